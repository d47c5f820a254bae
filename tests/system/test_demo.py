"""
The README's first command, as a newcomer runs it: ``./demo.sh`` on a
machine that has only what it installs.  Everything that only the tests
install is hidden first, in a private mount namespace: the directory that
holds them is replaced by one that holds everything else (an empty
directory over each would not do: Python imports an empty directory as a
namespace package).  A demo that imported one of them would fail here, as
it did on a fresh Debian before the lab left tests/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: What run-tests.sh installs for the tests alone, and the demo must not need.
TEST_TOOLS = ("pytest", "_pytest", "hypothesis", "pluggy", "iniconfig", "py", "xdist", "execnet")
#: In a private mount namespace: the directory holding the test tools ($1) is
#: kept at $2 and replaced by a tmpfs into which every other entry is bound.
HIDE = r"""
set -eu
site=$1 kept=$2
shift 2
mount --bind "$site" "$kept"
mount -t tmpfs none "$site"
for entry in "$kept"/*; do
    name=${entry##*/}
    for tool in "$@"; do
        case $name in "$tool" | "$tool".py | "$tool"-* | _"$tool"* ) continue 2 ;; esac
    done
    if [ -d "$entry" ]; then mkdir "$site/$name"; else : > "$site/$name"; fi
    mount --bind "$entry" "$site/$name"
done
if /usr/bin/python3 -c 'import pytest' 2>/dev/null; then echo 'pytest is still there'; exit 99; fi
exec ./demo.sh
"""


def tools_home() -> str:
    """The one directory /usr/bin/python3 finds every test tool in."""
    found = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import importlib.util as u, os, sys\n"
            "for name in sys.argv[1:]:\n"
            "    spec = u.find_spec(name)\n"
            "    if spec and spec.origin: print(os.path.dirname(os.path.dirname(spec.origin)))",
            *TEST_TOOLS,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    homes = set(found)
    assert len(homes) == 1, f"test tools in more than one place: {homes}"
    return homes.pop()


@pytest.mark.lan
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
@pytest.mark.skipif(
    sys.prefix != sys.base_prefix,
    reason="the demo runs Debian's /usr/bin/python3 whatever runs the tests: once, not from a virtualenv",
)
def test_the_demo_runs_where_no_test_tool_is_installed(tmp_path: Path) -> None:
    site = tools_home()
    kept = tmp_path / "site"
    kept.mkdir()
    demo = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            HIDE,
            "sh",
            site,
            str(kept),
            *TEST_TOOLS,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    out = demo.stdout + demo.stderr
    sys.stdout.write(out[-3000:])
    assert demo.returncode == 0, out[-3000:]
    assert "3 of 3 copies verified" in demo.stdout, out[-3000:]
