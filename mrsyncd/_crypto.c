/*
 * mrsyncd._crypto: the AEAD of every multicast datagram, in C.
 *
 * Only the per-datagram sealing and opening live here (the pattern of
 * aioquic's _crypto.c): everything else about a datagram is Python, in
 * mrsyncd/wire/datagram.py, which falls back to the `cryptography` package when
 * this module is absent.  The reason for C is the cost of a call: this keeps
 * one OpenSSL cipher context per key and per direction, so a datagram costs
 * one IV reset and one pass over its bytes (about 0.8 us for 1408 bytes with
 * AES-NI), where cryptography 38 (Debian 12) builds a fresh context per call
 * (about 9 us).
 *
 * The nonce of a datagram is 4 zero bytes and its 64-bit sequence number,
 * big-endian: unique for as long as the key is, since a key serves one run
 * of one transfer and its sender numbers every datagram once.
 *
 * `AEAD.seal_blocks` seals a sender's run of consecutive whole blocks of one
 * file into datagrams end to end, one call for up to a batch (`sendmsg` takes
 * the buffer as it is), where a call a datagram cost the send loop a slice,
 * a header and a join for each.
 *
 * `receive` is a receiver's read loop: one recvmmsg for up to a batch of
 * datagrams, each checked and opened into one buffer, and consecutive
 * blocks of a file gathered into runs, so that Python does its bookkeeping
 * and its write once per run, not once per datagram.  It knows the clear
 * header's layout (mrsyncd/wire/datagram.py, docs/PROTOCOL.md section 3); the
 * pure-Python twin is `mrsyncd.engine.intake.python_receive`, and the contract
 * tests in tests/integration/test_intake.py hold the two to the same answers.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define TAG_SIZE 16
#define NONCE_SIZE 12
#define KEY_SIZE 32

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *seal_ctx;
    EVP_CIPHER_CTX *open_ctx;
} AEADObject;

static PyTypeObject AEADType;


static void
nonce_of(unsigned long long sequence, unsigned char nonce[NONCE_SIZE])
{
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (unsigned char)(sequence >> (56 - 8 * i));
}

static EVP_CIPHER_CTX *
new_context(const EVP_CIPHER *cipher, const unsigned char *key, int encrypt)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL)
        return NULL;
    if (!EVP_CipherInit_ex(ctx, cipher, NULL, NULL, NULL, encrypt)
        || !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_IVLEN, NONCE_SIZE, NULL)
        || !EVP_CipherInit_ex(ctx, NULL, NULL, key, NULL, encrypt)) {
        EVP_CIPHER_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

static int
AEAD_init(AEADObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"cipher", "key", NULL};
    const char *name;
    Py_buffer key;
    const EVP_CIPHER *cipher;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sy*", keywords, &name, &key))
        return -1;
    if (strcmp(name, "aes-256-gcm") == 0)
        cipher = EVP_aes_256_gcm();
    else if (strcmp(name, "chacha20-poly1305") == 0)
        cipher = EVP_chacha20_poly1305();
    else {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "unknown cipher %s", name);
        return -1;
    }
    if (key.len != KEY_SIZE) {
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "a key is %d bytes, not %zd", KEY_SIZE, key.len);
        return -1;
    }
    EVP_CIPHER_CTX_free(self->seal_ctx);
    EVP_CIPHER_CTX_free(self->open_ctx);
    self->seal_ctx = new_context(cipher, key.buf, 1);
    self->open_ctx = new_context(cipher, key.buf, 0);
    PyBuffer_Release(&key);
    if (self->seal_ctx == NULL || self->open_ctx == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up the cipher");
        return -1;
    }
    return 0;
}

static void
AEAD_dealloc(AEADObject *self)
{
    EVP_CIPHER_CTX_free(self->seal_ctx);
    EVP_CIPHER_CTX_free(self->open_ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Seal header (clear) and payload into out: header, ciphertext, tag; 0 on failure. */
static int
seal_into(EVP_CIPHER_CTX *ctx, const unsigned char *header, int header_size, const unsigned char *payload,
          int length, unsigned long long sequence, unsigned char *out)
{
    unsigned char nonce[NONCE_SIZE];
    int n;

    memcpy(out, header, header_size);
    nonce_of(sequence, nonce);
    return EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 1)
        && EVP_CipherUpdate(ctx, NULL, &n, header, header_size)
        && EVP_CipherUpdate(ctx, out + header_size, &n, payload, length)
        && EVP_CipherFinal_ex(ctx, out + header_size + n, &n)
        && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_SIZE, out + header_size + length);
}

PyDoc_STRVAR(AEAD_seal_doc,
"seal(header, payload, sequence) -> header + ciphertext + tag\n\n"
"The header is authenticated and left clear; the payload is encrypted.");

static PyObject *
AEAD_seal(AEADObject *self, PyObject *args)
{
    Py_buffer header, payload;
    unsigned long long sequence;
    PyObject *out = NULL;

    if (!PyArg_ParseTuple(args, "y*y*K", &header, &payload, &sequence))
        return NULL;
    if (header.len > INT_MAX || payload.len > INT_MAX - header.len - TAG_SIZE) {
        PyErr_SetString(PyExc_ValueError, "datagram too long");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, header.len + payload.len + TAG_SIZE);
    if (out == NULL)
        goto done;
    if (!seal_into(self->seal_ctx, header.buf, (int)header.len, payload.buf, (int)payload.len, sequence,
                   (unsigned char *)PyBytes_AS_STRING(out))) {
        Py_CLEAR(out);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not seal a datagram");
    }
done:
    PyBuffer_Release(&header);
    PyBuffer_Release(&payload);
    return out;
}

/*
 * Open a datagram of a clear header of header_size bytes, length bytes of
 * ciphertext and the tag, into out; 0 if it does not authenticate.
 */
static int
open_into(EVP_CIPHER_CTX *ctx, const unsigned char *in, int header_size, int length,
          unsigned long long sequence, unsigned char *out)
{
    unsigned char nonce[NONCE_SIZE];
    unsigned char tag[TAG_SIZE];
    int n;

    memcpy(tag, in + header_size + length, TAG_SIZE);
    nonce_of(sequence, nonce);
    return EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, 0)
        && EVP_CipherUpdate(ctx, NULL, &n, in, header_size)
        && EVP_CipherUpdate(ctx, out, &n, in + header_size, length)
        && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_SIZE, tag)
        && EVP_CipherFinal_ex(ctx, out + n, &n) > 0;
}

PyDoc_STRVAR(AEAD_open_doc,
"open(datagram, header_size, sequence) -> payload, or None\n\n"
"None when the datagram is shorter than a header and a tag, or does not\n"
"authenticate under this key and nonce.");

static PyObject *
AEAD_open(AEADObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t header_size;
    unsigned long long sequence;
    PyObject *out = NULL;

    if (!PyArg_ParseTuple(args, "y*nK", &data, &header_size, &sequence))
        return NULL;
    Py_ssize_t length = data.len - header_size - TAG_SIZE;
    if (header_size < 0 || length < 0 || data.len > INT_MAX) {
        PyBuffer_Release(&data);
        Py_RETURN_NONE;
    }
    out = PyBytes_FromStringAndSize(NULL, length);
    if (out == NULL)
        goto done;
    if (!open_into(self->open_ctx, data.buf, (int)header_size, (int)length, sequence,
                   (unsigned char *)PyBytes_AS_STRING(out))) {
        Py_DECREF(out);
        out = Py_None;
        Py_INCREF(out);
    }
done:
    PyBuffer_Release(&data);
    return out;
}

/* The clear header (mrsyncd/wire/datagram.py). */
#define VERSION 11 /* datagram.VERSION, which checks it (the module exports it): a stale build is not used */
#define KIND_DATA 1
#define KIND_ECHO 3
#define HEADER_SIZE 24
#define OVERHEAD (HEADER_SIZE + TAG_SIZE)
#define WIRE_ID_SIZE 4 /* the transfer id's first bytes, as datagram.WIRE_ID_SIZE */
#define MAX_BATCH 256
/* The order of `mrsyncd.engine.intake.REJECTIONS`. */
enum { R_SHORT, R_VERSION, R_KIND, R_FOREIGN, R_TAG, R_COUNT };

static uint32_t
be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Append a run (kind, file, first block, count, offset, bytes, sequence) as a tuple; -1 on error. */
static int
append_run(PyObject *runs, const long long run[7])
{
    PyObject *t = Py_BuildValue("(LLLLLLL)", run[0], run[1], run[2], run[3], run[4], run[5], run[6]);
    if (t == NULL)
        return -1;
    int failed = PyList_Append(runs, t);
    Py_DECREF(t);
    return failed;
}

/* The kernel's arrival time of a message in microseconds, or now's. */
static long long
arrival_us(struct msghdr *msg)
{
    struct cmsghdr *c;
    struct timespec ts;

    for (c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS
            && c->cmsg_len >= CMSG_LEN(sizeof ts)) {
            memcpy(&ts, CMSG_DATA(c), sizeof ts);
            return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
        }
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

PyDoc_STRVAR(receive_doc,
"receive(aead, fd, wire_id, out, block_size, batch, sample)\n"
"    -> (runs, got, seq_max, owd_sum, owd_min, owd_count, rejected, more)\n\n"
"Read up to ``batch`` datagrams from the non-blocking socket ``fd`` and\n"
"open those of ``wire_id`` under ``aead`` into ``out``, one payload\n"
"after another.  See `mrsyncd.engine.intake.Batch` for the answer.");

static PyObject *
receive(PyObject *module, PyObject *args)
{
    AEADObject *aead;
    int fd;
    Py_buffer tid, out;
    Py_ssize_t block_size;
    int batch, sample;
    PyObject *runs = NULL, *result = NULL;
    unsigned char *raw = NULL;

    if (!PyArg_ParseTuple(args, "O!iy*w*nii", &AEADType, &aead, &fd, &tid, &out, &block_size,
                          &batch, &sample))
        return NULL;
    Py_ssize_t slot = OVERHEAD + block_size + 1;
    if (tid.len != WIRE_ID_SIZE || block_size < 1 || block_size > 65535 || batch < 1
        || batch > MAX_BATCH || sample < 1 || out.len < (Py_ssize_t)batch * (block_size + 1)) {
        PyErr_SetString(PyExc_ValueError, "bad receive arguments");
        goto done;
    }
    raw = malloc((size_t)batch * slot);
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    char control[MAX_BATCH][CMSG_SPACE(sizeof(struct timespec)) + 64];
    if (raw == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memset(msgs, 0, sizeof(struct mmsghdr) * batch);
    for (int i = 0; i < batch; i++) {
        iovs[i].iov_base = raw + (size_t)i * slot;
        iovs[i].iov_len = slot;
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = control[i];
        msgs[i].msg_hdr.msg_controllen = sizeof control[i];
    }
    int count;
    Py_BEGIN_ALLOW_THREADS
    do {
        count = recvmmsg(fd, msgs, batch, MSG_DONTWAIT, NULL);
    } while (count < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    if (count < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        count = 0;
    }
    runs = PyList_New(0);
    if (runs == NULL)
        goto done;
    long long rejected[R_COUNT] = {0};
    long long got = 0, seq_max = -1, owd_sum = 0, owd_min = 0, owd_count = 0;
    Py_ssize_t offset = 0;
    /* The open run: kind, file, first block, count, offset, bytes, sequence. */
    long long run[7] = {0};
    int have_run = 0, run_full = 0;
    unsigned char *payloads = out.buf;

    for (int i = 0; i < count; i++) {
        const unsigned char *d = iovs[i].iov_base;
        Py_ssize_t len = msgs[i].msg_len;
        if (len < OVERHEAD) {
            rejected[R_SHORT]++;
            continue;
        }
        if (d[0] != VERSION) {
            rejected[R_VERSION]++;
            continue;
        }
        int kind = d[1];
        if (kind < KIND_DATA || kind > KIND_ECHO) {
            rejected[R_KIND]++;
            continue;
        }
        if (memcmp(d + 2, tid.buf, WIRE_ID_SIZE) != 0) {
            rejected[R_FOREIGN]++;
            continue;
        }
        unsigned long long sequence = (unsigned long long)(d[6] << 8 | d[7]) << 32 | be32(d + 8);
        int length = (int)(len - OVERHEAD);
        if ((msgs[i].msg_hdr.msg_flags & MSG_TRUNC)
            || !open_into(aead->open_ctx, d, HEADER_SIZE, length, sequence, payloads + offset)) {
            rejected[R_TAG]++;
            continue;
        }
        got++;
        if ((long long)sequence > seq_max)
            seq_max = (long long)sequence;
        if (sequence % sample == 0) {
            long long now = arrival_us(&msgs[i].msg_hdr);
            /* The clocks differ by a constant: the difference modulo 2**32, signed. */
            long long owd = (int32_t)(uint32_t)(now - be32(d + 20));
            owd_min = owd_count ? (owd < owd_min ? owd : owd_min) : owd;
            owd_sum += owd;
            owd_count++;
        }
        long long file = be32(d + 12), block = be32(d + 16);
        if (have_run && kind == KIND_DATA && run[0] == KIND_DATA && run_full && run[1] == file
            && run[2] + run[3] == block) {
            run[3]++;
            run[5] += length;
            run[6] = (long long)sequence;
        } else {
            if (have_run && append_run(runs, run) < 0)
                goto done;
            run[0] = kind, run[1] = file, run[2] = block, run[3] = 1;
            run[4] = offset, run[5] = length, run[6] = (long long)sequence;
            have_run = 1;
        }
        run_full = length == block_size;
        offset += length;
    }
    if (have_run && append_run(runs, run) < 0)
        goto done;
    result = Py_BuildValue("(OLLLLL(LLLLL)O)", runs, got, seq_max, owd_sum, owd_min, owd_count,
                           rejected[R_SHORT], rejected[R_VERSION], rejected[R_KIND],
                           rejected[R_FOREIGN], rejected[R_TAG], count == batch ? Py_True : Py_False);
done:
    free(raw);
    Py_XDECREF(runs);
    PyBuffer_Release(&tid);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(AEAD_seal_blocks_doc,
"seal_blocks(header, data, offset, block_size, count) -> datagrams\n\n"
"count datagrams back to back, one call for a sender's run of consecutive\n"
"blocks of one file: the i-th seals data[offset + i * block_size:][:block_size]\n"
"under header (the first's, packed by datagram.py) with its sequence number\n"
"and its block index each raised by i.");

/* Raise the big-endian integer of width bytes at p by add; 0 if it overflows. */
static int
add_be(unsigned char *p, int width, unsigned long long add)
{
    unsigned long long value = 0;
    for (int i = 0; i < width; i++)
        value = value << 8 | p[i];
    unsigned long long limit = width == 8 ? ~0ULL : (1ULL << (8 * width)) - 1;
    if (add > limit - value)
        return 0;
    value += add;
    for (int i = width - 1; i >= 0; i--, value >>= 8)
        p[i] = (unsigned char)value;
    return 1;
}

static PyObject *
AEAD_seal_blocks(AEADObject *self, PyObject *args)
{
    Py_buffer header, data;
    Py_ssize_t offset, block_size, count;
    PyObject *out = NULL;

    if (!PyArg_ParseTuple(args, "y*y*nnn", &header, &data, &offset, &block_size, &count))
        return NULL;
    unsigned char first[HEADER_SIZE], last[HEADER_SIZE];
    if (header.len != HEADER_SIZE) {
        PyErr_Format(PyExc_ValueError, "a header is %d bytes, not %zd", HEADER_SIZE, header.len);
        goto done;
    }
    if (offset < 0 || block_size < 0 || count < 1 || block_size > INT_MAX - OVERHEAD
        || count > (PY_SSIZE_T_MAX - OVERHEAD) / (block_size + OVERHEAD)
        || offset > data.len || (block_size && (data.len - offset) / block_size < count)) {
        PyErr_SetString(PyExc_ValueError, "the blocks lie outside data");
        goto done;
    }
    memcpy(first, header.buf, HEADER_SIZE);
    memcpy(last, header.buf, HEADER_SIZE);
    /* The last datagram's sequence (48 bits at 6) and block index (32 bits at 16) must fit. */
    if (!add_be(last + 6, 6, (unsigned long long)count - 1) || !add_be(last + 16, 4, (unsigned long long)count - 1)) {
        PyErr_SetString(PyExc_OverflowError, "the run's sequence numbers or block indexes overflow");
        goto done;
    }
    unsigned long long sequence = 0;
    for (int i = 6; i < 12; i++)
        sequence = sequence << 8 | first[i];
    Py_ssize_t size = HEADER_SIZE + block_size + TAG_SIZE;
    out = PyBytes_FromStringAndSize(NULL, size * count);
    if (out == NULL)
        goto done;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *in = (const unsigned char *)data.buf + offset;
    int sealed = 1;
    for (Py_ssize_t i = 0; i < count && sealed; i++) {
        sealed = seal_into(self->seal_ctx, first, HEADER_SIZE, in + i * block_size, (int)block_size,
                           sequence + (unsigned long long)i, p + i * size);
        add_be(first + 6, 6, 1);
        add_be(first + 16, 4, 1);
    }
    if (!sealed) {
        Py_CLEAR(out);
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not seal a datagram");
    }
done:
    PyBuffer_Release(&header);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef AEAD_methods[] = {
    {"seal", (PyCFunction)AEAD_seal, METH_VARARGS, AEAD_seal_doc},
    {"open", (PyCFunction)AEAD_open, METH_VARARGS, AEAD_open_doc},
    {"seal_blocks", (PyCFunction)AEAD_seal_blocks, METH_VARARGS, AEAD_seal_blocks_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AEADType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mrsyncd._crypto.AEAD",
    .tp_doc = PyDoc_STR("AEAD(cipher, key): one key's sealing and opening contexts."),
    .tp_basicsize = sizeof(AEADObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)AEAD_init,
    .tp_dealloc = (destructor)AEAD_dealloc,
    .tp_methods = AEAD_methods,
};

static PyMethodDef module_methods[] = {
    {"receive", (PyCFunction)receive, METH_VARARGS, receive_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mrsyncd._crypto",
    .m_doc = "The datagram AEAD, with OpenSSL contexts kept per key, and a receiver's read loop.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__crypto(void)
{
    if (PyType_Ready(&AEADType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&AEADType);
    if (PyModule_AddObject(m, "AEAD", (PyObject *)&AEADType) < 0) {
        Py_DECREF(&AEADType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "VERSION", VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
