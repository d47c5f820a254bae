"""
The cluster's certificate authority: one CA, and certificates for three roles.

Every connection on the control channel is mutual TLS against one private CA
(see docs of `mrsyncd.security.tls`).  Authentication says *who* a peer is; the master
must also know *what* it may do: a node registers and receives, an operator
submits jobs, and a node certificate must never be able to submit jobs.  So
the role is part of the certificate, signed by the CA, and read back with
`role_of`.

Role encoding
-------------
The role is an ExtendedKeyUsage purpose under a private arc::

    1.3.6.1.4.1.55555.7717         mrsyncd roles (made-up enterprise arc)
    1.3.6.1.4.1.55555.7717.1       master
    1.3.6.1.4.1.55555.7717.2       node
    1.3.6.1.4.1.55555.7717.3       operator

A certificate carries exactly one of them, next to the standard purpose its
TLS side needs: ``serverAuth`` for the master, ``clientAuth`` for nodes and
operators.  OpenSSL checks the standard purpose itself (a master certificate
cannot be used as a TLS client, a node certificate cannot serve), and
`role_of` refuses a certificate with no role, with two roles, or with an
unknown purpose under our arc: there is no default role and no way to confuse
one with another.  The CA certificate carries no role, so it can never be used
as a peer identity.

The peer's *name* is its certificate's common name (`name_of`).  The same
name, plus any extra DNS names and IP addresses, goes into the
subjectAltName, which is what `service_identity` checks when a node or
operator verifies the master by host name.

Files
-----
``create_ca`` writes ``DIR/ca.crt`` and ``DIR/ca.key``; ``issue`` writes
``NAME.crt`` and ``NAME.key``.  Private keys are created with mode 0600 by
``os.open`` (never world-readable, not even for an instant, whatever the
umask), written to a temporary name and linked into place, so a crash never
leaves a half-written key and an existing file is never silently replaced.

Keys are ECDSA P-256: the strongest choice that every TLS stack we support
(OpenSSL 3 behind pyOpenSSL 23 on Debian 12, and current PyPI) signs and
verifies in TLS 1.2 and 1.3 without special configuration.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Literal, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

Role = Literal["master", "node", "operator"]

#: The private arc under which roles are ExtendedKeyUsage purposes.
ROLE_ARC: Final = "1.3.6.1.4.1.55555.7717"
ROLE_OIDS: Final[dict[Role, ObjectIdentifier]] = {
    "master": ObjectIdentifier(ROLE_ARC + ".1"),
    "node": ObjectIdentifier(ROLE_ARC + ".2"),
    "operator": ObjectIdentifier(ROLE_ARC + ".3"),
}
ROLES: Final[tuple[Role, ...]] = ("master", "node", "operator")
#: A node certificate's tags (``mrsync-ca issue --tag``), a non-critical
#: extension holding a DER SEQUENCE OF UTF8String: the tags operators may
#: target the node by.  A node's own configuration may narrow them, never
#: add to them, so a stolen node key cannot claim another group's jobs.
TAGS_OID: Final = ObjectIdentifier(ROLE_ARC + ".10")
_ROLE_BY_OID: Final[dict[ObjectIdentifier, Role]] = {oid: role for role, oid in ROLE_OIDS.items()}

#: The TLS purpose each role needs: the master serves, the others dial it.
_TLS_PURPOSE: Final[dict[Role, ObjectIdentifier]] = {
    "master": ExtendedKeyUsageOID.SERVER_AUTH,
    "node": ExtendedKeyUsageOID.CLIENT_AUTH,
    "operator": ExtendedKeyUsageOID.CLIENT_AUTH,
}

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
#: The CA's revocation list, beside its key (`revoke`).
CRL: Final = "crl.pem"
DEFAULT_CA_DAYS: Final = 3650
#: A year and a month: a stolen key is good for at most that long even if
#: nobody revokes it, and an operator reissues once a year.
DEFAULT_DAYS: Final = 397
#: The daemons read the revocation list whenever it changes and never judge
#: it stale, but X.509 wants a next update: this far ahead.
CRL_DAYS: Final = 3650
#: Certificates start a little in the past, so that a peer whose clock is
#: slightly behind does not reject a certificate issued a moment ago.
CLOCK_SKEW: Final = datetime.timedelta(minutes=5)

#: Names end up as a common name, a DNS subjectAltName and a file name, so
#: they are host-name-like: no slashes, no spaces, no leading dot or hyphen.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?")


class CertError(Exception):
    """A certificate or key could not be made, read or understood."""


class RoleError(CertError):
    """A certificate carries no mrsyncd role, or an ambiguous one."""


class CertificateFileError(CertError):
    """A certificate or key file is missing, unreadable or not what it should be."""


def create_ca(
    directory: str,
    name: str = "mrsyncd cluster CA",
    days: int = DEFAULT_CA_DAYS,
    *,
    force: bool = False,
) -> x509.Certificate:
    """
    Create a new cluster CA in ``directory`` (made, mode 0700, if missing).

    Refuses to replace an existing ``ca.crt`` or ``ca.key`` unless ``force``:
    a new CA silently invalidates every certificate the old one issued.
    """
    if days < 1:
        raise CertError("a CA must be valid for at least one day")
    if not name.strip():
        raise CertError("the CA name must not be empty")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path, key_path = os.path.join(directory, CA_CERT), os.path.join(directory, CA_KEY)
    if not force:
        _refuse_existing(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mrsyncd"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        # path_length=0: this CA signs peers only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_file(key_path, _key_pem(key), 0o600, force)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return cert


def issue(
    ca_dir: str,
    role: str,
    name: str,
    out_dir: str | None = None,
    days: int = DEFAULT_DAYS,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    *,
    force: bool = False,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    tags: Sequence[str] = (),
) -> x509.Certificate:
    """
    Issue a certificate for ``name`` in ``role``, signed by the CA in ``ca_dir``.

    Writes ``NAME.crt`` and ``NAME.key`` into ``out_dir`` (default: ``ca_dir``)
    and refuses to replace either unless ``force``.  ``name`` is the common
    name and the first DNS subjectAltName; ``dns_names`` and ``ip_addresses``
    add more, so that clients can check the master by whatever name or
    address they dial.

    ``not_before``/``not_after`` override the validity computed from ``days``
    (both must be timezone-aware).  They exist to reissue with exact dates and
    to let tests make a certificate that has already expired; the validity is
    otherwise clamped to the CA's, since a certificate outliving its CA is
    useless.
    """
    if days < 1 and not_after is None:
        raise CertError("a certificate must be valid for at least one day")
    if role not in ROLE_OIDS:
        raise CertError(f"unknown role {role!r}: say one of {', '.join(ROLES)}")
    the_role = cast(Role, role)
    check_name(name)
    if tags and the_role != "node":
        raise CertError(f"only node certificates carry tags, not {role} certificates")
    tags = [check_name(t, "tag") for t in dict.fromkeys(tags)]
    extra_dns = [check_name(d, "DNS name") for d in dns_names]
    try:
        ips = [ipaddress.ip_address(a) for a in ip_addresses]
    except ValueError as e:
        raise CertError(str(e)) from None
    out_dir = ca_dir if out_dir is None else out_dir
    cert_path, key_path = os.path.join(out_dir, name + ".crt"), os.path.join(out_dir, name + ".key")
    if not force:
        _refuse_existing(cert_path, key_path)

    ca_cert, ca_key = _load_ca_and_key(ca_dir)
    now = utcnow()
    ca_before, ca_after = validity(ca_cert)
    start = not_before if not_before is not None else max(now - CLOCK_SKEW, ca_before)
    end = not_after if not_after is not None else min(now + datetime.timedelta(days=days), ca_after)
    if end <= start:
        raise CertError(f"certificate would end ({end}) before it starts ({start})")

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys([name, *extra_dns])]
    sans += [x509.IPAddress(ip) for ip in dict.fromkeys(ips)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([_TLS_PURPOSE[the_role], ROLE_OIDS[the_role]]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if tags:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(TAGS_OID, _der_strings(tags)), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    os.makedirs(out_dir, exist_ok=True)
    _write_file(key_path, _key_pem(key), 0o600, force)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return cert


def _load_ca_and_key(ca_dir: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = load_certificate(os.path.join(ca_dir, CA_CERT))
    ca_key = load_private_key(os.path.join(ca_dir, CA_KEY))
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{os.path.join(ca_dir, CA_KEY)}: not an EC key made by create_ca")
    if public_key_der(ca_key.public_key()) != public_key_der(ca_cert.public_key()):
        raise CertError(f"{ca_dir}: {CA_KEY} does not belong to {CA_CERT}")
    return ca_cert, ca_key


def revoke(ca_dir: str, serials: Sequence[int] = ()) -> x509.CertificateRevocationList:
    """
    Add ``serials`` to the CA's revocation list ``ca_dir/crl.pem`` (made,
    empty, if there is none) and sign it anew.  Revoking twice is harmless:
    the first date stays.
    """
    ca_cert, ca_key = _load_ca_and_key(ca_dir)
    path = os.path.join(ca_dir, CRL)
    revoked: dict[int, datetime.datetime] = {}
    if os.path.lexists(path):
        for entry in load_revocation_list(path, ca_cert):
            when = getattr(entry, "revocation_date_utc", None)  # cryptography >= 42
            revoked[entry.serial_number] = when or entry.revocation_date.replace(tzinfo=datetime.UTC)
    now = utcnow()
    for serial in serials:
        revoked.setdefault(serial, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=CRL_DAYS))
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_file(path, crl.public_bytes(serialization.Encoding.PEM), 0o644, True)
    return crl


def load_revocation_list(path: str, ca: x509.Certificate) -> x509.CertificateRevocationList:
    """A revocation list, refused unless the cluster CA signed it."""
    try:
        crl = x509.load_pem_x509_crl(_read(path))
    except ValueError:
        raise CertificateFileError(f"{path}: not a PEM revocation list") from None
    public = ca.public_key()
    signed = isinstance(public, ec.EllipticCurvePublicKey) and crl.is_signature_valid(public)
    if crl.issuer != ca.subject or not signed:
        raise CertificateFileError(
            f"{path}: not a revocation list of the cluster CA {ca.subject.rfc4514_string()}"
        )
    return crl


def revoked_serials(path: str, ca: x509.Certificate) -> frozenset[int]:
    return frozenset(entry.serial_number for entry in load_revocation_list(path, ca))


def tags_of(certificate: x509.Certificate) -> tuple[str, ...]:
    """The tags a node certificate grants (none if it has no tags extension)."""
    try:
        value = certificate.extensions.get_extension_for_oid(TAGS_OID).value
    except x509.ExtensionNotFound:
        return ()
    try:
        return _strings_from_der(cast(x509.UnrecognizedExtension, value).value)
    except ValueError as e:
        raise CertError(f"{_describe(certificate)}: a malformed tags extension ({e})") from None


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_strings(strings: Sequence[str]) -> bytes:
    """DER of a SEQUENCE OF UTF8String."""
    items = b"".join(b"\x0c" + _der_length(len(b)) + b for b in (s.encode() for s in strings))
    return b"\x30" + _der_length(len(items)) + items


def _strings_from_der(data: bytes) -> tuple[str, ...]:
    """The inverse of `_der_strings`; ValueError for anything else."""

    def element(data: bytes, at: int, tag: int) -> tuple[bytes, int]:
        if at + 2 > len(data) or data[at] != tag:
            raise ValueError(f"expected tag {tag:#x} at byte {at}")
        length, at = data[at + 1], at + 2
        if length & 0x80:
            size = length & 0x7F
            if not 0 < size <= 4 or at + size > len(data):
                raise ValueError("bad length")
            length, at = int.from_bytes(data[at : at + size], "big"), at + size
        if at + length > len(data):
            raise ValueError("truncated")
        return data[at : at + length], at + length

    body, end = element(data, 0, 0x30)
    if end != len(data):
        raise ValueError("trailing bytes")
    strings, at = [], 0
    while at < len(body):
        raw, at = element(body, at, 0x0C)
        strings.append(raw.decode())
    return tuple(strings)


def role_of(certificate: x509.Certificate) -> Role:
    """
    The mrsyncd role a certificate was issued for.

    Raises `RoleError` unless exactly one known role purpose is present: a
    certificate without a role gets no rights rather than some default.
    """
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise RoleError(f"certificate for {_describe(certificate)} carries no mrsyncd role") from None
    ours = [oid for oid in eku if oid.dotted_string.startswith(ROLE_ARC + ".")]
    unknown = [oid.dotted_string for oid in ours if oid not in _ROLE_BY_OID]
    if unknown:
        raise RoleError(f"certificate for {_describe(certificate)} has unknown role {', '.join(unknown)}")
    roles = sorted({_ROLE_BY_OID[oid] for oid in ours})
    if not roles:
        raise RoleError(f"certificate for {_describe(certificate)} carries no mrsyncd role")
    if len(roles) > 1:
        raise RoleError(f"certificate for {_describe(certificate)} claims several roles: {', '.join(roles)}")
    return roles[0]


def name_of(certificate: x509.Certificate) -> str:
    """The peer name a certificate was issued for: its one common name."""
    cns = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CertError(f"certificate has {len(cns)} common names, expected exactly one")
    value = cns[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def validity(certificate: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    """
    A certificate's (not before, not after), timezone-aware.

    cryptography ≥ 42 has ``not_valid_*_utc`` and deprecates the naive
    properties; Debian 12's cryptography 38 has only the naive ones (in UTC).
    """
    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    utc = datetime.UTC
    return (
        certificate.not_valid_before.replace(tzinfo=utc),
        certificate.not_valid_after.replace(tzinfo=utc),
    )


def load_certificate(path: str) -> x509.Certificate:
    """Read one PEM certificate, with an error that names the file."""
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise CertificateFileError(f"{path}: not a PEM certificate ({e})") from None


def load_private_key(path: str) -> PrivateKeyTypes:
    """
    Read one unencrypted PEM private key, with an error that names the file.

    Only EC keys are made here, but any key type TLS can use is accepted, so
    that a hand-made RSA key for a peer still works.
    """
    data = _read(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # encrypted: daemons start unattended, so no passphrases
        raise CertificateFileError(f"{path}: cannot use this private key ({e})") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateFileError(f"{path}: not a PEM private key ({e})") from None


def describe(certificate: x509.Certificate) -> str:
    """A few human-readable lines about a certificate, for ``mrsync-ca show``."""
    try:
        role: str = role_of(certificate)
    except RoleError:
        role = "none"
    try:
        bc = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    before, after = validity(certificate)
    lines = [
        f"subject:     {certificate.subject.rfc4514_string()}",
        f"issuer:      {certificate.issuer.rfc4514_string()}",
        f"serial:      {certificate.serial_number:x}",
        f"role:        {'CA' if is_ca else role}",
        f"tags:        {', '.join(tags_of(certificate)) or '-'}",
        f"dns names:   {', '.join(dns) or '-'}",
        f"ip addrs:    {', '.join(ips) or '-'}",
        f"not before:  {before.isoformat()}",
        f"not after:   {after.isoformat()}",
        f"sha256:      {certificate.fingerprint(hashes.SHA256()).hex(':')}",
    ]
    if after < utcnow():
        lines.append("status:      EXPIRED")
    return "\n".join(lines)


def utcnow() -> datetime.datetime:
    """Now, timezone-aware and to the second, as certificates keep time."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it can be a common name, a DNS name and a file name; else raise `CertError`."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise CertError(
            f"bad {what} {name!r}: use letters, digits, '-', '_' and '.', "
            "starting and ending with a letter or digit"
        )
    return name


def _describe(certificate: x509.Certificate) -> str:
    try:
        return repr(name_of(certificate))
    except CertError:
        return certificate.subject.rfc4514_string() or "(no subject)"


def public_key_der(key: object) -> bytes:
    """A public key's DER SubjectPublicKeyInfo: the way to compare two keys of any type."""
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateFileError(f"{path}: {e.strerror or e}") from None


def _refuse_existing(*paths: str) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise CertError(f"{path} already exists (use --force to replace it)")


def _write_file(path: str, data: bytes, mode: int, overwrite: bool) -> None:
    """
    Write ``data`` to ``path`` with ``mode`` from the first byte on.

    The data goes to a new temporary file beside ``path``, created by
    ``os.open`` with O_EXCL and ``mode`` (so a key is 0600 from its creation;
    the umask can only narrow it), is synced, and then takes the final name:
    ``os.replace`` when overwriting, else ``os.link``, which fails instead of
    replacing a file that appeared meanwhile.  A crash leaves at worst a
    stray temporary file, never a half-written key under the real name.
    """
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except OSError as e:
        raise CertError(f"{tmp}: cannot create: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CertError(f"{path} already exists (use --force to replace it)") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
