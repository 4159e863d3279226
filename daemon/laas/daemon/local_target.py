"""The device's models as router targets: the router's `DeviceTarget` and `Device` over the model registry.

Layer: daemon (the router's protocols, implemented with the registry). A local target renders and
counts a request with its model (chat through the model's template; a continuation's delivered text
is literal, never control tokens), runs it in the model's queue, and learns from every request it runs:
each finished one updates its latency estimate. A request the router admitted exactly with this model
runs as rendered; a provisional one is rendered once, before it queues when the model is loaded (a
prompt too long fails at once), else in its turn once loaded, and its fit is checked then.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import replace

from laas.core.engine import Engine
from laas.core.errors import LaasError, NotFound, Unavailable
from laas.core.types import Completion, EmbeddingRequest, EmbeddingResult, GenerationRequest, ToolChoiceMode
from laas.daemon.backends.literal_text import literal
from laas.daemon.model_entry import ModelEntry, ModelState
from laas.daemon.registry import ModelRegistry
from laas.daemon.tool_calls import ToolCallParser, forced_call
from laas.router.latency import LocalEstimator
from laas.router.load import Hold, HostLoad, InFlight
from laas.router.policy import Estimate, TargetKind, admit
from laas.router.targets import Admitted, RoutedRequest, Streamed

Clock = Callable[[], float]


class LocalTarget:
    kind = TargetKind.LOCAL

    def __init__(self, entry: ModelEntry, registry: ModelRegistry, clock: Clock, host: HostLoad | None = None
                 ) -> None:
        self.entry = entry
        self.name = entry.name
        self.estimator = LocalEstimator(parallel=entry.queue.parallel, in_flight=InFlight(host or HostLoad()))
        self._registry = registry
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

    def check_servable(self) -> None:
        self.entry.check_servable()

    def estimate(self, admitted: Admitted, hold: Hold | None = None) -> Estimate:
        entry = self.entry
        self.estimator.parallel = entry.parallel  # an automatic value is known once the model is described
        servable = entry.servable  # a model that is not loaded loads on use: it costs its load time
        reason = "" if servable else ("model is loading" if entry.fetching else f"model is {entry.state.value}")
        max_tokens = admitted.max_tokens(self.context_length, self.kind)
        now, load, e = self._clock(), self.load_ms(), self.estimator
        if hold is None:
            predicted = e.predict_ms(admitted.prompt_tokens, max_tokens, now) + load
            first = e.first_token_ms(admitted.prompt_tokens, now) + load
        else:
            predicted = e.predict_held(hold, admitted.prompt_tokens, max_tokens, now) + load
            first = e.predict_held(hold, admitted.prompt_tokens, max_tokens, now, first_token=True) + load
        return Estimate(self.name, self.kind, self.context_length, servable, predicted, reason,
                        first_token_ms=first)

    def reserve(self, admitted: Admitted) -> Hold:
        """A place in the queue estimate: this request's own service time, not the queue ahead of it."""
        return self.estimator.hold(admitted.prompt_tokens, admitted.max_tokens(self.context_length, self.kind),
                                   self._clock())

    def embed_estimate(self) -> Estimate:
        entry = self.entry
        reason = "" if entry.servable else ("model is loading" if entry.fetching else f"model is {entry.state.value}")
        return Estimate(self.name, self.kind, self.context_length, entry.servable, self.load_ms(), reason)

    async def embed(self, request: EmbeddingRequest, keep_alive_s: float | None) -> EmbeddingResult:
        async with self._registry.queued(self.entry, keep_alive_s) as engine:
            return await engine.embed(request)

    async def render(self, request: RoutedRequest) -> GenerationRequest | None:
        async with self._registry.holding(self.entry) as engine:  # not unloaded while it tokenizes
            if engine is None:
                return None
            try:
                return await self._render(engine, request)
            except Unavailable:  # unloaded meanwhile
                return None

    async def _render(self, engine: Engine, request: RoutedRequest, resumed_from: str = "") -> GenerationRequest:
        """The engine-level request: chat rendered with the model's template (and tools), prompt tokens
        counted; tool_choice required or a named function becomes the constraint that forces the call."""
        tools = request.tools if request.tool_choice.mode is not ToolChoiceMode.NONE else ()
        if request.messages and not resumed_from:
            bound = await engine.render_chat(request.messages, tools)
        elif request.messages:  # resume inside the assistant's turn, not as a new message
            bound = await engine.render_chat(request.messages[:-1], tools)
            bound = replace(bound, prompt=bound.prompt + literal(request.messages[-1].content))
        elif resumed_from and request.prompt.endswith(resumed_from):  # text already streamed: never control tokens
            bound = GenerationRequest(prompt=request.prompt[:-len(resumed_from)] + literal(resumed_from))
        else:
            bound = GenerationRequest(prompt=request.prompt)
        tokens = await engine.tokenize(bound.prompt, add_special=bound.add_special)
        sampling = request.sampling
        forced = forced_call(tools, request.tool_choice)
        if forced is not None and not resumed_from:
            sampling = replace(sampling, constraint=forced)
        return replace(bound, sampling=sampling, prompt_tokens=tuple(tokens), messages=request.messages,
                       tools=tools, tool_choice=request.tool_choice)

    async def _complete(self, admitted: Admitted, engine: Engine) -> GenerationRequest:
        """A provisional admission completed: rendered, counted and its fit checked (OutOfRange if none)."""
        bound = await self._render(engine, admitted.request, admitted.resumed_from)
        sampling = bound.sampling
        granted = admit(len(bound.prompt_tokens or ()), sampling.max_tokens, self.context_length,
                        admitted.default_max_tokens)
        return replace(bound, sampling=replace(sampling, max_tokens=granted.max_tokens))

    async def stream(self, admitted: Admitted, hold: Hold | None = None) -> AsyncGenerator[Streamed, None]:
        # Without the router's hold, take one before the first await, so that requests started at the same
        # moment see each other.
        own = hold is None
        hold = self.reserve(admitted) if hold is None else hold
        max_tokens = admitted.max_tokens(self.context_length, self.kind)
        try:
            exact = admitted.bound_for(self.name)
            if exact is not None:  # the policy judged its fit with these very tokens
                early: GenerationRequest | None = replace(
                    exact, sampling=replace(exact.sampling, max_tokens=max_tokens))
            else:
                async with self._registry.holding(self.entry) as loaded:
                    early = await self._complete(admitted, loaded) if loaded is not None else None

            async def bind(engine: Engine) -> GenerationRequest:
                return early if early is not None else await self._complete(admitted, engine)

            # The model's output, its tool calls made structured (a call is never returned as raw text).
            request = admitted.request
            parser = ToolCallParser() if request.tools and request.tool_choice.mode is not ToolChoiceMode.NONE else None
            async for chunk in self._registry.run(self.entry, bind, request.keep_alive_s):
                hold.start(self._clock() - 1e-3)  # the first chunk: it has the model (a no-op after)
                if isinstance(chunk, Completion):
                    t, u = chunk.timings, chunk.usage
                    self.estimator.observe(u.prompt_tokens - u.cached_prompt_tokens, t.prompt_ms,
                                           u.completion_tokens, t.decode_ms, batch=hold.batch_during(),
                                           elsewhere=hold.elsewhere_during(), stalled_ms=hold.stalled_ms)
                    if own:
                        hold.release()  # a caller may stop reading at the completion
                for item in parser.feed(chunk) if parser is not None else (chunk,):
                    yield item
        finally:
            if own:
                hold.release()


class LocalModels:
    """The router's `Device`: a target per model in the registry; a model that stays over a reload keeps
    its target, and with it its learned estimates."""

    def __init__(self, registry: ModelRegistry, clock: Clock) -> None:
        self._registry = registry
        self._clock = clock
        self._targets: dict[str, LocalTarget] = {}
        self.host = HostLoad()  # the requests in flight on every target: the remote ones share it (routing.py)

    @property
    def default_model(self) -> str:
        return self._registry.default.name

    def targets(self) -> dict[str, LocalTarget]:
        entries = {e.name: e for e in self._registry.entries()}
        for name in [n for n, t in self._targets.items() if entries.get(n) is not t.entry]:
            del self._targets[name]
        for name, entry in entries.items():
            if name not in self._targets:
                self._targets[name] = LocalTarget(entry, self._registry, self._clock, self.host)
        return self._targets

    def not_served(self, model: str) -> LaasError:
        try:
            self._registry.get(model)  # NotFound naming the known models
        except LaasError as e:
            return e
        return NotFound(f"model {model!r} is not served here", field="model")  # pragma: no cover - get() raised
