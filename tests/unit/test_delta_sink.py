"""A stream's text deltas leave the scheduler thread itself where its sink can take them without blocking,
and through the relay thread otherwise, in order either way (slot_scheduler.SlotScheduler._emit)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from laas.core.types import Completion, GenerationRequest, SamplingParams, TextDelta
from laas.daemon.backends.decode_loop import DecodeLoop
from laas.daemon.backends.slot_scheduler import Sequence, Slot, SlotScheduler, relay_sink, stream_sequence
from laas.daemon.runners.frames import FrameParser, FrameWriter

pytestmark = pytest.mark.fast


class Counting(SlotScheduler):
    """Each step decodes the next integer for every running sequence; a token's text is its number."""

    def __init__(self, loop: DecodeLoop) -> None:
        super().__init__(parallel=2, n_ctx=10_000, on_token=lambda: None, loop=loop, relay_name="test-relay")
        self._begin_serving()

    def _step(self) -> None:
        while self._relayed != self._queued:  # as a real step's time would: the relay catches up meanwhile
            time.sleep(0.0005)
        for slot in self.slots:
            if slot.seq is not None:
                seq = slot.seq
                slot.tokens.append(seq.next_token or 0)
                self._deliver(seq, seq.completion, None)

    def _truncate(self, slot: Slot, keep: int) -> None:
        del slot.tokens[keep:]

    def _is_eog(self, token: int) -> bool:
        return False

    def _text(self, seq: Sequence, token: int) -> str:
        return f"{token} "

    def _text_of(self, token: int) -> str:
        return f"{token} "


class RefusingSink:
    """Takes deltas from the scheduler thread only on some calls (as a full channel would refuse them)."""

    def __init__(self, takes: int) -> None:
        self.got: list[tuple[str, str]] = []  # (how it came, its text), in the order they arrived
        self._takes = takes
        self._calls = 0

    def try_send(self, delta: TextDelta) -> bool:
        self._calls += 1
        if self._calls % self._takes:
            return False
        self.got.append(("direct", delta.text))
        return True

    def send(self, delta: TextDelta) -> None:
        assert threading.current_thread().name == "test-relay"
        self.got.append(("relay", delta.text))


async def _stream(scheduler: SlotScheduler, loop: DecodeLoop, sink: RefusingSink, tokens: int) -> list[object]:
    """What one sequence of `tokens` tokens streams through the loop (its text goes to `sink`)."""
    relay_sink.set(sink)
    request = GenerationRequest("", SamplingParams(max_tokens=tokens, ignore_eos=True))
    try:
        return [item async for item in stream_sequence(
            scheduler, lambda emit: Sequence(request, [1, 2], tokens, emit))]
    finally:
        scheduler.close()
        loop.stop()


@pytest.mark.parametrize("takes", [1, 3])
async def test_deltas_go_direct_where_the_sink_takes_them_and_stay_in_order(takes: int) -> None:
    loop = DecodeLoop()
    sink = RefusingSink(takes)
    items = await _stream(Counting(loop), loop, sink, 60)
    assert [text for _, text in sink.got] == [f"{i} " for i in range(60)]  # every token once, in order
    ways = {how for how, _ in sink.got}
    assert ways == ({"direct"} if takes == 1 else {"direct", "relay"})
    assert [type(i) for i in items] == [Completion]  # the end still comes through the loop, after the deltas


def test_try_send_sends_a_whole_frame_or_nothing() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    writer = FrameWriter(ours)
    assert writer.try_send(("delta", 1, "a"))
    assert FrameParser().feed(theirs.recv(1 << 16)) == [("delta", 1, "a")]
    filled = 0
    while writer.try_send(("fill", "x" * 4096)):  # until the channel has no room: refused, nothing sent
        filled += 1
    assert filled > 0
    parser, got = FrameParser(), list[tuple[object, ...]]()
    theirs.setblocking(False)
    while True:
        try:
            got += parser.feed(theirs.recv(1 << 20))
        except BlockingIOError:
            break
    assert len(got) == filled and parser.feed(b"") == []  # only whole frames came, none half written
    with writer._lock:  # another thread is writing: refused rather than waiting for it
        assert not writer.try_send(("delta", 2, "b"))
    theirs.close()
    assert writer.try_send(("after", 0))  # a broken channel drops the frame (as send does)
    ours.close()


class Holding(Counting):
    """Holds its sinks' deltas as llama.cpp's scheduler does: each step's compute ends with flush_held()."""

    holds_deltas = True

    def __init__(self, loop: DecodeLoop, sink: RefusingSink, silent_first: bool = False) -> None:
        super().__init__(loop)
        self.sink = sink
        self.silent_first = silent_first
        self.at_compute: list[list[str]] = []  # what the client had as each step's compute began

    def _step(self) -> None:
        self.at_compute.append([text for _, text in self.sink.got])
        self.flush_held()  # the compute is done
        self.stats.steps += 1
        super()._step()

    def _text(self, seq: Sequence, token: int) -> str:
        return "" if self.silent_first and token == 0 else f"{token} "


@pytest.mark.parametrize("silent_first", [False, True])
async def test_a_holding_scheduler_sends_text_as_the_next_step_ends_but_the_first_at_once(silent_first: bool) -> None:
    loop = DecodeLoop()
    sink = RefusingSink(1)
    scheduler = Holding(loop, sink, silent_first)
    items = await _stream(scheduler, loop, sink, 40)
    first = 1 if silent_first else 0  # the token of the first text
    texts = [f"{i} " for i in range(first, 40)]
    assert [text for _, text in sink.got] == texts  # every text once, in order, before the end
    assert [type(i) for i in items] == [Completion]
    steps = scheduler.at_compute
    assert len(steps) == 40
    assert steps[first + 1] == texts[:1]  # the first text was sent by the step that made it
    for k in range(first + 2, 40):  # a later one waits for the end of the next step's compute, no longer
        assert steps[k] == texts[:k - first - 1], k
