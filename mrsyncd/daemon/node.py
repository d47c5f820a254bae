"""
The node: an always-on receiver that keeps one TLS AMP connection to its
master.

`ClientService` redials with backoff whenever the connection drops, so a
master restart or a network blip needs no operator.  On every connection the
node registers under the name in its own certificate, with its tags and the
free space under its allowed roots; a heartbeat keeps the free space fresh
and notices a master that stopped answering.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import internet, service
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mrsyncd import logs
from mrsyncd.control.commands import Heartbeat
from mrsyncd.control.peers import ReceiverControl
from mrsyncd.daemon import readiness
from mrsyncd.daemon.config import ConfigError, NodeConfig, TLSConfig
from mrsyncd.engine.agent import ReceiverAgent
from mrsyncd.security import certs, tls
from mrsyncd.units import split_address

log = logs.logger(__name__)

HEARTBEAT = 10.0


def free_space(roots: tuple[str, ...]) -> dict[str, int]:
    free = {}
    for root in roots:
        try:
            st = os.statvfs(root)
        except OSError:
            continue
        free[root] = st.f_bavail * st.f_frsize
    return free


class NodeService(service.MultiService):
    def __init__(
        self,
        reactor: Any,
        config: NodeConfig,
        tls_config: TLSConfig,
        revocations: tls.Revocations | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.revocations = revocations or tls.Revocations()
        self.revocations.on_change.append(self.drop_revoked)
        #: The connection to the master, once its certificate passed.
        self.link: MasterLink | None = None
        certificate = config.certificate or tls_config.certificate
        key = config.key or tls_config.key
        own = certs.load_certificate(certificate)
        if certs.role_of(own) != "node":
            raise ConfigError(
                f"{certificate} has the {certs.role_of(own)} role;"
                " [node] needs a certificate with the node role"
            )
        self.name: str = certs.name_of(own)
        host, port = split_address(config.master)
        options = tls.client_options(
            tls_config.ca, certificate, key, config.master_name or host, refuse_expired=True
        )
        endpoint = endpoints.wrapClientTLS(options, endpoints.HostnameEndpoint(reactor, host, port))
        self.agent = ReceiverAgent(
            reactor,
            interface=config.interface,
            roots=config.roots,
            rcvbuf=config.rcvbuf,
            post_receive=config.post_receive,
            hook_timeout=config.hook_timeout,
            allow_setid=config.allow_setid,
        )
        factory = Factory.forProtocol(self._protocol)
        factory.noisy = False
        self.client = internet.ClientService(
            endpoint,
            factory,
            retryPolicy=internet.backoffPolicy(initialDelay=0.5, maxDelay=30.0),
            clock=reactor,
        )
        self.client.setServiceParent(self)
        self.heartbeat = task.LoopingCall(self._beat)
        self.heartbeat.clock = reactor

    def _protocol(self) -> MasterLink:
        return MasterLink(
            self,
            self.agent,
            self.name,
            self.config.tags,
            lambda: free_space(self.config.roots),
            on_registered=self._registered,
        )

    def drop_revoked(self) -> None:
        link = self.link
        if link is not None and link.identity is not None:
            if self.revocations.shut_out(link.identity, link.transport, "was"):
                link.identity = None

    def _registered(self) -> None:
        where = self.config.master
        readiness.notify(ready=True, status=f"registered as {self.name} with the master at {where}")

    def startService(self) -> None:
        super().startService()
        readiness.notify(status=f"dialling the master at {self.config.master} to register as {self.name}")
        self.heartbeat.start(HEARTBEAT, now=False)

    def stopService(self) -> defer.Deferred:
        readiness.notify(stopping=True)
        if self.heartbeat.running:
            self.heartbeat.stop()
        self.agent.close()
        return super().stopService()

    def _beat(self) -> defer.Deferred:
        """A master that does not answer a heartbeat in time is dialled again."""
        d = self.client.whenConnected(failAfterFailures=1)

        def beat(protocol: Any) -> defer.Deferred:
            call = protocol.callRemote(Heartbeat, free=free_space(self.config.roots))
            call.addTimeout(HEARTBEAT * 2, self.reactor)

            def lost(failure: Any) -> None:
                log.warn(
                    "master did not answer a heartbeat ({why}): reconnecting", why=failure.getErrorMessage()
                )
                if protocol.transport is not None:
                    protocol.transport.abortConnection()  # type: ignore[attr-defined]

            return call.addErrback(lost)

        d.addCallback(beat)
        d.addErrback(lambda failure: None)  # not connected now: ClientService is redialling
        return d


@implementer(IHandshakeListener)
class MasterLink(ReceiverControl):
    """
    A node's connection to its master: it registers only once the master's
    certificate, already checked against the CA and the master's name by
    the handshake, is also not revoked, so that a revoked master key gets
    no more of the node than its certificate: no registration, no free
    space, no job.
    """

    register_on_connect = False

    def __init__(self, node: NodeService, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node = node
        self.max_box_bytes = node.config.max_message_bytes
        self.max_manifest_entries = node.config.max_manifest_entries
        self.identity: tls.PeerIdentity | None = None

    def handshakeCompleted(self) -> None:
        transport: Any = self.transport
        identity = tls.peer_identity(transport)
        if self.node.revocations.shut_out(identity, transport):
            return
        self.identity = identity
        self.node.link = self
        self.register()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.node.link is self:
            self.node.link = None
