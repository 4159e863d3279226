"""Draft-model speculation in the GGUF engine, with real models: the default Q4_1 model drafts for a Q8_0 copy
of the same weights (written here by llama.cpp's own quantizer). Output is token for token what plain
decoding of the Q8_0 model gives (greedy, seeded sampling with logprobs, constrained), alone and in a
batch; drafts are really decoded and mostly kept; a draft without the model's vocabulary is refused; and
through the daemon, a [[models]] table's speculation_draft serves over HTTP and shows in the metrics.

(Q8_0, not F16: llama.cpp's F16 kernels sum a row's products in another order in a batch of several
tokens than for one, so a verification step's logits can differ from a one-token step's in the last bits,
and at a near tie greedy decoding then takes the other token. Q8_0 and Q4_1 rows are summed alike either
way, so the comparison is exact.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from laas.core.errors import ModelLoadError
from laas.daemon.backends.gguf import GgufEngine
from laas.daemon.gguf_header import read_gguf_header
from tests.conftest import link_or_copy
from tests.daemon_process import DaemonProcess
from tests.gguf_convert import requantize
from tests.gguf_edit import edit_gguf
from tests.integration.test_metrics import _stats
from tests.integration.test_speculation import (
    TASKS,
    _request,
    _run,
    constrained_like_plain,
    in_company,
    say_what_plain_says,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def target_file(model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model's weights as Q8_0: a larger model the default one can draft for."""
    return requantize(model_file, "q8_0", tmp_path_factory.mktemp("q8") / "smollm2-135m-q8_0.gguf")


@pytest.fixture(scope="module")
async def engines(target_file: Path, model_file: Path) -> AsyncIterator[tuple[GgufEngine, GgufEngine]]:
    """The Q8_0 model plain and with the Q4_1 model drafting, parallel 4 each. The drafting one drafts at
    least 4 tokens a step: on this kind of machine a Q4_1 step costs most of a Q8_0 one, and the plan (rightly)
    drafts nothing, which would leave nothing to verify."""
    header = read_gguf_header(target_file)
    plain = await GgufEngine.load(target_file, header, context_length=2048, threads=2, parallel=4)
    spec = await GgufEngine.load(target_file, header, context_length=2048, threads=2, parallel=4,
                                 speculation="draft", draft_path=model_file, draft_min=4)
    yield plain, spec
    await spec.aclose()
    await plain.aclose()


async def test_greedy_output_is_plain_decodings_and_drafts_are_kept(engines: tuple[GgufEngine, GgufEngine]) -> None:
    plain, spec = engines
    before = spec.stats()
    await say_what_plain_says(plain, spec, TASKS)
    after = spec.stats()
    drafted, kept = after.draft_tokens - before.draft_tokens, after.draft_accepted - before.draft_accepted
    decoded = after.decoded_tokens - before.decoded_tokens
    # The same weights at another precision agree on most tokens: most drafts are kept, on any text.
    assert drafted >= 4 * 40 and kept >= 0.6 * drafted, (kept, drafted)
    assert after.steps - before.steps < decoded - kept // 2  # several tokens a step


async def test_drafting_streams_in_a_batch_say_what_they_say_alone(engines: tuple[GgufEngine, GgufEngine]) -> None:
    """Four streams draft at once (the draft model decodes their rounds in one batch, each in its own KV
    stream), joining at different times: each says what it says alone, undrafted."""
    await in_company(*engines, lead_tokens=120, other_tokens=32)


async def test_seeded_sampling_logprobs_and_constraints_are_unchanged(engines: tuple[GgufEngine, GgufEngine]) -> None:
    """A draft token is kept where the model's own sample equals it (the acceptance rule for a deterministic
    draft): a seeded stream samples what it samples undrafted, with the same logprobs; a constrained one
    stays in its grammar."""
    plain, spec = engines
    request = await _request(plain, TASKS[1], temperature=0.8, seed=7, top_k=30, repeat_penalty=1.05,
                             logprobs=True, top_logprobs=2)
    want, _, want_lp = await _run(plain, request)
    got, _, got_lp = await _run(spec, request)
    assert (got, got_lp) == (want, want_lp)
    await constrained_like_plain(plain, spec, max_tokens=100)


async def test_a_draft_without_the_models_vocabulary_is_refused(target_file: Path, model_file: Path,
                                                                 tmp_path: Path) -> None:
    stranger = edit_gguf(model_file, tmp_path / "other-vocab.gguf", {"tokenizer.ggml.bos_token_id": 7})
    with pytest.raises(ModelLoadError, match=r"speculation_draft other-vocab.gguf: its vocabulary is not the "
                                             r"model's \(BOS and EOS tokens differ\)"):
        await GgufEngine.load(target_file, read_gguf_header(target_file), context_length=512, threads=2,
                              speculation="draft", draft_path=stranger)


def test_the_daemon_serves_a_model_with_its_draft(start_daemon: Callable[..., DaemonProcess], target_file: Path,
                                                  model_file: Path, make_home: Callable[..., Path]) -> None:
    """[[models]] speculation_draft names a file in the store: the daemon loads both (in the model's runner),
    answers over HTTP what the model answers undrafted (speculation off), and counts the drafts in the
    metrics. A draft that is not in the store fails that model with the field named, and the daemon serves
    the others."""
    home = make_home()
    link_or_copy(target_file, home / "models" / target_file.name)
    table = f'[[models]]\nname = "{{name}}"\npath = "{target_file.name}"\ncontext_length = 1024\nparallel = 2\n'
    config = (table.format(name="q8") + 'speculation = "off"\n' + table.format(name="q8-drafted")
              + f'speculation_draft = "{model_file.name}"\nspeculation_draft_min = 4\n'
              + table.format(name="q8-lost") + 'speculation_draft = "missing.gguf"\n')
    daemon = start_daemon(config, home=home)
    body = {"messages": [{"role": "user", "content": TASKS[0]}], "max_tokens": 64, "temperature": 0}
    with httpx.Client(base_url=daemon.http_url, timeout=120) as http:
        answers = {}
        for name in ("q8", "q8-drafted"):
            reply = http.post("/chat/completions", json={**body, "model": name})
            assert reply.status_code == 200, reply.text
            answers[name] = reply.json()["choices"][0]["message"]["content"]
        assert answers["q8-drafted"] == answers["q8"] and answers["q8"]
        stats = _stats(daemon.target)
        drafted = stats[("laas_draft_tokens_total", (("model", "q8-drafted"),))]
        kept = stats[("laas_draft_accepted_tokens_total", (("model", "q8-drafted"),))]
        assert 0 < kept <= drafted, (kept, drafted)
        assert stats[("laas_draft_tokens_total", (("model", "q8"),))] == 0
        lost = http.post("/chat/completions", json={**body, "model": "q8-lost"})
        assert lost.status_code == 409, lost.text  # FAILED: failed_precondition, until the file is there
        assert "models.q8-lost.speculation_draft" in lost.text and "missing.gguf" in lost.text
        assert http.post("/chat/completions", json={**body, "model": "q8"}).status_code == 200
