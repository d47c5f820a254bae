"""
``mrsync-ca``: make and inspect the cluster's CA and its certificates.

::

    mrsync-ca init DIR [--name NAME] [--days N] [--force]
    mrsync-ca issue DIR --role master|node|operator NAME [--dns NAME]... [--ip ADDR]... [--tag TAG]...
                        [--out DIR] [--days N] [--force]
    mrsync-ca show CERT
    mrsync-ca revoke DIR NAME|SERIAL

It is a thin shell around `mrsyncd.security.certs` that turns mistakes into one-line
messages and exit codes a script can test: 2 for a wrong command line, 1 for
an operation that failed, 0 for success.  Nothing already on disk is replaced
without ``--force``: a replaced CA strands every certificate it signed, and a
replaced key strands the certificate a peer is using.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Sequence

from twisted.python import usage

from mrsyncd.scripts.options import CommandOptions, InterspersedOptions, usage_error
from mrsyncd.security import certs

PROG = "mrsync-ca"


def _days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        raise ValueError(f"days must be a whole number, not {value!r}") from None
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    return days


_days.coerceDoc = "A whole number of days, at least 1."  # type: ignore[attr-defined]


class InitOptions(InterspersedOptions):
    """``init DIR``: create a new CA."""

    synopsis = "DIR [--name NAME] [--days N] [--force]"
    longdesc = "Create a cluster CA: DIR/ca.crt (give it to every peer) and DIR/ca.key (keep it safe)."
    optParameters = [
        ["name", None, "mrsyncd cluster CA", "The CA's common name."],
        ["days", None, certs.DEFAULT_CA_DAYS, "Days the CA is valid.", _days],
    ]
    optFlags = [["force", None, "Replace an existing CA (strands every certificate it issued)."]]

    def parseArgs(self, directory: str) -> None:  # type: ignore[override]
        self["directory"] = directory


class IssueOptions(InterspersedOptions):
    """``issue DIR NAME``: issue a certificate for one peer."""

    synopsis = (
        "DIR --role master|node|operator NAME [--dns NAME]... [--ip ADDR]... [--tag TAG]..."
        " [--out DIR] [--days N]"
    )
    longdesc = "Write NAME.crt and NAME.key (mode 0600), signed by the CA in DIR, for a peer in one role."
    optParameters = [
        ["role", "r", None, "The peer's role: " + ", ".join(certs.ROLES) + "."],
        ["out", "o", None, "Where to write NAME.crt and NAME.key (default: the CA directory)."],
        ["days", None, certs.DEFAULT_DAYS, "Days the certificate is valid.", _days],
    ]
    optFlags = [["force", None, "Replace an existing NAME.crt / NAME.key."]]

    def __init__(self) -> None:
        super().__init__()
        self["dns"] = []
        self["ip"] = []
        self["tag"] = []

    def opt_dns(self, name: str) -> None:
        """Another DNS name for the certificate (repeatable); NAME is always one."""
        try:
            self["dns"].append(certs.check_name(name, "DNS name"))
        except certs.CertError as e:
            raise usage.UsageError(str(e)) from None

    def opt_ip(self, address: str) -> None:
        """An IP address for the certificate (repeatable), for peers that dial by address."""
        try:
            self["ip"].append(str(ipaddress.ip_address(address)))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_tag(self, tag: str) -> None:
        """A tag operators may target this node by (@TAG, repeatable; node certificates only)."""
        try:
            self["tag"].append(certs.check_name(tag, "tag"))
        except certs.CertError as e:
            raise usage.UsageError(str(e)) from None

    def parseArgs(self, directory: str, name: str) -> None:  # type: ignore[override]
        self["directory"] = directory
        self["name"] = name

    def postOptions(self) -> None:
        if self["tag"] and self["role"] != "node":
            raise usage.UsageError("--tag is for node certificates only")
        if self["role"] is None:
            raise usage.UsageError("--role is required: " + ", ".join(certs.ROLES))
        if self["role"] not in certs.ROLES:
            raise usage.UsageError(f"--role must be one of {', '.join(certs.ROLES)}, not {self['role']!r}")
        try:
            certs.check_name(self["name"])
        except certs.CertError as e:
            raise usage.UsageError(str(e)) from None


class ShowOptions(InterspersedOptions):
    """``show CERT``: print what a certificate says."""

    synopsis = "CERT"
    longdesc = "Print a certificate's subject, role, names, validity and fingerprint."

    def parseArgs(self, path: str) -> None:  # type: ignore[override]
        self["path"] = path


class RevokeOptions(InterspersedOptions):
    """``revoke DIR NAME|SERIAL``: add a certificate to the CA's revocation list."""

    synopsis = "DIR NAME|SERIAL"
    longdesc = (
        "Add a certificate to DIR/crl.pem, the revocation list signed by the CA in DIR: by NAME "
        "when DIR holds NAME.crt, else by its SERIAL in hex (as 'show' prints it). Masters and "
        "nodes whose [tls] crl is that file refuse the certificate, and drop its connections, "
        "within seconds of the file changing."
    )

    def parseArgs(self, directory: str, which: str) -> None:  # type: ignore[override]
        self["directory"] = directory
        self["which"] = which


class Options(CommandOptions):
    """The ``mrsync-ca`` command line."""

    synopsis = f"Usage: {PROG}"
    longdesc = "Make and inspect the cluster's CA and its master, node and operator certificates."
    subCommands = [
        ["init", None, InitOptions, "Create a cluster CA in DIR."],
        ["issue", None, IssueOptions, "Issue a master, node or operator certificate."],
        ["show", None, ShowOptions, "Show a certificate's name, role and validity."],
        ["revoke", None, RevokeOptions, "Revoke a certificate (the CA's crl.pem)."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("say init, issue, show or revoke")


def init(options: usage.Options) -> str:
    directory = options["directory"]
    ca = certs.create_ca(directory, options["name"], options["days"], force=options["force"])
    return (
        f"created CA {certs.name_of(ca)!r}: {os.path.join(directory, certs.CA_CERT)}, "
        f"{os.path.join(directory, certs.CA_KEY)} (valid until {certs.validity(ca)[1]:%Y-%m-%d})"
    )


def issue(options: usage.Options) -> str:
    out = options["out"] or options["directory"]
    name = options["name"]
    cert = certs.issue(
        options["directory"],
        options["role"],
        name,
        out,
        options["days"],
        options["dns"],
        options["ip"],
        force=options["force"],
        tags=options["tag"],
    )
    return (
        f"issued {options['role']} certificate {name!r}: {os.path.join(out, name + '.crt')}, "
        f"{os.path.join(out, name + '.key')} (valid until {certs.validity(cert)[1]:%Y-%m-%d})"
    )


def show(options: usage.Options) -> str:
    return certs.describe(certs.load_certificate(options["path"]))


def revoke(options: usage.Options) -> str:
    directory, which = options["directory"], options["which"]
    named = os.path.join(directory, which + ".crt")
    if os.path.isfile(named):
        cert = certs.load_certificate(named)
        serial, what = cert.serial_number, f"{which!r} (serial {cert.serial_number:x})"
    else:
        try:
            serial = int(which.removeprefix("0x").replace(":", ""), 16)
        except ValueError:
            raise certs.CertError(
                f"{named} does not exist, and {which!r} is no serial number (hex)"
            ) from None
        what = f"serial {serial:x}"
    crl = certs.revoke(directory, [serial])
    path = os.path.join(directory, certs.CRL)
    return (
        f"revoked {what}: {path} lists {len(crl)} certificates; "
        "copy it to every master and node's [tls] crl (they reload it within seconds)"
    )


COMMANDS = {"init": init, "issue": issue, "show": show, "revoke": revoke}


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``mrsync-ca``; exits 2 on a usage error, 1 on a failure."""
    options = Options()
    try:
        options.parseOptions(list(argv) if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        usage_error(PROG, options, e)
    assert options.subCommand is not None
    try:
        print(COMMANDS[options.subCommand](options.subOptions))
    except certs.CertError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {where}{e.strerror or e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
