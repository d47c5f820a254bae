"""
The Debian package, as an administrator meets it: built from debian/ with
``dpkg-buildpackage`` (in a copy of the tree, so the checkout stays clean),
checked with lintian and ``systemd-analyze``, installed with apt, then
exercised for real: a master and two nodes run the units' own ExecStart
command lines as the package's user, each in a host of a namespace LAN
(mrsyncd/testing/lan.py), and the installed ``mrsync`` pushes a tree to both nodes
with certificates made by the installed ``mrsync-ca``.  Then an upgrade, a
removal and a purge, checking what each keeps and deletes.

Every host of the LAN shares this machine's file system.  ``ip netns exec``
bind-mounts each entry of ``/etc/netns/NAMESPACE/`` over the same name in
``/etc`` for the command it runs, so every daemon finds its own
``/etc/mrsyncd/`` (configuration, certificate, key) exactly where the unit
says; a node's receiving root is likewise its own directory bind-mounted
over the shared path, in the mount namespace ``ip netns exec`` made for it.

The test leaves the machine as it found it: it purges the package, removes
the ``mrsyncd`` account if it made it, and restores the socket buffer
limits the package raised.  It is skipped where it cannot run (not root,
no dpkg-buildpackage, build dependencies missing, inside a virtualenv, or
with the mrsyncd package already installed here).
"""

from __future__ import annotations

import contextlib
import fnmatch
import grp
import os
import pwd
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mrsyncd.testing.cluster import write_toml
from mrsyncd.testing.lan import Host
from tests.support import assert_same_tree, make_full_tree, unit_settings

pytestmark = [pytest.mark.package, pytest.mark.lan]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "mrsyncd"
USER = "mrsyncd"
UPGRADE_VERSION_SUFFIX = "+pkgtest1"
#: Commands run with this environment: Debian's own tools and interpreter,
#: never a virtualenv's or pyenv's, and never this checkout's modules.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {
    "dpkg-buildpackage": "dpkg-dev",
    "dpkg-checkbuilddeps": "dpkg-dev",
    "apt-get": "apt",
    "lintian": "lintian",
    "systemd-analyze": "systemd",
    "setpriv": "util-linux",
    "ip": "iproute2",
}
SYSCTLS = ("net.core.rmem_max", "net.core.wmem_max")
FOUR_MIB = 4 << 20
CONTROL_PORT = 7718

FILES = [
    "/usr/bin/mrsync",
    "/usr/bin/mrsync-ca",
    "/usr/bin/mrsync-engine",
    "/usr/lib/python3/dist-packages/twisted/plugins/mrsyncd_plugin.py",
    "/usr/lib/python3/dist-packages/mrsyncd/daemon/tap.py",
    "/etc/mrsyncd/mrsyncd.toml",
    "/lib/systemd/system/mrsyncd-master.service",
    "/lib/systemd/system/mrsyncd-node.service",
    "/usr/lib/sysctl.d/60-mrsyncd.conf",
    "/usr/share/man/man1/mrsync.1.gz",
    "/usr/share/man/man1/mrsync-ca.1.gz",
    "/usr/share/man/man8/mrsyncd.8.gz",
    "/usr/share/doc/mrsyncd/README.Debian.gz",
    "/usr/share/doc/mrsyncd/examples/preserve-owner.conf",
]
#: Twisted's (python3-twisted ships them): a package that shipped these
#: would clash with it, and the cache is rebuilt by its trigger.
NOT_OURS = [
    "/usr/lib/python3/dist-packages/twisted/__init__.py",
    "/usr/lib/python3/dist-packages/twisted/plugins/__init__.py",
    "/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache",
]
PLUGIN_CACHE = Path("/usr/lib/python3/dist-packages/twisted/plugins/dropin.cache")
UNITS = {
    "master": "/lib/systemd/system/mrsyncd-master.service",
    "node": "/lib/systemd/system/mrsyncd-node.service",
}


def system_env(**extra: str) -> dict[str, str]:
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")}
    env.update(extra)
    return env


def run(
    args: Sequence[str], *, timeout: float = 120, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("env", system_env())
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n"
            f"stderr:\n{result.stderr[-4000:]}"
        )
    return result


def package_status(name: str = PACKAGE) -> str:
    """dpkg's status of a package ("install ok installed", ...), or "" if it never heard of it."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True, env=system_env()
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def unavailable() -> str | None:
    """Why this machine cannot run the package test, or None."""
    if not sys.platform.startswith("linux"):
        return "builds and installs a Debian package: needs Debian"
    if os.geteuid() != 0:
        return "installs and purges a Debian package: needs root"
    if shutil.which("dpkg-buildpackage", path=SYSTEM_PATH) is None:
        return "dpkg-buildpackage is not installed (apt-get install dpkg-dev debhelper dh-python ...)"
    if sys.prefix != sys.base_prefix:
        return "runs once, under Debian's python3, not in a virtualenv"
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=SYSTEM_PATH) is None})
    if missing:
        return f"missing tools: apt-get install {' '.join(missing)}"
    status = package_status()
    if status and "not-installed" not in status:
        return f"the {PACKAGE} package is on this machine ({status}): the test would replace and purge it"
    return None


def copy_tree(destination: Path) -> None:
    """This checkout as the developer has it (tracked and new files, not ignored ones)."""
    git = shutil.which("git", path=SYSTEM_PATH)
    listed = (
        subprocess.run(
            [git, "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            env=system_env(),
        )
        if git and (REPO / ".git").exists()
        else None
    )
    if listed is not None and listed.returncode == 0:
        for name in sorted({n for n in listed.stdout.decode().split("\0") if n}):
            source = REPO / name
            if not os.path.lexists(source):
                continue  # deleted in the work tree
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
        return
    shutil.copytree(
        REPO,
        destination,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "__pycache__",
            "*.pyc",
            ".*_cache",
            ".hypothesis",
            "build",
            "dist",
            "*.egg-info",
            "dropin.cache",
            ".pybuild",
            "results",
            "*.so",
        ),
    )


def changelog_version(tree: Path) -> str:
    first = (tree / "debian" / "changelog").read_text().splitlines()[0]
    found = re.match(r"\S+ \(([^)]+)\)", first)
    assert found, first
    return found.group(1)


def add_changelog_entry(tree: Path, version: str) -> None:
    """A newer version of the same tree, to install over the first one as an upgrade."""
    path = tree / "debian" / "changelog"
    old = path.read_text()
    trailer = re.search(r"^ -- (.+?)  .*$", old, re.M)
    assert trailer, "debian/changelog has no trailer line"
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    entry = (
        f"{PACKAGE} ({version}) unstable; urgency=medium\n\n"
        f"  * Rebuilt by tests/system/test_package.py to test upgrades.\n\n"
        f" -- {trailer.group(1)}  {stamp}\n\n"
    )
    path.write_text(entry + old)


def architecture() -> str:
    """This machine's: the package holds a C module, so it is built for it."""
    return run(["dpkg", "--print-architecture"]).stdout.strip()


def build(tree: Path) -> Path:
    """dpkg-buildpackage -us -uc -b in ``tree``; the .deb it made beside it."""
    missing = run(["dpkg-checkbuilddeps"], cwd=tree, check=False)
    if missing.returncode != 0:
        pytest.skip(f"build dependencies missing: {missing.stderr.strip()}")
    run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree, timeout=300)
    version = changelog_version(tree)
    deb = tree.parent / f"{PACKAGE}_{version}_{architecture()}.deb"
    assert deb.exists(), sorted(p.name for p in tree.parent.iterdir())
    return deb


def apt_get(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run(
        [
            "apt-get",
            "-y",
            "-q",
            "-o",
            "DPkg::Lock::Timeout=120",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            *args,
        ],
        timeout=timeout,
        env=system_env(DEBIAN_FRONTEND="noninteractive"),
        # Not this checkout: python3-twisted's trigger runs "python3 -c", which
        # would scan (and write a plugin cache into) ./twisted/plugins.
        cwd="/",
    )


def dpkg_excludes(path: str) -> bool:
    """
    Does dpkg leave ``path`` out when it unpacks (path-exclude in dpkg.cfg,
    as minimal and container images do for /usr/share/man and /usr/share/doc)?
    """
    verdict = False
    configs = [Path("/etc/dpkg/dpkg.cfg"), *sorted(Path("/etc/dpkg/dpkg.cfg.d").glob("*"))]
    for config in configs:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for line in config.read_text().splitlines():
                option, _, pattern = line.strip().partition("=")
                if option in ("path-exclude", "path-include") and fnmatch.fnmatch(path, pattern.strip()):
                    verdict = option == "path-exclude"
    return verdict


def read_sysctls() -> dict[str, int]:
    values = {}
    for name in SYSCTLS:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            values[name] = int(f.read())
    return values


def plugin_cache_names() -> bytes:
    return PLUGIN_CACHE.read_bytes() if PLUGIN_CACHE.exists() else b""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The package built twice from a copy of this tree: as it is, and as a newer version."""
    why = unavailable()
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp("package")
    tree = base / f"{PACKAGE}-src"
    copy_tree(tree)
    started = time.monotonic()
    first = build(tree)
    version = changelog_version(tree)
    changes = next(tree.parent.glob(f"{PACKAGE}_{version}_*.changes"))
    # The second build goes elsewhere so that the two sets of outputs do not mix.
    upgrade_tree = base / "upgrade" / f"{PACKAGE}-src"
    upgrade_tree.parent.mkdir()
    copy_tree(upgrade_tree)
    add_changelog_entry(upgrade_tree, version + UPGRADE_VERSION_SUFFIX)
    second = build(upgrade_tree)
    print(f"built {first.name} and {second.name} in {time.monotonic() - started:.1f} s")
    yield {"deb": first, "changes": changes, "upgrade": second}


def test_package_contents_and_lintian(built: dict[str, Path]) -> None:
    listing = run(["dpkg-deb", "-c", str(built["deb"])]).stdout
    paths = {"/" + line.split()[5].lstrip("./") for line in listing.splitlines()}
    for wanted in FILES:
        assert wanted in paths, f"{wanted} not in the package:\n{listing}"
    for unwanted in NOT_OURS:
        assert unwanted not in paths, f"the package ships {unwanted}, which belongs to python3-twisted"
    for module in ("_crypto", "_erasure"):
        pattern = rf"/usr/lib/python3/dist-packages/mrsyncd/{module}\..*\.so"
        native = [p for p in paths if re.fullmatch(pattern, p)]
        assert native, f"the data path's C module {module} is not in the package:\n{listing}"
    fields = run(["dpkg-deb", "-f", str(built["deb"]), "Package", "Architecture", "Depends"]).stdout
    assert "Package: mrsyncd" in fields and f"Architecture: {architecture()}" in fields, fields
    for dependency in (
        "libssl3",  # the C module's libcrypto, found by dh_shlibdeps
        "python3-twisted",
        "python3-openssl",
        "python3-service-identity",
        "python3-cryptography",
    ):
        assert re.search(rf"\b{dependency}\b", fields), f"no {dependency} in {fields}"
    control = run(["dpkg-deb", "-I", str(built["deb"]), "triggers", "conffiles"]).stdout
    assert "activate-noawait twisted-plugins-cache" in control, control
    assert "/etc/mrsyncd/mrsyncd.toml" in control, control

    result = run(
        ["lintian", "--no-tag-display-limit", "--display-info", str(built["changes"])],
        check=False,
        timeout=300,
    )
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWI]: ", line)]
    print("lintian:\n" + "\n".join(tags))
    errors = [line for line in tags if line.startswith("E: ")]
    assert not errors, "lintian errors:\n" + "\n".join(errors) + f"\n{result.stderr}"
    assert result.returncode == 0, f"lintian exited {result.returncode}: {result.stdout}\n{result.stderr}"


# Running the daemons as the units would.


def unit_command(unit: str) -> tuple[list[str], str]:
    """The ExecStart command line and User of an installed unit."""
    settings = unit_settings(unit)
    return shlex.split(settings["ExecStart"]), settings["User"]


class NotifySocket:
    """
    What systemd gives a ``Type=notify`` unit: a datagram socket named in
    ``NOTIFY_SOCKET``, on which the daemon says it is ready (sd_notify).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        os.chmod(path, 0o666)  # the unit's user sends to it

    def wait_ready(self, timeout: float) -> dict[str, str]:
        """The fields of the message that says READY=1 (and any sent before it)."""
        fields: dict[str, str] = {}
        self.socket.settimeout(timeout)
        while fields.get("READY") != "1":
            message = self.socket.recv(4096).decode()
            fields.update(line.split("=", 1) for line in message.splitlines() if "=" in line)
        return fields

    def close(self) -> None:
        self.socket.close()


class Daemon:
    """A unit's ExecStart on a LAN host, as the unit's user, without privileges, logging to a file."""

    def __init__(
        self,
        host: Host,
        unit: str,
        log: Path,
        bind: tuple[Path, Path] | None = None,
        notify: NotifySocket | None = None,
    ) -> None:
        self.host = host
        self.log = log
        argv, user = unit_command(unit)
        assert unit_settings(unit)["Type"] == "notify", unit
        # systemctl reload: the daemon rereads its revocation list (mrsyncd.security.tls.RevocationWatch).
        assert unit_settings(unit)["ExecReload"] == "/bin/kill -HUP $MAINPID", unit
        pw = pwd.getpwnam(user)
        # What systemd would do for User=, NoNewPrivileges=yes and an empty
        # CapabilityBoundingSet=: drop to the user with its groups, no way
        # back to privileges, an environment of its own, working directory /.
        # LimitNOFILE= as systemd would set it (it may raise the hard limit, which
        # this process may not be allowed to: then as far as the hard limit).
        nofile = min(int(unit_settings(unit)["LimitNOFILE"]), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        command = [
            "prlimit",
            f"--nofile={nofile}",
            "--",
            "env",
            "-i",
            f"PATH={SYSTEM_PATH}",
            "LANG=C.UTF-8",
            f"HOME={pw.pw_dir}",
            f"USER={user}",
            f"LOGNAME={user}",
            f"SHELL={pw.pw_shell}",
            *([f"NOTIFY_SOCKET={notify.path}"] if notify is not None else []),
            "setpriv",
            f"--reuid={user}",
            f"--regid={user}",
            "--init-groups",
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--",
            *argv,
        ]
        if bind is not None:
            # This host's own directory over the shared path, in the mount
            # namespace that ip netns exec made for this command only.
            command = [
                "sh",
                "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"',
                "sh",
                *map(str, bind),
                *command,
            ]
        with open(log, "ab") as out:
            out.write(f"==== {' '.join(argv)} as {user} on {host.name}\n".encode())
            out.flush()
            # Not host.popen: that puts this checkout on PYTHONPATH, and the
            # point is to run what the package installed.
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=system_env(),
                cwd="/",
                start_new_session=True,
            )
        host.processes.append(self.proc)

    def check_unprivileged(self) -> None:
        """The daemon runs as the unit's user, with no capabilities and no way to gain any."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        assert "twistd3" in Path(f"/proc/{self.proc.pid}/cmdline").read_text(), status["Name"]
        uid = pwd.getpwnam(USER).pw_uid
        assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
        assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0, status
        assert status["NoNewPrivs"].strip() == "1", status

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, other: Daemon | None = None) -> None:
        """Wait for ``pattern`` in this daemon's log; fail early if it (or ``other``) exits."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            for daemon in (self, other):
                if daemon is not None and daemon.proc.poll() is not None:
                    raise AssertionError(
                        f"{daemon.host.name} exited with {daemon.proc.returncode} before {pattern!r}:\n"
                        f"{daemon.text()[-3000:]}"
                    )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def install_identity(ca_dir: Path, role: str, name: str, etc: Path, staging: Path, *extra: str) -> None:
    """Issue with the installed mrsync-ca and install as README.Debian says (key 0640 root:mrsyncd)."""
    run(["/usr/bin/mrsync-ca", "issue", str(ca_dir), "--role", role, name, "--out", str(staging), *extra])
    etc.mkdir(parents=True, exist_ok=True)
    os.chmod(etc, 0o755)
    run(["install", "-m", "0644", str(ca_dir / "ca.crt"), str(etc / "ca.crt")])
    run(["install", "-m", "0644", str(staging / f"{name}.crt"), str(etc / "host.crt")])
    run(["install", "-m", "0640", "-g", USER, str(staging / f"{name}.key"), str(etc / "host.key")])


def chown_tree(root: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            os.chown(os.path.join(dirpath, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def check_installed() -> None:
    status = package_status()
    assert status == "install ok installed", status
    listed = set(run(["dpkg", "-L", PACKAGE]).stdout.splitlines())
    for wanted in FILES:
        if dpkg_excludes(wanted):
            continue
        assert wanted in listed, f"dpkg -L {PACKAGE} lacks {wanted}"
        assert os.path.exists(wanted), wanted
    for unwanted in NOT_OURS:
        assert unwanted not in listed, f"{PACKAGE} owns {unwanted}"
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE]).stdout
    assert "/etc/mrsyncd/mrsyncd.toml" in conffiles, conffiles
    # The account and the directories that belong to it.
    pw = pwd.getpwnam(USER)
    assert pw.pw_uid < 1000 and pw.pw_shell.endswith("nologin") and pw.pw_dir == "/var/lib/mrsyncd", pw
    assert grp.getgrgid(pw.pw_gid).gr_name == USER
    for directory in ("/var/lib/mrsyncd", "/var/log/mrsyncd"):
        st = os.stat(directory)
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid), directory
    # The trigger made python3-twisted rebuild its plugin cache with ours in it,
    # and twistd3 (as the daemons' user, who cannot write the cache) lists it.
    assert b"mrsyncd_plugin" in plugin_cache_names(), "the twisted plugin cache does not list mrsyncd"
    listing = run(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "twistd3", "--help"], cwd="/"
    )
    assert re.search(r"^\s+mrsyncd\s", listing.stdout, re.M), listing.stdout
    # The sysctl.d file was applied (where /proc/sys is writable).
    values = read_sysctls()
    if os.access("/proc/sys/net/core/rmem_max", os.W_OK):
        assert all(v >= FOUR_MIB for v in values.values()), values


def verify_units() -> None:
    # verify checks that each Documentation=man: page exists, unless dpkg
    # was told to leave manual pages out.
    man = "--man=no" if dpkg_excludes("/usr/share/man/man8/mrsyncd.8.gz") else "--man=yes"
    result = run(["systemd-analyze", "verify", man, *UNITS.values()], check=False)
    print(f"systemd-analyze verify: exit {result.returncode} {result.stdout}{result.stderr}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mrsyncd" not in result.stdout + result.stderr, result.stdout + result.stderr
    for unit in UNITS.values():
        security = run(["systemd-analyze", "security", "--offline=yes", unit], check=False)
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
        assert level, security.stdout + security.stderr
        print(f"systemd-analyze security {os.path.basename(unit)}: {level.group(1)}")
        assert float(level.group(1)) <= 3.0, security.stdout
    # The shipped drop-in for --preserve-owner, beside a copy of the node unit.
    with tempfile.TemporaryDirectory() as scratch:
        unit = Path(scratch) / "mrsyncd-node.service"
        shutil.copy(UNITS["node"], unit)
        dropins = Path(scratch) / "mrsyncd-node.service.d"
        dropins.mkdir()
        shutil.copy("/usr/share/doc/mrsyncd/examples/preserve-owner.conf", dropins)
        result = run(["systemd-analyze", "verify", man, str(unit)], check=False)
        assert result.returncode == 0 and "mrsyncd" not in result.stdout + result.stderr, result
        security = run(["systemd-analyze", "security", "--offline=yes", str(unit)], check=False).stdout
        assert re.search(r"✗ AmbientCapabilities=", security), security
        level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security)
        assert level, security
        print(f"systemd-analyze security mrsyncd-node.service with preserve-owner.conf: {level.group(1)}")


def push_over_lan(lan: Any, base: Path, netns_dirs: list[Path]) -> None:
    net = lan(nodes=2)
    master_host, nodes = net.master, net.nodes
    ca_dir, staging = base / "ca", base / "staging"
    run(["/usr/bin/mrsync-ca", "init", str(ca_dir)])
    etc = {}
    for host in [master_host, *nodes]:
        etc[host.name] = Path("/etc/netns") / host.netns / "mrsyncd"
        netns_dirs.append(etc[host.name].parent)
    install_identity(ca_dir, "master", "master", etc["master"], staging, "--ip", master_host.ipv4)
    tls = {
        "ca": "/etc/mrsyncd/ca.crt",
        "certificate": "/etc/mrsyncd/host.crt",
        "key": "/etc/mrsyncd/host.key",
    }
    master_toml = _config_path(UNITS["master"])
    write_toml(
        etc["master"] / master_toml.name,
        {
            "tls": tls,
            "master": {
                "address": master_host.ipv4,
                "interface": "eth0",
                "rate": "300M",
                "grace": 20,
                "sources": [str(base)],
            },
        },
    )
    # One destination path for every node: each node's own directory is
    # mounted over it in that node's daemon.
    shared = base / "shared"
    shared.mkdir()
    node_toml = _config_path(UNITS["node"])
    for node in nodes:
        install_identity(ca_dir, "node", node.name, etc[node.name], staging)
        write_toml(
            etc[node.name] / node_toml.name,
            {
                "tls": tls,
                "node": {
                    "master": f"{master_host.ipv4}:{CONTROL_PORT}",
                    "interface": "eth0",
                    "roots": [str(shared)],
                },
            },
        )
        mine = base / "nodes" / node.name
        mine.mkdir(parents=True)
        chown_tree(mine, USER)
    run(
        [
            "/usr/bin/mrsync-ca",
            "issue",
            str(ca_dir),
            "--role",
            "operator",
            "operator",
            "--out",
            str(base / "operator"),
        ]
    )

    # The sources belong to the daemons' user: the master reads them as that user.
    source = base / "src"
    make_full_tree(str(source))
    chown_tree(source, USER)

    daemons = []
    sockets = {host.name: NotifySocket(base / f"notify-{host.name}") for host in [master_host, *nodes]}
    try:
        master = Daemon(master_host, UNITS["master"], base / "master.log", notify=sockets[master_host.name])
        daemons.append(master)
        # Ready (Type=notify) once it listens: a push right after finds it.
        ready = sockets[master_host.name].wait_ready(30)
        assert ready["STATUS"] == f"listening on {master_host.ipv4} port {CONTROL_PORT}", ready
        assert "master listening on" in master.text()
        for node in nodes:
            daemons.append(
                Daemon(
                    node,
                    UNITS["node"],
                    base / f"{node.name}.log",
                    bind=(base / "nodes" / node.name, shared),
                    notify=sockets[node.name],
                )
            )
        for node, daemon in zip(nodes, daemons[1:], strict=True):
            ready = sockets[node.name].wait_ready(30)
            assert ready["STATUS"].startswith(f"registered as {node.name} with the master at "), ready
            master.wait_for(rf"node {node.name} registered from", 30, other=daemon)
        for daemon in daemons:
            daemon.check_unprivileged()

        started = time.monotonic()
        push = master_host.run(
            [
                "env",
                "-i",
                f"PATH={SYSTEM_PATH}",
                "LANG=C.UTF-8",
                "HOME=/nonexistent",
                "/usr/bin/mrsync",
                "--master",
                f"{master_host.ipv4}:{CONTROL_PORT}",
                "--ca",
                str(ca_dir / "ca.crt"),
                "--cert",
                str(base / "operator" / "operator.crt"),
                "--key",
                str(base / "operator" / "operator.key"),
                "push",
                f"{source}/",
                f"all:{shared}/tree",
            ],
            check=False,
            timeout=180,
        )
        logs = "\n".join(f"--- {d.host.name}:\n{d.text()[-3000:]}" for d in daemons)
        assert push.returncode == 0, (
            f"mrsync push exited {push.returncode}\n{push.stdout}\n{push.stderr}\n{logs}"
        )
        print(f"push took {time.monotonic() - started:.1f} s:\n{push.stdout}")
        for node in nodes:
            assert_same_tree(unittest.TestCase(), str(source), str(base / "nodes" / node.name / "tree"))
            assert re.search(rf"\b{node.name}: done\b", push.stdout), push.stdout
        for daemon in daemons:
            text = daemon.text()
            for bad in ("Traceback", "dropin.cache", "Unhandled", "receive buffer is"):
                assert bad not in text, f"{bad!r} in the log of {daemon.host.name}:\n{text[-3000:]}"
        # The master keeps its job store where the unit's StateDirectory= is.
        assert os.path.exists("/var/lib/mrsyncd/jobs.sqlite")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        for notify in sockets.values():
            notify.close()


def _config_path(unit: str) -> Path:
    argv, _ = unit_command(unit)
    config = Path(argv[argv.index("--config") + 1])
    assert config.parent == Path("/etc/mrsyncd"), config
    return config


def test_install_push_upgrade_remove_purge(built: dict[str, Path], lan: Any) -> None:
    started = time.monotonic()
    sysctls = read_sysctls()
    had_user = _exists(pwd.getpwnam, USER)
    had_group = _exists(grp.getgrnam, USER)
    had_netns_dir = os.path.isdir("/etc/netns")
    base = Path(tempfile.mkdtemp(prefix="mrsyncd-package-"))
    os.chmod(base, 0o755)  # the daemons' user walks into it
    netns_dirs: list[Path] = []
    try:
        apt_get("install", "--no-install-recommends", str(built["deb"]))
        check_installed()
        verify_units()

        push_over_lan(lan, base, netns_dirs)

        # An upgrade keeps an edited conffile, the account and the state.
        with open("/etc/mrsyncd/mrsyncd.toml", "a") as f:
            f.write("# edited by the administrator\n")
        apt_get("install", "--no-install-recommends", str(built["upgrade"]))
        version = run(["dpkg-query", "-W", "-f=${Version}", PACKAGE]).stdout
        assert version.endswith(UPGRADE_VERSION_SUFFIX), version
        check_installed()
        assert "# edited by the administrator" in Path("/etc/mrsyncd/mrsyncd.toml").read_text()
        assert os.path.exists("/var/lib/mrsyncd/jobs.sqlite")

        # Removal keeps configuration, state and logs, and drops the plugin from the cache.
        apt_get("remove", PACKAGE)
        assert "config-files" in package_status(), package_status()
        assert not os.path.exists("/usr/bin/mrsync")
        assert os.path.exists("/etc/mrsyncd/mrsyncd.toml")
        assert os.path.exists("/var/lib/mrsyncd/jobs.sqlite")
        assert b"mrsyncd_plugin" not in plugin_cache_names()

        # Purge deletes them; the account stays (Debian practice), and so do
        # the nodes' roots.
        apt_get("purge", PACKAGE)
        assert package_status() in ("", "unknown ok not-installed"), package_status()
        for gone in (
            "/etc/mrsyncd",
            "/var/lib/mrsyncd",
            "/var/log/mrsyncd",
            "/etc/systemd/system/multi-user.target.wants/mrsyncd-node.service",
        ):
            assert not os.path.lexists(gone), f"{gone} survived the purge"
        assert _exists(pwd.getpwnam, USER)
        assert (base / "nodes" / "node1" / "tree" / "small.txt").exists()
    finally:
        _leave_as_found(sysctls, had_user, had_group, had_netns_dir, base, netns_dirs)
    print(f"install, push, upgrade, remove and purge took {time.monotonic() - started:.1f} s")


def _exists(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _leave_as_found(
    sysctls: dict[str, int],
    had_user: bool,
    had_group: bool,
    had_netns_dir: bool,
    base: Path,
    netns_dirs: list[Path],
) -> None:
    """Undo what the test and the package did to this machine, whatever happened."""
    problems = []
    if package_status() not in ("", "unknown ok not-installed"):
        result = run(
            ["dpkg", "--purge", PACKAGE],
            check=False,
            env=system_env(DEBIAN_FRONTEND="noninteractive"),
            cwd="/",
        )
        if result.returncode != 0:
            problems.append(f"dpkg --purge: {result.stderr}")
    if not had_user and _exists(pwd.getpwnam, USER):
        run(["deluser", "--system", "--quiet", USER], check=False)
    if not had_group and _exists(grp.getgrnam, USER):
        run(["delgroup", "--system", "--quiet", USER], check=False)
    for name, value in sysctls.items():
        if read_sysctls()[name] != value:
            run(["sysctl", "-q", "-w", f"{name}={value}"], check=False)
    for directory in netns_dirs:
        shutil.rmtree(directory, ignore_errors=True)
    if not had_netns_dir:
        with contextlib.suppress(OSError):
            os.rmdir("/etc/netns")
    shutil.rmtree(base, ignore_errors=True)
    if problems:
        raise AssertionError("; ".join(problems))
