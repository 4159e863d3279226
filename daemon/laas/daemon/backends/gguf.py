"""The GGUF engine: llama-cpp-python behind the Engine interface.

Layer: infrastructure. One llama.cpp context serves one request at a time (the model's queue sees to
that). Each generation runs in the engine's own worker thread, which hands text deltas to the event
loop and checks a stop flag before every decode step, so a cancelled or expired request frees the
model within one step. ctypes releases the GIL during native calls, so the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from laas.daemon.backends.worker import stream_from_worker
from laas.daemon.engine import (
    ChatMessage,
    Completion,
    Engine,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelFormat,
    ModelInfo,
    TextDelta,
    Timings,
    Usage,
)
from laas.daemon.errors import InvalidArgument, ModelLoadError
from laas.daemon.gguf_header import GgufHeader
from laas.daemon.stops import StopMatcher

log = logging.getLogger(__name__)



class GgufEngine(Engine):
    """Serves one GGUF file. Construct with :meth:`load` (it runs the slow native load off the loop)."""

    def __init__(self, llm: Any, header: GgufHeader, context_length: int) -> None:
        self._llm = llm
        self._header = header
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf")
        self._closing = threading.Event()  # stops any generation still running when the engine closes
        self._info = ModelInfo(
            format=ModelFormat.GGUF,
            quantization=header.quantization,
            context_length=context_length,
            trained_context_length=header.context_length,
            size_bytes=header.size_bytes,
            architecture=header.architecture,
            chat_template=header.chat_template,
        )
        self._formatter = chat_formatter(llm._model, header)
        import llama_cpp

        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._vocab = llm._model.vocab
        self._random_seed = llama_cpp.LLAMA_DEFAULT_SEED  # llama.cpp draws a fresh seed for this value

    @classmethod
    async def load(cls, path: Path, header: GgufHeader, *, context_length: int, threads: int) -> GgufEngine:
        def _load() -> Any:
            import llama_cpp  # deferred: importing it loads the native library

            try:
                return llama_cpp.Llama(
                    model_path=str(path), n_ctx=context_length, n_threads=threads, n_threads_batch=threads,
                    n_batch=min(512, context_length), verbose=False,
                )
            except (ValueError, RuntimeError, OSError) as e:
                raise ModelLoadError(f"llama.cpp could not load {path.name}: {e}") from e

        n_ctx = min(context_length, header.context_length or context_length)
        llm = await asyncio.to_thread(_load)
        return cls(llm, header, n_ctx)

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        return await asyncio.to_thread(self._tokenize, text, add_special)

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    async def render_chat(self, messages: Sequence[ChatMessage]) -> GenerationRequest:
        if self._formatter is None:
            raise ModelLoadError(f"model {self._header.metadata.get('general.name', '')!r} has no chat template")
        return self._formatter([{"role": m.role, "content": m.content} for m in messages])

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        blocking = functools.partial(self._generate_blocking, request)
        async for chunk in stream_from_worker(self._executor, blocking, "llama.cpp"):
            yield chunk

    def _generate_blocking(self, request: GenerationRequest, stop_flag: threading.Event,
                           emit: Callable[[object], None]) -> None:
        s = request.sampling
        llm = self._llm
        prompt = list(request.prompt_tokens or self._tokenize(request.prompt, True))
        max_tokens = s.max_tokens or 1
        llm.set_seed(s.seed if s.seed is not None else self._random_seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(s.stop + request.template_stops)
        start = time.perf_counter()
        first_token_at = 0.0
        completion = 0
        finish = FinishReason.LENGTH
        cached = _cached_prefix(llm, prompt)
        tokens = llm.generate(
            prompt, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
            repeat_penalty=s.repeat_penalty, presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty, reset=True,
        )
        try:
            while completion < max_tokens and not stop_flag.is_set() and not self._closing.is_set():
                token = next(tokens)
                if completion == 0:
                    first_token_at = time.perf_counter()
                completion += 1
                self.decoded_tokens += 1
                if not s.ignore_eos and self._is_eog(self._vocab, token):
                    finish = FinishReason.STOP
                    break
                piece = llm.detokenize([token], special=False)
                text = stops.feed(decoder.decode(piece))
                if text:
                    emit(TextDelta(text))
                if stops.stopped:
                    finish = FinishReason.STOP
                    break
        finally:
            tokens.close()
        # Bytes of a character cut off by max_tokens are dropped, not sent as U+FFFD.
        tail = stops.flush()
        if tail:
            emit(TextDelta(tail))
        end = time.perf_counter()
        first_token_at = first_token_at or end
        prompt_ms = (first_token_at - start) * 1000
        emit(Completion(
            finish_reason=finish,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=completion, cached_prompt_tokens=cached),
            timings=Timings(prompt_ms=prompt_ms, decode_ms=(end - first_token_at) * 1000),
        ))

    async def check_health(self) -> None:
        if self._executor._shutdown:
            raise ModelLoadError("engine is closed")

    async def aclose(self) -> None:
        # A stream abandoned at shutdown may never be finalized: stop its worker here, and wait for it
        # off the event loop, which must stay free to finalize what it can.
        self._closing.set()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.close)


def _cached_prefix(llm: Any, prompt: list[int]) -> int:
    """Prompt tokens llama.cpp will reuse from its KV cache (it re-evaluates the last one of a full match)."""
    cached = 0
    for have, want in zip(llm._input_ids[: llm.n_tokens], prompt, strict=False):
        if have != want:
            break
        cached += 1
    return min(cached, len(prompt) - 1)


def chat_formatter(model: Any, header: GgufHeader) -> Callable[[list[dict[str, str]]], GenerationRequest] | None:
    """A renderer for the model's embedded chat template, in llama-cpp-python's sandboxed Jinja env.

    `model` is llama-cpp-python's LlamaModel (the vocabulary names the template's BOS/EOS tokens)."""
    template = header.chat_template
    if not template:
        return None
    import jinja2
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(token_id: int) -> str:
        return str(model.token_get_text(token_id)) if token_id >= 0 else ""

    formatter = Jinja2ChatFormatter(
        template=template, eos_token=token_text(model.token_eos()), bos_token=token_text(model.token_bos()),
        add_generation_prompt=True,
    )

    def render(messages: list[dict[str, str]]) -> GenerationRequest:
        try:
            result = formatter(messages=messages)  # type: ignore[arg-type]
        except (ValueError, jinja2.TemplateError) as e:  # the template's raise_exception, or a sandbox refusal
            raise InvalidArgument(f"messages: the model's chat template refused them: {e}", field="messages") from e
        stop = result.stop
        stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if s)
        return GenerationRequest(prompt=result.prompt, template_stops=stops, add_special=not result.added_special)

    return render
