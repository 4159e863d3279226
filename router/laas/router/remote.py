"""A remote target: a cloud endpoint or a LAN peer, with its latency estimate, circuit and redaction.

Layer: router. An `Endpoint` (cloud.CloudEngine, peer.PeerEngine) only streams a request as asked: it
renders with its own template and counts with its own tokenizer, so it neither renders nor tokenizes
here. The target around it learns from every request: each finished one updates its latency estimate
(with the load laasd had in flight there when it was sent: `reserve`, load.py),
each failure its error rate and circuit; personal data is replaced before a request leaves, when a
redactor is set, and restored in the answer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Protocol

from laas.core.errors import TargetFailed
from laas.core.types import Completion, EmbeddingRequest, EmbeddingResult, GenerationChunk, GenerationRequest, TextDelta
from laas.router.embedding import Embedder
from laas.router.latency import CircuitBreaker, RemoteEstimator
from laas.router.load import Hold
from laas.router.policy import CAPABILITIES, CLOUD_CAPABILITIES, Estimate, TargetKind
from laas.router.redact import Mapping, Redaction, Redactor, Restorer
from laas.router.targets import Admitted, RoutedRequest, Streamed

Clock = Callable[[], float]


class Endpoint(Protocol):
    """Another server that runs requests: a request goes as a prompt or as chat messages (it renders them)."""

    @property
    def context_length(self) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """TextDelta items, then one Completion; any failure of the endpoint is TargetFailed."""
        ...

    async def check_health(self) -> None: ...

    async def aclose(self) -> None: ...


class RemoteTarget:
    def __init__(self, name: str, kind: TargetKind, engine: Endpoint, estimator: RemoteEstimator,
                 breaker: CircuitBreaker, clock: Clock, redactor: Redactor | None = None,
                 capabilities: frozenset[str] | None = None, embedder: Embedder | None = None) -> None:
        self.embedder = embedder  # its embeddings API; None: it serves no embeddings
        self.redactor = redactor  # personal data is replaced before a request leaves for this target
        # What it can do (policy.CAPABILITIES); by default a peer all, a cloud endpoint OpenAI's.
        self.capabilities = capabilities if capabilities is not None else (
            frozenset(CAPABILITIES) if kind is TargetKind.PEER else CLOUD_CAPABILITIES)
        self.name = name
        self.kind = kind
        self.engine = engine  # the endpoint
        self.estimator = estimator
        self.breaker = breaker
        self._clock = clock

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def _circuit(self) -> tuple[bool, str]:
        now = self._clock()
        allowed = self.breaker.allows(now)
        return allowed, "" if allowed else (
            f"circuit open after {self.breaker.failures} failures; next try in "
            f"{max(self.breaker.cooldown_s - (now - (self.breaker.opened_at or now)), 0):.0f}s")

    def embed_estimate(self) -> Estimate:
        """Whether it can take an Embed call now (its circuit); embedding latency is not predicted yet."""
        allowed, reason = self._circuit()
        return Estimate(self.name, self.kind, self.context_length, allowed, 0.0, reason)

    async def embed(self, model: str, request: EmbeddingRequest) -> EmbeddingResult:
        """The vectors from the endpoint's model `model` (never redacted: a cut text has another vector,
        so an Embed call that may not leave the device must say LOCAL_ONLY)."""
        if self.embedder is None:  # the router never routes Embed here (embedding.choose_embedding)
            raise TargetFailed(f"{self.name}: serves no embeddings")
        self.breaker.on_attempt(self._clock())
        try:
            result = await self.embedder.embed(model, request)
        except TargetFailed:
            self.breaker.on_failure(self._clock())
            raise
        except BaseException:
            self.breaker.on_abandon()
            raise
        self.breaker.on_success()
        return result

    def estimate(self, admitted: Admitted, hold: Hold | None = None) -> Estimate:
        allowed, reason = self._circuit()
        max_tokens, now, e = admitted.max_tokens(self.context_length, self.kind), self._clock(), self.estimator
        if hold is None:
            predicted = e.predict_ms(admitted.prompt_tokens, max_tokens, now)
            first = e.first_token_ms(admitted.prompt_tokens, now)
        else:
            predicted = e.predict_held(hold, admitted.prompt_tokens, max_tokens, now)
            first = e.predict_held(hold, admitted.prompt_tokens, max_tokens, now, first_token=True)
        missing = tuple(sorted(admitted.request.needs() - self.capabilities))
        return Estimate(self.name, self.kind, self.context_length, allowed, predicted, reason, missing, first)

    def reserve(self, admitted: Admitted) -> Hold:
        return self.estimator.hold(admitted.prompt_tokens, admitted.max_tokens(self.context_length, self.kind),
                                   self._clock())

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

    async def stream(self, admitted: Admitted, hold: Hold | None = None) -> AsyncGenerator[Streamed, None]:
        own = hold is None
        hold = self.reserve(admitted) if hold is None else hold
        try:
            async for item in self._stream(admitted, hold):
                if own and isinstance(item, Completion):
                    hold.release()  # a caller may stop reading at the completion
                yield item
        finally:
            if own:
                hold.release()

    async def _stream(self, admitted: Admitted, hold: Hold) -> AsyncGenerator[Streamed, None]:
        request, restorer, redacted = self._redacted(admitted.request)
        if redacted:
            yield Redaction(redacted)
        bound = GenerationRequest(prompt=request.prompt, sampling=request.sampling, messages=request.messages,
                                  tools=request.tools, tool_choice=request.tool_choice)
        self.breaker.on_attempt(self._clock())
        start = time.perf_counter()
        first = 0.0
        tokens = 0
        settled = False
        try:
            async for chunk in self.engine.generate(bound):
                if isinstance(chunk, TextDelta):
                    tokens += 1
                    if not first:
                        first = time.perf_counter()
                        hold.start(self._clock())
                    if restorer is not None:  # placeholders back to the values; a split one waits for its end
                        chunk = replace(chunk, text=restorer.feed(chunk.text))
                        if not chunk.text:
                            continue
                elif isinstance(chunk, Completion):
                    end = time.perf_counter()
                    first = first or end
                    self.estimator.observe((first - start) * 1000, tokens, (end - first) * 1000,
                                           admitted.prompt_tokens, hold.ahead_ms, hold.others,
                                           hold.elsewhere_during())
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

    async def aclose(self) -> None:
        await self.engine.aclose()
