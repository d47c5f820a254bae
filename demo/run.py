"""
The main job of mrsyncd, on one machine: a master and three nodes, each on a
host of its own (network namespaces on a bridge), with throwaway
certificates, pushing a sample tree with the real ``mrsync`` CLI and live
progress, then checking every node's copy.  Run it as root through
../demo.sh, which installs what it needs first.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mrsyncd.testing.cluster import Cluster, cli_env  # noqa: E402
from mrsyncd.testing.lan import Lan, unavailable  # noqa: E402


def sample_tree(root: Path) -> None:
    """A little of everything: a large file, small ones, a symlink, a hardlink."""
    (root / "docs").mkdir(parents=True)
    (root / "bin").mkdir()
    with open(root / "image.bin", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    for i in range(20):
        (root / "docs" / f"note-{i:02d}.txt").write_text(f"note {i}\n" * (i + 1))
    (root / "bin" / "run").write_text("#!/bin/sh\necho hello from mrsyncd\n")
    (root / "bin" / "run").chmod(0o755)
    (root / "empty").write_text("")
    os.symlink("docs/note-00.txt", root / "latest")
    os.link(root / "docs" / "note-01.txt", root / "first-note")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        h.update(f"{path.relative_to(root)} {st.st_mode:o} {st.st_mtime_ns}".encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def main() -> int:
    why = unavailable()
    if why:
        print(f"demo: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mrsyncd-demo-") as scratch:
        base = Path(scratch)
        src = base / "sample"
        sample_tree(src)
        print(f"sample tree: {src} (64 MiB image, 20 notes, a symlink, a hardlink)")
        lan = Lan(nodes=3)
        cluster = None
        try:
            lan.wait_ready()
            lan.master.cap_egress("200mbit")
            print(f"LAN: master {lan.master.ipv4}, nodes {', '.join(h.ipv4 for h in lan.nodes)}")
            cluster = Cluster(
                base / "cluster",
                python="/usr/bin/python3",
                host=lan.master.ipv4,
                interface="eth0",
                loopback=False,
                master_netns=lan.master.netns,
                rate="200M",
            )
            cluster.start_master()
            print("master started; throwaway CA and certificates in", cluster.ca.directory)
            for host in lan.nodes:
                cluster.add_node(host.name, netns=host.netns, wait=False)
            for host in lan.nodes:
                cluster.wait_registered(host.name, 0)
            print(cluster.cli("nodes").stdout)
            cert, key = cluster.operator
            push = [
                *(["ip", "netns", "exec", lan.master.netns]),
                "/usr/bin/python3", "-m", "mrsyncd.scripts.mrsync",
                "--master", cluster.address, "--ca", cluster.ca.cert, "--cert", cert, "--key", key,
                "push", f"{src}/", f"all:{cluster.shared}/sample",
            ]
            print("$ mrsync push", f"{src}/", f"all:{cluster.shared}/sample")
            code = subprocess.call(push, env=cli_env())
            want = tree_digest(src)
            good = 0
            for host in lan.nodes:
                copy = cluster.node_dir(host.name) / "sample"
                same = copy.exists() and tree_digest(copy) == want
                good += same
                print(f"  {host.name}: {'identical to the source' if same else 'DIFFERENT'}")
            print(f"mrsync exited {code}; {good} of {len(lan.nodes)} copies verified")
            return 0 if code == 0 and good == len(lan.nodes) else 1
        finally:
            if cluster is not None:
                cluster.close()
            lan.close()


if __name__ == "__main__":
    sys.exit(main())
