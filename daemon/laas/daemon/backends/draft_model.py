"""A draft model: a small GGUF that shares the target's vocabulary proposes the next tokens, the target
verifies them in its next step (batching.py).

Layer: infrastructure (llama.cpp). The draft model has a llama.cpp context of its own with a KV stream per
slot, as the target has; for each slot it remembers which tokens its cache holds. Each step, for every
sequence that drafts, it first catches up with what the target holds (the prompt, then what the last
verification kept, and the next token: whatever the cache shares with that is reused, the rest is removed
and evaluated) and then decodes a round per drafted position, every drafting sequence in one batch, taking
the draft's likeliest token each time (a deterministic draft: the target's own sample decides whether a
token is kept, so output is what plain decoding gives). A long prompt is caught up a chunk a step; until
then the sequence decodes plainly.

`check_compatible` says whether two loaded models share a vocabulary (a draft that does not cannot speak for
the target): the same kind of tokenizer, size, special tokens and the text of every token.
"""

from __future__ import annotations

from typing import Any

from laas.core.errors import ModelLoadError
from laas.daemon.backends.slot_scheduler import common_prefix


class DraftModel:
    """The draft model's context and what each of its sequences holds; only the scheduler thread uses it."""

    def __init__(self, model: Any, ctx: Any, *, parallel: int, n_batch: int, catch_up: int) -> None:
        import llama_cpp
        import numpy

        self._lib = llama_cpp
        self._numpy = numpy
        self.model = model
        self.ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx.ctx)
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(model.vocab))
        self._n_batch = n_batch
        self._catch_up = max(1, catch_up)  # prompt tokens caught up per step, for all sequences together
        self._held: list[list[int]] = [[] for _ in range(parallel)]  # per sequence id: the tokens in its cache
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def free(self) -> None:
        self._lib.llama_batch_free(self._batch)

    def draft(self, wants: list[tuple[int, list[int], int, int]]) -> list[list[int]]:
        """For each (sequence id, the target's tokens, its next token, tokens wanted): up to that many tokens
        the draft model expects next ([] where it wants none, or has not caught up yet)."""
        drafts: list[list[int]] = [[] for _ in wants]
        active: list[tuple[int, int]] = []  # (index in wants, its output's row in the batch)
        n, budget = 0, self._catch_up
        for w, (seq_id, tokens, next_token, want) in enumerate(wants):
            if want <= 0:
                continue
            context = [*tokens, next_token]  # copied only where it drafts: the plan often says none
            held = self._held[seq_id]
            keep = min(common_prefix(held, context), len(context) - 1)  # the last is evaluated for its logits
            if len(held) > keep:
                self._lib.llama_memory_seq_rm(self._mem, seq_id, keep, -1)
                del held[keep:]
            missing = context[keep:]
            if len(missing) > 1:  # a prompt to catch up on (or what the last step kept): within the budget
                if budget <= 0 or n >= self._n_batch:
                    continue
                take = min(len(missing), budget, self._n_batch - n)
                budget -= take - 1
                missing = missing[:take]
            for i, token in enumerate(missing):
                self._put(n, token, len(held) + i, seq_id, False)
                n += 1
            held.extend(missing)
            if len(held) == len(context):
                self._batch.logits[n - 1] = True
                active.append((w, n - 1))
        while active:
            self._decode(n)
            going: list[tuple[int, int]] = []
            n = 0
            for w, row in active:
                token = self._likeliest(row)
                draft = drafts[w]
                draft.append(token)
                if len(draft) < wants[w][3]:
                    seq_id = wants[w][0]
                    held = self._held[seq_id]
                    self._put(n, token, len(held), seq_id, True)
                    held.append(token)
                    going.append((w, n))
                    n += 1
            active = going
        if n:  # caught up on prompts only: nobody drafts this step
            self._decode(n)
        return drafts

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self.ctx.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} on the draft model")

    def _likeliest(self, row: int) -> int:
        pointer = self._lib.llama_get_logits_ith(self.ctx.ctx, row)
        return int(self._numpy.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).argmax())

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        put_token(self._batch, i, token, pos, seq_id, logits)


def put_token(batch: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
    """Row `i` of a llama_batch: `token` at `pos` of sequence `seq_id`, with its logits or not."""
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq_id
    batch.logits[i] = logits


def check_compatible(target: Any, draft: Any, draft_name: str) -> None:
    """Raises ModelLoadError unless `draft` (a loaded llama.cpp model) has `target`'s vocabulary."""
    import llama_cpp

    tv, dv = target.vocab, draft.vocab

    def differ(what: str) -> ModelLoadError:
        return ModelLoadError(f"speculation_draft {draft_name}: its vocabulary is not the model's ({what} differ)")

    if llama_cpp.llama_vocab_type(tv) != llama_cpp.llama_vocab_type(dv):
        raise differ("tokenizer types")
    n = int(llama_cpp.llama_vocab_n_tokens(tv))
    if int(llama_cpp.llama_vocab_n_tokens(dv)) != n:
        raise differ("vocabulary sizes")
    if (llama_cpp.llama_vocab_bos(tv), llama_cpp.llama_vocab_eos(tv)) != (llama_cpp.llama_vocab_bos(dv),
                                                                         llama_cpp.llama_vocab_eos(dv)):
        raise differ("BOS and EOS tokens")
    for i in range(n):
        if llama_cpp.llama_vocab_get_text(tv, i) != llama_cpp.llama_vocab_get_text(dv, i):
            raise differ(f"the texts of token {i}")
