"""
`mrsyncd.control.boxes`: AMP without Twisted, held to Twisted's AMP.

Each operator command there is checked against its twin in `commands`
through Twisted's own parser and serializer, so a change to one side that
the other lacks fails here, not at an operator's terminal.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest
from twisted.protocols import amp

from mrsyncd.control import boxes, commands

SAMPLES: dict[type, list[Any]] = {
    type(boxes.INTEGER): [0, 7, -3, 1 << 40],
    type(boxes.FLOAT): [0.0, 0.5, 1e-3],
    type(boxes.BOOLEAN): [True, False],
    type(boxes.TEXT): ["", "node1", "nœud ü"],
    # Past one AMP value: split over spec, spec.1, ...
    type(boxes.JSON): [{}, [1, "two"], {"sources": ["/a" * 40_000], "rate": None}],
}


def samples(arguments: tuple[boxes.Argument, ...], pick: int) -> dict[str, Any]:
    return {a.name: SAMPLES[type(a.kind)][pick % len(SAMPLES[type(a.kind)])] for a in arguments}


def shape(arguments: list[tuple[bytes, amp.Argument]]) -> list[tuple[str, bool]]:
    return [(name.decode(), argument.optional) for name, argument in arguments]


def twin(command: boxes.Command) -> type[amp.Command]:
    found = getattr(commands, command.name)
    assert issubclass(found, amp.Command), command.name
    return found


@pytest.mark.parametrize("command", boxes.OPERATOR_COMMANDS, ids=lambda c: c.name)
def test_each_operator_command_says_what_its_twisted_twin_says(command: boxes.Command) -> None:
    other = twin(command)
    assert other.commandName == command.name.encode()
    assert [(n.decode(), a.optional) for n, a in other.arguments] == [
        (a.name, a.optional) for a in command.arguments
    ]
    assert [(n.decode(), a.optional) for n, a in other.response] == [
        (a.name, a.optional) for a in command.response
    ]
    assert {code.decode() for code in other.errors.values()} == boxes.REFUSALS
    for pick in range(4):
        values = samples(command.arguments, pick)
        parsed = other.parseArguments(amp.AmpBox(boxes.arguments_box(command, values)), None)
        assert parsed == values, (command.name, pick)
        answer = samples(command.response, pick)
        assert boxes.answer_values(command, dict(other.makeResponse(answer, None))) == answer


def test_an_optional_argument_given_as_none_is_left_out_as_twisted_leaves_it() -> None:
    values = {"job": 3, "files": False, "wait": None}
    box = dict(boxes.arguments_box(boxes.JOB_STATUS, values))
    assert b"wait" not in box
    assert box == dict(commands.JobStatus.makeArguments(values, None))


def test_every_command_the_master_takes_from_operators_is_here() -> None:
    operators = {
        name
        for name, value in vars(commands).items()
        if isinstance(value, type)
        and issubclass(value, amp.Command)
        and value.errors == commands._OPERATOR_ERRORS
    }
    assert operators == {c.name for c in boxes.OPERATOR_COMMANDS}


def test_a_boolean_is_true_or_false_and_nothing_else() -> None:
    with pytest.raises(ValueError):
        boxes.BOOLEAN.decode(b"yes")


class Peer:
    """The far end of a socket pair, sending what it is told in pieces of ``step`` bytes."""

    def __init__(self, step: int = 1 << 16) -> None:
        self.near, self.far = socket.socketpair()
        self.step = step
        self.asked: list[dict[bytes, bytes]] = []

    def sends(self, data: bytes) -> threading.Thread:
        def run() -> None:
            for i in range(0, len(data), self.step):
                self.far.sendall(data[i : i + self.step])

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.near.close()
        self.far.close()


def test_a_box_read_a_byte_at_a_time_is_read_whole() -> None:
    peer = Peer(step=1)
    try:
        stream = boxes.BoxStream(peer.near)
        items = [(b"_answer", b"1"), (b"k", b"v" * 300), (b"empty", b"")]
        sending = peer.sends(boxes.encode(items) + boxes.encode([(b"next", b"2")]))
        assert stream.read_box() == dict(items)
        assert stream.read_box() == {b"next": b"2"}
        sending.join(10)
    finally:
        peer.close()


def test_ask_takes_its_own_answer_and_raises_its_error() -> None:
    peer = Peer()
    try:
        stream = boxes.BoxStream(peer.near)
        # An answer to another tag, and a box that is no answer, come first.
        peer.sends(
            boxes.encode([(b"_answer", b"99"), (b"job", b"1")])
            + boxes.encode([(b"noise", b"x")])
            + boxes.encode([(b"_answer", b"1"), (b"job", b"42")])
            + boxes.encode(
                [(b"_error", b"2"), (b"_error_code", b"NO_SUCH_JOB"), (b"_error_description", b"no 9")]
            )
        )
        assert stream.call_remote(boxes.SUBMIT, spec={"a": 1}) == {"job": 42}
        sent = boxes.BoxStream(peer.far)
        asked = sent.read_box()
        assert asked[b"_command"] == b"Submit" and asked[b"_ask"] == b"1" and asked[b"spec"] == b'{"a": 1}'
        with pytest.raises(boxes.AmpError) as raised:
            stream.call_remote(boxes.CANCEL, job=9)
        assert (raised.value.code, raised.value.description) == ("NO_SUCH_JOB", "no 9")
    finally:
        peer.close()


def test_a_box_past_the_bound_or_cut_short_ends_the_stream() -> None:
    peer = Peer()
    try:
        stream = boxes.BoxStream(peer.near, max_box_bytes=1000)
        peer.sends(boxes.encode([(b"k%d" % i, b"v" * 100) for i in range(20)])).join(10)
        with pytest.raises(ConnectionError, match="more than"):
            stream.read_box()
    finally:
        peer.close()
    peer = Peer()
    try:
        stream = boxes.BoxStream(peer.near)
        peer.sends(boxes.encode([(b"_answer", b"1"), (b"k", b"v" * 100)])[:-20]).join(10)
        peer.far.close()
        with pytest.raises(ConnectionError, match="closed"):
            stream.read_box()
    finally:
        peer.close()
