"""What the runtime's use cases take and give back, in domain types: no protobuf, no HTTP JSON.

Layer: application. An edge builds the requests from its wire format with the values exactly as the
client sent them (only the fields it set); the use cases (runtime.py) validate them, so every edge
gets the same checks and the same errors. The results are frozen snapshots the edge converts back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from laas.core.types import (
    ChatMessage,
    Constraint,
    EmbeddingInput,
    EmbeddingResult,
    GenerationChunk,
    ModelInfo,
    Tool,
    ToolChoice,
)
from laas.daemon.registry import ModelState
from laas.router.policy import Policy, TargetKind


@dataclass(frozen=True, slots=True)
class SamplingFields:
    """Sampling as the client set it: None for a field it left out (validation.sampling_from checks)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_logprobs: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def given(self) -> dict[str, int | float]:
        """The numeric fields the client set."""
        out: dict[str, int | float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("stop", "ignore_eos", "logprobs") and value is not None:
                out[f.name] = value
        return out


@dataclass(frozen=True, slots=True)
class Routing:
    policy: Policy = Policy.AUTO
    latency_budget_ms: float | None = None
    # How long the client waits (its deadline, from the edge), the budget when none is given.
    deadline_ms: float | None = None


@dataclass(frozen=True, slots=True)
class TextRequest:
    """A Generate (`prompt`) or Chat (`messages`, not None) request; `tools` and `tool_choice` are Chat's."""

    model: str = ""
    prompt: str = ""
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingFields = SamplingFields()
    keep_alive_s: float | None = None
    routing: Routing = Routing()
    constraint: Constraint | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """An Embed request as the client sent it (None: a field it left out)."""

    model: str = ""
    inputs: tuple[EmbeddingInput, ...] = ()
    dimensions: int | None = None
    normalize: bool | None = None  # None: True
    truncate: bool = False
    keep_alive_s: float | None = None
    routing: Routing = Routing()


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """Where the chunks that follow come from, and why."""

    target: str
    kind: TargetKind
    reason: str = ""
    predicted_ms: float = 0.0
    failover: bool = False
    local_only: bool = False
    redacted: int = 0  # items of personal data replaced before the request left the device


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One item of a generation's stream; the last one's chunk is the Completion (its timings carry the
    time to first token, from the call's arrival)."""

    chunk: GenerationChunk
    model: str = ""  # on the first chunk: the model the request resolved to
    route: RouteInfo | None = None  # on the first chunk of every route taken


@dataclass(frozen=True, slots=True)
class EmbedReply:
    """An Embed call's vectors, the model that made them and where they were computed."""

    model: str
    result: EmbeddingResult
    route: RouteInfo

    @property
    def dimensions(self) -> int:
        return len(self.result.embeddings[0].vector) if self.result.embeddings else 0


@dataclass(frozen=True, slots=True)
class Candidate:
    route: RouteInfo
    eligible: bool
    meets_deadline: bool
    note: str


@dataclass(frozen=True, slots=True)
class Explanation:
    """The route a request would take, without running it."""

    chosen: RouteInfo
    order: tuple[str, ...]
    candidates: tuple[Candidate, ...]
    prompt_tokens: int
    max_tokens: int
    budget_ms: float


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A model as it is now: what is known of its file, and its residency."""

    name: str
    state: ModelState
    is_default: bool
    active_requests: int
    queued_requests: int
    error: str
    memory_bytes: int
    keep_alive_s: float
    last_used_unix_s: float
    unloads_in_s: float | None = None  # set when a loaded, idle model has a keep-alive timer running
    info: ModelInfo | None = None
    parallel: int = 1  # requests it decodes at once, the value in force
