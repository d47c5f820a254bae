"""
``mrsync``: the operator's command line.

::

    mrsync push [--include|--exclude PATTERN]... [--rate RATE] [-n] [-v|-q] [--detach] [--json]
                SRC... TARGETS:DEST
    mrsync nodes [--forget NAME] | jobs | status JOB [--follow] [--json] | cancel JOB

It talks to the master over TLS AMP with an operator certificate, on the
standard library alone (`mrsyncd.control.boxes`): Twisted's AMP and TLS cost
a command 0.26-0.33 s to import, most of its start.  Where the
master is and which certificate to use come from flags, else the
environment (``MRSYNC_MASTER``, ``MRSYNC_CA``, ``MRSYNC_CERT``,
``MRSYNC_KEY``), else a client file (``MRSYNC_CONFIG``, else
``~/.config/mrsync/client.toml``, else ``/etc/mrsyncd/client.toml``).

Exit codes, for scripts: 0 every target succeeded; 1 the job failed on at
least one target; 6 every node it was sent to succeeded, some were missed;
2 a wrong command line or client configuration (no master or certificate
named); 3 the master could not be reached, or the
certificate cannot be used: unreadable, from another CA, expired, or not an
operator's (checked here first, then by the master); 4 the master refused the
request; 5 the job was cancelled; 130 interrupted (Ctrl-C, see `Interruption`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import sys
import time
import tomllib
from collections.abc import Callable
from typing import Any

from twisted.python import usage

from mrsyncd.control.boxes import (
    CANCEL,
    FORGET_NODE,
    JOB_STATUS,
    LIST_JOBS,
    LIST_NODES,
    REFUSALS,
    SUBMIT,
    AmpError,
    BoxStream,
    Command,
    client_context,
)
from mrsyncd.scripts.options import EXIT_USAGE, CommandOptions, InterspersedOptions, usage_error
from mrsyncd.units import parse_rate, split_address

EXIT_OK, EXIT_FAILED = 0, 1
EXIT_UNREACHABLE, EXIT_REFUSED, EXIT_CANCELLED = 3, 4, 5
#: Every node the job reached completed it, but some were not connected.
EXIT_MISSED = 6
#: What a shell reports for a command ended by Ctrl-C: 128 + SIGINT.
EXIT_INTERRUPTED = 128 + signal.SIGINT
FINISHED = ("done", "failed", "cancelled")
#: How often a followed job's progress line is drawn anew.
PROGRESS_INTERVAL = 0.5


class CommandError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Connection(CommandOptions):
    optParameters = [
        ["master", "m", None, "host:port of the master (MRSYNC_MASTER)."],
        ["master-name", None, None, "Name in the master's certificate (default: its host)."],
        ["ca", None, None, "Cluster CA certificate (MRSYNC_CA)."],
        ["cert", None, None, "Operator certificate (MRSYNC_CERT)."],
        ["key", None, None, "Operator key (MRSYNC_KEY)."],
        ["config", None, None, "Client configuration file (MRSYNC_CONFIG)."],
    ]


class Verbosity:
    """``-v`` and ``-q``, as rsync's users read them, for the commands that follow a job."""

    optFlags: list[list[str | None]] = [
        ["verbose", "v", "Report more: every path that failed on each node, and each hook's output."],
        ["quiet", "q", "Report less: no progress, and nothing at the end unless a node did not succeed."],
    ]

    def verbosity(self) -> int:
        """-1 quiet, 0 as usual, 1 verbose."""
        options: Any = self
        if options["verbose"] and options["quiet"]:
            raise usage.UsageError("-v and -q ask for opposite things: give one")
        return 1 if options["verbose"] else -1 if options["quiet"] else 0


class PushOptions(Verbosity, InterspersedOptions):
    synopsis = "[options] SRC... TARGETS:DEST"
    longdesc = (
        "Send SRC (paths on the master; SRC/ sends its contents) to DEST on TARGETS: "
        "'all', a comma-separated list of node names, or @tag."
    )
    # Short options mean what they mean to rsync's users, or are not given.
    optFlags = [
        ["detach", None, "Print the job id and return without following it."],
        ["recursive", "r", "Accepted as rsync has it: directories are always sent whole."],
        ["json", None, "Print a machine-readable final report."],
        ["preserve-owner", None, "Set owner and group on the nodes that may (see mrsyncd(8))."],
        ["delete", None, "Delete what the source lacks from the directories sent."],
        ["backup", "b", "Keep each overwritten or deleted file as NAME~ on the nodes."],
        ["dry-run", "n", "Show what each node would receive; send nothing."],
    ]
    optParameters = [["rate", None, None, "Cap the sending rate, bits per second (k, M, G)."]]

    def __init__(self) -> None:
        super().__init__()
        #: rsync's filter rules, in the order given: the first that matches a path decides.
        self["filters"] = []

    def opt_bwlimit(self, value: str) -> None:
        """Cap the sending rate as rsync's --bwlimit does: KiB a second, or with a K, M or G suffix."""
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)(?:i?B)?", value.strip(), re.IGNORECASE)
        if match is None:
            raise usage.UsageError(f"--bwlimit takes KiB a second (or a K, M or G suffix), not {value!r}")
        power = "KMG".index(match.group(2).upper()) + 1 if match.group(2) else 1
        self["rate"] = f"{float(match.group(1)) * 1024**power * 8:.0f}"

    def opt_exclude(self, pattern: str) -> None:
        """Leave out names (or paths, with a /) matching PATTERN; repeatable."""
        self["filters"].append(_rule("- ", pattern))

    def opt_include(self, pattern: str) -> None:
        """Keep what PATTERN matches, whatever a later --exclude says (as rsync's first match wins)."""
        self["filters"].append(_rule("+ ", pattern))

    def opt_exclude_from(self, path: str) -> None:
        """Read exclude patterns from FILE, one a line ('-' is standard input; # and ; start comments)."""
        self["filters"].extend(_rule("- ", pattern) for pattern in _patterns(path, "--exclude-from"))

    def opt_include_from(self, path: str) -> None:
        """Read include patterns from FILE, as --exclude-from does."""
        self["filters"].extend(_rule("+ ", pattern) for pattern in _patterns(path, "--include-from"))

    def parseArgs(self, *args: str) -> None:  # type: ignore[override]
        if len(args) < 2:
            raise usage.UsageError("name at least one source and TARGETS:DEST")
        targets, sep, destination = args[-1].partition(":")
        if not sep or not targets or not destination.startswith("/"):
            raise usage.UsageError("the last argument is TARGETS:/absolute/destination")
        self["sources"] = [_absolute(source) for source in args[:-1]]
        self["targets"], self["destination"] = targets, destination

    def postOptions(self) -> None:
        self["verbosity"] = self.verbosity()
        if self["rate"] is not None:
            try:
                self["rate"] = parse_rate(self["rate"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None


def _rule(sign: str, pattern: str) -> str:
    """A filter rule as rsync reads an include or exclude: a pattern starting "+ " or "- " says its own."""
    return pattern if pattern[:2] in ("+ ", "- ") else sign + pattern


def _patterns(path: str, option: str) -> list[str]:
    """The patterns of a file as rsync reads them: one a line, blank lines and comments skipped."""
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
    except OSError as e:
        raise usage.UsageError(f"{option} {path}: {e.strerror or e}") from None
    return [line for line in lines if line.strip() and line[0] not in "#;"]


def _absolute(source: str) -> str:
    """Relative sources are relative to here, which makes sense when run on the master."""
    absolute = os.path.abspath(source)
    return absolute + "/" if source.endswith("/") and absolute != "/" else absolute


class JobOptions(InterspersedOptions):
    synopsis = "JOB"

    def parseArgs(self, job: str) -> None:  # type: ignore[override]
        try:
            self["job"] = int(job)
        except ValueError:
            raise usage.UsageError(f"a job id is a number, not {job!r}") from None


class StatusOptions(Verbosity, JobOptions):
    optFlags = [
        ["follow", "f", "Follow the job until it ends."],
        ["json", None, "Print the status as JSON."],
        ["files", None, "Include each node's per-file results."],
    ]

    def postOptions(self) -> None:
        self["verbosity"] = self.verbosity()


class ListOptions(CommandOptions):
    optFlags = [["json", None, "Print JSON."]]


class NodesOptions(ListOptions):
    optParameters = [["forget", None, None, "Expect the node NAME no more (it must be disconnected)."]]


class Options(Connection):
    synopsis = "mrsync [connection options] push|nodes|jobs|status|cancel ..."
    longdesc = "Submit, follow and cancel mrsyncd jobs; list nodes. See mrsync(1)."
    subCommands = [
        ["push", None, PushOptions, "Submit a job and follow it."],
        ["nodes", None, NodesOptions, "List the nodes the master expects, or forget one."],
        ["jobs", None, ListOptions, "List recent jobs."],
        ["status", None, StatusOptions, "Show (or follow) one job."],
        ["cancel", None, JobOptions, "Cancel a job."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("say what to do: push, nodes, jobs, status or cancel")


def settings(options: Options, environ: dict[str, str]) -> dict[str, str]:
    """Flags, then the environment, then the client file."""
    path = options["config"] or environ.get("MRSYNC_CONFIG")
    candidates = (
        [path] if path else [os.path.expanduser("~/.config/mrsync/client.toml"), "/etc/mrsyncd/client.toml"]
    )
    from_file: dict[str, Any] = {}
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            try:
                with open(candidate, "rb") as f:
                    from_file = tomllib.load(f)
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise CommandError(f"{candidate}: {e}", EXIT_USAGE) from None
            unknown = set(from_file) - {"master", "master_name", "ca", "certificate", "key"}
            if unknown:
                raise CommandError(f"{candidate}: unknown keys {', '.join(sorted(unknown))}", EXIT_USAGE)
            base = os.path.dirname(os.path.abspath(candidate))
            for key in ("ca", "certificate", "key"):
                if key in from_file:
                    from_file[key] = os.path.join(base, os.path.expanduser(str(from_file[key])))
            break
        elif path:
            raise CommandError(f"{candidate}: no such client configuration file", EXIT_USAGE)
    found = {}
    for key, flag, env, file_key in [
        ("master", "master", "MRSYNC_MASTER", "master"),
        ("master_name", "master-name", "MRSYNC_MASTER_NAME", "master_name"),
        ("ca", "ca", "MRSYNC_CA", "ca"),
        ("certificate", "cert", "MRSYNC_CERT", "certificate"),
        ("key", "key", "MRSYNC_KEY", "key"),
    ]:
        value = options[flag] or environ.get(env) or from_file.get(file_key)
        if value:
            found[key] = str(value)
    missing = [k for k in ("master", "ca", "certificate", "key") if k not in found]
    if missing:
        raise CommandError(
            f"no {', '.join(missing)} given: use flags, MRSYNC_* variables or a client.toml", EXIT_USAGE
        )
    return found


#: Seconds the master may take to accept the connection, and then to finish the TLS handshake.
CONNECT_TIMEOUT = HANDSHAKE_TIMEOUT = 10.0


class MasterConnection(BoxStream):
    """
    ``mrsync``'s connection to the master.  With TLS 1.3 the master judges
    this side's certificate after this side's handshake is done, so a
    refusal comes with the first command's answer: until one has come, a
    failure is explained as the handshake's (`explain`).
    """

    def __init__(self, sock: socket.socket, explain: Callable[[BaseException], str]) -> None:
        super().__init__(sock)
        self.explain = explain
        self.answered = False


def connect(found: dict[str, str]) -> MasterConnection:
    try:
        host, port = split_address(found["master"])
    except ValueError as e:
        raise CommandError(f"master {found['master']!r}: {e}", EXIT_USAGE) from None
    name = found.get("master_name") or host

    def explain(e: BaseException) -> str:
        # This side's files are checked as a daemon checks its own at start
        # (`tls.client_options`), only now that something failed: their
        # checks load Twisted and cryptography, which a command that works
        # does without.  What they find is the likelier cause.
        return _own_files_wrong(found, name) or _not_trusted(e, found, name)

    try:
        context = client_context(found["ca"], found["certificate"], found["key"])
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise CommandError(_own_files_wrong(found, name) or f"{e}", EXIT_UNREACHABLE) from None
    try:
        raw = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        why = _own_files_wrong(found, name) or f"cannot reach the master at {found['master']}: {_said(e)}"
        raise CommandError(why, EXIT_UNREACHABLE) from None
    try:
        raw.settimeout(HANDSHAKE_TIMEOUT)
        sock = context.wrap_socket(raw, server_hostname=name)
        sock.settimeout(None)
    except (OSError, ValueError) as e:
        raw.close()
        raise CommandError(explain(e), EXIT_UNREACHABLE) from None
    return MasterConnection(sock, explain)


def _said(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _own_files_wrong(found: dict[str, str], name: str) -> str | None:
    """What is wrong with this side's CA, certificate or key, or None."""
    from mrsyncd.security import tls  # Twisted, pyOpenSSL and cryptography: only once something failed

    try:
        tls.client_options(found["ca"], found["certificate"], found["key"], name)
    except Exception as e:
        return str(e)
    return None


#: OpenSSL's verification codes for a certificate that names another host or address.
_NAME_MISMATCH = {62, 63, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, _EMAIL_MISMATCH, _IP_ADDRESS_MISMATCH


def _not_trusted(e: BaseException, found: dict[str, str], name: str) -> str:
    """Why the TLS handshake with the master failed, and what to do, in place of OpenSSL's words."""
    if isinstance(e, ssl.SSLCertVerificationError):
        if e.verify_code in _NAME_MISMATCH:
            return (
                f"the master's certificate is not for {name!r}: dial a name it carries, or set --master-name"
                " (master_name in client.toml) to one, or reissue it (mrsync-ca issue --dns/--ip)"
            )
        return (
            f"the master's certificate does not verify against {found['ca']}: is that this cluster's CA"
            " certificate? (Or the master's certificate has expired: mrsync-ca show on it.)"
        )
    return _refused_in_handshake(e)


def _refused_in_handshake(e: BaseException) -> str:
    """The master ended the connection as TLS began: it did not take this certificate."""
    said = str(e)
    alert = re.search(r"alert ([a-z ]+[a-z])", said)
    if isinstance(e, ssl.SSLError) and alert and not isinstance(e, ssl.SSLEOFError):
        return (
            f"the master refused this certificate in the TLS handshake ({alert.group(1)}): is it issued by"
            " the cluster's CA, and not expired or revoked?"
        )
    if isinstance(e, TimeoutError):
        return f"the master did not finish the TLS handshake within {HANDSHAKE_TIMEOUT:.0f} s"
    if isinstance(e, ConnectionError | ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return (
            "the master closed the connection as it began: it refuses this certificate (revoked, or holding"
            " max_connections_per_certificate connections already); the master's log says which"
        )
    return f"no answer from the master: {_said(e)}"


def call(connection: MasterConnection, command: Command, **kw: Any) -> dict[str, Any]:
    try:
        answer = connection.call_remote(command, **kw)
    except AmpError as e:
        if e.code in REFUSALS:
            raise CommandError(f"the master refused: {e.description}", EXIT_REFUSED) from None
        # UNKNOWN: the master failed at the request; its log says how.
        raise CommandError(f"the master could not answer {command.name}: {e}", EXIT_REFUSED) from None
    except (KeyError, ValueError) as e:
        raise CommandError(
            f"the master's answer to {command.name} is not one this mrsync reads ({e!r}): are both"
            " of one mrsyncd version?",
            EXIT_UNREACHABLE,
        ) from None
    except OSError as e:
        if connection.answered:
            raise CommandError(f"lost the master: {_said(e)}", EXIT_UNREACHABLE) from None
        # A certificate the master does not accept ends the connection just
        # after the handshake (TLS 1.3 finishes the client's side first),
        # which surfaces here, at the first command, as a lost connection.
        raise CommandError(connection.explain(e), EXIT_UNREACHABLE) from None
    connection.answered = True
    return answer


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """
    A live line on a terminal, redrawn in place and never wider than the
    terminal (the least useful parts go first: node names, the count of
    slow nodes, the ETA, the rate, the bytes); elsewhere a plain line every
    few seconds.
    """

    def __init__(self, out: Any, now: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.now = now
        self.tty = out.isatty()
        self.samples: list[tuple[float, int]] = []
        self.last_plain = float("-inf")
        self.shown = False

    def width(self) -> int:
        try:
            return max(20, os.get_terminal_size(self.out.fileno()).columns)
        except (OSError, ValueError, AttributeError):  # not a terminal, or closed, or no file at all
            return 80

    def show(self, status: dict[str, Any]) -> None:
        now = self.now()
        sent, planned = _sent_and_planned(status)
        self.samples = [s for s in self.samples if now - s[0] <= 5.0] + [(now, sent)]
        span = self.samples[-1][0] - self.samples[0][0]
        rate = (self.samples[-1][1] - self.samples[0][1]) * 8 / span if span > 0 else 0.0
        eta = (planned - sent) * 8 / rate if rate > 0 and planned > sent else 0.0
        head = f"job {status['id']} {status.get('phase') or status['state']}"
        # Until the source is scanned and the nodes have said what they
        # need, there is no size to show: "0 B of 0 B" would be a wrong one.
        parts = []
        if planned:
            parts = [
                (0, f"{100 * sent // planned}%"),
                (3, f"{_size(sent)} of {_size(planned)}"),
                (4, f"{rate / 1e6:.1f} Mbit/s"),
                (5, f"ETA {_clock(eta)}"),
            ]
        if self.tty:
            self._draw(head, parts + _nodes(status))
        elif now - self.last_plain >= 5.0:
            self.out.write(_fit(head, parts + _nodes(status), None) + "\n")
            self.last_plain = now

    def end(self, status: dict[str, Any] | None = None) -> None:
        """
        The job ended (``status``, its final state): on a terminal the line
        shows 100% (or where it stopped), the time taken and the average
        rate.  None: the line is left as it is.
        """
        if not self.tty:
            return
        if status is not None:
            sent, planned = _sent_and_planned(status)
            elapsed = max(_elapsed(status), 1e-3)
            parts = [
                (0, f"{100 * sent // planned if planned else 100}%"),
                (3, f"{_size(sent)} in {elapsed:.1f} s, {sent * 8 / elapsed / 1e6:.1f} Mbit/s"),
            ]
            self._draw(f"job {status['id']} {status['state']}", parts + _nodes(status))
        if self.shown:
            self.out.write("\n")
            self.shown = False

    def _draw(self, head: str, parts: list[tuple[int, str]]) -> None:
        self.out.write("\r\x1b[K" + _fit(head, parts, self.width() - 1))
        self.out.flush()
        self.shown = True


def _elapsed(status: dict[str, Any]) -> float:
    """Seconds from the job's start (or submission) to its end, or to now."""
    return float((status.get("finished") or time.time()) - (status.get("started") or status["submitted"]))


def _sent_and_planned(status: dict[str, Any]) -> tuple[int, int]:
    progress = status.get("progress")
    if progress:
        return progress["sent_bytes"], progress["planned_bytes"]
    return status.get("sent_bytes", 0), status.get("payload_bytes", 0)


def _nodes(status: dict[str, Any]) -> list[tuple[int, str]]:
    """
    The nodes' part of a progress line, each with its rank in `_fit`: how
    many are done, failed and slow, then the names of the failed and slow.
    """
    nodes = status["nodes"]
    progress = status.get("progress")
    missed = sorted(n for n, v in nodes.items() if v["state"] == "missed")
    if progress:
        done, failed, slow = progress["done"], sorted(progress["failed"]), progress.get("slow", [])
    else:
        done = [n for n, v in nodes.items() if v["state"] == "done"]
        failed = sorted(n for n, v in nodes.items() if v["state"] == "failed")
        slow = []
    parts = [(1, f"{len(done)}/{len(nodes)} done")]
    if failed:
        parts.append((2, f"{len(failed)} failed"))
    if missed:
        parts.append((3, f"{len(missed)} missed"))
    if slow:
        parts.append((6, f"{len(slow)} slow"))
    for rank, word, names in ((7, "failed", failed), (8, "missed", missed), (9, "slow", slow)):
        if names:
            parts.append((rank, f"{word}: " + ",".join(names)))
    return parts


def _fit(head: str, parts: list[tuple[int, str]], width: int | None) -> str:
    """
    ``head`` and ``parts`` (each with a rank: 0 is kept longest), less the
    highest-ranked parts until the line fits ``width`` (None: any), and cut
    short if even the head does not.
    """
    kept = list(parts)
    while True:
        line = "  ".join([head, *(text for _, text in kept)])
        if width is None or len(line) <= width or not kept:
            return line if width is None else line[:width]
        kept.remove(max(kept, key=lambda part: part[0]))


def _failures_first(status: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A job's nodes as its report lists them: those not done first, each part by name."""
    return sorted(status["nodes"].items(), key=lambda kv: (kv[1]["state"] == "done", kv[0]))


def report(status: dict[str, Any], out: Any, verbosity: int = 0) -> None:
    """
    The human-readable end of a job: one line per node, failures first;
    quiet, nothing when it is done; verbose, each path that failed (from
    ``status["files"]``) and each hook's output too.
    """
    if verbosity < 0 and status["state"] == "done":
        return
    out.write(
        f"job {status['id']} {status['state']} in {_elapsed(status):.1f} s: {_size(status['payload_bytes'])} "
        f"in the tree, {_size(status['sent_bytes'])} sent\n"
    )
    if status["message"]:
        out.write(f"  {status['message']}\n")
    if status["spec"].get("dry_run"):
        _dry_run_report(status, out)
        return
    for name, node in _failures_first(status):
        if verbosity < 0 and node["state"] == "done":
            continue
        reason = f": {node['reason']}" if node["reason"] else ""
        changed = f", {node['changed']} paths changed" if node["state"] == "done" else ""
        out.write(f"  {name}: {node['state']}{changed}{reason}\n")
        if verbosity > 0:
            for path, result in sorted(status.get("files", {}).get(name, {}).items()):
                if result not in ("ok", "unchanged"):
                    out.write(f"    {path}: {result}\n")
        hook = node.get("hook")
        if hook:
            out.write(f"    post-receive {' '.join(hook['argv'])} exited {hook['status']}\n")
            if verbosity > 0 and hook.get("output"):
                out.write("".join(f"      {line}\n" for line in hook["output"].splitlines()))


#: A dry run's file results (`mrsyncd.engine.storage`, which ``mrsync`` does not load).
WOULD_RECEIVE, WOULD_DELETE = "would receive", "would delete"


def _dry_run_report(status: dict[str, Any], out: Any) -> None:
    """
    What each node would receive and delete, then each change once, as
    rsync lists them (deletions first), with the nodes it applies to when
    that is not every node that answered.
    """
    files: dict[str, dict[str, str]] = status.get("files", {})
    changes: dict[tuple[bool, str], list[str]] = {}
    for name, node in _failures_first(status):
        results = files.get(name, {})
        receive = [path for path, result in results.items() if result == WOULD_RECEIVE]
        delete = [path for path, result in results.items() if result == WOULD_DELETE]
        for receiving, paths in ((False, delete), (True, receive)):
            for path in paths:
                changes.setdefault((receiving, path), []).append(name)
        reason = f": {node['reason']}" if node["reason"] else ""
        if name in files:
            size = _size(node["needed_bytes"])
            deletions = f", delete {len(delete)}" if status["spec"].get("delete") else ""
            out.write(f"  {name}: would receive {len(receive)} files, {size}{deletions}{reason}\n")
        else:
            out.write(f"  {name}: {node['state']}{reason}\n")
    answered = sorted(files)
    for (receiving, path), names in sorted(changes.items()):
        where = "" if sorted(names) == answered else f"  ({','.join(sorted(names))})"
        out.write(f"  {path if receiving else 'deleting ' + path}{where}\n")


def exit_code(status: dict[str, Any]) -> int:
    """0 done everywhere; 5 cancelled; 1 failed somewhere; 6 done wherever it was sent, some nodes missed."""
    if status["state"] == "done":
        return EXIT_OK
    if status["state"] == "cancelled":
        return EXIT_CANCELLED
    states = {node["state"] for node in status["nodes"].values()}
    return EXIT_MISSED if states == {"done", "missed"} else EXIT_FAILED


class Interruption:
    """
    Ctrl-C as the command at work hears it.  While `push` follows the job it
    started, the first cancels that job (at the next answer from the master,
    within `PROGRESS_INTERVAL`), and the command waits for the nodes to stop
    and reports what each completed, as rsync stops its transfer; a second
    leaves at once.  At any other moment (connecting, ``status --follow``)
    the first leaves at once: following a job is not running it.
    """

    def __init__(self, err: Any) -> None:
        self.err = err
        #: How many Ctrl-Cs came.
        self.heard = 0
        #: Set while a push follows its own job: Ctrl-C then cancels it.
        self.graceful = False

    def install(self) -> None:
        """
        Take SIGINT in place of Python's KeyboardInterrupt, which could come
        between any two steps, a box half read.  A blocking read goes on
        after the handler returns (PEP 475).
        """
        signal.signal(signal.SIGINT, lambda signum, frame: self.interrupted())

    def interrupted(self) -> None:
        self.heard += 1
        if self.heard > 1 or not self.graceful:
            sys.stdout.flush()
            self.err.write("\nmrsync: interrupted\n")
            self.err.flush()
            os._exit(EXIT_INTERRUPTED)


def _json(out: Any, value: Any) -> None:
    out.write(json.dumps(value, indent=1, sort_keys=True) + "\n")


def _when(seconds: float | None) -> str:
    if not seconds:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def follow(
    connection: MasterConnection,
    job: int,
    json_out: bool,
    out: Any,
    interruption: Interruption,
    verbosity: int = 0,
) -> int:
    """
    Show a job's progress until it ends, then its report.  A push's job
    (``interruption.graceful``) is cancelled on Ctrl-C, and the command
    exits 130 once it has ended.
    """
    progress = Progress(out)
    cancelled = False
    wait = 0.0  # the first answer at once: the job may be queued
    while True:
        # Held by the master until the job ends or PROGRESS_INTERVAL passes:
        # the end is heard as it comes (a poll heard it 0.25 s late on
        # average, 1.4% of a 20 s push), and so is a Ctrl-C.
        status = call(connection, JOB_STATUS, job=job, files=False, wait=wait)["status"]
        if status["state"] in FINISHED:
            break
        wait = PROGRESS_INTERVAL
        if interruption.heard and not cancelled:
            cancelled = True
            if not json_out:
                progress.end()
            call(connection, CANCEL, job=job)
            interruption.err.write(
                f"mrsync: interrupted: cancelling job {job} (Ctrl-C again to leave without waiting)\n"
            )
            interruption.err.flush()
            continue
        if not json_out and verbosity >= 0:
            progress.show(status)
    # Each file's result per node, only where it is shown: 80,000 of them
    # for a tree of 10,000 files to 8 nodes.
    files = json_out or bool(status["spec"].get("dry_run")) or verbosity > 0
    status = call(connection, JOB_STATUS, job=job, files=files, wait=None)["status"]
    if json_out:
        _json(out, status)
    else:
        if verbosity >= 0:
            progress.end(status)
        report(status, out, verbosity)
    return EXIT_INTERRUPTED if cancelled else exit_code(status)


def push(connection: MasterConnection, sub: PushOptions, out: Any, interruption: Interruption) -> int:
    spec = {
        "sources": sub["sources"],
        "destination": sub["destination"],
        "targets": sub["targets"],
        # Excludes alone go as bare patterns, which a master from before
        # filter rules takes too; only includes need the rules.
        **(
            {"excludes": [rule[2:] for rule in sub["filters"]]}
            if all(rule.startswith("- ") for rule in sub["filters"])
            else {"filters": sub["filters"]}
        ),
        "rate": sub["rate"],
        "preserve_owner": bool(sub["preserve-owner"]),
        "delete": bool(sub["delete"]),
        "backup": bool(sub["backup"]),
        "dry_run": bool(sub["dry-run"]),
    }
    # From the submission on, Ctrl-C cancels the job (one asked for while
    # the submission is on its way cancels it as soon as its id is known).
    interruption.graceful = not sub["detach"]
    job = call(connection, SUBMIT, spec=spec)["job"]
    if sub["detach"]:
        out.write(json.dumps({"job": job}) + "\n" if sub["json"] else f"{job}\n")
        return EXIT_OK
    if not sub["json"] and sub["verbosity"] >= 0:
        out.write(f"job {job} submitted\n")
        out.flush()
    return follow(connection, job, sub["json"], out, interruption, sub["verbosity"])


def status(connection: MasterConnection, sub: StatusOptions, out: Any, interruption: Interruption) -> int:
    if sub["follow"]:
        return follow(connection, sub["job"], sub["json"], out, interruption, sub["verbosity"])
    answer = call(connection, JOB_STATUS, job=sub["job"], files=sub["files"], wait=None)
    if sub["json"]:
        _json(out, answer["status"])
    else:
        report(answer["status"], out)
    return EXIT_OK


def cancel(connection: MasterConnection, sub: JobOptions, out: Any, interruption: Interruption) -> int:
    answer = call(connection, CANCEL, job=sub["job"])
    out.write(f"job {sub['job']}: {answer['state']}\n")
    return EXIT_OK


def nodes(connection: MasterConnection, sub: NodesOptions, out: Any, interruption: Interruption) -> int:
    if sub["forget"] is not None:
        call(connection, FORGET_NODE, name=sub["forget"])
        out.write(f"forgot {sub['forget']}: 'all' and its tags no longer name it until it registers again\n")
        return EXIT_OK
    answer = call(connection, LIST_NODES)
    if sub["json"]:
        _json(out, answer["nodes"])
        return EXIT_OK
    out.write(f"{'NODE':16} {'STATE':12} {'LAST CONTACT':19} {'LAST DONE':26} {'FREE':>9}  TAGS\n")
    for node in answer["nodes"]:
        free = _size(min(node["free"].values())) if node["free"] else "-"
        job = node.get("last_ok_job")  # a master from before it was kept has none
        done = "never" if job is None else f"{_when(node['last_ok_at'])} #{job}"
        out.write(
            f"{node['name']:16} {node['state']:12} {_when(node['last_contact']):19} {done:26} {free:>9}"
            f"  {','.join(node['tags'])}\n"
        )
    return EXIT_OK


def jobs(connection: MasterConnection, sub: ListOptions, out: Any, interruption: Interruption) -> int:
    answer = call(connection, LIST_JOBS, limit=50)
    if sub["json"]:
        _json(out, answer["jobs"])
        return EXIT_OK
    out.write(f"{'JOB':>5} {'STATE':10} {'SUBMITTED':20} {'BY':12} {'TARGETS':16} DESTINATION\n")
    for job in answer["jobs"]:
        spec = job["spec"]
        out.write(
            f"{job['id']:>5} {job['state']:10} {_when(job['submitted']):20} {job['operator']:12}"
            f" {spec['targets']:16} {spec['destination']}\n"
        )
    return EXIT_OK


COMMANDS: dict[str, Callable[..., int]] = {
    "push": push,
    "status": status,
    "cancel": cancel,
    "nodes": nodes,
    "jobs": jobs,
}


def run(options: Options, out: Any, interruption: Interruption) -> int:
    with connect(settings(options, dict(os.environ))) as connection:
        return COMMANDS[str(options.subCommand)](connection, options.subOptions, out, interruption)


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(argv if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        usage_error("mrsync", options, e)

    interruption = Interruption(sys.stderr)
    interruption.install()
    try:
        code = run(options, sys.stdout, interruption)
    except CommandError as e:
        sys.stdout.flush()
        sys.stderr.write(f"mrsync: {e}\n")
        code = e.code
    except Exception as e:  # one line, as every failure says it, not a traceback
        sys.stdout.flush()
        sys.stderr.write(f"mrsync: {type(e).__name__}: {e}\n")
        code = EXIT_FAILED
    sys.stdout.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
