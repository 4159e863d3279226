"""What the router routes (a request, admitted once) and the one protocol every target implements.

Layer: router (a library over core). A client's request becomes a RoutedRequest (a raw prompt, or chat
messages). The router admits it once, before the policy sees it: the device's model renders the chat
with its template and counts the tokens (when it is loaded; else the count is estimated from the text);
the result, an `Admitted` request, carries the count, the rendered engine request and the requested
max_tokens, and travels to whichever target runs it. Each target resolves its own max_tokens from it
with `Admitted.max_tokens` (policy.granted), so the default is resolved in one way for all.

An admission is *exact* (rendered and counted by the model that will run it: the policy judged its
fit with those numbers) or *provisional* (no rendering yet: the model was not loaded, or the request is
a failover's continuation); the device completes a provisional one once, in its turn, and checks the
fit then (policy.admit). A remote target sends the request as asked (it renders with its own template).

The device's targets (`DeviceTarget`, `Device`) are implemented by the daemon over its model
registry; the remote ones (remote.py) by the router itself over a cloud endpoint or a LAN peer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from laas.core.errors import LaasError
from laas.core.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    Tool,
    ToolChoice,
)
from laas.router.load import Hold
from laas.router.policy import Estimate, TargetKind, granted
from laas.router.redact import Redaction

Streamed = GenerationChunk | Redaction


@dataclass(frozen=True, slots=True)
class RoutedRequest:
    """A request before it is bound to a target: a raw prompt, or chat messages."""

    sampling: SamplingParams
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    keep_alive_s: float | None = None  # how long a local model stays loaded after this request
    tools: tuple[Tool, ...] = ()  # functions the model may call (chat), and how
    tool_choice: ToolChoice = field(default_factory=ToolChoice)

    def continued(self, delivered: str, max_tokens: int) -> RoutedRequest:
        """The same request, resumed after `delivered` was already streamed to the client (a constraint
        goes on from where that text left it, so the whole answer still fits it)."""
        sampling = replace(self.sampling, max_tokens=max_tokens)
        if sampling.constraint is not None:
            sampling = replace(sampling, constraint=replace(sampling.constraint,
                                                            prefix=sampling.constraint.prefix + delivered))
        if self.messages:
            return replace(self, sampling=sampling,
                           messages=(*self.messages, ChatMessage("assistant", delivered)))
        return replace(self, sampling=sampling, prompt=self.prompt + delivered)

    def text_tokens(self) -> int:
        """A count estimated from the text (about 4 bytes a token), for a model not loaded to count it."""
        text = self.prompt or "".join(m.content for m in self.messages)
        text += "".join(t.description + t.parameters for t in self.tools)
        return len(text.encode()) // 4 + 1

    def needs(self) -> frozenset[str]:
        """The capabilities a target must have to run it (see policy.CAPABILITIES)."""
        out: set[str] = set()
        if self.sampling.constraint is not None:
            out.add(self.sampling.constraint.kind.value)
        if self.tools:
            out.add("tools")
        if self.sampling.logprobs:
            out.add("logprobs")
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request admitted once: its prompt counted (and rendered by `counted_by`, when `bound` is set),
    the max_tokens it asked for and the default that stands in when it asked for none."""

    request: RoutedRequest
    prompt_tokens: int
    default_max_tokens: int
    # The engine request rendered with the chat template and tokenized by the model `counted_by`;
    # None: provisional (the device renders it in its turn).
    bound: GenerationRequest | None = None
    counted_by: str = ""
    resumed_from: str = ""  # the text already streamed to the client, when this continues a broken stream

    def bound_for(self, model: str) -> GenerationRequest | None:
        """The rendered request, when `model` rendered it (another model's template or tokens do not serve)."""
        return self.bound if self.counted_by == model else None

    def max_tokens(self, context_length: int, kind: TargetKind) -> int:
        """The tokens a target is asked for: as requested; unset, the default (on the device, shortened
        to the room its context leaves)."""
        room = context_length - self.prompt_tokens if kind is TargetKind.LOCAL else None
        return granted(self.request.sampling.max_tokens, self.default_max_tokens, room)

    @property
    def budget(self) -> int:
        """The most tokens the client may receive in all (failover continuations included)."""
        return granted(self.request.sampling.max_tokens, self.default_max_tokens)

    def continued(self, delivered: str, completion_tokens: int) -> Admitted:
        """A provisional admission of the rest, after `delivered` (`completion_tokens` of them) was streamed."""
        request = self.request.continued(delivered, self.budget - completion_tokens)
        return Admitted(request, self.prompt_tokens, self.default_max_tokens, resumed_from=delivered)


class Target(Protocol):
    """Somewhere a request can run: the device's model, a LAN peer, a cloud endpoint."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> TargetKind: ...

    def estimate(self, admitted: Admitted, hold: Hold | None = None) -> Estimate:
        """Its context window, whether it can take a request now, and how long it would take (no I/O).
        With `hold` (the request's reservation here): how long the reserved request takes beside what is
        reserved now, the requests decided after it included (cohort.py)."""
        ...

    def reserve(self, admitted: Admitted) -> Hold:
        """Counts the request's load on the target from now (no I/O): the next estimate sees it. The
        router reserves as it decides, and releases the hold when the stream ends, however it ends."""
        ...

    def stream(self, admitted: Admitted, hold: Hold | None = None) -> AsyncIterator[Streamed]:
        """Runs the request under `hold` (or a hold of its own, released at its end): TextDelta items,
        then one Completion. Raises TargetFailed (or an error of the request, e.g. OutOfRange) so that
        the router fails over; learns from how it went."""
        ...


class DeviceTarget(Target, Protocol):
    """A model on this device: it also renders and counts requests, for every target of its name."""

    async def render(self, request: RoutedRequest) -> GenerationRequest | None:
        """The request rendered with the model's template and tokenized, when the model is loaded now
        (planning does not load it); None when it is not."""
        ...

    def check_servable(self) -> None:
        """Raises the model's own error (fetching, failed) when it cannot serve."""
        ...

    def embed_estimate(self) -> Estimate:
        """Whether the model can take an Embed call now (no I/O)."""
        ...

    async def embed(self, request: EmbeddingRequest, keep_alive_s: float | None) -> EmbeddingResult:
        """The vectors, computed in the model's queue (the one generation waits in)."""
        ...


class Device(Protocol):
    """The device's models as the router sees them (the daemon implements it over its model registry)."""

    @property
    def default_model(self) -> str: ...

    def targets(self) -> Mapping[str, DeviceTarget]:
        """A target per local model, by name (following reloads)."""
        ...

    def not_served(self, model: str) -> LaasError:
        """The error for a model nothing serves (NotFound naming the known models)."""
        ...
