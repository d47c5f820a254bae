"""
The fixtures every test module may use, and the tiers.  Each test lives in
the directory of its tier, which marks it (``-m unit`` and so on):

- ``unit/``: pure logic, no socket, no process, no reactor but a fake clock;
- ``integration/``: real sockets, TLS, files and SQLite, in this process on
  the real reactor;
- ``system/``: real processes: daemons, the LAN of namespaces, the Debian
  package, the demo (most need root: markers ``lan`` and ``package``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from mrsyncd.testing.lan import Lan, _sigterm_as_interrupt, sweep_dead_runs, unavailable

# Hypothesis fails an example that takes over 200 ms: a timing check, which
# on CI's two workers sharing two cores measures the machine (a first example
# of test_datagram's took 319 ms there, and 0.14 ms when run again).  What
# must be fast is measured in bench/, against the peers.
settings.register_profile("mrsyncd", deadline=None)
settings.load_profile("mrsyncd")


@pytest.fixture(name="lan")
def lan_fixture() -> Iterator[Any]:
    """
    A factory of LANs: ``lan(nodes=3)`` builds one (skipping the test where
    the machine cannot); all are torn down when the test ends, pass or fail.
    """
    why = unavailable()
    if why:
        pytest.skip(why)
    sweep_dead_runs()
    made: list[Lan] = []

    def make(nodes: int = 3, **kwargs: Any) -> Lan:
        net = Lan(nodes, **kwargs)
        made.append(net)
        net.wait_ready()
        return net

    with _sigterm_as_interrupt():
        try:
            yield make
        finally:
            for net in reversed(made):
                net.close()


TIERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS:
            item.add_marker(tier)
