"""Continuous batching over one llama.cpp context: the scheduler thread of the batched GGUF engine.

Layer: infrastructure. One thread owns the context. Every step it admits waiting sequences into free
slots (llama.cpp sequence ids), builds one batch holding the next token of every decoding sequence
plus a bounded chunk of the prompts still being prefilled, decodes it once, and samples each
sequence's next token with that sequence's own sampler chain. Finished and cancelled sequences leave
between steps; a long prompt is prefilled `prefill_chunk` tokens a step, so the streams already
running keep receiving a token every step.

KV cache: each sequence id has a KV stream of its own (`kv_tokens` split evenly), so a sequence's
numbers do not depend on which others share the step: a greedy stream says the same in company as
alone. A finished sequence's tokens stay in its slot as a prefix cache: the next request whose prompt
starts the same way (a follow-up chat turn) takes that slot and prefills only the rest.

Constrained sequences (a JSON schema, a regex, a grammar: constraint_masks.py) carry a Matcher: before their
token is sampled, the logits of the tokens the constraint does not allow are set to -inf in llama.cpp's
own buffer (the sampler chain then draws among the rest); unconstrained sequences in the same step are
not touched. A sequence that asked for logprobs gets each token's log-probability (logprobs.py) with the
text it produced.

Speculation (prompt lookup, speculation.py): a sequence whose text so far ends with an n-gram seen
before also puts the tokens that followed it (its draft) into the step, after its next token. Its
outputs are then sampled in order, each with the sequence's own sampler, mask and logprobs, and a draft
token is kept while the sample equals it; the first sample that differs (or the one after a whole draft)
is the sequence's next token, and the KV cells of the drafts not kept are removed. So one step can
deliver several tokens of a sequence, and what it delivers is what plain decoding would have.
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from laas.core.errors import InvalidArgument, LaasError, ModelLoadError
from laas.core.types import Completion, FinishReason, GenerationRequest, TextDelta, Timings, TokenLogprob, Usage
from laas.daemon.backends.decode_loop import DecodeLoop
from laas.daemon.backends.speculation import PRIOR_MARGINAL, NgramDrafter, plan_drafts, relative_token_cost
from laas.daemon.constraint_masks import Matcher
from laas.daemon.logprobs import token_logprob
from laas.daemon.stops import StopMatcher

log = logging.getLogger(__name__)

Emit = Callable[[object], None]
END = object()  # sentinel: the sequence has left the scheduler


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
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    matcher: Matcher | None = None  # the request's constraint, at this sequence's point in it
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not sent yet
    drafter: NgramDrafter | None = None  # prompt lookup, when the engine speculates


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this sequence id holds in the KV cache
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    """Owns the llama.cpp context; the decode loop runs it until it is closed."""

    def __init__(self, model: Any, ctx: Any, *, parallel: int, n_batch: int, prefill_chunk: int,
                 make_sampler: Callable[[GenerationRequest], Any], on_token: Callable[[], None],
                 loop: DecodeLoop, max_draft: int = 0, token_cost: float = PRIOR_MARGINAL) -> None:
        import llama_cpp
        import numpy  # deferred with llama_cpp (which needs it): the daemon idles without either

        self._lib = llama_cpp
        self._numpy = numpy
        self._model = model
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx.ctx)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(model.vocab))
        self._pieces: dict[int, bytes] = {}  # token id -> its text's bytes (detokenized once)
        self.kv_cells = int(llama_cpp.llama_n_ctx(ctx.ctx))
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(ctx.ctx))  # cells of each sequence's own KV stream
        self._n_batch = n_batch
        self._prefill_chunk = max(1, min(prefill_chunk, n_batch))
        # Drafted tokens per sequence and step (0: no speculation); every sequence's fit in one batch.
        self._max_draft = max(0, min(max_draft, n_batch // max(parallel, 1) - 1))
        self._token_cost = token_cost  # a drafted token's cost relative to a one-token step (time_token_cost)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._make_sampler = make_sampler
        self._on_token = on_token
        self.slots = [Slot(i) for i in range(parallel)]
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
        self._outbox: queue.SimpleQueue[tuple[Emit, object] | None] = queue.SimpleQueue()
        self._relay = threading.Thread(target=self._relay_main, name="gguf-relay", daemon=True)
        try:
            loop.add(self)
        except BaseException:
            llama_cpp.llama_batch_free(self._batch)
            raise
        self._relay.start()

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

    def close(self) -> None:
        """Leaves the decode loop (sequences still running end with an error) and frees the batch."""
        with self._cond:
            self.closing = True
            self._cond.notify()
        self._closed.wait()
        self._outbox.put(None)  # after everything the scheduler emitted
        self._relay.join()
        self._lib.llama_batch_free(self._batch)

    # --- the relay thread -----------------------------------------------------------------------

    def _emit(self, seq: Sequence, item: object) -> None:
        self._outbox.put((seq.emit, item))

    def _relay_main(self) -> None:
        while (entry := self._outbox.get()) is not None:
            emit, item = entry
            emit(item)

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
            if self.active:
                self._step()
        except Exception as e:  # a native failure: end every stream with a clear error, not a hang
            log.exception("the batch scheduler failed")
            with self._cond:
                self.closing = True
            self._fail_all(ModelLoadError(f"generation failed in llama.cpp: {e}"))

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
            slot = max(free, key=lambda s: (_common_prefix(s.tokens, seq.prompt), -s.last_used))
            self._start(seq, slot)

    def _start(self, seq: Sequence, slot: Slot) -> None:
        keep = min(_common_prefix(slot.tokens, seq.prompt), len(seq.prompt) - 1)  # the last is evaluated again
        self._truncate(slot, keep)
        seq.slot, slot.seq = slot, seq
        seq.evaluated = seq.cached = keep
        seq.stops = StopMatcher(seq.request.sampling.stop + seq.request.template_stops)
        seq.sampler = self._make_sampler(seq.request)
        if self._max_draft:
            seq.drafter = NgramDrafter(seq.prompt, self._max_draft)
        seq.submitted_at = time.perf_counter()
        self.stats.prompt_tokens += len(seq.prompt)
        if keep:
            self.stats.prefix_hits += 1
            self.stats.prefix_cached_tokens += keep

    def _truncate(self, slot: Slot, keep: int) -> None:
        if len(slot.tokens) > keep:
            self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1)
            del slot.tokens[keep:]

    def _release(self, seq: Sequence) -> None:
        slot = seq.slot
        if slot is not None:
            slot.seq, slot.last_used, seq.slot = None, time.monotonic(), None
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None

    def _step(self) -> None:
        """One llama_decode over every active sequence: a token each, plus a chunk of prompt."""
        b = self._batch
        n = 0
        outputs: list[tuple[int, Sequence, list[int]]] = []  # (first output's index, sequence, its draft)
        added: list[tuple[Sequence, list[int]]] = []
        running = [s.seq for s in self.slots if s.seq is not None]
        decoding = [s for s in running if s.next_token is not None]
        for seq, draft in zip(decoding, self._drafts(decoding), strict=True):
            assert seq.slot is not None and seq.next_token is not None
            pos = len(seq.slot.tokens)
            self._put(n, seq.next_token, pos, seq.slot.seq_id, True)
            for i, token in enumerate(draft, 1):
                self._put(n + i, token, pos + i, seq.slot.seq_id, True)
            outputs.append((n, seq, draft))
            added.append((seq, [seq.next_token]))
            n += 1 + len(draft)
        # Prompts are prefilled a chunk a step beside running streams; with none running, a whole batch.
        budget = self._n_batch if n == 0 else min(self._n_batch - n, self._prefill_chunk)
        for seq in sorted((s for s in running if s.next_token is None), key=lambda s: s.submitted_at):
            if budget <= 0:
                break
            assert seq.slot is not None
            take = min(budget, len(seq.prompt) - seq.evaluated)
            chunk = seq.prompt[seq.evaluated: seq.evaluated + take]
            done = seq.evaluated + take == len(seq.prompt)
            for i, token in enumerate(chunk):
                last = done and i == take - 1
                self._put(n, token, seq.evaluated + i, seq.slot.seq_id, last)
                if last:
                    outputs.append((n, seq, []))
                n += 1
            added.append((seq, chunk))
            budget -= take
        if n == 0:
            return
        b.n_tokens = n
        rc = self._lib.llama_decode(self._ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.stats.steps += 1
        for seq, toks in added:
            assert seq.slot is not None
            seq.slot.tokens.extend(toks)
            if seq.next_token is None:
                seq.evaluated += len(toks)
        for index, seq, draft in outputs:
            if draft:
                self._verify(seq, index, draft)
            else:
                self._sample(seq, index)

    def _drafts(self, decoding: list[Sequence]) -> list[list[int]]:
        """Each decoding sequence's draft for this step (never past its context or its output), cut to what
        pays for its place in the step (speculation.plan_drafts)."""
        if not self._max_draft:
            return [[] for _ in decoding]
        drafters, drafts = [], []
        for seq in decoding:  # with speculation on, every sequence got a drafter when it started
            assert seq.slot is not None and seq.drafter is not None
            room = min(self.n_ctx - len(seq.slot.tokens) - 2, seq.max_tokens - seq.completion - 1)
            drafters.append(seq.drafter)
            drafts.append(seq.drafter.draft(room))
        if not any(drafts):
            return drafts
        take = plan_drafts([d.acceptance for d in drafters], [len(d) for d in drafts], self._token_cost)
        return [d[:k] for d, k in zip(drafts, take, strict=True)]

    def _verify(self, seq: Sequence, index: int, draft: list[int]) -> None:
        """Samples the outputs from `index` on in order, keeping each draft token the sample equals; the
        first sample that differs, or the one after the whole draft, is the next token. The KV cells of
        the drafts not kept are removed (also when the sequence finished on the way)."""
        slot, drafter = seq.slot, seq.drafter
        assert slot is not None and drafter is not None
        kept = 0
        for i, proposed in enumerate(draft):
            token = self._sample(seq, index + i)
            if seq.slot is None or token != proposed:
                break
            slot.tokens.append(proposed)
            kept += 1
        else:
            self._sample(seq, index + len(draft))
        self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, len(slot.tokens), -1)
        drafter.settle(len(draft), kept)
        self.stats.draft_tokens += len(draft)
        self.stats.draft_accepted += kept

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _sample(self, seq: Sequence, index: int) -> int:
        """Samples the sequence's next token from output `index`, sends its text, finishes the sequence
        where it ends; returns the token."""
        s = seq.request.sampling
        logits = None
        if seq.sampler is None or seq.matcher is not None or s.logprobs:
            pointer = self._lib.llama_get_logits_ith(self._ctx.ctx, index)
            logits = self._numpy.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
            if seq.matcher is not None:  # in llama.cpp's buffer: the sampler chain draws from what is left
                seq.matcher.mask(logits)
        if logits is not None and seq.sampler is None:  # greedy: the first of the largest logits (llama.cpp's pick)
            token = int(logits.argmax())
        else:
            token = int(seq.sampler.sample(self._ctx, index))
        now = time.perf_counter()
        if seq.completion == 0:
            seq.first_token_at = now
        seq.completion += 1
        seq.next_token = token
        self.stats.decoded_tokens += 1
        self._on_token()
        assert seq.slot is not None
        if not s.ignore_eos and self._lib.llama_vocab_is_eog(self._model.vocab, token):
            self._finish(seq, FinishReason.STOP)
            return token
        if seq.drafter is not None:
            seq.drafter.extend([token])
        if logits is not None and s.logprobs:
            seq.logprobs.append(token_logprob(logits, token, s, self._text_of))
        complete = False
        if seq.matcher is not None:
            # A token the constraint refuses cannot be drawn (its logit is -inf); refusing one anyway
            # ends the output where it still is.
            complete = not seq.matcher.accept(token) or seq.matcher.done
        piece = self._piece(token)
        text = seq.stops.feed(seq.decoder.decode(piece))
        if text:
            self._emit(seq, TextDelta(text, tuple(seq.logprobs)))
            seq.logprobs.clear()
        if seq.stops.stopped or complete:
            self._finish(seq, FinishReason.STOP)
        elif seq.completion >= seq.max_tokens or len(seq.slot.tokens) + 1 >= self.n_ctx:
            self._finish(seq, FinishReason.LENGTH)
        return token

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._model.detokenize([token], special=False)
        return piece

    def _text_of(self, token: int) -> str:
        return self._piece(token).decode("utf-8", errors="replace")

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


def time_token_cost(ctx: Any, tokens: int = 9, rounds: int = 5) -> float:
    """Times decode steps of one token and of `tokens` tokens (every one with logits, as a verification
    step has) on a fresh context's sequence 0, which is cleared after: one more token's cost relative to a
    one-token step, on this model and machine (speculation.relative_token_cost)."""
    import llama_cpp

    batch = llama_cpp.llama_batch_init(tokens, 0, 1)
    mem = llama_cpp.llama_get_memory(ctx.ctx)

    def step(n: int) -> float:
        for i in range(n):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = i + 1, 1 + i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = n
        started = time.perf_counter()
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise ModelLoadError("llama.cpp could not decode a timing step")
        elapsed = time.perf_counter() - started
        llama_cpp.llama_memory_seq_rm(mem, 0, 1, -1)
        return elapsed

    try:
        step(1)  # the first step after loading pays for faulting the weights in
        ones, manys = [], []
        for _ in range(rounds):
            ones.append(step(1))
            manys.append(step(tokens))
    finally:
        llama_cpp.llama_memory_clear(mem, True)
        llama_cpp.llama_batch_free(batch)
    return relative_token_cost(sorted(ones)[rounds // 2], sorted(manys)[rounds // 2], tokens)


def check_prompt(prompt: list[int]) -> None:
    if not prompt:
        raise InvalidArgument("prompt: it has no tokens", field="prompt")

