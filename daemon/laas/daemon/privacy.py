"""Which requests must stay on the device, and the operator's limits on a request's size.

Layer: domain (pure). A request is local-only when the client asks for it (routing policy
LOCAL_ONLY), or the operator says so: for every request (`local_only`), for a model
(`local_only_models`), for a token (created with --local-only), or by not granting a token the
`offload` scope. A model rule sees the model the request resolves to: an alias of a local-only model
is local-only too (and so is an alias that is listed itself). Local-only requests run with the
LOCAL_ONLY policy, so the router never considers a remote target, and the route in the response
carries `local_only`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from laas.core.errors import InvalidArgument
from laas.core.types import SamplingParams
from laas.daemon.tokens import Principal

if TYPE_CHECKING:
    from laas.daemon.settings import Settings


@dataclass(frozen=True, slots=True)
class PrivacyRules:
    local_only: bool = False
    local_only_models: frozenset[str] = frozenset()
    max_tokens_limit: int = 1 << 30
    aliases: tuple[tuple[str, str], ...] = ()  # alias -> local model name, as in Settings.aliases

    def resolved(self, model: str) -> str:
        """The local model a requested name stands for (the name itself unless it is an alias)."""
        return dict(self.aliases).get(model, model)

    def local_only_reason(self, model: str, principal: Principal, client_asked: bool) -> str:
        """Why this request must stay on the device ("" when it may leave); `model` is the requested name
        (the default model's when none was given)."""
        resolved = self.resolved(model)
        if client_asked:
            return "the client asked for local-only"
        if self.local_only:
            return "the operator keeps every request on this device"
        if model in self.local_only_models or resolved in self.local_only_models:
            return f"the operator keeps model {resolved} on this device"
        if principal.local_only:
            return f"token {principal.name} is local-only"
        if "offload" not in principal.scopes:
            return f"{principal.name} lacks the offload scope"
        return ""

    def check(self, sampling: SamplingParams) -> None:
        if sampling.max_tokens is not None and sampling.max_tokens > self.max_tokens_limit:
            raise InvalidArgument(f"sampling.max_tokens must be <= {self.max_tokens_limit} (max_tokens_limit); "
                                  f"got {sampling.max_tokens}", field="sampling.max_tokens")


def privacy_rules(settings: Settings) -> PrivacyRules:
    return PrivacyRules(settings.local_only, frozenset(settings.local_only_models), settings.max_tokens_limit,
                        settings.aliases)
