"""Builds the router from settings (remote engines, aliases) and seeds local estimates by calibration.

Layer: composition. API keys are read here, once, from their variable or file; a configured key that
is missing stops the daemon at start-up with a SettingsError naming the field.
"""

from __future__ import annotations

import logging
import time

from laas.client.channels import Tls
from laas.daemon.engine import Engine, SamplingParams
from laas.daemon.errors import InvalidArgument, LaasError
from laas.daemon.registry import ModelRegistry, ModelState
from laas.daemon.settings import RemoteConfig, Settings, SettingsError
from laas.router.cloud import CloudConfig, CloudEngine, read_api_key
from laas.router.dispatch import Router
from laas.router.latency import CircuitBreaker, RemoteEstimator
from laas.router.peer import PeerEngine
from laas.router.policy import TargetKind
from laas.router.redact import Redactor
from laas.router.targets import RemoteTarget, RoutedRequest

log = logging.getLogger(__name__)

CALIBRATION_PROMPT = "Calibration: the quick brown fox jumps over the lazy dog. " * 4
CALIBRATION_TOKENS = 8


def remote_engine(remote: RemoteConfig, index: int) -> Engine:
    try:
        key = read_api_key(remote.api_key_env, remote.api_key_file)
    except InvalidArgument as e:
        raise SettingsError(str(e), field=f"remotes[{index}].{e.field}") from e
    if remote.kind == "peer":  # a peer's API key is a laas token (its `generate` scope is enough)
        return PeerEngine(remote.name, remote.url, remote.model, remote.context_length,
                          tls=Tls(ca=remote.tls_ca) if remote.tls_ca else None, token=key)
    return CloudEngine(CloudConfig(
        name=remote.name, base_url=remote.url, model=remote.model, context_length=remote.context_length,
        api_key=key, connect_timeout_s=remote.connect_timeout_s, read_timeout_s=remote.read_timeout_s,
        call_timeout_s=remote.call_timeout_s, chat_only=remote.chat_only))


def build_router(settings: Settings, registry: ModelRegistry) -> Router:
    remotes = [
        RemoteTarget(
            r.name, TargetKind.PEER if r.kind == "peer" else TargetKind.CLOUD, remote_engine(r, i),
            RemoteEstimator(ttft_ms=r.ttft_ms, inter_token_ms=r.inter_token_ms),
            CircuitBreaker(threshold=r.failure_threshold, cooldown_s=r.cooldown_s),
            clock=time.monotonic,
            redactor=Redactor(settings.redact_patterns) if (settings.redact_peers if r.kind == "peer"
                                                           else settings.redact_cloud) else None,
        )
        for i, r in enumerate(settings.remotes)
    ]
    aliases = dict(settings.aliases)
    for alias, local in aliases.items():
        registry.get(local, field=f"aliases.{alias}")  # NotFound at start-up, not on the first request
    return Router(registry, remotes, aliases, {r.name: r.models for r in settings.remotes},
                  settings.default_max_tokens, clock=time.monotonic)


async def calibrate(router: Router) -> None:
    """Seeds each ready local model's prefill and decode rates with one short greedy generation."""
    for target in router.local.values():
        if target.entry.state is not ModelState.READY:
            continue
        request = RoutedRequest(SamplingParams(max_tokens=CALIBRATION_TOKENS, temperature=0.0, ignore_eos=True),
                                prompt=CALIBRATION_PROMPT)
        try:
            async for _ in target.stream(request, len(CALIBRATION_PROMPT) // 5, CALIBRATION_TOKENS):
                pass
        except LaasError as e:
            log.warning("calibration of %s failed: %s", target.name, e)
            continue
        est = target.estimator
        log.info("calibrated %s: prefill %.0f tok/s, decode %.1f tok/s", target.name,
                 est.prefill_tps or 0, est.decode_tps or 0)
