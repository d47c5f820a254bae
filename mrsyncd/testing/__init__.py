"""
The lab, shipped with the package as Flocker ships its test tools: a LAN of
network namespaces (`lan`), a cluster of real daemons with real certificates
on it (`cluster`) and tree comparisons (`trees`).  It imports nothing that
only the tests install (no pytest, no hypothesis), so that the demo and the
benchmark run on a machine that has only the package's own dependencies.
Building a LAN needs root and ``ip``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: Where the mrsyncd package is (the repository, or dist-packages): what
#: the processes the lab starts import it from, unless told another tree.
REPO = str(Path(__file__).resolve().parents[2])


def environment(code: str = REPO, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (else this process's) with ``code`` first on PYTHONPATH."""
    made = dict(os.environ if env is None else env)
    made["PYTHONPATH"] = os.pathsep.join(filter(None, [code, made.get("PYTHONPATH")]))
    return made
