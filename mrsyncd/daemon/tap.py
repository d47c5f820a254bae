"""
``twistd mrsyncd``: builds the services that the configuration asks for.

The plugin in twisted/plugins/ only names this module; everything else is
here, so that tests build the very same services with their own reactor.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.python import usage

from mrsyncd import __version__, logs
from mrsyncd.daemon import store
from mrsyncd.daemon.config import Config, ConfigError, load
from mrsyncd.daemon.master import MasterService
from mrsyncd.daemon.node import NodeService
from mrsyncd.security import tls
from mrsyncd.units import split_address

DEFAULT_CONFIG = "/etc/mrsyncd/mrsyncd.toml"
#: The exit status of a configuration error (sysexits' EX_CONFIG), which
#: the packaged units do not restart on (RestartPreventExitStatus=): the
#: same file would fail again every 5 s, and the unit should show failed.
EXIT_CONFIG = os.EX_CONFIG


def _stop_for(error: ConfigError) -> SystemExit:
    print(f"mrsyncd: {error}", file=sys.stderr)
    return SystemExit(EXIT_CONFIG)


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the mrsyncd master, node, or both, as the configuration file's [master] and [node] sections say."
    )
    optParameters = [["config", "c", DEFAULT_CONFIG, "The configuration file (TOML)."]]

    def opt_version(self) -> None:
        print(f"mrsyncd {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self["parsed"] = load(self["config"])
        except ConfigError as e:
            # Not a UsageError: twistd 22.4 (Debian 12) prints those after the
            # whole usage text and then exits 0, which systemd takes for a
            # clean stop.
            raise _stop_for(e) from None


def build(config: Config, reactor: Any) -> service.MultiService:
    """The services of one host, with an injected reactor."""
    logs.set_level(config.log_level)
    top = service.MultiService()
    try:
        revocations = tls.Revocations(config.tls.crl, config.tls.ca)
    except Exception as e:
        raise ConfigError(f"{config.path}: [tls] crl: {e}") from None
    tls.RevocationWatch(reactor, revocations).setServiceParent(top)
    if config.master is not None:
        master = config.master
        try:
            options = tls.server_options(config.tls.ca, config.tls.certificate, config.tls.key)
        except Exception as e:
            raise ConfigError(f"{config.path}: [tls]: {e}") from None
        interface = master.address

        def endpoint() -> Any:
            return endpoints.SSL4ServerEndpoint(reactor, master.port, options, interface=interface)

        try:
            master_service = MasterService(reactor, master, endpoint, revocations, key=config.tls.key)
        except store.StoreError as e:
            raise ConfigError(f"{config.path}: [master] state_dir: {e}") from None
        master_service.setServiceParent(top)
        if master.metrics:
            try:
                from mrsyncd.daemon.metrics import MetricsService
            except ImportError as e:
                raise ConfigError(
                    f"{config.path}: [master] metrics needs prometheus_client"
                    f" (Debian: apt install python3-prometheus-client): {e}"
                ) from None
            host, port = split_address(master.metrics)
            MetricsService(reactor, master_service, host, port).setServiceParent(top)
    if config.node is not None:
        try:
            node = NodeService(reactor, config.node, config.tls, revocations)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"{config.path}: [node]/[tls]: {e}") from None
        node.setServiceParent(top)
    return top


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    try:
        return build(options["parsed"], reactor)
    except ConfigError as e:
        raise _stop_for(e) from None
