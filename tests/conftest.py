"""The fixtures every test module may use."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mrsyncd.testing.lan import Lan, _sigterm_as_interrupt, sweep_dead_runs, unavailable


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
