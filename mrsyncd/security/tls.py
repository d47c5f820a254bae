"""
Mutual TLS for the control channel: who may connect, and who they are.

The master listens with `server_options`: a peer must present a certificate
signed by the cluster CA, or OpenSSL ends the handshake (no certificate, a
foreign CA, an expired certificate and a certificate for the wrong TLS purpose
are all refused before any application byte is read).  Nodes and operators
dial with `client_options`, which trusts only the cluster CA (never the
system's CAs) and checks the master's host name or IP address with
``service_identity``.

Authentication is not authorisation: once the handshake is done, the
protocol asks `peer_identity` for the peer's (name, role) from
``IHandshakeListener.handshakeCompleted`` and decides what that role may do.
`mrsyncd.security.certs` explains how the role is encoded.  Two consequences of that
encoding are enforced by OpenSSL itself: only a master certificate carries
``serverAuth``, so a node or operator certificate cannot impersonate the
master, and a master certificate carries no ``clientAuth``, so it cannot dial
in as a client.

With TLS 1.3 a client finishes its side of the handshake *before* the server
has judged the client's certificate; a rejected client learns of it from an
alert on its first read.  A client must therefore not treat its own
``handshakeCompleted`` as "accepted": it waits for the master's first answer.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import OpenSSL
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import crypto
from twisted.application import service
from twisted.internet import task
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)

from mrsyncd import logs
from mrsyncd.security.certs import (
    CertError,
    CertificateFileError,
    Role,
    load_certificate,
    load_private_key,
    name_of,
    public_key_der,
    revoked_serials,
    role_of,
    tags_of,
    utcnow,
    validity,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

__all__ = [
    "CertificateFileError",
    "PeerIdentity",
    "PeerIdentityError",
    "Revocations",
    "RevocationWatch",
    "client_options",
    "peer_identity",
    "server_options",
]

log = logs.logger(__name__)

#: Both ends are always mrsyncd on OpenSSL >= 3, so TLS 1.3 only (Twisted
#: 22.4 would otherwise still allow 1.0): no renegotiation, by which a TLS 1.2
#: peer could swap certificates after `peer_identity` has read one, and the
#: client's certificate (the node's name) is encrypted on the wire.
MINIMUM_TLS = TLSVersion.TLSv1_3


#: Private key types that sign in TLS 1.2 and 1.3.
_TLS_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class PeerIdentityError(Exception):
    """The peer's certificate does not say who it is or what it may do."""


class PeerIdentity(NamedTuple):
    """Who is on the other end of a TLS connection: its name, its role and its certificate's serial."""

    name: str
    role: Role
    serial: int = 0
    #: What a node certificate grants (`certs.tags_of`).
    tags: tuple[str, ...] = ()
    #: SHA-256 of the certificate (DER), hex, as `openssl x509 -fingerprint -sha256` shows it
    #: without colons: the audit log's record of which certificate acted.
    fingerprint: str = ""


#: How often a daemon looks whether its revocation list changed.
REVOCATION_POLL = 2.0


class Revocations:
    """
    The serial numbers the cluster CA revoked (``[tls] crl``, made by
    ``mrsync-ca revoke``), as this daemon last read them.  A list that is
    missing or not signed by the CA stops the daemon at start-up; one that
    goes bad later is logged and the last good one kept, so that a botched
    copy neither lets revoked peers back in nor locks everyone out.
    """

    def __init__(self, path: str = "", ca_path: str = "") -> None:
        """``path`` "": no list, nothing revoked."""
        self.path = path
        self._ca = _load_ca(ca_path) if path else None
        self._stamp: tuple[int, int, int] | None = None
        self.serials: frozenset[int] = frozenset()
        #: Called after a reload that changed the serials (`RevocationWatch`).
        self.on_change: list[Callable[[], None]] = []
        if path:
            self.reload()

    def revoked(self, serial: int) -> bool:
        return serial in self.serials

    def shut_out(self, identity: PeerIdentity, transport: Any, since: str = "is") -> bool:
        """
        If ``identity``'s certificate is revoked, say so and abort its
        connection: True.  ``since`` "was" for a connection dropped when the
        list changed, "is" for one refused after its handshake.
        """
        if not self.revoked(identity.serial):
            return False
        log.warn(
            "{verb} {role} {name} at {peer}: its certificate (serial {serial:x}) {since} revoked",
            verb="refused" if since == "is" else "dropping",
            role=identity.role,
            name=identity.name,
            peer=getattr(transport.getPeer(), "host", "?"),
            serial=identity.serial,
            since=since,
        )
        transport.abortConnection()
        return True

    def reload(self) -> bool:
        """Read the list again if its file changed; True (and `on_change` called) if the serials changed."""
        if self._ca is None:
            return False
        first = self._stamp is None
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            serials = revoked_serials(self.path, self._ca)
        except (OSError, CertError) as e:
            why = e if isinstance(e, CertError) else f"{self.path}: {e.strerror or e}"
            if first:
                raise CertificateFileError(f"revocation list {why}") from None
            log.error("revocation list {why}: keeping the one read before", why=why)
            return False
        changed = serials != self.serials
        self.serials = serials
        if changed or first:
            log.info("revocation list {path}: {n} certificates revoked", path=self.path, n=len(serials))
        if changed:
            for call in self.on_change:
                call()
        return changed


class RevocationWatch(service.Service):
    """
    Reads the revocation list again every `REVOCATION_POLL` seconds and at
    SIGHUP (``systemctl reload``), so that revoking a certificate reaches
    every daemon within seconds, open connections included.
    """

    def __init__(self, reactor: Any, revocations: Revocations) -> None:
        self.reactor = reactor
        self.revocations = revocations
        self._loop = task.LoopingCall(revocations.reload)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._loop.start(REVOCATION_POLL, now=False)
        signal.signal(
            signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.revocations.reload)
        )

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def server_options(ca_cert_path: str, cert_path: str, key_path: str) -> CertificateOptions:
    """
    TLS options for the master: its own certificate, and clients must present
    one signed by the cluster CA.

    ``trustRoot`` is Twisted's spelling of ``verify=True,
    requireCertificate=True, caCerts=[ca]``: OpenSSL is told to demand a
    client certificate and to fail the handshake unless it chains to the CA.
    """
    ca = _load_ca(ca_cert_path)
    cert, key = context_credentials(*_load_own(ca, cert_path, key_path, ("master",), refuse_expired=True))
    return CertificateOptions(
        privateKey=key,
        certificate=cert,
        trustRoot=trustRootFromCertificates([Certificate(crypto.X509.from_cryptography(ca))]),
        raiseMinimumTo=MINIMUM_TLS,
    )


def client_options(
    ca_cert_path: str, cert_path: str, key_path: str, hostname: str, refuse_expired: bool = False
) -> IOpenSSLClientConnectionCreator:
    """
    TLS options for a node or an operator dialling the master at ``hostname``.

    ``hostname`` is the name (or IP address) the client dials; the master's
    certificate must carry it as a subjectAltName, checked by
    ``service_identity``, and must chain to the cluster CA alone.
    ``refuse_expired`` (a node daemon): an own certificate outside its
    validity is an error, not a warning.
    """
    ca = _load_ca(ca_cert_path)
    cert, key = context_credentials(
        *_load_own(ca, cert_path, key_path, ("node", "operator"), refuse_expired=refuse_expired)
    )
    # The certificate and key go in as CertificateOptions' own arguments,
    # not as a PrivateCertificate, whose pyOpenSSL objects Twisted would pass on.
    return optionsForClientTLS(
        hostname,
        trustRoot=Certificate(crypto.X509.from_cryptography(ca)),
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS, "privateKey": key, "certificate": cert},
    )


#: pyOpenSSL takes `cryptography`'s certificates and keys from 24.3 on, and
#: deprecates its own X509 and PKey there (they are to go); Debian 12 has 23.0.
_TAKES_CRYPTOGRAPHY = tuple(int(part) for part in OpenSSL.__version__.split(".")[:2]) >= (24, 3)


def context_credentials(cert: x509.Certificate, key: Any) -> tuple[Any, Any]:
    """A certificate and its key as this pyOpenSSL's ``Context`` takes them."""
    if _TAKES_CRYPTOGRAPHY:
        return cert, key
    return crypto.X509.from_cryptography(cert), crypto.PKey.from_cryptography_key(key)


def peer_identity(transport: object) -> PeerIdentity:
    """
    The verified peer's (name, role), from a TLS transport.

    Call it from ``handshakeCompleted``: before then there is no verified
    certificate.  The certificate has already been checked against the CA by
    OpenSSL; this only reads what it says, and refuses one that names no role.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        raise PeerIdentityError(f"{transport!r} is not a TLS transport")
    peer = get()
    if peer is None:
        raise PeerIdentityError("the peer presented no certificate")
    cert = peer.to_cryptography()
    try:
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        return PeerIdentity(name_of(cert), role_of(cert), cert.serial_number, tags_of(cert), fingerprint)
    except CertError as e:
        raise PeerIdentityError(str(e)) from None


def _load_ca(path: str) -> x509.Certificate:
    ca = load_certificate(path)
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateFileError(f"{path}: not a CA certificate")
    return ca


def _load_own(
    ca: x509.Certificate,
    cert_path: str,
    key_path: str,
    roles: tuple[Role, ...],
    refuse_expired: bool = False,
) -> tuple[x509.Certificate, Any]:
    """
    Load this peer's certificate and key, and check them against each other,
    the CA and the role this side plays, so that a misconfiguration is
    reported at start-up with file names rather than as a handshake failure
    on the peer.  A daemon (``refuse_expired``) does not start with a
    certificate outside its validity: every peer would refuse it.
    """
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    if not isinstance(key, _TLS_KEYS):
        raise CertificateFileError(f"{key_path}: a {type(key).__name__}, which TLS peers cannot use")
    if public_key_der(key.public_key()) != public_key_der(cert.public_key()):
        raise CertificateFileError(f"{key_path}: not the private key of {cert_path}")
    try:
        role = role_of(cert)
    except CertError as e:
        raise CertificateFileError(f"{cert_path}: {e}") from None
    if role not in roles:
        raise CertificateFileError(
            f"{cert_path}: a {role} certificate, but this side needs {' or '.join(roles)}"
        )
    if not _issued_by(cert, ca):
        raise CertificateFileError(f"{cert_path}: not issued by the cluster CA {ca.subject.rfc4514_string()}")
    before, after = validity(cert)
    now = utcnow()
    if not before <= now <= after:
        if refuse_expired:
            raise CertificateFileError(
                f"{cert_path}: certificate valid only from {before} to {after} (now {now}):"
                " issue a new one (mrsync-ca issue --force)"
            )
        log.warn(
            "{path}: certificate valid only from {before} to {after}",
            path=cert_path,
            before=before,
            after=after,
        )
    return cert, key


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """
    Was ``cert`` signed by ``ca``?  Checked for EC CAs (all that
    `mrsyncd.security.certs` makes); for other key types the issuer name has to do, and
    OpenSSL checks the signature at handshake time anyway.
    """
    if cert.issuer != ca.subject:
        return False
    public = ca.public_key()
    algorithm = cert.signature_hash_algorithm
    if not isinstance(public, ec.EllipticCurvePublicKey) or algorithm is None:
        return True
    try:
        public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        return False
    return True
