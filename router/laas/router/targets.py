"""Targets the router can send a request to: a local model, or a remote engine (cloud endpoint, peer).

Layer: application. A target turns a routed request into its own GenerationRequest (a local model
renders chat with its template; a remote one takes the messages), runs it, and learns from it:
each finished request updates the target's latency estimate, each failure its error rate and circuit.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace

from laas.core.engine import Engine
from laas.core.errors import TargetFailed
from laas.core.types import ChatMessage, Completion, GenerationChunk, GenerationRequest, SamplingParams, TextDelta
from laas.daemon.backends.literal_text import literal
from laas.daemon.registry import ModelEntry, ModelRegistry, ModelState
from laas.router.latency import CircuitBreaker, LocalEstimator, RemoteEstimator
from laas.router.policy import Estimate, TargetKind, admit
from laas.router.redact import Mapping, Redaction, Redactor, Restorer

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RoutedRequest:
    """A request before it is bound to a target: a raw prompt, or chat messages."""

    sampling: SamplingParams
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    keep_alive_s: float | None = None  # how long a local model stays loaded after this request

    def continued(self, delivered: str, max_tokens: int) -> RoutedRequest:
        """The same request, resumed after `delivered` was already streamed to the client."""
        sampling = replace(self.sampling, max_tokens=max_tokens)
        if self.messages:
            return replace(self, sampling=sampling,
                           messages=(*self.messages, ChatMessage("assistant", delivered)))
        return replace(self, sampling=sampling, prompt=self.prompt + delivered)


class LocalTarget:
    kind = TargetKind.LOCAL

    def __init__(self, entry: ModelEntry, registry: ModelRegistry, default_max_tokens: int, clock: Clock) -> None:
        self.entry = entry
        self.name = entry.name
        self.estimator = LocalEstimator(parallel=entry.queue.parallel)
        self._registry = registry
        self._default_max_tokens = default_max_tokens
        self._clock = clock

    @property
    def context_length(self) -> int:
        info = self.entry.info
        return info.context_length if info else self.entry.config.context_length

    def load_ms(self) -> float:
        """Time to load the model before it can start: 0 when loaded; the last load, or a guess from its size."""
        entry = self.entry
        if entry.state is ModelState.READY:
            return 0.0
        return entry.load_ms or 200.0 + entry.size_bytes / 400_000  # ~400 MB/s from the page cache or disk

    def estimate(self, prompt_tokens: int, max_tokens: int) -> Estimate:
        entry = self.entry
        servable = entry.servable  # a model that is not loaded loads on use: it costs its load time
        reason = "" if servable else ("model is loading" if entry.fetching else f"model is {entry.state.value}")
        predicted = self.estimator.predict_ms(prompt_tokens, max_tokens, self._clock()) + self.load_ms()
        return Estimate(self.name, self.kind, self.context_length, servable, predicted, reason)

    async def render(self, request: RoutedRequest, resumed_from: str = "", engine: Engine | None = None
                     ) -> GenerationRequest:
        """The engine-level request: chat rendered with the model's template, prompt tokens counted."""
        engine = engine or self.entry.ready_engine()
        if request.messages and not resumed_from:
            bound = await engine.render_chat(request.messages)
        elif request.messages:  # resume inside the assistant's turn, not as a new message
            bound = await engine.render_chat(request.messages[:-1])
            bound = replace(bound, prompt=bound.prompt + literal(request.messages[-1].content))
        elif resumed_from and request.prompt.endswith(resumed_from):  # text already streamed: never control tokens
            bound = GenerationRequest(prompt=request.prompt[:-len(resumed_from)] + literal(resumed_from))
        else:
            bound = GenerationRequest(prompt=request.prompt)
        tokens = await engine.tokenize(bound.prompt, add_special=bound.add_special)
        return replace(bound, sampling=request.sampling, prompt_tokens=tuple(tokens), messages=request.messages)

    async def bind(self, request: RoutedRequest, resumed_from: str = "", engine: Engine | None = None
                   ) -> GenerationRequest:
        """render(), with the token budget granted within the context window (OutOfRange if none fits)."""
        bound = await self.render(request, resumed_from, engine)
        granted = admit(len(bound.prompt_tokens or ()), request.sampling.max_tokens, self.context_length,
                        self._default_max_tokens)
        return replace(bound, sampling=replace(request.sampling, max_tokens=granted.max_tokens))

    async def stream(self, request: RoutedRequest, prompt_tokens: int, max_tokens: int, resumed_from: str = ""
                     ) -> AsyncGenerator[GenerationChunk, None]:
        # Take a place in the queue estimate before the first await, so that requests planned at the same
        # moment see each other; the place holds this request's own service time, not the queue ahead.
        ticket = self.estimator.admit(self.estimator.service_ms(prompt_tokens, max_tokens))
        started = False
        try:
            # A loaded model checks the request before it queues (a prompt too long fails at once);
            # one that is not loaded checks it once loaded, in its turn.
            async with self._registry.holding(self.entry) as loaded:  # not unloaded while it tokenizes
                early = await self.bind(request, resumed_from, loaded) if loaded is not None else None

            async def bind(engine: Engine) -> GenerationRequest:
                return early if early is not None else await self.bind(request, resumed_from, engine)

            async for chunk in self._registry.run(self.entry, bind, request.keep_alive_s):
                if not started:
                    self.estimator.start(ticket, self._clock() - 1e-3)
                    started = True
                if isinstance(chunk, Completion):
                    t, u = chunk.timings, chunk.usage
                    self.estimator.observe(u.prompt_tokens - u.cached_prompt_tokens, t.prompt_ms,
                                           u.completion_tokens, t.decode_ms)
                yield chunk
        finally:
            self.estimator.finish(ticket)


class RemoteTarget:
    def __init__(self, name: str, kind: TargetKind, engine: Engine, estimator: RemoteEstimator,
                 breaker: CircuitBreaker, clock: Clock, redactor: Redactor | None = None) -> None:
        self.redactor = redactor  # personal data is replaced before a request leaves for this target
        self.name = name
        self.kind = kind
        self.engine = engine
        self.estimator = estimator
        self.breaker = breaker
        self._clock = clock

    @property
    def context_length(self) -> int:
        return self.engine.info.context_length

    def estimate(self, prompt_tokens: int, max_tokens: int) -> Estimate:
        now = self._clock()
        allowed = self.breaker.allows(now)
        reason = "" if allowed else (
            f"circuit open after {self.breaker.failures} failures; next try in "
            f"{max(self.breaker.cooldown_s - (now - (self.breaker.opened_at or now)), 0):.0f}s")
        return Estimate(self.name, self.kind, self.context_length, allowed,
                        self.estimator.predict_ms(prompt_tokens, max_tokens), reason)

    def _redacted(self, request: RoutedRequest) -> tuple[RoutedRequest, Restorer | None, int]:
        if self.redactor is None:
            return request, None, 0
        mapping = Mapping()
        redact = self.redactor.redact
        request = replace(request, prompt=redact(request.prompt, mapping),
                          messages=tuple(replace(m, content=redact(m.content, mapping)) for m in request.messages))
        # Stop strings too: the endpoint sees the placeholders the prompt has, and stops where it writes one.
        request = replace(request, sampling=replace(
            request.sampling, stop=tuple(redact(s, mapping) for s in request.sampling.stop)))
        return request, Restorer(mapping), mapping.replaced

    async def stream(self, request: RoutedRequest, prompt_tokens: int, max_tokens: int, resumed_from: str = ""
                     ) -> AsyncGenerator[GenerationChunk | Redaction, None]:
        request, restorer, redacted = self._redacted(request)
        if redacted:
            yield Redaction(redacted)
        bound = GenerationRequest(prompt=request.prompt, sampling=request.sampling, messages=request.messages)
        self.breaker.on_attempt(self._clock())
        start = time.perf_counter()
        first = 0.0
        tokens = 0
        settled = False
        try:
            async for chunk in self.engine.generate(bound):
                if isinstance(chunk, TextDelta):
                    tokens += 1
                    first = first or time.perf_counter()
                    if restorer is not None:  # placeholders back to the values; a split one waits for its end
                        chunk = TextDelta(restorer.feed(chunk.text))
                        if not chunk.text:
                            continue
                elif isinstance(chunk, Completion):
                    end = time.perf_counter()
                    first = first or end
                    self.estimator.observe((first - start) * 1000, tokens, (end - first) * 1000, prompt_tokens)
                    self.breaker.on_success()
                    settled = True
                    if restorer is not None and (tail := restorer.flush()):
                        yield TextDelta(tail)
                yield chunk
        except TargetFailed:
            self.estimator.observe_failure()
            self.breaker.on_failure(self._clock())
            settled = True
            raise
        finally:
            if not settled:
                self.breaker.on_abandon()
