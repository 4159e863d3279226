"""Continuous batching over one llama.cpp context: the scheduler thread of the batched GGUF engine.

Layer: infrastructure. The decode thread runs it (what every engine's scheduler does is in
slot_scheduler.py): every step it admits waiting sequences into free slots (llama.cpp sequence ids),
builds one batch holding the next token of every decoding sequence
plus a bounded chunk of the prompts still being prefilled, decodes it once, and samples each
sequence's next token with that sequence's own sampler chain. Finished and cancelled sequences leave
between steps; a long prompt is prefilled `prefill_chunk` tokens a step, so the streams already
running keep receiving a token every step.

KV cache: each sequence id has a KV stream of its own (`kv_tokens` split evenly), so a sequence's
numbers do not depend on which others share the step: a greedy stream says the same in company as
alone. A finished sequence's tokens stay in its slot as a prefix cache (slot_scheduler.py).

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

import logging
import time
from collections.abc import Callable
from typing import Any

from laas.core.errors import ModelLoadError
from laas.core.types import GenerationRequest
from laas.daemon.backends.decode_loop import DecodeLoop
from laas.daemon.backends.draft_model import DraftModel, put_token
from laas.daemon.backends.slot_scheduler import Sequence, Slot, SlotScheduler
from laas.daemon.backends.speculation import (
    DraftAcceptance,
    NgramDrafter,
    StepCost,
    plan_drafts,
    relative_to,
)

log = logging.getLogger(__name__)


class Scheduler(SlotScheduler):
    """Owns the llama.cpp context; the decode loop runs it until it is closed."""

    runtime = "llama.cpp"
    holds_deltas = True  # sent as llama_decode returns (SlotScheduler._emit)

    def __init__(self, model: Any, ctx: Any, *, parallel: int, n_batch: int, prefill_chunk: int,
                 make_sampler: Callable[[GenerationRequest], Any], on_token: Callable[[], None],
                 loop: DecodeLoop, max_draft: int = 0, min_draft: int = 0, step_cost: StepCost | None = None,
                 draft_model: DraftModel | None = None, draft_cost: StepCost | None = None) -> None:
        import llama_cpp
        import numpy  # deferred with llama_cpp (which needs it): the daemon idles without either

        super().__init__(parallel=parallel, n_ctx=int(llama_cpp.llama_n_ctx_seq(ctx.ctx)), on_token=on_token,
                         loop=loop, relay_name="gguf-relay")  # n_ctx: cells of each sequence's own KV stream
        self._lib = llama_cpp
        self._numpy = numpy
        self._model = model
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx.ctx)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(model.vocab))
        self._pieces: dict[int, bytes] = {}  # token id -> its text's bytes (detokenized once)
        self.kv_cells = int(llama_cpp.llama_n_ctx(ctx.ctx))
        self._n_batch = n_batch
        self._prefill_chunk = max(1, min(prefill_chunk, n_batch))
        # Drafted tokens per sequence and step (0: no speculation); every sequence's fit in one batch.
        self._max_draft = max(0, min(max_draft, n_batch // max(parallel, 1) - 1))
        self._min_draft = min(min_draft, self._max_draft)  # decoded where offered, whatever the plan says
        self._step_cost = step_cost or StepCost.linear()  # a step's time by its tokens (time_step_cost)
        # A draft model drafts instead of prompt lookup; a round of its steps costs draft_cost, which is
        # timed as this model's step cost is, and scaled to this model's one-token step.
        self._draft_model = draft_model
        self._draft_cost = relative_to(draft_cost or StepCost.linear(), self._step_cost)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._make_sampler = make_sampler
        try:
            self._begin_serving()
        except BaseException:
            llama_cpp.llama_batch_free(self._batch)
            raise

    def _free(self) -> None:
        self._lib.llama_batch_free(self._batch)
        if self._draft_model is not None:
            self._draft_model.free()

    def _begin(self, seq: Sequence) -> None:
        seq.sampler = self._make_sampler(seq.request)
        if self._draft_model is not None:
            seq.drafter = DraftAcceptance(self._max_draft)
        elif self._max_draft:
            seq.drafter = NgramDrafter(seq.prompt, self._max_draft)

    def _end(self, seq: Sequence) -> None:
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None

    def _truncate(self, slot: Slot, keep: int) -> None:
        if len(slot.tokens) > keep:
            self._lib.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1)
            del slot.tokens[keep:]

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
        decode_n = n
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
        if self._held and n > decode_n:  # a step with a prompt's chunk is long: not held through it
            self.flush_held()
        b.n_tokens = n
        rc = self._lib.llama_decode(self._ctx.ctx, b)
        if self._held:
            self.flush_held()
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
        pays for its place in the step (speculation.plan_drafts), and never under `min_draft` where offered."""
        if not self._max_draft:
            return [[] for _ in decoding]
        if self._draft_model is not None:
            return self._model_drafts(decoding)
        drafters, drafts = [], []
        for seq in decoding:  # with speculation on, every sequence got a drafter when it started
            assert seq.drafter is not None
            drafters.append(seq.drafter)
            drafts.append(seq.drafter.draft(self._room(seq)))
        if not any(drafts):
            return drafts
        take = plan_drafts([f.survival(len(d)) for f, d in zip(drafters, drafts, strict=True)], self._step_cost)
        return [d[:max(k, self._min_draft)] for d, k in zip(drafts, take, strict=True)]

    def _model_drafts(self, decoding: list[Sequence]) -> list[list[int]]:
        """The draft model's drafts, as long as each sequence's record says pays for its draft rounds and
        its place in the step (speculation.plan_drafts), and never under `min_draft`."""
        rooms = [min(self._room(seq), self._max_draft) for seq in decoding]
        survival = []
        for seq, room in zip(decoding, rooms, strict=True):
            assert seq.drafter is not None
            survival.append(seq.drafter.survival(room))
        take = plan_drafts(survival, self._step_cost, self._draft_cost)
        wants = []
        for seq, k, room in zip(decoding, take, rooms, strict=True):
            assert seq.slot is not None and seq.next_token is not None
            wants.append((seq.slot.seq_id, seq.slot.tokens, seq.next_token, min(max(k, self._min_draft), room)))
        assert self._draft_model is not None
        return self._draft_model.draft(wants)

    def _room(self, seq: Sequence) -> int:
        """Draft tokens the sequence has room for: never past its context, nor past its output's length."""
        assert seq.slot is not None
        return max(0, min(self.n_ctx - len(seq.slot.tokens) - 2, seq.max_tokens - seq.completion - 1))

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
        put_token(self._batch, i, token, pos, seq_id, logits)

    def _sample(self, seq: Sequence, index: int) -> int:
        """Samples the sequence's next token from output `index` and delivers it; returns the token."""
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
        self._deliver(seq, token, logits)
        return token

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._model.detokenize([token], special=False)
        return piece

    def _text_of(self, token: int) -> str:
        return self._piece(token).decode("utf-8", errors="replace")

    def _text(self, seq: Sequence, token: int) -> str:
        return seq.decoder.decode(self._piece(token))

    def _is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._model.vocab, token))


STEP_SIZES = (1, 2, 3, 5, 9, 17, 33, 49)  # the step sizes timed at load (StepCost interpolates between them)


def time_step_cost(ctx: Any, sizes: tuple[int, ...] = STEP_SIZES, rounds: int = 3) -> StepCost:
    """Times decode steps of each of `sizes` tokens (every one with logits, as a verification step has) on
    a fresh context's sequence 0, which is cleared after: a step's time by its tokens, relative to a
    one-token step, on this model and machine (speculation.StepCost). Sizes past the context's batch are
    left out."""
    import llama_cpp

    sizes = tuple(n for n in sizes if n <= int(llama_cpp.llama_n_batch(ctx.ctx)))
    batch = llama_cpp.llama_batch_init(max(sizes), 0, 1)
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
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(rounds):
            for n in sizes:
                times[n].append(step(n))
    finally:
        llama_cpp.llama_memory_clear(mem, True)
        llama_cpp.llama_batch_free(batch)
    return StepCost([(n, sorted(t)[rounds // 2]) for n, t in times.items()])
