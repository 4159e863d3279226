"""Continuous batching over one ONNX decoder: the scheduler of the ONNX engine.

Layer: infrastructure (onnxruntime through onnx_decoder.py, numpy). What every scheduler does (slots,
admission, prefix reuse, cancellation, stops, constraints, logprobs) is in slot_scheduler.py; this is
the native step. Each step runs the next token of every decoding sequence in one batch (the decoder's
rows 0..n-1: sequences are moved there by swapping rows when they start decoding), then prefills a
chunk of the prompts waiting in their own rows, `prefill_chunk` tokens beside running streams and
PREFILL_CHUNK when none runs, so a long prompt delays the others by about one chunk. Each sequence
samples with its own Sampler (sampling.py) from its row of the logits.

A slot's row keeps its tokens after the sequence ends: a request whose prompt starts the same way
prefills only the rest (counted as cached prompt tokens).

Numbers: onnxruntime's int4 MatMulNBits (int8 compute) takes another kernel for one row than for several,
and the two round differently, so an int4 greedy stream decoded alone can part from the same stream in
company after a few dozen tokens (it says the same in any company of two or more). fp32 packages give
the same numbers alone and in company; tests/integration/test_onnx_batching.py checks both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from laas.core.errors import Unavailable
from laas.daemon.backends.decode_loop import DecodeLoop
from laas.daemon.backends.detokenize import IncrementalDetokenizer
from laas.daemon.backends.onnx_decoder import PREFILL_CHUNK, OnnxDecoder
from laas.daemon.backends.slot_scheduler import Sequence, Slot, SlotScheduler
from laas.daemon.sampling import Sampler

T = TypeVar("T")


class OnnxScheduler(SlotScheduler):
    """Owns the decoder; the decode loop runs it until it is closed."""

    runtime = "onnxruntime"

    def __init__(self, decoder: OnnxDecoder, tokenizer: Any, eos: frozenset[int], *, prefill_chunk: int,
                 on_token: Callable[[], None], loop: DecodeLoop) -> None:
        super().__init__(parallel=decoder.rows, n_ctx=decoder.max_length, on_token=on_token, loop=loop,
                         relay_name="onnx-relay")
        self._decoder = decoder
        self._tokenizer = tokenizer
        self._eos = eos
        self._prefill_chunk = max(1, min(prefill_chunk, PREFILL_CHUNK))
        self.kv_cells = decoder.rows * decoder.max_length
        self._begin_serving()

    def exclusive(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the decoder's row 0 from this thread, while no sequence is running or waiting (it
        holds the loop's lock, so none starts meanwhile); what row 0 cached is forgotten."""
        with self._cond:
            if self.closing or self._pending or self.active:
                raise Unavailable("the model is generating; evaluate it while it serves no request")
            for slot in self.slots:
                if slot.seq_id == 0:
                    slot.tokens.clear()
            return fn()

    def _begin(self, seq: Sequence) -> None:
        seq.sampler = Sampler(seq.request.sampling, seq.prompt)
        seq.detokenizer = IncrementalDetokenizer(self._tokenizer, seq.prompt)

    def _end(self, seq: Sequence) -> None:
        seq.sampler = None

    def _truncate(self, slot: Slot, keep: int) -> None:
        del slot.tokens[keep:]  # the row's lengths say what is valid: nothing to clear

    def _is_eog(self, token: int) -> bool:
        return token in self._eos

    def _text(self, seq: Sequence, token: int) -> str:
        text: str = seq.detokenizer.add(token)
        return text

    def _text_of(self, token: int) -> str:
        return str(self._tokenizer.decode([token], skip_special_tokens=False))

    def _step(self) -> None:
        running = [s.seq for s in self.slots if s.seq is not None]
        decoding = [s for s in running if s.next_token is not None]
        if decoding:
            self._gather(decoding)
            decoding.sort(key=lambda s: s.slot.seq_id if s.slot is not None else 0)  # row i: the batch's i-th
            pairs = [(s.slot, s.next_token) for s in decoding if s.slot is not None and s.next_token is not None]
            logits = self._decoder.decode([t for _, t in pairs], [len(slot.tokens) for slot, _ in pairs])
            self.stats.steps += 1
            for i, (seq, (slot, token)) in enumerate(zip(decoding, pairs, strict=True)):
                slot.tokens.append(token)
                self._sample(seq, logits[i])
        budget = self._prefill_chunk if decoding else PREFILL_CHUNK
        for seq in sorted((s for s in running if s.next_token is None), key=lambda s: s.submitted_at):
            if budget <= 0 or seq.slot is None:
                break
            slot = seq.slot
            take = min(budget, len(seq.prompt) - seq.evaluated)
            chunk = seq.prompt[seq.evaluated: seq.evaluated + take]
            logits = self._decoder.forward(chunk, seq.evaluated, slot.seq_id)
            if not decoding:  # a prompt chunk alone is a step of its own; beside decoding, part of that step
                self.stats.steps += 1
            slot.tokens.extend(chunk)
            seq.evaluated += take
            budget -= take
            if seq.evaluated == len(seq.prompt):
                self._sample(seq, logits[-1])

    def _gather(self, decoding: list[Sequence]) -> None:
        """Moves the decoding sequences' slots into rows 0..n-1 (the rows one batch runs), swapping each one
        found beyond them with a slot there that does not decode."""
        n = len(decoding)
        moving = {id(s.slot) for s in decoding}
        outside = [s.slot for s in decoding if s.slot is not None and s.slot.seq_id >= n]
        if not outside:
            return
        spare = [slot for slot in self.slots if slot.seq_id < n and id(slot) not in moving]
        for slot, other in zip(outside, spare, strict=True):
            self._decoder.swap(slot.seq_id, other.seq_id, max(len(slot.tokens), len(other.tokens)))
            slot.seq_id, other.seq_id = other.seq_id, slot.seq_id

    def _sample(self, seq: Sequence, logits: Any) -> None:
        if seq.matcher is not None:  # the logits are this step's own buffer: masked in place
            seq.matcher.mask(logits)
        token = seq.sampler.sample(logits)
        seq.sampler.accept(token)
        self._deliver(seq, token, logits)
