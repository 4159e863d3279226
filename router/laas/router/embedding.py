"""Where an Embed call may run: only on targets that serve the very model asked for.

Layer: router (pure: no I/O, no clock). An embedding is only useful beside embeddings of the same model,
so latency never buys a different model: the candidates are the device (when the model is its own),
and remote targets the operator declared as serving that model (`[[remotes]].embedding_models`: the
requested name -> the endpoint's own name for it; a LAN peer is declared the same way, and the peer
checks the name itself). Every other target is judged not eligible, with the reason, so ExplainRoute
can say why. Order: the device first (cost, privacy), then the eligible remote targets, fastest first;
LOCAL_ONLY and CLOUD_ONLY filter as for generation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from laas.core.errors import InvalidArgument, NotFound, Unavailable
from laas.core.types import EmbeddingRequest, EmbeddingResult
from laas.router.policy import Decision, Estimate, Judged, Policy, TargetKind


class Embedder(Protocol):
    """A remote endpoint's embeddings API (cloud: OpenAI /v1/embeddings; peer: laas.v1 Embed)."""

    async def embed(self, model: str, request: EmbeddingRequest) -> EmbeddingResult:
        """The vectors, from the endpoint's model named `model`; any failure of the endpoint is TargetFailed."""
        ...


@dataclass(frozen=True, slots=True)
class EmbedCandidate:
    estimate: Estimate
    # The target's own name for the requested model, when it serves that model; None: it does not.
    serves: str | None
    declared: tuple[str, ...] = ()  # the embedding models it was declared for (for the note)


def choose_embedding(model: str, candidates: Sequence[EmbedCandidate], policy: Policy) -> Decision:
    """The targets that may embed with `model`, the route first; raises when none may."""
    judged = tuple(_judge(model, c, policy) for c in candidates)
    eligible = sorted((j for j in judged if j.eligible),
                      key=lambda j: (j.estimate.kind is not TargetKind.LOCAL, j.estimate.predicted_ms))
    if not eligible:
        notes = "; ".join(f"{j.estimate.target}: {j.note}" for j in judged) or "nothing serves it"
        message = f"no target can embed with model {model!r} ({notes})"
        serving = [j for j in judged if j.why != "model"]
        if serving and all(j.why == "policy" for j in serving):
            raise InvalidArgument(message, field="routing.policy")
        if any(j.why == "unavailable" for j in judged):
            raise Unavailable(message)
        raise NotFound(message, field="model")
    first = eligible[0].estimate
    reason = ("the device serves this model" if first.kind is TargetKind.LOCAL else
              f"{first.target} serves this model" + ("" if any(c.estimate.kind is TargetKind.LOCAL
                                                               for c in candidates)
                                                     else " (the device does not)"))
    return Decision(order=tuple(j.estimate for j in eligible), reason=reason, judged=judged)


def _judge(model: str, c: EmbedCandidate, policy: Policy) -> Judged:
    e = c.estimate
    if c.serves is None:
        declared = f" (declared for: {', '.join(c.declared)})" if c.declared else " (no embedding model declared)"
        return Judged(e, False, True, f"does not serve {model!r}: embeddings of another model do not "
                      f"compare{declared}", "model")
    if policy is Policy.LOCAL_ONLY and e.kind is not TargetKind.LOCAL:
        return Judged(e, False, True, "LOCAL_ONLY keeps the request on the device", "policy")
    if policy is Policy.CLOUD_ONLY and e.kind is TargetKind.LOCAL:
        return Judged(e, False, True, "CLOUD_ONLY sends the request off the device", "policy")
    if not e.available:
        return Judged(e, False, True, e.unavailable_reason or "unavailable", "unavailable")
    note = "" if e.kind is TargetKind.LOCAL else f"serves it as {c.serves!r}"
    return Judged(e, True, True, note)


def served_name(declared: Mapping[str, str], model: str, default_model: str) -> str | None:
    """A remote target's name for `model` ("" is the default model), from its declaration."""
    return declared.get(model or default_model)
