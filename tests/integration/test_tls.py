"""
Certificates, mutual TLS and ``mrsync-ca``, for real.

Every handshake here is a real TLS handshake over loopback TCP, on the real
reactor, with certificates made by `mrsyncd.security.certs` in a temporary directory.
Hostile clients (no certificate, a foreign CA, an expired certificate, a
master certificate used as a client) are built with Twisted's own API, since
`mrsyncd.security.tls.client_options` refuses to load such files in the first place.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from mrsyncd.security import certs, tls

#: pyOpenSSL 24.3 and later deprecate being given their own X509 and PKey
#: objects (they are to go): mrsyncd gives them `cryptography`'s.
pytestmark = pytest.mark.filterwarnings("error:Passing pyOpenSSL:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MASTER = "master.test"


def temp_dir(testcase: unittest.TestCase) -> str:
    path = tempfile.mkdtemp(prefix="mrsyncd-tls-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class Cluster:
    """A CA in ``base/ca`` and certificates issued by it into ``base/certs``."""

    def __init__(self, base: str) -> None:
        self.ca_dir = os.path.join(base, "ca")
        self.out = os.path.join(base, "certs")
        certs.create_ca(self.ca_dir, "test CA", 30)
        self.ca = os.path.join(self.ca_dir, certs.CA_CERT)

    def issue(self, role: str, name: str, **kw: object) -> tuple[str, str]:
        certs.issue(self.ca_dir, role, name, self.out, **kw)  # type: ignore[arg-type]
        return os.path.join(self.out, name + ".crt"), os.path.join(self.out, name + ".key")


def raw_credentials(cert_path: str, key_path: str) -> dict[str, object]:
    """A certificate and key from files for CertificateOptions, with none of mrsyncd.security.tls's checks."""
    cert, key = tls.context_credentials(certs.load_certificate(cert_path), certs.load_private_key(key_path))
    return {"certificate": cert, "privateKey": key}


def raw_client(ca_path: str, cert_path: str, key_path: str, **extra: object) -> object:
    """Client options to dial the master with a certificate from files, as they are."""
    options = {**raw_credentials(cert_path, key_path), **extra}
    return optionsForClientTLS(MASTER, trustRoot=raw_ca(ca_path), extraCertificateOptions=options)


def raw_ca(path: str) -> Certificate:
    with open(path, "rb") as f:
        return Certificate.loadPEM(f.read())


@implementer(IHandshakeListener)
class ServerSide(protocol.Protocol):
    """Records who the handshake says the peer is, and tells the peer."""

    factory: ServerFactory

    def handshakeCompleted(self) -> None:
        identity = tls.peer_identity(self.transport)
        self.factory.identities.append(identity)
        self.transport.write(f"{identity.name} {identity.role}\n".encode())

    def connectionLost(self, reason: object = None) -> None:
        # Wrapped: a Deferred fired with a Failure would errback.
        self.factory.lost.put([reason])


class ServerFactory(protocol.Factory):
    protocol = ServerSide

    def __init__(self) -> None:
        self.identities: list[tls.PeerIdentity] = []
        self.lost: defer.DeferredQueue = defer.DeferredQueue()


@implementer(IHandshakeListener)
class ClientSide(protocol.Protocol):
    """Reads the server's one-line answer, then hangs up."""

    def __init__(self) -> None:
        self.received = b""
        self.server: tls.PeerIdentity | None = None
        self.closed: defer.Deferred = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.server = tls.peer_identity(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"\n"):
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback([reason])


def assert_tls_error(testcase: unittest.TestCase, reason, fragment: str) -> None:
    """
    ``reason`` is an OpenSSL error mentioning ``fragment``.

    The refused client learns *why* from the server's alert ("unknown ca",
    "certificate expired", ...).  OpenSSL 3.0 spells these "sslv3 alert ..."
    or "tlsv13 alert ...", newer ones "tls alert ...", so only the alert's
    own name is compared.
    """
    reason.trap(SSL.Error)
    testcase.assertIn(fragment, str(reason.value))


class HandshakeTests(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.cluster = Cluster(temp_dir(self))
        self.master = self.cluster.issue("master", MASTER, ip_addresses=["127.0.0.1"])
        self.node = self.cluster.issue("node", "node1")
        self.operator = self.cluster.issue("operator", "alice")

    def listen(self, options: object | None = None) -> defer.Deferred:
        """Start a server on a free loopback port; fires with the factory."""
        if options is None:
            options = tls.server_options(self.cluster.ca, *self.master)
        factory = ServerFactory()
        endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
        d = endpoint.listen(factory)

        def listening(port: object) -> ServerFactory:
            self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
            factory.port = port.getHost().port  # type: ignore[attr-defined]
            return factory

        return d.addCallback(listening)

    @defer.inlineCallbacks
    def exchange(self, factory: ServerFactory, client_options: object):
        """Connect, wait until both sides have closed; returns (client, client reason, server reason)."""
        endpoint = endpoints.wrapClientTLS(
            client_options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", factory.port)
        )
        client = yield endpoints.connectProtocol(endpoint, ClientSide())
        [client_reason] = yield client.closed
        [server_reason] = yield factory.lost.get()
        return client, client_reason, server_reason

    @defer.inlineCallbacks
    def assert_refused(self, client_options: object, server_options: object | None = None):
        """The handshake fails: the server never learns an identity, the client never hears back."""
        factory = yield self.listen(server_options)
        client, client_reason, server_reason = yield self.exchange(factory, client_options)
        self.assertEqual(factory.identities, [])
        self.assertEqual(client.received, b"")
        self.assertFalse(client_reason.check(ConnectionDone), client_reason)
        return client_reason, server_reason

    @defer.inlineCallbacks
    def test_node_and_operator_are_identified(self):
        factory = yield self.listen()
        for (cert, key), expected in [(self.node, ("node1", "node")), (self.operator, ("alice", "operator"))]:
            options = tls.client_options(self.cluster.ca, cert, key, MASTER)
            client, client_reason, server_reason = yield self.exchange(factory, options)
            identity = factory.identities[-1]
            loaded = certs.load_certificate(cert)
            fingerprint = loaded.fingerprint(hashes.SHA256()).hex()
            self.assertEqual(identity, (*expected, loaded.serial_number, (), fingerprint))
            self.assertEqual(client.received, "{} {}\n".format(*expected).encode())
            master = certs.load_certificate(self.master[0])
            master_fingerprint = master.fingerprint(hashes.SHA256()).hex()
            self.assertEqual(client.server, (MASTER, "master", master.serial_number, (), master_fingerprint))
            client_reason.trap(ConnectionDone)
        self.assertEqual([i.role for i in factory.identities], ["node", "operator"])

    @defer.inlineCallbacks
    def test_master_checked_by_ip_address(self):
        factory = yield self.listen()
        options = tls.client_options(self.cluster.ca, *self.node, "127.0.0.1")
        client, _, _ = yield self.exchange(factory, options)
        self.assertEqual(client.received, b"node1 node\n")

    @defer.inlineCallbacks
    def test_client_without_certificate_is_refused(self):
        options = optionsForClientTLS(MASTER, trustRoot=raw_ca(self.cluster.ca))
        client_reason, server_reason = yield self.assert_refused(options)
        assert_tls_error(self, client_reason, "certificate required")
        assert_tls_error(self, server_reason, "peer did not return a certificate")

    @defer.inlineCallbacks
    def test_certificate_from_foreign_ca_is_refused(self):
        foreign = Cluster(temp_dir(self))
        cert, key = foreign.issue("node", "node1")
        options = raw_client(self.cluster.ca, cert, key)
        client_reason, server_reason = yield self.assert_refused(options)
        assert_tls_error(self, client_reason, "unknown ca")
        assert_tls_error(self, server_reason, "certificate verify failed")

    @defer.inlineCallbacks
    def test_expired_certificate_is_refused(self):
        now = certs.utcnow()
        cert, key = self.cluster.issue(
            "node",
            "old-node",
            not_before=now - datetime.timedelta(days=10),
            not_after=now - datetime.timedelta(days=1),
        )
        # Through mrsyncd's own loader: it warns, but the server must refuse.
        options = tls.client_options(self.cluster.ca, cert, key, MASTER)
        client_reason, server_reason = yield self.assert_refused(options)
        assert_tls_error(self, client_reason, "certificate expired")
        assert_tls_error(self, server_reason, "certificate verify failed")

    @defer.inlineCallbacks
    def test_master_certificate_cannot_dial_in(self):
        # Only clientAuth certificates can be clients: OpenSSL checks the EKU.
        options = raw_client(self.cluster.ca, *self.master)
        client_reason, server_reason = yield self.assert_refused(options)
        assert_tls_error(self, client_reason, "unsupported certificate")
        assert_tls_error(self, server_reason, "certificate verify failed")

    @defer.inlineCallbacks
    def test_node_certificate_cannot_serve(self):
        # A node certificate for the right name still lacks serverAuth.
        cert, key = self.cluster.issue("node", "impostor", dns_names=[MASTER])
        server = CertificateOptions(trustRoot=raw_ca(self.cluster.ca), **raw_credentials(cert, key))
        options = tls.client_options(self.cluster.ca, *self.node, MASTER)
        client_reason, server_reason = yield self.assert_refused(options, server)
        assert_tls_error(self, client_reason, "certificate verify failed")
        assert_tls_error(self, server_reason, "unsupported certificate")

    @defer.inlineCallbacks
    def test_tls_1_2_is_refused(self):
        options = raw_client(self.cluster.ca, *self.node, lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
        client_reason, server_reason = yield self.assert_refused(options)
        assert_tls_error(self, client_reason, "protocol version")
        assert_tls_error(self, server_reason, "unsupported protocol")

    @defer.inlineCallbacks
    def test_client_refuses_master_with_another_name(self):
        other = self.cluster.issue("master", "other.test")
        factory = yield self.listen(tls.server_options(self.cluster.ca, *other))
        options = tls.client_options(self.cluster.ca, *self.node, MASTER)
        client, client_reason, _ = yield self.exchange(factory, options)
        self.assertEqual(client.received, b"")
        client_reason.trap(VerificationError)


class LoadingTests(unittest.SynchronousTestCase):
    """Bad files are reported at start-up, naming the file."""

    def setUp(self) -> None:
        self.base = temp_dir(self)
        self.cluster = Cluster(self.base)
        self.master = self.cluster.issue("master", MASTER)
        self.node = self.cluster.issue("node", "node1")

    def assert_error(self, path: str, call, *args: object) -> None:
        e = self.assertRaises(certs.CertificateFileError, call, *args)
        self.assertIn(path, str(e))

    def test_missing_files(self) -> None:
        missing = os.path.join(self.base, "missing.crt")
        self.assert_error(missing, tls.server_options, missing, *self.master)
        self.assert_error(missing, tls.server_options, self.cluster.ca, missing, self.master[1])
        self.assert_error(missing, tls.client_options, self.cluster.ca, self.node[0], missing, MASTER)

    def test_garbage_files(self) -> None:
        garbage = os.path.join(self.base, "garbage.pem")
        with open(garbage, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        self.assert_error(garbage, tls.server_options, garbage, *self.master)
        self.assert_error(garbage, tls.server_options, self.cluster.ca, self.master[0], garbage)
        # A key where a certificate belongs, and a certificate where a key belongs.
        self.assert_error(self.master[1], tls.server_options, self.cluster.ca, self.master[1], self.master[1])
        self.assert_error(self.master[0], tls.server_options, self.cluster.ca, self.master[0], self.master[0])

    def test_mismatched_key(self) -> None:
        self.assert_error(self.node[1], tls.server_options, self.cluster.ca, self.master[0], self.node[1])

    def test_wrong_role_for_the_side(self) -> None:
        self.assert_error(self.node[0], tls.server_options, self.cluster.ca, *self.node)
        self.assert_error(self.master[0], tls.client_options, self.cluster.ca, *self.master, MASTER)

    def test_ca_must_be_a_ca(self) -> None:
        self.assert_error(self.master[0], tls.client_options, self.master[0], *self.node, MASTER)

    def test_certificate_from_another_ca(self) -> None:
        foreign = Cluster(os.path.join(self.base, "foreign"))
        cert, key = foreign.issue("node", "node1")
        self.assert_error(cert, tls.client_options, self.cluster.ca, cert, key, MASTER)

    def test_peer_identity_without_certificate(self) -> None:
        class NoCertificate:
            def getPeerCertificate(self) -> None:
                return None

        self.assertRaises(tls.PeerIdentityError, tls.peer_identity, NoCertificate())
        self.assertRaises(tls.PeerIdentityError, tls.peer_identity, object())


class CertificateTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.base = temp_dir(self)
        self.cluster = Cluster(self.base)

    def test_node_tags(self) -> None:
        tagged = certs.issue(
            self.cluster.ca_dir, "node", "n1", self.cluster.out, tags=["gpu", "rack-2", "gpu"]
        )
        self.assertEqual(certs.tags_of(tagged), ("gpu", "rack-2"))
        self.assertIn("tags:        gpu, rack-2", certs.describe(tagged))
        self.assertEqual(certs.tags_of(certs.issue(self.cluster.ca_dir, "node", "n2", self.cluster.out)), ())
        with self.assertRaisesRegex(certs.CertError, "only node certificates carry tags"):
            certs.issue(self.cluster.ca_dir, "operator", "o", self.cluster.out, tags=["gpu"])
        with self.assertRaisesRegex(certs.CertError, "bad tag 'a b'"):
            certs.issue(self.cluster.ca_dir, "node", "n3", self.cluster.out, tags=["a b"])
        # Many tags (a long form DER length), and what is not our encoding.
        many = [f"t{i:03d}" for i in range(60)]
        self.assertEqual(
            certs.tags_of(certs.issue(self.cluster.ca_dir, "node", "n4", self.cluster.out, tags=many)),
            tuple(many),
        )
        for bad in (b"", b"\x31\x00", b"\x30\x05\x0c\x03gp", b"\x30\x02\x04\x00", b"\x30\x00\x00"):
            with self.assertRaises(ValueError):
                certs._strings_from_der(bad)

    def test_role_and_names(self) -> None:
        cert = certs.issue(
            self.cluster.ca_dir,
            "master",
            MASTER,
            self.cluster.out,
            dns_names=["mrsync.test"],
            ip_addresses=["127.0.0.1", "::1"],
        )
        self.assertEqual(certs.role_of(cert), "master")
        self.assertEqual(certs.name_of(cert), MASTER)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), [MASTER, "mrsync.test"])
        self.assertEqual([str(a) for a in san.get_values_for_type(x509.IPAddress)], ["127.0.0.1", "::1"])
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(
            list(eku), [ExtendedKeyUsageOID.SERVER_AUTH, ObjectIdentifier("1.3.6.1.4.1.55555.7717.1")]
        )
        for role, purpose in [("node", "CLIENT_AUTH"), ("operator", "CLIENT_AUTH")]:
            c = certs.issue(self.cluster.ca_dir, role, role + "1", self.cluster.out)
            self.assertEqual(certs.role_of(c), role)
            eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            self.assertIn(getattr(ExtendedKeyUsageOID, purpose), list(eku))
            self.assertNotIn(ExtendedKeyUsageOID.SERVER_AUTH, list(eku))

    def forge(self, eku: list[ObjectIdentifier] | None) -> x509.Certificate:
        """A certificate signed by the real CA, with whatever purposes we like."""
        ca_cert = certs.load_certificate(self.cluster.ca)
        ca_key = certs.load_private_key(os.path.join(self.cluster.ca_dir, certs.CA_KEY))
        key = ec.generate_private_key(ec.SECP256R1())
        now = certs.utcnow()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        return builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]

    def test_missing_or_ambiguous_role_is_refused(self) -> None:
        arc = certs.ROLE_ARC
        for eku in [
            None,
            [ExtendedKeyUsageOID.CLIENT_AUTH],
            [ExtendedKeyUsageOID.CLIENT_AUTH, ObjectIdentifier(arc + ".2"), ObjectIdentifier(arc + ".3")],
            [ExtendedKeyUsageOID.CLIENT_AUTH, ObjectIdentifier(arc + ".9")],
        ]:
            self.assertRaises(certs.RoleError, certs.role_of, self.forge(eku))
        # The CA itself is nobody.
        self.assertRaises(certs.RoleError, certs.role_of, certs.load_certificate(self.cluster.ca))

    def test_keys_are_0600_whatever_the_umask(self) -> None:
        old = os.umask(0)
        try:
            cert, key = self.cluster.issue("node", "node1")
            ca_dir = os.path.join(self.base, "ca2")
            certs.create_ca(ca_dir)
        finally:
            os.umask(old)
        for path in [
            key,
            os.path.join(ca_dir, certs.CA_KEY),
            os.path.join(self.cluster.ca_dir, certs.CA_KEY),
        ]:
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, path)
        self.assertEqual(stat.S_IMODE(os.stat(cert).st_mode), 0o644)
        self.assertEqual(sorted(os.listdir(self.cluster.out)), ["node1.crt", "node1.key"])

    def test_nothing_is_replaced_without_force(self) -> None:
        cert, key = self.cluster.issue("node", "node1")
        with open(key, "rb") as f:
            before = f.read()
        self.assertRaises(certs.CertError, self.cluster.issue, "node", "node1")
        self.assertRaises(certs.CertError, certs.create_ca, self.cluster.ca_dir)
        with open(key, "rb") as f:
            self.assertEqual(f.read(), before)
        self.cluster.issue("node", "node1", force=True)
        with open(key, "rb") as f:
            self.assertNotEqual(f.read(), before)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)

    def test_bad_names_and_roles(self) -> None:
        for name in ["../evil", "a/b", "", "-x", "a b"]:
            self.assertRaises(certs.CertError, self.cluster.issue, "node", name)
        self.assertRaises(certs.CertError, self.cluster.issue, "admin", "node1")
        self.assertFalse(os.path.exists(self.cluster.out))

    def test_validity_is_clamped_to_the_ca(self) -> None:
        cert = certs.issue(self.cluster.ca_dir, "node", "node1", self.cluster.out, days=3650)
        ca = certs.load_certificate(self.cluster.ca)
        self.assertEqual(certs.validity(cert)[1], certs.validity(ca)[1])


class ReactorFromThread:
    """A clock whose callFromThread calls at once: what a signal handler needs of a reactor, and no more."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.clock, name)

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802
        f(*args)


class RevocationsTests(unittest.SynchronousTestCase):
    """A daemon's view of the revocation list: read at start, reread when it changes."""

    def setUp(self) -> None:
        self.base = temp_dir(self)
        self.ca_dir = os.path.join(self.base, "ca")
        certs.create_ca(self.ca_dir, "test CA", 30)
        self.ca = os.path.join(self.ca_dir, "ca.crt")
        self.crl = os.path.join(self.ca_dir, certs.CRL)

    def test_missing_or_foreign_list_stops_the_start(self) -> None:
        with self.assertRaisesRegex(certs.CertificateFileError, "revocation list .*crl.pem: No such file"):
            tls.Revocations(self.crl, self.ca)
        other = os.path.join(self.base, "other")
        certs.create_ca(other, "other CA", 30)
        certs.revoke(other, [5])
        with self.assertRaisesRegex(certs.CertificateFileError, "not a revocation list of the cluster CA"):
            tls.Revocations(os.path.join(other, certs.CRL), self.ca)

    def test_a_change_is_read_and_a_bad_copy_keeps_the_last_good_list(self) -> None:
        certs.revoke(self.ca_dir, [7])
        revocations = tls.Revocations(self.crl, self.ca)
        calls: list[frozenset[int]] = []
        revocations.on_change.append(lambda: calls.append(revocations.serials))
        self.assertTrue(revocations.revoked(7) and not revocations.revoked(8))
        self.assertFalse(revocations.reload())  # unchanged file: not even read
        certs.revoke(self.ca_dir, [8])
        self.assertTrue(revocations.reload())
        self.assertEqual(calls, [frozenset({7, 8})])
        with open(self.crl, "w") as f:
            f.write("garbage")
        self.assertFalse(revocations.reload())
        self.assertTrue(revocations.revoked(8))
        os.unlink(self.crl)
        self.assertFalse(revocations.reload())
        self.assertEqual(revocations.serials, frozenset({7, 8}))

    def test_a_hangup_rereads_the_list_at_once(self) -> None:
        """SIGHUP (``systemctl reload``) rereads the list without waiting for the next poll."""
        certs.revoke(self.ca_dir, [7])
        revocations = tls.Revocations(self.crl, self.ca)
        clock = Clock()  # the poll never comes: only the signal can reread the list
        watch = tls.RevocationWatch(ReactorFromThread(clock), revocations)
        watch.startService()
        self.addCleanup(watch.stopService)
        certs.revoke(self.ca_dir, [9])
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertTrue(revocations.revoked(9))
        watch.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)

    def test_no_list_revokes_nothing(self) -> None:
        revocations = tls.Revocations()
        self.assertFalse(revocations.reload())
        self.assertFalse(revocations.revoked(1))


class CommandLineTests(unittest.SynchronousTestCase):
    """``mrsync-ca`` as a user runs it, in a subprocess."""

    def setUp(self) -> None:
        self.base = temp_dir(self)

    def run_ca(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        return subprocess.run(
            [sys.executable, "-m", "mrsyncd.scripts.mrsync_ca", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.base,
            timeout=30,
        )

    def assert_fails(self, code: int, args: list[str], *fragments: str) -> None:
        result = self.run_ca(*args)
        self.assertEqual(result.returncode, code, result)
        self.assertEqual(result.stdout, "")
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("mrsync-ca: "), result.stderr)
        for fragment in fragments:
            self.assertIn(fragment, result.stderr)

    def test_revoke_by_name_and_by_serial(self) -> None:
        self.assertEqual(self.run_ca("init", "ca").returncode, 0)
        self.assertEqual(self.run_ca("issue", "ca", "--role", "node", "n1").returncode, 0)
        issued = self.run_ca("issue", "ca", "--role", "operator", "op", "--out", "elsewhere")
        self.assertEqual(issued.returncode, 0, issued)
        ca = certs.load_certificate(os.path.join(self.base, "ca", "ca.crt"))
        crl = os.path.join(self.base, "ca", certs.CRL)
        n1 = certs.load_certificate(os.path.join(self.base, "ca", "n1.crt")).serial_number
        op = certs.load_certificate(os.path.join(self.base, "elsewhere", "op.crt")).serial_number
        result = self.run_ca("revoke", "ca", "n1")
        self.assertEqual(result.returncode, 0, result)
        self.assertIn(f"revoked 'n1' (serial {n1:x})", result.stdout)
        self.assertEqual(certs.revoked_serials(crl, ca), {n1})
        # Not in the CA directory: by the serial 'show' prints.
        shown = self.run_ca("show", os.path.join("elsewhere", "op.crt")).stdout
        serial = next(line.split()[1] for line in shown.splitlines() if line.startswith("serial:"))
        self.assertEqual(self.run_ca("revoke", "ca", serial).returncode, 0)
        # Twice is harmless.
        self.assertEqual(self.run_ca("revoke", "ca", "n1").returncode, 0)
        self.assertEqual(certs.revoked_serials(crl, ca), {n1, op})
        self.assert_fails(1, ["revoke", "ca", "nobody"], "no ", "nobody.crt", "is no serial number")

    def test_init_issue_show(self) -> None:
        result = self.run_ca("init", "ca", "--name", "Lab CA", "--days", "100")
        self.assertEqual(result.returncode, 0, result)
        self.assertIn("Lab CA", result.stdout)
        result = self.run_ca(
            "issue", "ca", "--role", "master", MASTER, "--dns", "m.test", "--ip", "10.1.2.3", "--out", "out"
        )
        self.assertEqual(result.returncode, 0, result)
        crt, key = (
            os.path.join(self.base, "out", MASTER + ".crt"),
            os.path.join(self.base, "out", MASTER + ".key"),
        )
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.base, "ca", "ca.key")).st_mode), 0o600)
        cert = certs.load_certificate(crt)
        self.assertEqual((certs.name_of(cert), certs.role_of(cert)), (MASTER, "master"))
        result = self.run_ca("show", crt)
        self.assertEqual(result.returncode, 0, result)
        for fragment in ["role:        master", "master.test, m.test", "10.1.2.3", "CN=Lab CA"]:
            self.assertIn(fragment, result.stdout)
        # And the files really work for TLS.
        tls.server_options(os.path.join(self.base, "ca", "ca.crt"), crt, key)

    def test_refuses_to_overwrite(self) -> None:
        self.assertEqual(self.run_ca("init", "ca").returncode, 0)
        self.assert_fails(1, ["init", "ca"], "ca.crt already exists", "--force")
        self.assertEqual(self.run_ca("issue", "ca", "-r", "node", "n1").returncode, 0)
        self.assert_fails(1, ["issue", "ca", "-r", "node", "n1"], "n1.crt already exists")
        self.assertEqual(self.run_ca("issue", "ca", "-r", "node", "n1", "--force").returncode, 0)

    def test_usage_errors(self) -> None:
        self.assert_fails(2, ["issue", "ca", "--role", "admin", "n1"], "--role must be one of", "'admin'")
        self.assert_fails(2, ["issue", "ca", "n1"], "--role is required")
        self.assert_fails(2, ["issue", "ca", "--role", "node", "../n1"], "bad name")
        self.assert_fails(2, ["init", "ca", "--days", "zero"], "whole number")
        self.assert_fails(2, [], "say init, issue, show or revoke")
        self.assertFalse(os.path.exists(os.path.join(self.base, "ca")))

    def test_failures(self) -> None:
        self.assert_fails(1, ["show", "nope.crt"], "nope.crt", "No such file")
        self.assert_fails(1, ["issue", "nowhere", "--role", "node", "n1"], os.path.join("nowhere", "ca.crt"))
