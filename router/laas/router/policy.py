"""Routing policy: the pure decision of where a request runs, and in which order targets take over.

Layer: domain (no I/O, no clock). Inputs are the request's size and budget and, for every target
that could serve the model, an estimate (context window, availability, predicted latency); the output
is an ordered list of targets (the first is the route, the rest its failovers) with the reason.

Rules, in order:
1. A target must fit the request (prompt + max_tokens within its context window), be available
   (loaded, circuit closed) and have what the request needs (a constraint's kind, tools, logprobs: a
   remote target declared without one is not eligible); LOCAL_ONLY keeps only the device, CLOUD_ONLY
   only remote targets.
2. With a latency budget: the device when it meets it (cost and privacy); else the fastest target
   that meets it; else the fastest target ("nothing meets the deadline").
3. Without a budget, or with PREFER_LOCAL: the device when it fits; else the fastest remote target.
Failovers follow in order of predicted latency, the device first among equals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from laas.core.errors import InvalidArgument, OutOfRange, Unavailable


class Policy(enum.Enum):
    AUTO = "auto"
    LOCAL_ONLY = "local_only"
    CLOUD_ONLY = "cloud_only"
    PREFER_LOCAL = "prefer_local"


class TargetKind(enum.Enum):
    LOCAL = "local"
    PEER = "peer"
    CLOUD = "cloud"


# What a request may need of a target (RoutedRequest.needs): a constraint's kind, tools, logprobs. The
# device and LAN peers (laas.v1) have them all; an OpenAI-compatible cloud has the first two kinds of
# constraint, tools and logprobs (regex and grammars are extensions some servers have: declare them).
CAPABILITIES = ("json_schema", "json_object", "regex", "lark", "gbnf", "tools", "logprobs")
CLOUD_CAPABILITIES = frozenset({"json_schema", "json_object", "tools", "logprobs"})
# The API field a need comes from, for the error when no target has it.
NEED_FIELDS = {"json_schema": "constraint.json_schema", "json_object": "constraint.json_object",
               "regex": "constraint.regex", "lark": "constraint.lark", "gbnf": "constraint.gbnf",
               "tools": "tools", "logprobs": "sampling.logprobs"}


@dataclass(frozen=True, slots=True)
class Admission:
    """What the device will run: the token budget granted to the request."""

    prompt_tokens: int
    max_tokens: int


def granted(requested: int | None, default: int, room: int | None = None) -> int:
    """The max_tokens a target runs a request with: as asked; unset, the default, shortened to `room`
    (the context left on the device) when it is given. Every resolution of the default is this one."""
    if requested is not None:
        return requested
    return default if room is None else max(min(default, room), 1)


def admit(prompt_tokens: int, requested_max_tokens: int | None, context_length: int,
          default_max_tokens: int) -> Admission:
    """Grants a token budget that fits the context window, or raises OutOfRange: the device's check of a
    request it counted itself (policy.choose judged the others with the same arithmetic).

    An explicit max_tokens must fit whole (prompt + max_tokens <= context); an unset one gets the
    default, shortened to the room left, so short replies to long prompts still work.
    """
    room = context_length - prompt_tokens
    if room < 1:
        raise OutOfRange(
            f"prompt is {prompt_tokens} tokens; the model's context window is {context_length} tokens",
            field="prompt",
        )
    if requested_max_tokens is not None and requested_max_tokens > room:
        raise OutOfRange(
            f"prompt ({prompt_tokens} tokens) + sampling.max_tokens ({requested_max_tokens}) exceeds the "
            f"model's context window of {context_length} tokens",
            field="sampling.max_tokens",
        )
    return Admission(prompt_tokens, granted(requested_max_tokens, default_max_tokens, room))


@dataclass(frozen=True, slots=True)
class Estimate:
    """One target's view of one request."""

    target: str
    kind: TargetKind
    context_length: int
    available: bool
    predicted_ms: float
    unavailable_reason: str = ""
    missing: tuple[str, ...] = ()  # capabilities the request needs that the target lacks (CAPABILITIES)
    first_token_ms: float = 0.0  # predicted time to its first token (0: not predicted); hedge.py reads it


@dataclass(frozen=True, slots=True)
class Query:
    prompt_tokens: int
    max_tokens: int | None  # None: the default, shortened on the device to the room left
    default_max_tokens: int
    policy: Policy = Policy.AUTO
    budget_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Judged:
    estimate: Estimate
    eligible: bool
    meets_deadline: bool
    note: str
    why: str = ""  # "policy", "unavailable" or "context" when not eligible


@dataclass(frozen=True, slots=True)
class Decision:
    order: tuple[Estimate, ...]  # the route first, then its failovers
    reason: str
    judged: tuple[Judged, ...]

    @property
    def chosen(self) -> Estimate:
        return self.order[0]


def _max_tokens(query: Query, e: Estimate) -> int:
    room = e.context_length - query.prompt_tokens if e.kind is TargetKind.LOCAL else None
    return granted(query.max_tokens, query.default_max_tokens, room)


def _judge(query: Query, e: Estimate) -> Judged:
    meets = query.budget_ms is None or e.predicted_ms <= query.budget_ms
    if query.policy is Policy.LOCAL_ONLY and e.kind is not TargetKind.LOCAL:
        return Judged(e, False, meets, "LOCAL_ONLY keeps the request on the device", "policy")
    if query.policy is Policy.CLOUD_ONLY and e.kind is TargetKind.LOCAL:
        return Judged(e, False, meets, "CLOUD_ONLY sends the request off the device", "policy")
    if e.missing:
        return Judged(e, False, meets, f"lacks {', '.join(e.missing)} (its declared capabilities)", "capability")
    if not e.available:
        return Judged(e, False, meets, e.unavailable_reason or "unavailable", "unavailable")
    needed = query.prompt_tokens + _max_tokens(query, e)
    if needed > e.context_length:
        return Judged(e, False, meets, f"needs {needed} tokens of context, has {e.context_length}", "context")
    return Judged(e, True, meets, "meets the deadline" if query.budget_ms is not None and meets else "")


def choose(query: Query, estimates: list[Estimate]) -> Decision:
    """The route and its failovers; raises OutOfRange/Unavailable when no target can take the request."""
    judged = tuple(_judge(query, e) for e in estimates)
    eligible = [j for j in judged if j.eligible]
    if not eligible:
        raise _nothing_fits(query, judged)
    by_speed = sorted(eligible, key=lambda j: (j.estimate.predicted_ms, j.estimate.kind is not TargetKind.LOCAL))
    local = next((j for j in eligible if j.estimate.kind is TargetKind.LOCAL), None)
    budget = query.budget_ms
    if local is not None and (budget is None or query.policy is Policy.PREFER_LOCAL or local.meets_deadline):
        first = local
        reason = ("the device meets the deadline" if budget is not None and local.meets_deadline
                  else "the device fits the request" if budget is None else "PREFER_LOCAL: the device fits")
    elif budget is None:
        first = by_speed[0]
        reason = f"{_why_not_local(judged, local, budget)}; {first.estimate.target} is the fastest remote target"
    else:
        meeting = [j for j in by_speed if j.meets_deadline]
        first = meeting[0] if meeting else by_speed[0]
        if meeting:
            reason = f"{_why_not_local(judged, local, budget)}; {first.estimate.target} is the fastest that meets it"
        else:
            reason = f"no target meets the {budget:.0f} ms deadline; {first.estimate.target} is the fastest"
    rest = [j for j in by_speed if j is not first]
    return Decision(order=(first.estimate, *(j.estimate for j in rest)), reason=reason, judged=judged)


def _why_not_local(judged: tuple[Judged, ...], local: Judged | None, budget: float | None) -> str:
    if local is not None:
        return f"the device would take {local.estimate.predicted_ms:.0f} ms, over the {budget:.0f} ms deadline"
    device = [j for j in judged if j.estimate.kind is TargetKind.LOCAL]
    if not device:
        return "the model is not on the device"
    return f"the device cannot take it ({device[0].note})"


def _nothing_fits(query: Query, judged: tuple[Judged, ...]) -> Exception:
    notes = "; ".join(f"{j.estimate.target}: {j.note}" for j in judged) or "no target serves this model"
    message = f"no target can take this request ({notes})"
    oversized = [j for j in judged if j.why == "context"]
    could_fit_later = [j for j in judged if j.why == "unavailable" and
                       query.prompt_tokens + _max_tokens(query, j.estimate) <= j.estimate.context_length]
    if oversized and not could_fit_later:
        prompt_too_long = query.max_tokens is None or all(
            query.prompt_tokens >= j.estimate.context_length for j in oversized)
        return OutOfRange(message, field="prompt" if prompt_too_long else "sampling.max_tokens")
    if judged and all(j.why == "policy" for j in judged):
        return InvalidArgument(message, field="routing.policy")
    lacking = [j for j in judged if j.why == "capability"]
    if lacking and all(j.why in ("policy", "capability") for j in judged):
        field = NEED_FIELDS.get(lacking[0].estimate.missing[0], "request")
        return InvalidArgument(f"{field}: {message}", field=field)
    return Unavailable(message)
