"""The ONNX engine: a laas ONNX package served by onnxruntime, tokenizers and numpy.

Layer: infrastructure. It behaves as the GGUF engine does (same sampling parameters, streaming, stop
strings, chat template, cancellation within one decode step) so the servicer cannot tell them apart.
Serving needs onnxruntime, tokenizers, numpy and jinja2 only: never torch, transformers or optimum
(the exporters' extra). Up to `parallel` requests decode at once: a scheduler (onnx_batching.py) in
a decode thread of the engine's own batches their steps, and keeps a finished request's tokens as a
prefix cache; onnxruntime releases the GIL while it computes, so the event loop keeps serving. The KV
cache lives in :class:`OnnxDecoder`, preallocated for the context length, a row per sequence.
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
from laas.daemon.backends.decode_loop import DecodeLoop
from laas.daemon.backends.literal_text import SpecialTexts, segments
from laas.daemon.backends.onnx_batching import OnnxScheduler
from laas.daemon.backends.onnx_decoder import OnnxDecoder
from laas.daemon.backends.slot_scheduler import Emit, stream_sequence
from laas.daemon.backends.slot_scheduler import Sequence as BatchSequence
from laas.daemon.backends.worker import NativeClaims
from laas.daemon.chat_template import ChatTemplate, compile_template, render_chat
from laas.daemon.constraint_masks import ConstraintCompiler, Matcher, json_tokenizer
from laas.daemon.onnx_package import Manifest, read_manifest, verify_files

log = logging.getLogger(__name__)

INLINE_TOKENIZE_CHARS = 4096  # longer texts are tokenized in a worker thread, off the event loop
PREFILL_CHUNK = 128  # prompt tokens per step beside running streams


class OnnxEngine(Engine):
    """Serves one ONNX package. Construct with :meth:`load` (it checks the files and loads off the loop)."""

    def __init__(self, folder: Path, manifest: Manifest, decoder: OnnxDecoder, tokenizer: Any,
                 template: ChatTemplate | None, gate: Path | None = None) -> None:
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
        self._loop = DecodeLoop(gate)  # the engine's own decode thread (onnxruntime's threads are its own)
        self._scheduler = OnnxScheduler(decoder, tokenizer, self._eos, prefill_chunk=PREFILL_CHUNK,
                                        on_token=self._count_token, loop=self._loop)
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
    async def load(cls, folder: Path, *, context_length: int, threads: int, parallel: int = 1,
                   gate: Path | None = None) -> OnnxEngine:
        """`parallel`: requests decoded at once (the KV cache holds a full context for each). `gate`: the
        daemon's compute lock (Shared.gate), held by every step."""
        return await asyncio.to_thread(cls._load, folder, context_length, threads, parallel, gate)

    @classmethod
    def _load(cls, folder: Path, context_length: int, threads: int, parallel: int,
              gate: Path | None) -> OnnxEngine:
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
        decoder = OnnxDecoder.open(folder / manifest.graph, manifest.decoder, n_ctx, threads, max(parallel, 1))
        return cls(folder, manifest, decoder, tokenizer, template, gate)

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
        """Logits [n, vocab] at every position of `tokens` from an empty cache (for evaluation, while no
        generation runs: see OnnxScheduler.exclusive)."""
        def logits() -> Any:
            if self._decoder is None:
                raise ModelLoadError("engine is closed")
            decoder = self._decoder
            return self._scheduler.exclusive(lambda: decoder.all_logits(tokens))

        return self._native.call(logits)

    def stats(self) -> BatchStats:
        return self._scheduler.report()

    def _count_token(self) -> None:
        self.decoded_tokens += 1

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        return await render_chat(self._template, messages, self._specials, self._manifest.name, tools)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if self._decoder is None:
            raise ModelLoadError("engine is closed")
        s = request.sampling
        prompt = list(request.prompt_tokens or await self.tokenize(request.prompt, add_special=request.add_special))
        if not prompt:
            prompt = [self._manifest.bos_token_id or 0]
        n_ctx = self._decoder.max_length
        if len(prompt) >= n_ctx:
            raise OutOfRange(f"prompt: {len(prompt)} tokens leave no room in the context of {n_ctx}", field="prompt")
        matcher: Matcher | None = None
        if s.constraint is not None:  # compiled (or taken from the cache) before it queues
            constraint = s.constraint
            matcher = await self._native.run(lambda: self.constraints.matcher(constraint))
        max_tokens = min(s.max_tokens or 1, n_ctx - len(prompt))

        def sequence(emit: Emit) -> BatchSequence:
            return BatchSequence(request=request, prompt=prompt, max_tokens=max_tokens, emit=emit, matcher=matcher)

        async with contextlib.aclosing(stream_sequence(self._scheduler, sequence)) as chunks:  # closed with this
            async for chunk in chunks:
                yield chunk

    async def check_health(self) -> None:
        if self._decoder is None or not self._scheduler.alive:
            raise ModelLoadError("engine is closed")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._native.close)
        await asyncio.to_thread(self._scheduler.close)  # a generation's last step, off the event loop
        await asyncio.to_thread(self._loop.stop)
        self._decoder = None
        if self._template is not None:
            await asyncio.to_thread(self._template.close)
