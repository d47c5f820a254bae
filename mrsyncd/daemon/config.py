"""
The daemon's configuration: one TOML file, checked whole at start-up.

An operator who mistypes a key or a value should learn it from the first
line twistd prints, not from a node that silently uses a default: every key
is declared here with its type and default (etc/mrsyncd.toml shows them
all), an unknown key or a bad value raises `ConfigError` naming the file and
the key, and the sections present decide which services run.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from mrsyncd.control.boxes import MAX_BOX_BYTES
from mrsyncd.control.commands import MAX_MANIFEST_ENTRIES, MAX_MESSAGE_BYTES, MAX_SPEC_BYTES
from mrsyncd.daemon.store import KEEP_DAYS, KEEP_JOBS
from mrsyncd.engine.hook import HOOK_TIMEOUT
from mrsyncd.units import parse_rate, port_number, split_address
from mrsyncd.wire.datagram import MAX_BLOCK_SIZE


class ConfigError(ValueError):
    """The configuration file cannot be used; the message names file and key."""


@dataclass(frozen=True)
class TLSConfig:
    ca: str = "/etc/mrsyncd/ca.crt"
    certificate: str = "/etc/mrsyncd/host.crt"
    key: str = "/etc/mrsyncd/host.key"
    #: The CA's revocation list (``mrsync-ca revoke``); "" = none.
    crl: str = ""


@dataclass(frozen=True)
class MasterConfig:
    #: Address and port of the TLS control listener (nodes and operators).
    address: str = ""
    port: int = 7718
    #: The job store lives here.
    state_dir: str = "/var/lib/mrsyncd"
    #: Directories jobs may send from (required in a configuration file):
    #: an operator's certificate reaches what lies beneath them, never the
    #: master's key or its state directory (`master.source_refusal`).
    sources: tuple[str, ...] = ()
    #: Multicast interface, by name or address ("" = the kernel's choice).
    interface: str = ""
    #: Job n of the pool sends to group ``group + n`` on port ``port_base + n``.
    group: str = "239.255.77.1"
    port_base: int = 7720
    max_jobs: int = 4
    ttl: int = 1
    loopback: bool = False
    rate: float = 1e9
    #: File bytes per datagram; 0 ("auto") fills one packet of the
    #: interface's MTU, at most 1500 (`multicast.Channel.payload_room`).
    block_size: int = 0
    #: Seconds a silent node is waited for before it is reported failed.
    grace: float = 30.0
    #: A node still missing something after this many passes of a job, or
    #: whose chunks failed their digests this many times, is failed in it:
    #: no one node holds a job for ever (`transfer.Transfer`).
    max_passes: int = 100
    max_corrupt_chunks: int = 16
    #: Finished jobs the store keeps: the newest this many, none older than
    #: this many days (`store.JobStore.prune`).
    keep_jobs: int = KEEP_JOBS
    keep_days: float = KEEP_DAYS
    #: ``address:port`` of the Prometheus endpoint ("" = none).
    metrics: str = ""
    #: Connections one certificate may hold at once (a node needs one, an
    #: operator one per running ``mrsync``): a stolen key cannot open
    #: thousands.
    max_connections_per_certificate: int = 64
    #: Bounds on what a peer may make the master hold: one message (AMP
    #: box) of a node or an operator, a job spec, the entries of a job's
    #: tree (its scan stops past them).
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_spec_bytes: int = MAX_SPEC_BYTES
    max_manifest_entries: int = MAX_MANIFEST_ENTRIES


@dataclass(frozen=True)
class NodeConfig:
    #: ``host:port`` of the master's control listener.
    master: str = ""
    #: The name the master's certificate must carry (default: host of ``master``).
    master_name: str = ""
    interface: str = ""
    #: A job may write only beneath one of these directories.
    roots: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    #: Run after a job completes here: argv, with the job id and changed
    #: paths in the environment (never sent by the job itself).
    post_receive: tuple[str, ...] = ()
    #: Seconds the hook may run before it is stopped (SIGTERM, then SIGKILL).
    hook_timeout: float = HOOK_TIMEOUT
    rcvbuf: int = 4 << 20
    #: Keep a file's set-user-ID and set-group-ID bits when a job sets
    #: owners (--preserve-owner, as root).  Off, they are cleared on arrival:
    #: a user's own set-user-ID file would otherwise arrive root's and
    #: set-user-ID on every node.
    allow_setid: bool = False
    #: The node's own certificate and key, when the host also runs a master
    #: and [tls] holds the master's (default: those of [tls]).
    certificate: str = ""
    key: str = ""
    #: Bounds on what the master may make the node hold: one message (AMP
    #: box), and the entries of a manifest (a larger one is refused).
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_manifest_entries: int = MAX_MANIFEST_ENTRIES


@dataclass(frozen=True)
class Config:
    path: str
    tls: TLSConfig = field(default_factory=TLSConfig)
    master: MasterConfig | None = None
    node: NodeConfig | None = None
    log_level: str = "info"


def _positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings")
    return tuple(value)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _positive(unit: str) -> Callable[[Any], float]:
    """A check for a positive number of ``unit``."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"must be a positive number of {unit}")
        return float(value)

    return check


def _listen_address(value: Any) -> str:
    """``address:port`` (``[v6addr]:port``), or "" for none."""
    text = _string(value)
    if text:
        split_address(text)
    return text


def _rate(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    return parse_rate(_string(value))


def _group(value: Any) -> str:
    if not ipaddress.ip_address(_string(value)).is_multicast:
        raise ValueError("must be a multicast address")
    return str(value)


def _ttl(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
        raise ValueError("must be from 0 to 255")
    return value


def _block_size(value: Any) -> int:
    if value == "auto":
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 512 <= value <= MAX_BLOCK_SIZE:
        raise ValueError(f'must be "auto" or from 512 to {MAX_BLOCK_SIZE}')
    return value


def _message_bytes(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 << 20 <= value <= MAX_BOX_BYTES:
        raise ValueError(f"must be from 1048576 (1 MiB) to {MAX_BOX_BYTES}")
    return value


def _roots(value: Any) -> tuple[str, ...]:
    roots = _strings(value)
    for root in roots:
        if not root.startswith("/"):
            raise ValueError(f"{root!r} is not an absolute path")
    return roots


def _level(value: Any) -> str:
    if value not in ("info", "debug"):
        raise ValueError('must be "info" or "debug"')
    return str(value)


_CHECKS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "tls": {"ca": _string, "certificate": _string, "key": _string, "crl": _string},
    "master": {
        "address": _string,
        "port": port_number,
        "state_dir": _string,
        "sources": _roots,
        "interface": _string,
        "group": _group,
        "port_base": port_number,
        "max_jobs": _positive_int,
        "ttl": _ttl,
        "loopback": _boolean,
        "rate": _rate,
        "block_size": _block_size,
        "grace": _positive("seconds"),
        "max_passes": _positive_int,
        "max_corrupt_chunks": _positive_int,
        "keep_jobs": _positive_int,
        "keep_days": _positive("days"),
        "metrics": _listen_address,
        "max_connections_per_certificate": _positive_int,
        "max_message_bytes": _message_bytes,
        "max_spec_bytes": _positive_int,
        "max_manifest_entries": _positive_int,
    },
    "node": {
        "master": _string,
        "master_name": _string,
        "interface": _string,
        "roots": _roots,
        "tags": _strings,
        "post_receive": _strings,
        "hook_timeout": _positive("seconds"),
        "rcvbuf": _positive_int,
        "allow_setid": _boolean,
        "certificate": _string,
        "key": _string,
        "max_message_bytes": _message_bytes,
        "max_manifest_entries": _positive_int,
    },
    "log": {"level": _level},
}


def _section(path: str, name: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    checked = {}
    for key, value in raw.items():
        check = _CHECKS[name].get(key)
        if check is None:
            known = ", ".join(sorted(_CHECKS[name]))
            raise ConfigError(f"{path}: unknown key {key!r} in [{name}] (known: {known})")
        try:
            checked[key] = check(value)
        except ValueError as e:
            raise ConfigError(f"{path}: [{name}] {key} = {value!r}: {e}") from None
    return checked


def parse(text: str, path: str = "<config>") -> Config:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for name in document:
        if name not in _CHECKS:
            raise ConfigError(f"{path}: unknown section [{name}] (known: {', '.join(_CHECKS)})")
    sections = {name: _section(path, name, raw) for name, raw in document.items()}
    if "master" not in sections and "node" not in sections:
        raise ConfigError(f"{path}: neither [master] nor [node] is configured: nothing to run")
    master = MasterConfig(**sections["master"]) if "master" in sections else None
    node = NodeConfig(**sections["node"]) if "node" in sections else None
    if node is not None:
        if not node.master:
            raise ConfigError(f"{path}: [node] master is required (host:port of the master)")
        try:
            split_address(node.master)
        except ValueError as e:
            raise ConfigError(f"{path}: [node] master = {node.master!r}: {e}") from None
        if not node.roots:
            raise ConfigError(f"{path}: [node] roots is required: where may jobs write?")
    if master is not None:
        if not master.sources:
            raise ConfigError(
                f"{path}: [master] sources is required: the directories jobs may send from,"
                ' for example sources = ["/srv"]'
            )
        if master.max_jobs > 256:
            raise ConfigError(f"{path}: [master] max_jobs must be at most 256")
        last_group = ipaddress.ip_address(master.group) + (master.max_jobs - 1)
        if not last_group.is_multicast:
            raise ConfigError(
                f"{path}: [master] group = {master.group!r}: the pool of {master.max_jobs} jobs"
                f" runs past the multicast range ({last_group})"
            )
        if master.port_base + master.max_jobs - 1 > 65535:
            raise ConfigError(
                f"{path}: [master] port_base = {master.port_base}: the pool of {master.max_jobs} jobs"
                " runs past port 65535"
            )
    return Config(
        path=path,
        tls=TLSConfig(**sections.get("tls", {})),
        master=master,
        node=node,
        log_level=sections.get("log", {}).get("level", "info"),
    )


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, path)


def defaults() -> dict[str, dict[str, Any]]:
    """Every key and its default, for the documented example and its test."""
    return {
        "tls": {f.name: getattr(TLSConfig(), f.name) for f in fields(TLSConfig)},
        "master": {f.name: getattr(MasterConfig(), f.name) for f in fields(MasterConfig)},
        "node": {f.name: getattr(NodeConfig(), f.name) for f in fields(NodeConfig)},
    }
