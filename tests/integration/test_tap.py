"""
``twistd mrsyncd`` in process: `mrsyncd.daemon.tap` builds the services a
configuration asks for with an injected reactor (a `MemoryReactorClock`),
as Twisted's own ``test_tap`` modules test theirs.  Real certificates, a
real job store; the real processes are the daemon tests' business.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.interfaces import IReactorPluggableNameResolver
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from mrsyncd.daemon import store
from mrsyncd.daemon.config import ConfigError, load
from mrsyncd.daemon.master import MasterService
from mrsyncd.daemon.node import NodeService
from mrsyncd.daemon.tap import EXIT_CONFIG, Options, build, makeService
from mrsyncd.security import tls
from mrsyncd.testing.cluster import CA, write_toml


@implementer(IReactorPluggableNameResolver)
class Reactor(MemoryReactorClock):
    """A memory reactor a node's `HostnameEndpoint` takes; nothing here dials, so nothing resolves."""

    nameResolver = None

    def installNameResolver(self, resolver: object) -> object:
        raise NotImplementedError


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path / "ca", tmp_path / "certs")


def write_config(tmp_path: Path, ca: CA, *, node: bool = True, **master: object) -> Path:
    cert, key = ca.issue("master", "master", dns=["localhost"])
    node_cert, node_key = ca.issue("node", "node1")
    sections: dict[str, dict[str, object]] = {
        "tls": {"ca": ca.cert, "certificate": cert, "key": key},
        "master": {"state_dir": str(tmp_path / "state"), "sources": ["/srv"], "port": 7718, **master},
    }
    if node:
        sections["node"] = {
            "master": "localhost:7718",
            "roots": [str(tmp_path / "roots")],
            "certificate": node_cert,
            "key": node_key,
        }
    return write_toml(tmp_path / "mrsyncd.toml", sections)


def test_a_host_runs_what_its_configuration_names_and_the_master_listens_where_it_says(
    tmp_path: Path, ca: CA
) -> None:
    reactor = Reactor()
    top = build(load(str(write_config(tmp_path, ca, address="127.0.0.1", port=7799))), reactor)
    kinds = [type(child) for child in top]
    assert kinds == [tls.RevocationWatch, MasterService, NodeService], kinds
    master = next(child for child in top if isinstance(child, MasterService))
    master.startService()
    try:
        [(port, factory, context, _, interface)] = reactor.sslServers
        assert (port, interface) == (7799, "127.0.0.1")
        assert context is not None and factory is not None
        assert (tmp_path / "state" / "jobs.sqlite").exists()
    finally:
        master.stopService()


def test_a_master_alone_has_no_node_and_a_node_alone_no_master(tmp_path: Path, ca: CA) -> None:
    top = build(load(str(write_config(tmp_path, ca, node=False))), Reactor())
    assert not any(isinstance(child, NodeService) for child in top)
    for child in top:
        if isinstance(child, MasterService):
            child.jobs.close()


def test_what_cannot_be_built_is_a_configuration_error_naming_the_section(tmp_path: Path, ca: CA) -> None:
    path = write_config(tmp_path, ca)
    config = load(str(path))
    (tmp_path / "state").mkdir()
    newer = store.JobStore(str(tmp_path / "state" / "jobs.sqlite"))
    newer.db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(ConfigError, match=r"\[master\] state_dir: .* newer mrsyncd"):
        build(config, Reactor())
    (tmp_path / "state" / "jobs.sqlite").unlink()
    Path(config.tls.key).write_text("not a key")
    with pytest.raises(ConfigError, match=r"\[tls\]"):
        build(config, Reactor())


def test_twistd_options_stop_with_ex_config_and_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = Options()
    with pytest.raises(SystemExit) as stopped:
        options.parseOptions(["--config", str(tmp_path / "missing.toml")])
    assert stopped.value.code == EXIT_CONFIG
    assert f"mrsyncd: {tmp_path / 'missing.toml'}: cannot read" in capsys.readouterr().err


def test_make_service_builds_from_the_parsed_options(tmp_path: Path, ca: CA) -> None:
    options = Options()
    options.parseOptions(["--config", str(write_config(tmp_path, ca, node=False))])
    top = makeService(options)
    masters = [child for child in top if isinstance(child, MasterService)]
    assert len(masters) == 1
    masters[0].jobs.close()
