"""The GGUF engine: llama.cpp through llama-cpp-python's low-level API; concurrent requests share decode steps.

Layer: infrastructure. The model and one llama.cpp context with `parallel` sequence ids (1 by default:
one request at a time, the others wait in the model's queue) are
driven by a Scheduler thread (batching.py); this class is the Engine face of it: it tokenizes,
renders chat, submits a sequence per generate() call and relays what the scheduler emits to the
event loop. Closing the iterator cancels the sequence; the scheduler drops it before its next step,
and generate() waits for that, so no token is decoded for it afterwards.

The decode thread (decode_loop.DecodeLoop) is passed in by whoever owns it: the daemon shares one among its
engines and stops it on shutdown. An engine given none (tests, `laas eval`) runs its own, which aclose()
stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from laas.core.engine import Engine
from laas.core.errors import ModelLoadError, OutOfRange
from laas.core.types import ChatMessage, GenerationChunk, GenerationRequest, ModelFormat, ModelInfo, Tool
from laas.daemon.backends.backend import BatchStats
from laas.daemon.backends.batching import STEP_SIZES, Scheduler, time_step_cost
from laas.daemon.backends.decode_loop import DecodeLoop
from laas.daemon.backends.draft_model import DraftModel, check_compatible
from laas.daemon.backends.literal_text import SpecialTexts, segments
from laas.daemon.backends.llama_lib import init_backends, native_digest
from laas.daemon.backends.slot_scheduler import Emit, check_prompt, stream_sequence
from laas.daemon.backends.slot_scheduler import Sequence as BatchSequence
from laas.daemon.backends.speculation import StepCost, draft_model_can_pay, relative_to
from laas.daemon.backends.step_costs import StepCosts, kept_or_timed, step_cost_key
from laas.daemon.backends.worker import NativeClaims
from laas.daemon.chat_template import ChatTemplate, compile_template, render_chat
from laas.daemon.constraint_masks import ConstraintCompiler, Matcher, llama_tokenizer
from laas.daemon.gguf_header import GgufHeader

log = logging.getLogger(__name__)

PREFILL_CHUNK = 128  # prompt tokens per step: a long prompt delays the running streams by about this much
DRAFT_MAX = 48  # prompt-lookup tokens a sequence may draft per step (speculation.plan_drafts decodes what pays)
DRAFT_MODEL_MAX = 16  # a draft model's tokens per sequence and step (speculation.plan_drafts: what pays)
DRAFT_STEP_SIZES = (1, 2, 3, 5)  # a draft model's rounds batch one token per sequence: timed up to a few


class GgufEngine(Engine):
    """Serves one GGUF file to up to `parallel` requests at once. Construct with :meth:`load`."""

    def __init__(self, model: Any, ctx: Any, header: GgufHeader, context_length: int, *, parallel: int,
                 n_batch: int, prefill_chunk: int, template: ChatTemplate | None = None,
                 specials: SpecialTexts | None = None, decode_loop: DecodeLoop | None = None,
                 max_draft: int = 0, min_draft: int = 0, step_cost: StepCost | None = None,
                 draft: tuple[DraftModel, StepCost] | None = None, owns_loop: bool = False) -> None:
        """`owns_loop`: `decode_loop` was made for this engine alone (aclose stops it)."""
        import llama_cpp

        self._lib = llama_cpp
        self._model = model
        self._ctx = ctx
        self._header = header
        self._n_vocab = int(model.n_vocab())
        self._random_seed = llama_cpp.LLAMA_DEFAULT_SEED
        self._native = NativeClaims()  # tokenizing outside the scheduler: aclose waits for it
        self._specials = specials or special_texts(model)  # what message contents may not turn into
        self._own_loop = decode_loop if owns_loop else None  # the engine's own decode thread, stopped by aclose()
        if decode_loop is None:
            decode_loop = self._own_loop = DecodeLoop()
        self._scheduler = Scheduler(model, ctx, parallel=parallel, n_batch=n_batch, prefill_chunk=prefill_chunk,
                                    make_sampler=self._make_sampler, on_token=self._count_token, loop=decode_loop,
                                    max_draft=max_draft, min_draft=min_draft, step_cost=step_cost,
                                    draft_model=draft[0] if draft else None, draft_cost=draft[1] if draft else None)
        self._draft = draft[0] if draft else None
        self._info = ModelInfo(  # a request gets at most its sequence's share of the KV cache
            format=ModelFormat.GGUF, quantization=header.quantization,
            context_length=min(context_length, self._scheduler.n_ctx),
            trained_context_length=header.context_length, size_bytes=header.size_bytes,
            architecture=header.architecture, chat_template=header.chat_template,
        )
        if template is not None:  # its BOS/EOS texts come from the vocabulary, known only now
            template.bind(bos_token=_token_text(model, model.token_bos()),
                          eos_token=_token_text(model, model.token_eos()))
        self._template = template
        # The constraint compiler over the vocabulary llama.cpp loaded (built at the first constraint).
        self.constraints = ConstraintCompiler(lambda: llama_tokenizer(model.vocab, self._n_vocab), self._n_vocab)

    @classmethod
    async def load(cls, path: Path, header: GgufHeader, *, context_length: int, threads: int, parallel: int = 1,
                   kv_tokens: int = 0, prefill_chunk: int = PREFILL_CHUNK, flash_attn: str = "auto",
                   speculation: str = "off", draft_min: int = 0, draft_path: Path | None = None,
                   decode_loop: DecodeLoop | None = None, gate: Path | None = None,
                   step_costs: StepCosts | None = None) -> GgufEngine:
        """`kv_tokens`: KV cells in all, split evenly among the `parallel` sequences (0: a full context each).
        `speculation`: "ngram" drafts by prompt lookup (batching.py), "draft" with the GGUF at `draft_path`
        (draft_model.py: it must share this model's vocabulary), both planned with what a drafted token
        costs, timed here at load (or kept from an earlier load in `step_costs`: step_costs.py); "off" does
        not. `draft_min`: draft tokens a step decodes at least where they are offered, whatever that cost says.
        `decode_loop`: the thread that decodes, shared with other engines; None: the engine runs its own,
        its steps holding the daemon's compute lock at `gate` (Shared.gate) where one is given."""
        n_ctx = min(context_length, header.context_length or context_length)
        n_batch = min(512, max(n_ctx, parallel))
        drafts = speculation in ("ngram", "draft")
        if speculation == "draft" and draft_path is None:
            raise ModelLoadError(f"{path.name}: speculation \"draft\" needs a draft model (speculation_draft)")
        # Timing steps decodes: in the decode thread, as every decode (decode_loop.DecodeLoop says why).
        owns_loop = decode_loop is None
        loop = decode_loop or DecodeLoop(gate)

        def _load() -> tuple[Any, Any, StepCost | None, tuple[DraftModel, StepCost] | None]:
            import llama_cpp  # deferred: importing it loads the native library
            from llama_cpp._logger import set_verbose

            set_verbose(False)
            init_backends()  # a portable build: its best CPU variant, from the package's own folder
            llama_cpp.llama_backend_init()
            mparams = llama_cpp.llama_model_default_params()
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = kv_tokens or n_ctx * parallel
            cparams.n_batch = cparams.n_ubatch = n_batch
            cparams.n_seq_max = parallel
            # A KV stream of its own per sequence: a sequence attends over the same cells in the same
            # order whoever shares the step, so its numbers (and a greedy stream's text) do not depend
            # on its company. (A unified cache interleaves the sequences' cells, which changes how the
            # SIMD lanes sum attention, and a greedy stream can then diverge.)
            cparams.kv_unified = False
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.no_perf = True
            # Flash attention: llama.cpp's own "auto" turns it on where the model's layers support it (every
            # model on a CPU). In-process here it is 4-10% faster at one stream and 2-5% at four, and with a
            # KV stream per sequence a greedy stream in company still decodes what it decodes alone
            # (measured: 0 of 24 staggered streams differed, with it and without;
            # tests/integration/test_batching.py checks both).
            cparams.flash_attn_type = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                                       "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                       "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
            model, ctx = _open(path, mparams, cparams)
            opened = [ctx, model]
            system = llama_cpp.llama_print_system_info().decode(errors="replace")  # the CPU features in use
            library = {"build": native_digest(), "system": system}
            settings = {"n_ctx": cparams.n_ctx, "n_batch": n_batch, "n_seq_max": parallel, "threads": threads,
                        "flash_attn": flash_attn, "kv_unified": False}

            def costs_of(file: Path, context: Any, sizes: tuple[int, ...]) -> StepCost:
                """The steps are timed in the decode thread; the kept curves are read and written here."""
                key = step_cost_key(file, settings | {"sizes": sizes}, library)
                cost, kept = kept_or_timed(lambda s: loop.call(lambda: time_step_cost(context, s)), sizes,
                                           step_costs, key)
                if kept:
                    log.info("%s: its step costs as kept from an earlier load (a one-token step agrees)", file.name)
                return cost

            try:  # what a drafted token costs in a step, on this machine (speculation plans with it)
                step_cost = costs_of(path, ctx, STEP_SIZES) if drafts else None
                draft = None
                if speculation == "draft" and draft_path is not None:
                    draft_model, draft_ctx = _open(draft_path, mparams, cparams)
                    opened[:0] = [draft_ctx, draft_model]
                    check_compatible(model, draft_model, draft_path.name)
                    draft_cost = costs_of(draft_path, draft_ctx, DRAFT_STEP_SIZES)
                    draft = (DraftModel(draft_model, draft_ctx, parallel=parallel, n_batch=n_batch,
                                        catch_up=prefill_chunk), draft_cost)
            except BaseException:
                for native in opened:
                    native.close()
                raise
            return model, ctx, step_cost, draft

        # The chat template compiles first: a broken one fails the model before any native object exists.
        template = await asyncio.to_thread(lambda: compile_template(header.chat_template, model=path.name))
        try:
            model, ctx, step_cost, draft = await asyncio.to_thread(_load)
        except BaseException:
            if template is not None:
                await asyncio.to_thread(template.close)
            if owns_loop:
                await asyncio.to_thread(loop.stop)
            raise
        specials = await asyncio.to_thread(special_texts, model)
        if step_cost is not None:  # timed: speculation is on (a draft model is loaded only then)
            kind = "prompt-lookup" if draft is None or draft_path is None else f"draft-model ({draft_path.name})"
            log.info("%s: %s speculation on; a step's time by its tokens here (one token: %.1f ms): %s",
                     path.name, kind, step_cost.seconds * 1000, step_cost.describe())
            if draft is not None:
                log.info("%s: the draft model's step (one token: %.1f ms): %s", path.name,
                         draft[1].seconds * 1000, draft[1].describe())
                if not draft_model_can_pay(step_cost, relative_to(draft[1], step_cost), DRAFT_MODEL_MAX):
                    log.warning("%s: its draft model's step costs %.2f of its own here, too much to pay even when "
                                "every draft is kept: it drafts only what speculation_draft_min asks (%d)",
                                path.name, draft[1].seconds / step_cost.seconds, draft_min)
        return cls(model, ctx, header, n_ctx, parallel=parallel, n_batch=n_batch, prefill_chunk=prefill_chunk,
                   template=template, specials=specials, decode_loop=loop, owns_loop=owns_loop,
                   max_draft=(DRAFT_MODEL_MAX if draft else DRAFT_MAX) if drafts else 0, min_draft=draft_min,
                   step_cost=step_cost, draft=draft)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def stats(self) -> BatchStats:
        return self._scheduler.report()

    def _count_token(self) -> None:
        self.decoded_tokens += 1

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        return await self._native.run(lambda: self._tokenize(text, add_special))

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        """Special tokens are parsed except in literal spans (message contents: see literal_text)."""
        ids: list[int] = []
        for i, (piece, literal) in enumerate(segments(text)):
            ids += self._model.tokenize(piece.encode("utf-8"), add_bos=add_special and i == 0, special=not literal)
        return ids

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        return await render_chat(self._template, messages, self._specials,
                                 str(self._header.metadata.get("general.name", "")), tools)

    def _make_sampler(self, request: GenerationRequest) -> Any:
        """The request's own sampler chain, as llama-cpp-python's Llama builds it (same results); None for
        plain greedy decoding (no penalties), which the scheduler does itself: an argmax over the logits."""
        from llama_cpp import _internals

        s = request.sampling
        if s.temperature == 0.0 and (s.repeat_penalty, s.frequency_penalty, s.presence_penalty) == (1.0, 0.0, 0.0):
            return None
        sampler: Any = _internals.LlamaSampler()  # type: ignore[no-untyped-call]
        sampler.add_penalties(n_vocab=self._n_vocab, penalty_last_n=64, penalty_repeat=s.repeat_penalty,
                              penalty_freq=s.frequency_penalty, penalty_present=s.presence_penalty)
        if s.temperature == 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(s.top_k)
            sampler.add_typical(1.0, 1)
            sampler.add_top_p(s.top_p, 1)
            sampler.add_min_p(s.min_p, 1)
            sampler.add_temp(s.temperature)
            sampler.add_dist(s.seed if s.seed is not None else self._random_seed)
        return sampler

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        prompt = list(request.prompt_tokens or await self.tokenize(request.prompt, add_special=request.add_special))
        check_prompt(prompt)
        if len(prompt) >= self._info.context_length:
            raise OutOfRange(f"prompt: {len(prompt)} tokens leave no room in the context of "
                             f"{self._info.context_length}", field="prompt")
        matcher: Matcher | None = None
        if request.sampling.constraint is not None:  # compiled (or taken from the cache) before it queues
            constraint = request.sampling.constraint
            matcher = await self._native.run(lambda: self.constraints.matcher(constraint))
        def sequence(emit: Emit) -> BatchSequence:
            return BatchSequence(request=request, prompt=prompt, max_tokens=request.sampling.max_tokens or 1,
                                 emit=emit, matcher=matcher)

        async with contextlib.aclosing(stream_sequence(self._scheduler, sequence)) as chunks:  # closed with this
            async for chunk in chunks:
                yield chunk

    async def check_health(self) -> None:
        if not self._scheduler.alive:
            raise ModelLoadError("engine is closed")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._native.close)  # no llama_tokenize runs on the model once it is freed
        await asyncio.to_thread(self._scheduler.close)
        if self._own_loop is not None:
            await asyncio.to_thread(self._own_loop.stop)
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            await asyncio.to_thread(ctx.close)
        model, self._model = self._model, None
        if model is not None:
            await asyncio.to_thread(model.close)
        draft, self._draft = self._draft, None
        if draft is not None:
            await asyncio.to_thread(draft.ctx.close)
            await asyncio.to_thread(draft.model.close)
        if self._template is not None:
            await asyncio.to_thread(self._template.close)


def _open(path: Path, mparams: Any, cparams: Any) -> tuple[Any, Any]:
    """A llama.cpp model and a context on it; ModelLoadError where llama.cpp refuses the file."""
    from llama_cpp import _internals

    try:
        model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
        try:
            ctx = _internals.LlamaContext(model=model, params=cparams, verbose=False)
        except BaseException:
            model.close()  # type: ignore[no-untyped-call]
            raise
    except (ValueError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"llama.cpp could not load {path.name}: {e}") from e
    return model, ctx


def _token_text(model: Any, token_id: int) -> str:
    return str(model.token_get_text(token_id)) if token_id >= 0 else ""


def special_texts(model: Any) -> SpecialTexts:
    """The texts llama.cpp reads as control tokens when it parses special tokens (not the user-defined
    ones, which it reads in any text)."""
    import llama_cpp

    control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    vocab = model.vocab
    texts = (llama_cpp.llama_vocab_get_text(vocab, i) for i in range(int(llama_cpp.llama_vocab_n_tokens(vocab)))
             if llama_cpp.llama_vocab_get_attr(vocab, i) & control)
    return SpecialTexts(t.decode("utf-8", errors="replace") for t in texts if t)
