"""Continuous batching, the part every engine's scheduler shares: sequences in KV slots, admission with
prefix reuse, cancellation, and what happens to a sequence once its next token is chosen.

Layer: infrastructure (threads; no native library). A scheduler owns one model's KV cache, which holds
`parallel` slots. It runs in a decode thread (decode_loop.DecodeLoop), a turn at a time: it drops
cancelled sequences, admits waiting ones into free slots, and runs one step of its engine (`_step`, the
native part: batching.py for llama.cpp, onnx_batching.py for onnxruntime). A finished sequence's tokens
stay in its slot as a prefix cache: the next request whose prompt starts the same way (a follow-up chat
turn) takes that slot and prefills only the rest. What a scheduler emits reaches the event loop through a
relay thread (see `Scheduler._outbox`), and `stream_sequence` is the engine's async face of one sequence.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from laas.core.errors import InvalidArgument, LaasError, ModelLoadError
from laas.core.types import (
    Completion,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    TextDelta,
    Timings,
    TokenLogprob,
    Usage,
)
from laas.daemon.backends.backend import BatchStats
from laas.daemon.backends.decode_loop import DecodeLoop
from laas.daemon.backends.worker import wait_through_cancellation
from laas.daemon.constraint_masks import Matcher
from laas.daemon.logprobs import token_logprob
from laas.daemon.stops import StopMatcher

log = logging.getLogger(__name__)

Emit = Callable[[object], None]
END = object()  # sentinel: the sequence has left the scheduler


class DeltaSink(Protocol):
    """A consumer that takes a stream's text deltas straight from the scheduler's threads, in order, instead
    of through the event loop: the runner (runners/child.py) sets one in the task that iterates the engine's
    `generate` (`relay_sink`) and writes each delta to its channel, so the runner's loop does no work per
    token. It is only for a `generate` that passes the deltas of stream_sequence through unchanged (both
    engines' do). The end, its Completion and errors still come through the loop, after every delta."""

    def try_send(self, delta: TextDelta) -> bool:
        """From the scheduler thread, as the token is chosen: sends it only where that cannot block (False:
        not sent; it goes through the relay, `send`)."""
        ...

    def send(self, delta: TextDelta) -> None:
        """From the relay thread: may wait for room in the channel."""
        ...


relay_sink: ContextVar[DeltaSink | None] = ContextVar("relay_sink", default=None)


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler. Only the scheduler thread touches it after submission."""

    request: GenerationRequest
    prompt: list[int]
    max_tokens: int
    emit: Emit
    cancel: threading.Event = field(default_factory=threading.Event)
    slot: Slot | None = None
    sampler: Any = None
    evaluated: int = 0  # prompt tokens in the KV cache (cached prefix included)
    next_token: int | None = None  # sampled, not yet decoded
    completion: int = 0
    cached: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    detokenizer: Any = None  # an engine that detokenizes by ids (detokenize.py) keeps its state here
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    matcher: Matcher | None = None  # the request's constraint, at this sequence's point in it
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not sent yet
    drafter: Any = None  # prompt lookup (speculation.NgramDrafter), when the engine speculates
    sink: DeltaSink | None = None  # where its text deltas go from the scheduler thread (see SlotScheduler._emit)
    spoken: bool = False  # a text delta of it has been sent (its first is never held: time to first token)


@dataclass(eq=False)
class Slot:
    seq_id: int  # the KV cache's sequence id (llama.cpp) or row (onnxruntime) this slot's tokens are in
    tokens: list[int] = field(default_factory=list)  # what the slot holds in the KV cache
    seq: Sequence | None = None
    last_used: float = 0.0


@dataclass
class SchedulerStats:
    """Counters the engine reports (metrics read them; only the scheduler thread writes)."""

    steps: int = 0
    prefix_hits: int = 0
    prefix_cached_tokens: int = 0
    prompt_tokens: int = 0
    decoded_tokens: int = 0
    draft_tokens: int = 0  # drafted tokens decoded for verification
    draft_accepted: int = 0  # of which the target produced the same


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` start with alike (comparing slices, in C: a whole context's tokens are
    compared every step where a draft model catches up)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def check_prompt(prompt: list[int]) -> None:
    if not prompt:
        raise InvalidArgument("prompt: it has no tokens", field="prompt")


class SlotScheduler:
    """The engine-independent part of a scheduler; a subclass does the native steps (see the hooks)."""

    runtime = "the engine"  # named in the error a native failure ends the streams with
    kv_cells = 0  # KV cells in all (the subclass sets it from its cache)
    # A subclass that calls flush_held() as each step's compute ends (see _emit) holds a sink's text deltas
    # after a stream's first until then.
    holds_deltas = False

    def __init__(self, *, parallel: int, n_ctx: int, on_token: Callable[[], None], loop: DecodeLoop,
                 relay_name: str) -> None:
        self.n_ctx = n_ctx  # tokens one slot holds
        self.slots = [Slot(i) for i in range(parallel)]
        self._on_token = on_token
        self._pending: deque[Sequence] = deque()
        self._loop = loop
        self._cond = loop.cond
        self.closing = False
        self._closed = threading.Event()
        self.stats = SchedulerStats()
        # What the scheduler emits is handed to the event loop by a relay thread. Waking the loop is a write
        # to its self-pipe, which releases the GIL; the loop's thread takes it and runs the whole stream's
        # handlers, and the writer waits for it to give the GIL back. The relay does that waiting, so the
        # scheduler goes straight on to its next decode (measured: 7% of its time went to that wait).
        # A sequence with a sink (a runner's channel) sends its text deltas from the scheduler thread itself
        # where that cannot block, and only while the relay has nothing left to hand over (_emit).
        self._outbox: queue.SimpleQueue[tuple[Emit, object] | None] = queue.SimpleQueue()
        self._queued = 0  # items put in the outbox (only the scheduler thread writes it)
        self._relayed = 0  # items the relay has handed over (only the relay thread writes it)
        self._relay = threading.Thread(target=self._relay_main, name=relay_name, daemon=True)
        self._held: list[tuple[Sequence, TextDelta]] = []  # text deltas for sinks, sent by flush_held()

    def _begin_serving(self) -> None:
        """Joins the decode loop and starts the relay: the subclass calls it once its own state is ready."""
        self._loop.add(self)
        self._relay.start()

    # --- hooks: the native part ------------------------------------------------------------------

    def _step(self) -> None:
        """Decodes one step of the running sequences (their next tokens, a chunk of prompt), then chooses
        each finished position's token and hands it to `_deliver`."""
        raise NotImplementedError

    def _truncate(self, slot: Slot, keep: int) -> None:
        """Forgets what `slot` holds past its first `keep` tokens."""
        raise NotImplementedError

    def _begin(self, seq: Sequence) -> None:
        """Gives a sequence that takes a slot its sampler (and whatever else the engine keeps per sequence)."""

    def _end(self, seq: Sequence) -> None:
        """Frees what `_begin` gave the sequence."""

    def _is_eog(self, token: int) -> bool:
        raise NotImplementedError

    def _text(self, seq: Sequence, token: int) -> str:
        """The text `token` adds to the sequence's output ("" while a character is incomplete)."""
        raise NotImplementedError

    def _text_of(self, token: int) -> str:
        """One token's own text (the logprobs' alternatives)."""
        raise NotImplementedError

    def _free(self) -> None:
        """Frees the scheduler's native buffers, once it has left the decode loop."""

    # --- called from the event loop -------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self.closing:
                raise ModelLoadError("engine is closed")
            self._pending.append(seq)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.seq is not None)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def kv_used(self) -> int:
        return sum(len(s.tokens) for s in self.slots)

    @property
    def alive(self) -> bool:
        return self._loop.alive and not self.closing

    def report(self) -> BatchStats:
        """What the engine reports to the metrics (its `stats()`)."""
        s = self.stats
        return BatchStats(
            parallel=len(self.slots), active=self.active, waiting=self.waiting, kv_cells=self.kv_cells,
            kv_used=self.kv_used, steps=s.steps, prefix_hits=s.prefix_hits, prefix_cached_tokens=s.prefix_cached_tokens,
            prompt_tokens=s.prompt_tokens, decoded_tokens=s.decoded_tokens, draft_tokens=s.draft_tokens,
            draft_accepted=s.draft_accepted,
        )

    def close(self) -> None:
        """Leaves the decode loop (sequences still running end with an error) and frees the native state."""
        with self._cond:
            self.closing = True
            self._cond.notify()
        self._closed.wait()
        self._outbox.put(None)  # after everything the scheduler emitted
        self._relay.join()
        self._free()

    # --- the relay thread -----------------------------------------------------------------------

    def _emit(self, seq: Sequence, item: object) -> None:
        """Hands `item` to the sequence's consumer, in order. A text delta with a sink goes at once from this
        thread where the relay is idle (nothing it holds could then come after it) and the sink can take it
        without blocking. Through the relay, each token woke that thread and the two passed the GIL to and fro:
        py-spy found the decode thread 1.9% of its time in that hand-over at one stream, and the relay used
        0.13 ms of CPU a token (per-thread schedstat), beside 8.4-ms steps.

        Where the subclass holds deltas, a stream's text after its first waits for the end of the next
        decode step (flush_held), and anything else emitted sends what is held first. Sent at once, a
        token reached the daemon as the step began, and the daemon's handling of it (0.4 ms of CPU a token,
        most of it Python) took a core from a step whose two compute threads wait for each other; sent as a
        step ends, it runs while this thread samples and the other compute thread has nothing to do. One
        stream: 1.011x and 1.014x tokens/s (paired, 10 and 20 alternating rounds, 2 cores); each token
        after the first reaches the client one step later."""
        if self.holds_deltas and seq.spoken and type(item) is TextDelta and seq.sink is not None:
            self._held.append((seq, item))
            return
        if self._held:
            self.flush_held()
        if type(item) is TextDelta:
            seq.spoken = True
        self._send(seq, item)

    def flush_held(self) -> None:
        """Sends the text deltas held (in the order emitted)."""
        held, self._held = self._held, []
        for seq, item in held:
            self._send(seq, item)

    def _send(self, seq: Sequence, item: object) -> None:
        sink = seq.sink
        if sink is not None and type(item) is TextDelta and self._relayed == self._queued and sink.try_send(item):
            return
        self._queued += 1
        self._outbox.put((seq.emit, item))

    def _relay_main(self) -> None:
        while (entry := self._outbox.get()) is not None:
            emit, item = entry
            try:
                emit(item)
            finally:
                self._relayed += 1

    # --- the scheduler thread -------------------------------------------------------------------

    def has_work(self) -> bool:
        """Called with the loop's lock held."""
        return self.closing or bool(self._pending) or self.active > 0

    def run_once(self) -> None:
        """One turn in the decode loop: drop cancelled sequences, admit waiting ones, decode a step."""
        if self.closing:
            self._fail_all(ModelLoadError("engine is closed"))
            self._closed.set()
            return
        try:
            self._drop_cancelled()
            self._admit()
            steps = self.stats.steps
            if self.active:
                self._step()
            if self._held and self.stats.steps == steps:  # no step came to send them after
                self.flush_held()
        except Exception as e:  # a native failure: end every stream with a clear error, not a hang
            log.exception("the batch scheduler failed")
            with self._cond:
                self.closing = True
            self._fail_all(ModelLoadError(f"generation failed in {self.runtime}: {e}"))

    def _fail_all(self, error: LaasError) -> None:
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for seq in [*pending, *(s.seq for s in self.slots if s.seq is not None)]:
            if seq.slot is not None:
                self._release(seq)
            self._emit(seq, error)
            self._emit(seq, END)

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.seq is not None and slot.seq.cancel.is_set():
                seq = slot.seq
                self._release(seq)
                self._emit(seq, END)
        with self._cond:
            gone = [s for s in self._pending if s.cancel.is_set()]
            for seq in gone:
                self._pending.remove(seq)
        for seq in gone:
            self._emit(seq, END)

    def _admit(self) -> None:
        """Moves waiting sequences into free slots, in arrival order."""
        while True:
            with self._cond:
                if not self._pending:
                    return
                seq = self._pending[0]
            free = [s for s in self.slots if s.seq is None]
            if not free:
                return
            with self._cond:
                self._pending.popleft()
            # The free slot holding the longest prefix of this prompt; else the least recently used.
            slot = max(free, key=lambda s: (common_prefix(s.tokens, seq.prompt), -s.last_used))
            self._start(seq, slot)

    def _start(self, seq: Sequence, slot: Slot) -> None:
        keep = min(common_prefix(slot.tokens, seq.prompt), len(seq.prompt) - 1)  # the last is evaluated again
        self._truncate(slot, keep)
        seq.slot, slot.seq = slot, seq
        seq.evaluated = seq.cached = keep
        seq.stops = StopMatcher(seq.request.sampling.stop + seq.request.template_stops)
        self._begin(seq)
        seq.submitted_at = time.perf_counter()
        self.stats.prompt_tokens += len(seq.prompt)
        if keep:
            self.stats.prefix_hits += 1
            self.stats.prefix_cached_tokens += keep

    def _release(self, seq: Sequence) -> None:
        slot = seq.slot
        if slot is not None:
            slot.seq, slot.last_used, seq.slot = None, time.monotonic(), None
        self._end(seq)

    def _deliver(self, seq: Sequence, token: int, logits: Any) -> None:
        """The sequence's next token is `token` (chosen from `logits`, None where the engine's sampler chain
        drew it without them): sends its text, finishes the sequence where it ends."""
        s = seq.request.sampling
        now = time.perf_counter()
        if seq.completion == 0:
            seq.first_token_at = now
        seq.completion += 1
        seq.next_token = token
        self.stats.decoded_tokens += 1
        self._on_token()
        assert seq.slot is not None
        if not s.ignore_eos and self._is_eog(token):
            self._finish(seq, FinishReason.STOP)
            return
        if seq.drafter is not None:
            seq.drafter.extend([token])
        if logits is not None and s.logprobs:
            seq.logprobs.append(token_logprob(logits, token, s, self._text_of))
        complete = False
        if seq.matcher is not None:
            # A token the constraint refuses cannot be drawn (its logit is -inf); refusing one anyway
            # ends the output where it still is.
            complete = not seq.matcher.accept(token) or seq.matcher.done
        text = seq.stops.feed(self._text(seq, token))
        if text:
            self._emit(seq, TextDelta(text, tuple(seq.logprobs)))
            seq.logprobs.clear()
        if seq.stops.stopped or complete:
            self._finish(seq, FinishReason.STOP)
        elif seq.completion >= seq.max_tokens or len(seq.slot.tokens) + 1 >= self.n_ctx:
            self._finish(seq, FinishReason.LENGTH)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        # Bytes of a character cut off by max_tokens are dropped, not sent as U+FFFD.
        tail = seq.stops.flush()
        if tail:
            self._emit(seq, TextDelta(tail, tuple(seq.logprobs)))
        seq.logprobs.clear()
        end = time.perf_counter()
        first = seq.first_token_at or end
        self._release(seq)
        self._emit(seq, Completion(
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(seq.prompt), completion_tokens=seq.completion,
                        cached_prompt_tokens=seq.cached),
            timings=Timings(prompt_ms=(first - seq.submitted_at) * 1000, decode_ms=(end - first) * 1000),
        ))
        self._emit(seq, END)


async def stream_sequence(scheduler: SlotScheduler, make: Callable[[Emit], Sequence]
                          ) -> AsyncGenerator[GenerationChunk, None]:
    """Submits the sequence `make` builds around an emit function and yields what the scheduler emits for
    it. Closing the iterator cancels the sequence; the scheduler drops it before its next step, and this
    waits for that, so no token is decoded for it afterwards. With a `relay_sink` set, the text deltas go
    to it instead."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[object] = asyncio.Queue()
    left = loop.create_future()
    sink = relay_sink.get()

    def emit(item: object) -> None:
        if sink is not None and type(item) is TextDelta:
            sink.send(item)
            return
        # A stream abandoned at shutdown: the loop is closed and nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_deliver, chunks, left, item)

    seq = make(emit)
    seq.sink = sink
    scheduler.submit(seq)
    try:
        while True:
            item = await chunks.get()
            if item is END:
                break
            if isinstance(item, LaasError):
                raise item
            yield cast(GenerationChunk, item)
    finally:
        seq.cancel.set()
        scheduler.wake()
        await wait_through_cancellation(left)


def _deliver(chunks: asyncio.Queue[object], left: asyncio.Future[None], item: object) -> None:
    chunks.put_nowait(item)
    if item is END and not left.done():
        left.set_result(None)
