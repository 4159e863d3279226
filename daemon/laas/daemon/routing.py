"""The router's wiring: the targets the settings name (the device's models, remote endpoints, aliases),
and the local estimates seeded by calibration.

Layer: daemon (composition root's side: settings in, a router library object out). API keys are
read here, once, from their variable or file; a configured key that is missing stops the daemon at
start-up with a SettingsError naming the field.
"""

from __future__ import annotations

import functools
import logging
import time

from laas.client.channels import Tls
from laas.core.errors import InvalidArgument, LaasError
from laas.core.types import Completion, SamplingParams
from laas.daemon.local_target import LocalModels, LocalTarget
from laas.daemon.model_entry import ModelState
from laas.daemon.registry import ModelRegistry
from laas.daemon.settings import RemoteConfig, Settings, SettingsError
from laas.router.cloud import CloudConfig, CloudEngine, read_api_key
from laas.router.dispatch import Router
from laas.router.hedge import HedgeConfig
from laas.router.latency import CircuitBreaker, Rates, RemoteEstimator, calibrate_rates, decode_floor_tps
from laas.router.load import InFlight
from laas.router.peer import PeerEngine
from laas.router.policy import TargetKind
from laas.router.redact import Redactor
from laas.router.remote import RemoteTarget
from laas.router.targets import Admitted, RoutedRequest

log = logging.getLogger(__name__)

CALIBRATION_PROMPT = "Calibration: the quick brown fox jumps over the lazy dog. " * 4
CALIBRATION_TOKENS = 8
CALIBRATION_ATTEMPTS = 2  # one more run at most: under lasting contention each run takes 20-30 s


def remote_endpoint(remote: RemoteConfig, index: int) -> PeerEngine | CloudEngine:
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


def build_router(settings: Settings, registry: ModelRegistry, device: LocalModels) -> Router:
    """The router over the device's models and the remote targets the settings name."""
    endpoints = [remote_endpoint(r, i) for i, r in enumerate(settings.remotes)]
    remotes = [
        RemoteTarget(
            r.name, TargetKind.PEER if r.kind == "peer" else TargetKind.CLOUD, endpoints[i],
            RemoteEstimator(ttft_ms=r.ttft_ms, inter_token_ms=r.inter_token_ms, in_flight=InFlight(device.host)),
            CircuitBreaker(threshold=r.failure_threshold, cooldown_s=r.cooldown_s),
            clock=time.monotonic,
            redactor=Redactor(settings.redact_patterns) if (settings.redact_peers if r.kind == "peer"
                                                           else settings.redact_cloud) else None,
            capabilities=frozenset(r.capabilities) if r.capabilities is not None else None,
            embedder=endpoints[i] if r.embedding_models else None,
        )
        for i, r in enumerate(settings.remotes)
    ]
    aliases = dict(settings.aliases)
    for alias, local in aliases.items():
        registry.get(local, field=f"aliases.{alias}")  # NotFound at start-up, not on the first request
    return Router(device, remotes, aliases, {r.name: r.models for r in settings.remotes},
                  settings.default_max_tokens, clock=time.monotonic,
                  embedding_models={r.name: dict(r.embedding_models) for r in settings.remotes},
                  local_digest=functools.partial(local_digest, registry),
                  hedging=HedgeConfig(after=settings.hedge_after, share=settings.hedge_share) if settings.hedge
                  else None, gather_s=settings.route_together_ms / 1000)


def local_digest(registry: ModelRegistry, name: str) -> str | None:
    """The device's digest of its model `name` (model_digest.py), what a discovered peer's must equal."""
    try:
        return registry.digest(registry.get(name))
    except LaasError:
        return None


async def calibrate(device: LocalModels) -> None:
    """Seeds each ready local model's prefill and decode rates with short greedy generations: one, unless it
    decodes far slower than the model's size predicts (another process on the cores), then up to
    CALIBRATION_ATTEMPTS; the fastest run counts, and a seed is never below that floor."""
    for target in device.targets().values():
        if target.entry.state is not ModelState.READY:
            continue
        floor = decode_floor_tps(target.entry.size_bytes)
        try:
            rates, runs = await calibrate_rates(functools.partial(_measure, target), floor, CALIBRATION_ATTEMPTS)
        except LaasError as e:
            log.warning("calibration of %s failed: %s", target.name, e)
            continue
        if rates.decode_tps is not None and rates.decode_tps < floor:
            log.warning("calibration of %s decoded at %.1f tok/s in %d runs, far below the %.0f tok/s its size "
                        "predicts: is another process using the cores (`threads` defaults to all of them)? "
                        "The router assumes %.0f tok/s until a request measures it", target.name,
                        rates.decode_tps, runs, floor, floor)
        target.estimator.seed(rates, floor)
        est = target.estimator
        log.info("calibrated %s in %d run(s): prefill %.0f tok/s, decode %.1f tok/s", target.name, runs,
                 est.prefill_tps or 0, est.decode_tps or 0)


async def _measure(target: LocalTarget, attempt: int) -> Rates:
    """One calibration run's rates (a new first word each run: the prompt cache must not serve it)."""
    prompt = f"{attempt}. {CALIBRATION_PROMPT}"
    request = RoutedRequest(SamplingParams(max_tokens=CALIBRATION_TOKENS, temperature=0.0, ignore_eos=True),
                            prompt=prompt)
    rates = Rates(None, None)
    async for chunk in target.stream(Admitted(request, len(prompt) // 5, CALIBRATION_TOKENS)):
        if isinstance(chunk, Completion):
            u, t = chunk.usage, chunk.timings
            prefilled = u.prompt_tokens - u.cached_prompt_tokens
            rates = Rates(prefilled * 1000 / t.prompt_ms if prefilled >= 8 and t.prompt_ms > 0 else None,
                          (u.completion_tokens - 1) * 1000 / t.decode_ms
                          if u.completion_tokens >= 2 and t.decode_ms > 0 else None)
    log.debug("calibration run %d of %s: prefill %.1f tok/s, decode %.1f tok/s (0: not measured)", attempt,
              target.name, rates.prefill_tps or 0, rates.decode_tps or 0)
    return rates
