"""The mrsync command line: parsing, where settings come from, the progress display."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest
from twisted.internet.task import Clock
from twisted.python import usage

from mrsyncd import __version__
from mrsyncd.scripts.mrsync import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_MISSED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Options,
    Progress,
    exit_code,
    report,
    settings,
)

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_push_options_may_follow_the_sources():
    options = parse("push", "/data/a", "--exclude", "*.tmp", "/data/b/", "--rate", "50M", "@rack1:/srv/x")
    sub = options.subOptions
    assert sub["sources"] == ["/data/a", "/data/b/"], "a trailing slash means the contents"
    assert sub["targets"] == "@rack1" and sub["destination"] == "/srv/x"
    assert sub["filters"] == ["- *.tmp"]
    assert sub["rate"] == 50e6


def test_relative_sources_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sub = parse("push", "tree/", "all:/srv/x").subOptions
    assert sub["sources"] == [f"{tmp_path}/tree/"]


@pytest.mark.parametrize(
    "argv",
    [
        ["push", "/a"],
        ["push", "/a", "all"],
        ["push", "/a", "all:relative/dest"],
        ["push", "/a", ":/dest"],
        ["push", "--rate", "fast", "/a", "all:/d"],
        ["status", "seven"],
        [],
    ],
)
def test_bad_command_lines_are_usage_errors(argv):
    with pytest.raises(usage.UsageError):
        parse(*argv)


def test_flags_beat_the_environment_which_beats_the_client_file(tmp_path):
    client = tmp_path / "client.toml"
    client.write_text('master = "file:1"\nca = "ca.crt"\ncertificate = "op.crt"\nkey = "op.key"\n')
    found = settings(parse("--config", str(client), "jobs"), {})
    assert found == {
        "master": "file:1",
        "ca": f"{tmp_path}/ca.crt",
        "certificate": f"{tmp_path}/op.crt",
        "key": f"{tmp_path}/op.key",
    }, "paths in the file are relative to it"
    found = settings(parse("--config", str(client), "jobs"), {"MRSYNC_MASTER": "env:2"})
    assert found["master"] == "env:2"
    found = settings(parse("--config", str(client), "--master", "flag:3", "jobs"), {"MRSYNC_MASTER": "env:2"})
    assert found["master"] == "flag:3"


def test_missing_settings_and_bad_client_files_say_so(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(CommandError, match="no master, ca, certificate, key given") as caught:
        settings(parse("--config", str(empty), "jobs"), {})
    assert caught.value.code == EXIT_USAGE
    with pytest.raises(CommandError, match="no such client configuration file"):
        settings(parse("--config", str(tmp_path / "none.toml"), "jobs"), {})
    bad = tmp_path / "bad.toml"
    bad.write_text('master = "m:1"\ncolour = "blue"\n')
    with pytest.raises(CommandError, match="unknown keys colour"):
        settings(parse("--config", str(bad), "jobs"), {})


def status(state="running", sent=0, planned=0, nodes=None, **extra):
    return {
        "id": 7,
        "state": state,
        "nodes": nodes or {"n1": {"state": "running"}, "n2": {"state": "running"}},
        "progress": {"sent_bytes": sent, "planned_bytes": planned, "done": [], "failed": {}},
        **extra,
    }


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line_with_rate_and_eta():
    clock, out = Clock(), Terminal()
    progress = Progress(out, clock.seconds)
    progress.show(status(sent=0, planned=100_000_000))
    clock.advance(1.0)
    progress.show(status(sent=10_000_000, planned=100_000_000))
    last = out.getvalue().split("\r\x1b[K")[-1]
    assert last == "job 7 running  10%  9.5 MiB of 95.4 MiB  80.0 Mbit/s  ETA 0:00:09  0/2 done"
    assert "\n" not in out.getvalue()


def test_progress_before_the_size_is_known_shows_no_figures():
    clock, out = Clock(), io.StringIO()
    Progress(out, clock.seconds).show(status(sent=0, planned=0, phase="scanning"))
    assert out.getvalue() == "job 7 scanning  0/2 done\n"


def on_a_terminal(columns: int, draw) -> list[str]:
    """What ``draw(progress, clock)`` puts on a pseudo-terminal ``columns`` wide, line by line."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    attrs = termios.tcgetattr(terminal)
    attrs[1] &= ~termios.OPOST  # no newline translation: what is written is what is read
    termios.tcsetattr(terminal, termios.TCSANOW, attrs)
    with open(terminal, "w", closefd=True) as out:
        clock = Clock()
        draw(Progress(out, clock.seconds), clock)
    written = b""
    while select.select([controller], [], [], 0.1)[0]:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal side is closed and all was read
            break
        if not chunk:
            break
        written += chunk
    os.close(controller)
    return [line for line in re.split(r"\r\x1b\[K|\n", written.decode()) if line]


def busy(**progress):
    nodes = {f"node{i}": {"state": "running"} for i in range(1, 9)}
    base = {"sent_bytes": 70 << 20, "planned_bytes": 200 << 20, "done": ["node1", "node2"]}
    base["failed"] = {"node13": "gone"}
    base["slow"] = ["node7"]
    return status(nodes=nodes, progress={**base, **progress}, submitted=1000.0, started=1000.0, finished=None)


@pytest.mark.parametrize("columns", [80, 40])
def test_progress_never_outgrows_the_terminal_and_ends_at_100_percent(columns):
    def draw(progress, clock):
        for sent in (10, 70, 150):
            progress.show(busy(sent_bytes=sent << 20))
            clock.advance(1.0)
        final = busy(sent_bytes=200 << 20, done=[f"node{i}" for i in range(1, 8)])
        progress.end({**final, "state": "done", "finished": 1020.0})

    lines = on_a_terminal(columns, draw)
    assert len(lines) == 4, lines
    assert all(len(line) < columns for line in lines), [(len(line), line) for line in lines]
    assert all(line.startswith("job 7 running  ") and "%" in line for line in lines[:3]), lines
    assert all(" done  1 failed" in line for line in lines), lines
    assert lines[-1].startswith("job 7 done  100%"), lines
    if columns == 80:
        assert "70.0 MiB of 200.0 MiB" in lines[1] and "Mbit/s" in lines[1], lines
        assert "200.0 MiB in 20.0 s, 83.9 Mbit/s  7/8 done  1 failed" in lines[-1], lines


def test_progress_names_slow_and_failed_nodes_when_there_is_room():
    out = Terminal()
    progress = Progress(out, Clock().seconds)
    progress.width = lambda: 200
    progress.show(busy())
    last = out.getvalue().split("\r\x1b[K")[-1]
    assert last.endswith("2/8 done  1 failed  1 slow  failed: node13  slow: node7"), last


def test_progress_elsewhere_prints_a_plain_line_every_few_seconds():
    clock, out = Clock(), io.StringIO()
    progress = Progress(out, clock.seconds)
    for second in range(11):
        progress.show(status(sent=second * 1_000_000, planned=20_000_000))
        clock.advance(1.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "\r" not in out.getvalue()


def test_a_dry_run_lists_each_change_once_with_the_nodes_it_applies_to():
    status = {
        "id": 9,
        "state": "done",
        "submitted": 100.0,
        "started": 100.0,
        "finished": 101.5,
        "payload_bytes": 3000,
        "sent_bytes": 0,
        "message": "",
        "spec": {"dry_run": True, "delete": True},
        "nodes": {
            name: {"state": "done", "reason": "", "needed_bytes": size, "changed": 0}
            for name, size in (("n1", 1000), ("n2", 3000), ("n3", 0))
        },
        "files": {
            "n1": {"a": "would receive", "b": "unchanged", "old": "would delete"},
            "n2": {"a": "would receive", "b": "would receive", "old": "would delete", "x/y": "would delete"},
            "n3": {"a": "unchanged", "b": "unchanged"},
        },
    }
    out = io.StringIO()
    report(status, out)
    assert out.getvalue().splitlines() == [
        "job 9 done in 1.5 s: 2.9 KiB in the tree, 0 B sent",
        "  n1: would receive 1 files, 1000 B, delete 1",
        "  n2: would receive 2 files, 2.9 KiB, delete 2",
        "  n3: would receive 0 files, 0 B, delete 0",
        "  deleting old  (n1,n2)",
        "  deleting x/y  (n2)",
        "  a  (n1,n2)",
        "  b  (n2)",
    ]
    # Where every node that answered would receive it, no node is named.
    status["files"]["n3"]["a"] = "would receive"
    out = io.StringIO()
    report(status, out)
    assert "  a\n" in out.getvalue()


def test_quiet_says_nothing_of_success_and_verbose_names_each_failed_path_and_hook_output():
    def status(state: str, nodes: dict[str, str]) -> dict[str, object]:
        return {
            "id": 4,
            "state": state,
            "submitted": 10.0,
            "started": 10.0,
            "finished": 12.0,
            "payload_bytes": 100,
            "sent_bytes": 100,
            "message": "" if state == "done" else "failed on 1 of 2 nodes: n2",
            "spec": {},
            "nodes": {
                name: {
                    "state": node,
                    "reason": "" if node == "done" else "2 entries failed, first a: cannot write: No space",
                    "needed_bytes": 0,
                    "changed": 2,
                    "hook": {"argv": ["/bin/reload"], "status": 0, "output": "reloaded\nall well\n"},
                }
                for name, node in nodes.items()
            },
            "files": {
                "n1": {"a": "ok", "b": "unchanged"},
                "n2": {"a": "cannot write: No space", "b": "ok", "c": "cannot write: No space"},
            },
        }

    def shown(verbosity: int, state: str, nodes: dict[str, str]) -> list[str]:
        out = io.StringIO()
        report(status(state, nodes), out, verbosity)
        return out.getvalue().splitlines()

    assert shown(-1, "done", {"n1": "done", "n2": "done"}) == []
    assert shown(-1, "failed", {"n1": "done", "n2": "failed"}) == [
        "job 4 failed in 2.0 s: 100 B in the tree, 100 B sent",
        "  failed on 1 of 2 nodes: n2",
        "  n2: failed: 2 entries failed, first a: cannot write: No space",
        "    post-receive /bin/reload exited 0",
    ]
    assert shown(1, "failed", {"n1": "done", "n2": "failed"}) == [
        "job 4 failed in 2.0 s: 100 B in the tree, 100 B sent",
        "  failed on 1 of 2 nodes: n2",
        "  n2: failed: 2 entries failed, first a: cannot write: No space",
        "    a: cannot write: No space",
        "    c: cannot write: No space",
        "    post-receive /bin/reload exited 0",
        "      reloaded",
        "      all well",
        "  n1: done, 2 paths changed",
        "    post-receive /bin/reload exited 0",
        "      reloaded",
        "      all well",
    ]
    assert len(shown(0, "failed", {"n1": "done", "n2": "failed"})) == 6


def test_exit_codes_follow_the_job():
    def nodes(*states):
        return {f"n{i}": {"state": state} for i, state in enumerate(states)}

    assert exit_code({"state": "done", "nodes": nodes("done")}) == EXIT_OK
    assert exit_code({"state": "failed", "nodes": nodes("done", "failed")}) == EXIT_FAILED
    assert exit_code({"state": "failed", "nodes": nodes("failed", "missed")}) == EXIT_FAILED
    assert exit_code({"state": "failed", "nodes": nodes("missed")}) == EXIT_FAILED
    assert exit_code({"state": "failed", "nodes": {}}) == EXIT_FAILED  # refused before it started
    assert exit_code({"state": "failed", "nodes": nodes("done", "missed", "done")}) == EXIT_MISSED
    assert exit_code({"state": "cancelled", "nodes": nodes("missed", "failed")}) == EXIT_CANCELLED


def test_mrsync_loads_none_of_the_engine_and_no_twisted_amp_or_tls():
    """
    ``mrsync`` speaks the operator's commands and nothing else: loading the
    receiver, the sender and the erasure code cost every push 60-80 ms
    before its first byte, and Twisted's AMP, its TLS, pyOpenSSL and
    cryptography 0.26-0.33 s more.  They are loaded only to explain a
    failure (`test_daemon`'s certificate tests).
    """
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, mrsyncd.scripts.mrsync; print(' '.join(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    ).stdout.split()
    assert "mrsyncd.control.boxes" in loaded and "ssl" in loaded
    beyond = (
        "mrsyncd.engine",
        "mrsyncd.daemon",
        "mrsyncd.control.commands",
        "mrsyncd.control.peers",
        "mrsyncd.wire",
        "mrsyncd.security",
        "twisted.internet",
        "twisted.protocols",
        "OpenSSL",
        "cryptography",
        "service_identity",
    )
    heavy = [m for m in loaded if m.startswith(beyond)]
    assert heavy == [], heavy


PROGRAMS = {
    "mrsync": "mrsyncd.scripts.mrsync",
    "mrsync-ca": "mrsyncd.scripts.mrsync_ca",
    "mrsync-engine": "mrsyncd.scripts.mrsync_engine",
}


def run_program(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": REPOSITORY, "HOME": "/nonexistent"}
    env = {k: v for k, v in env.items() if not k.startswith("MRSYNC_")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    ("program", "args"),
    [
        ("mrsync", []),
        ("mrsync", ["push"]),
        ("mrsync", ["status"]),
        ("mrsync-ca", []),
        ("mrsync-ca", ["issue"]),
        ("mrsync-engine", []),
        ("mrsync-engine", ["send"]),
    ],
)
def test_every_command_answers_version_with_mrsyncds(program, args):
    answer = run_program(PROGRAMS[program], *args, "--version")
    assert (answer.returncode, answer.stdout, answer.stderr) == (0, f"mrsyncd {__version__}\n", "")


@pytest.mark.parametrize(
    ("program", "args", "help"),
    [
        ("mrsync", ["--bogus"], "mrsync --help"),
        ("mrsync", ["push", "--bogus", "/a", "all:/b"], "mrsync push --help"),
        ("mrsync", ["status", "seven"], "mrsync status --help"),
        ("mrsync-ca", ["frob"], "mrsync-ca --help"),
        ("mrsync-ca", ["issue", "ca", "n1"], "mrsync-ca issue --help"),
        ("mrsync-engine", [], "mrsync-engine --help"),
    ],
)
def test_a_usage_error_is_one_line_and_where_the_help_is(program, args, help):
    answer = run_program(PROGRAMS[program], *args)
    assert answer.returncode == 2
    (line,) = answer.stderr.splitlines()
    assert line.startswith(f"{program}: ") and line.endswith(f" (see {help})"), answer.stderr


@pytest.mark.parametrize(
    ("limit", "bits"),
    [
        ("12500", 12500 * 1024 * 8),
        ("10M", 10 * 1024**2 * 8),
        ("1.5g", 1.5 * 1024**3 * 8),
        ("800KiB", 800 * 1024 * 8),
    ],
)
def test_bwlimit_caps_the_rate_as_rsync_reads_it(limit, bits):
    assert parse("push", "--bwlimit", limit, "/a", "all:/d").subOptions["rate"] == bits


def test_short_options_mean_what_they_mean_to_rsync():
    """-r is recursive (a push always is), -n a dry run, -b a backup; -d (rsync's --dirs) is not detach."""
    push = parse("push", "-r", "-n", "-b", "/a", "all:/d").subOptions
    flags = (push["recursive"], push["dry-run"], push["backup"], push["detach"], push["rate"])
    assert flags == (1, 1, 1, 0, None)
    for wrong in (["-d"], ["--bwlimit", "fast"], ["-v", "-q"]):
        with pytest.raises(usage.UsageError):
            parse("push", *wrong, "/a", "all:/d")
    assert parse("push", "-v", "/a", "all:/d").subOptions["verbosity"] == 1
    assert parse("push", "-q", "/a", "all:/d").subOptions["verbosity"] == -1
    assert parse("status", "--follow", "-q", "3").subOptions["verbosity"] == -1


def test_includes_and_excludes_keep_their_order_and_files_are_read_as_rsync_reads_them(tmp_path, monkeypatch):
    (tmp_path / "excludes").write_text("# build output\n*.o\n\n; editors\n*~\n/cache/\n+ cache/keep\n")
    (tmp_path / "includes").write_text("keep.o\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("*.tmp\n"))
    sub = parse(
        "push",
        "--include-from",
        str(tmp_path / "includes"),
        "--exclude-from",
        str(tmp_path / "excludes"),
        "--include",
        "*/",
        "--exclude-from",
        "-",
        "--exclude",
        "*",
        "/a",
        "all:/d",
    ).subOptions
    # A pattern that starts with "+ " or "- " says its own sign, as rsync reads it.
    assert sub["filters"] == [
        "+ keep.o",
        "- *.o",
        "- *~",
        "- /cache/",
        "+ cache/keep",
        "+ */",
        "- *.tmp",
        "- *",
    ]
    assert parse("push", "--exclude", "+ x", "--include", "- y", "/a", "all:/d").subOptions["filters"] == [
        "+ x",
        "- y",
    ]
    with pytest.raises(
        usage.UsageError, match=f"--exclude-from {tmp_path}/missing: No such file or directory"
    ):
        parse("push", "--exclude-from", str(tmp_path / "missing"), "/a", "all:/d")
