"""
``mrsync-engine``: the transfer engine on its own, without the daemon.

``mrsync-engine send`` scans its sources, waits for receivers to dial in over
(plain, unauthenticated) AMP and runs one transfer; ``mrsync-engine receive``
dials a sender and receives.  It exists to test and measure the data plane
across real hosts (tests/system/test_lan.py, bench/); clusters run the daemon, whose
control channel is authenticated.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Any

from twisted.internet import defer, endpoints, protocol, task, threads
from twisted.internet.protocol import connectionDone
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure

from mrsyncd import logs
from mrsyncd.control.contract import Feedback, TransferOptions
from mrsyncd.control.peers import AMPPeer, ReceiverControl, SenderControl
from mrsyncd.engine.agent import ReceiverAgent
from mrsyncd.engine.multicast import Channel
from mrsyncd.engine.transfer import Transfer, new_offer
from mrsyncd.scripts.options import CommandOptions, usage_error
from mrsyncd.units import parse_rate
from mrsyncd.wire.datagram import OVERHEAD
from mrsyncd.wire.manifest import scan

log = logs.logger(__name__)


class ChannelOptions(CommandOptions):
    optParameters = [
        ["group", "g", "239.255.77.1", "Multicast group (IPv4 or IPv6)."],
        ["port", "p", 7717, "UDP port of the group.", int],
        ["interface", "i", "", "Interface name or address to send or receive on."],
        ["ttl", None, 1, "Multicast TTL / hop limit.", int],
    ]
    optFlags = [["no-loopback", None, "Do not loop multicast back to this host."]]

    def channel(self) -> Channel:
        return Channel(self["group"], self["port"], self["interface"], self["ttl"], not self["no-loopback"])


class SendOptions(ChannelOptions):
    synopsis = "[options] SOURCE... "
    optParameters = [
        ["listen", "l", "tcp:7718", "Endpoint on which receivers dial in."],
        ["receivers", "n", 1, "Number of receivers to wait for.", int],
        ["wait", None, 60.0, "Seconds to wait for them.", float],
        ["rate", "r", "100M", "Sending rate, bits per second (k, M, G suffixes)."],
        ["destination", "d", "", "Destination directory on the receivers."],
        ["block-size", None, 0, "Payload bytes per datagram (0: fill an MTU, at most 1500).", int],
        ["grace", None, 30.0, "Seconds a silent receiver is waited for.", float],
        ["report", None, "-", "Where to write the JSON report."],
    ]
    optFlags = [
        ["preserve-owner", None, "Ask receivers that may (root, or with the capabilities) to set owners."]
    ]

    def parseArgs(self, *sources: str) -> None:
        if not sources:
            raise usage.UsageError("name at least one source")
        self["sources"] = list(sources)

    def postOptions(self) -> None:
        if not self["destination"]:
            raise usage.UsageError("--destination is required")
        try:
            self["rate"] = parse_rate(self["rate"])
            self.channel()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


class ReceiveOptions(ChannelOptions):
    optParameters = [
        ["connect", "c", None, "Endpoint of the sender, e.g. tcp:10.0.0.1:7718."],
        ["name", None, None, "This receiver's name."],
        ["root", None, "/", "Directory that destinations are relative to."],
        ["wait", None, 60.0, "Seconds to keep trying to reach the sender.", float],
    ]
    optFlags = [["allow-setid", None, "Keep set-id bits where owners are set (the node's allow_setid)."]]

    def postOptions(self) -> None:
        if not self["connect"] or not self["name"]:
            raise usage.UsageError("--connect and --name are required")


class Options(CommandOptions):
    synopsis = "send|receive [options]"
    subCommands = [
        ["send", None, SendOptions, "Send sources to receivers that dial in."],
        ["receive", None, ReceiveOptions, "Dial a sender and receive."],
    ]
    optFlags = [["verbose", "v", "Log debug detail, Twisted's connection chatter included."]]


@defer.inlineCallbacks
def send(reactor: Any, options: SendOptions) -> Any:
    peers: list[AMPPeer] = []
    transfers: list[Transfer] = []

    def feedback(transfer_id: bytes, node: str, report: Feedback) -> None:
        for transfer in transfers:
            transfer.feedback(node, report, transfer_id)

    factory = protocol.Factory.forProtocol(lambda: SenderControl(peers.append, feedback))
    port = yield endpoints.serverFromString(reactor, options["listen"]).listen(factory)
    # Receivers dial in while the sources are digested.
    block_size = options["block-size"] or options.channel().payload_room() - OVERHEAD
    scanning = threads.deferToThread(scan, options["sources"], block_size)
    log.info("waiting for {n} receivers on {where}", n=options["receivers"], where=port.getHost())
    waited = 0.0
    while len(peers) < options["receivers"]:
        if scanning.called and isinstance(scanning.result, Failure):
            yield scanning  # a source that cannot be read fails now, not once receivers came
        if waited >= options["wait"]:
            raise RuntimeError(f"only {len(peers)} of {options['receivers']} receivers came")
        yield task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
    manifest, local_paths = yield scanning
    offer = new_offer(
        manifest,
        options.channel(),
        options["destination"],
        TransferOptions(preserve_owner=bool(options["preserve-owner"])),
    )
    transfer = Transfer(
        reactor, offer, local_paths, list(peers), rate_bps=options["rate"], grace=options["grace"]
    )
    transfers.append(transfer)
    report = yield transfer.run()
    port.stopListening()
    document = asdict(report)
    document["transfer_id"] = report.transfer_id.hex()
    document["ok"] = report.ok
    document["payload_bytes"] = manifest.total_bytes()
    text = json.dumps(document, indent=1, sort_keys=True)
    if options["report"] == "-":
        print(text)
    else:
        with open(options["report"], "w") as f:
            f.write(text)
    return 0 if report.ok else 1


@defer.inlineCallbacks
def receive(reactor: Any, options: ReceiveOptions) -> Any:
    agent = ReceiverAgent(
        reactor,
        interface=options["interface"],
        destination_root=options["root"],
        allow_setid=bool(options["allow-setid"]),
    )
    lost: defer.Deferred = defer.Deferred()

    class Control(ReceiverControl):
        def connectionLost(self, reason: Failure = connectionDone) -> None:
            super().connectionLost(reason)
            lost.callback(None)

    endpoint = endpoints.clientFromString(reactor, options["connect"])
    waited = 0.0
    while True:
        try:
            yield endpoint.connect(protocol.Factory.forProtocol(lambda: Control(agent, options["name"])))
            break
        except Exception:
            if waited >= options["wait"]:
                raise
            yield task.deferLater(reactor, 0.05, lambda: None)
            waited += 0.05
    yield lost
    agent.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(argv if argv is not None else sys.argv[1:])
        if options.subCommand is None:
            raise usage.UsageError("say send or receive")
    except usage.UsageError as e:
        usage_error("mrsync-engine", options, e)
    level = LogLevel.debug if options["verbose"] else LogLevel.info
    logs.set_level(level.name)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(level)])],
        redirectStandardIO=False,
    )
    run = send if options.subCommand == "send" else receive

    def exit_with(code: int) -> None:
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: run(reactor, options.subOptions).addCallback(exit_with))


if __name__ == "__main__":
    main()
