"""The ONNX engine: a laas ONNX package served by onnxruntime, tokenizers and numpy.

Layer: infrastructure. It behaves as the GGUF engine does (same sampling parameters, streaming, stop
strings, chat template, cancellation within one decode step) so the servicer cannot tell them apart.
Serving needs onnxruntime, tokenizers, numpy and jinja2 only: never torch, transformers or optimum
(the exporters' extra). Each generation runs in the engine's worker thread, which checks a stop flag
before every decode step; onnxruntime releases the GIL while it computes, so the event loop keeps
serving. The KV cache lives in :class:`OnnxDecoder`, preallocated for the context length.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from laas.core.engine import Engine
from laas.core.errors import ModelLoadError, OutOfRange
from laas.core.types import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelFormat,
    ModelInfo,
    TextDelta,
    Timings,
    TokenLogprob,
    Tool,
    Usage,
)
from laas.daemon.backends.detokenize import IncrementalDetokenizer
from laas.daemon.backends.literal_text import SpecialTexts, segments
from laas.daemon.backends.onnx_decoder import OnnxDecoder
from laas.daemon.backends.worker import NativeClaims, stream_from_worker
from laas.daemon.chat_template import ChatTemplate, compile_template, render_chat
from laas.daemon.constraint_masks import ConstraintCompiler, json_tokenizer
from laas.daemon.logprobs import token_logprob
from laas.daemon.onnx_package import Manifest, read_manifest, verify_files
from laas.daemon.sampling import Sampler
from laas.daemon.stops import StopMatcher

log = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 4096  # longer texts are tokenized in a worker thread, off the event loop


class OnnxEngine(Engine):
    """Serves one ONNX package. Construct with :meth:`load` (it checks the files and loads off the loop)."""

    def __init__(self, folder: Path, manifest: Manifest, decoder: OnnxDecoder, tokenizer: Any,
                 template: ChatTemplate | None) -> None:
        self._folder = folder
        self._manifest = manifest
        self._decoder: OnnxDecoder | None = decoder
        self._tokenizer = tokenizer
        # The same tokenizer reading special tokens' texts as text (message contents: see literal_text).
        self._literal_tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        self._literal_tokenizer.encode_special_tokens = True
        self._specials = SpecialTexts(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)
        self._template = template
        self._eos = frozenset(manifest.eos_token_ids)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        vocab = decoder.shape.vocab_size  # the logits' width (may exceed the tokenizer's ids)
        self.constraints = ConstraintCompiler(lambda: json_tokenizer(tokenizer.to_str(), vocab, manifest.eos_token_ids),
                                              vocab, lambda text: self._tokenize(text, False))
        self._native = NativeClaims()  # tokenizing and evaluation outside the worker: aclose waits for them
        self._info = ModelInfo(
            format=ModelFormat.ONNX,
            quantization=manifest.quantization,
            context_length=decoder.max_length,
            trained_context_length=manifest.context_length,
            size_bytes=manifest.size_bytes,
            architecture=manifest.architecture,
            chat_template=template.source if template else None,
        )

    @classmethod
    async def load(cls, folder: Path, *, context_length: int, threads: int) -> OnnxEngine:
        return await asyncio.to_thread(cls._load, folder, context_length, threads)

    @classmethod
    def _load(cls, folder: Path, context_length: int, threads: int) -> OnnxEngine:
        from tokenizers import Tokenizer

        manifest = read_manifest(folder)
        if manifest.decoder is None:
            raise ModelLoadError(f"{folder.name} is an embedding package, not a decoder")
        verify_files(folder, manifest)
        try:
            tokenizer = Tokenizer.from_file(str(folder / manifest.tokenizer))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise ModelLoadError(f"{folder.name}/{manifest.tokenizer} cannot be loaded: {e}") from e
        source = None
        if manifest.chat_template and manifest.file(manifest.chat_template):
            source = (folder / manifest.chat_template).read_text(encoding="utf-8")

        def text(token_id: int | None) -> str:
            return (tokenizer.id_to_token(token_id) or "") if token_id is not None else ""

        eos = manifest.eos_token_ids[0] if manifest.eos_token_ids else None
        template = compile_template(source, model=folder.name, bos_token=text(manifest.bos_token_id),
                                    eos_token=text(eos))
        n_ctx = min(context_length, manifest.context_length)
        decoder = OnnxDecoder.open(folder / manifest.graph, manifest.decoder, n_ctx, threads)
        return cls(folder, manifest, decoder, tokenizer, template)

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        if len(text) <= INLINE_TOKENIZE_CHARS:  # microseconds: not worth a thread hop
            return self._native.call(lambda: self._tokenize(text, add_special))
        return await self._native.run(lambda: self._tokenize(text, add_special))

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        """Special tokens are parsed except in literal spans (message contents: see literal_text)."""
        ids: list[int] = []
        for piece, literal in segments(text):
            ids += (self._literal_tokenizer if literal else self._tokenizer).encode(piece, add_special_tokens=False).ids
        if add_special and self._manifest.add_bos and self._manifest.bos_token_id is not None:
            ids.insert(0, self._manifest.bos_token_id)
        return ids

    def text_tokens(self, text: str) -> list[int]:
        """Plain text to ids, no special tokens added (for evaluation)."""
        return self._native.call(lambda: self._tokenize(text, False))

    def decoder_logits(self, tokens: Sequence[int]) -> Any:
        """Logits [n, vocab] at every position of `tokens` from an empty cache (for evaluation; not while
        a generation runs)."""
        def logits() -> Any:
            if self._decoder is None:
                raise ModelLoadError("engine is closed")
            return self._decoder.all_logits(tokens)

        return self._native.call(logits)

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        return await render_chat(self._template, messages, self._specials, self._manifest.name, tools)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        constraint = request.sampling.constraint
        if constraint is not None:  # compiled (or taken from the cache) before the generation starts
            await self._native.run(lambda: self.constraints.matcher(constraint))  # warms the cache, checks
        blocking = functools.partial(self._generate_blocking, request)
        async for chunk in stream_from_worker(self._executor, blocking, "onnxruntime"):
            yield chunk

    def _generate_blocking(self, request: GenerationRequest, stop_flag: threading.Event,
                           emit: Callable[[object], None]) -> None:
        decoder = self._decoder
        if decoder is None:
            raise ModelLoadError("engine is closed")
        s = request.sampling
        prompt = list(request.prompt_tokens or self._tokenize(request.prompt, request.add_special))
        if not prompt:
            prompt = [self._manifest.bos_token_id or 0]
        if len(prompt) >= decoder.max_length:
            raise OutOfRange(f"prompt: {len(prompt)} tokens leave no room in the context of {decoder.max_length}",
                             field="prompt")
        max_tokens = min(s.max_tokens or 1, decoder.max_length - len(prompt))
        matcher = self.constraints.matcher(s.constraint) if s.constraint is not None else None
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text is not sent yet
        sampler = Sampler(s, prompt)
        detok = IncrementalDetokenizer(self._tokenizer, prompt)
        stops = StopMatcher(s.stop + request.template_stops)
        start = time.perf_counter()
        first_token_at = 0.0
        completion = 0
        finish = FinishReason.LENGTH
        position = len(prompt)
        logits = decoder.prefill(prompt)
        while completion < max_tokens and not stop_flag.is_set():
            if matcher is not None:
                logits = logits.copy()
                matcher.mask(logits)
            token = sampler.sample(logits)
            sampler.accept(token)
            if completion == 0:
                first_token_at = time.perf_counter()
            completion += 1
            self.decoded_tokens += 1
            if not s.ignore_eos and token in self._eos:
                finish = FinishReason.STOP
                break
            if s.logprobs:
                pending.append(token_logprob(logits, token, s, self._token_text))
            complete = matcher is not None and (not matcher.accept(token) or matcher.done)
            text = stops.feed(detok.add(token))
            if text:
                emit(TextDelta(text, tuple(pending)))
                pending.clear()
            if stops.stopped or complete:
                finish = FinishReason.STOP
                break
            if completion < max_tokens and not stop_flag.is_set():
                logits = decoder.forward((token,), position)[-1]
                position += 1
        # Bytes of a character cut off by max_tokens never left the detokenizer: nothing to drop here.
        tail = stops.flush()
        if tail:
            emit(TextDelta(tail, tuple(pending)))
        end = time.perf_counter()
        first_token_at = first_token_at or end
        emit(Completion(
            finish_reason=finish,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion),
            timings=Timings(prompt_ms=(first_token_at - start) * 1000, decode_ms=(end - first_token_at) * 1000),
        ))

    def _token_text(self, token: int) -> str:
        return str(self._tokenizer.decode([token], skip_special_tokens=False))

    async def check_health(self) -> None:
        if self._decoder is None or self._executor._shutdown:
            raise ModelLoadError("engine is closed")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._native.close)
        await asyncio.to_thread(self._executor.shutdown, True)  # a generation's last step, off the event loop
        self._decoder = None
        if self._template is not None:
            await asyncio.to_thread(self._template.close)
