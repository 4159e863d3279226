"""packaging/laasd.toml documents every setting: uncommented, it must load, name them all and no other, show
the defaults, and say which settings a reload applies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from laas.daemon.settings import ModelConfig, RemoteConfig, Settings, fields_marked, load_settings

SAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "laasd.toml"
TABLES = {"models", "remotes", "aliases"}
# Shown with an example rather than the default (which depends on the machine, or is "none").
EXAMPLES = {"threads", "tls_cert", "tls_key", "tls_client_ca", "tokens_file", "local_only_models",
            "redact_patterns"}


def _uncommented(tmp_path: Path) -> Path:
    lines = []
    for line in SAMPLE.read_text().splitlines():
        match = re.match(r"# (\[\[?\w+\]\]?|\w+ = .*)$", line)
        if match:
            lines.append(match.group(1))
    out = tmp_path / "laasd.toml"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_the_commented_sample_is_all_defaults(tmp_path: Path) -> None:
    settings = load_settings(SAMPLE, environ={"LAAS_HOME": str(tmp_path)})
    assert settings == Settings(home=tmp_path)


def test_every_setting_is_documented_and_the_sample_loads(tmp_path: Path) -> None:
    settings = load_settings(_uncommented(tmp_path), environ={})
    documented = set(re.findall(r"^# (\w+) = ", SAMPLE.read_text(), flags=re.M))
    assert set(Settings.model_fields) - TABLES <= documented
    assert set(ModelConfig.model_fields) <= documented
    assert set(RemoteConfig.model_fields) <= documented
    assert settings.listen == "127.0.0.1:7734"
    assert [m.name for m in settings.models] == ["gemma3-270m"]
    assert [r.name for r in settings.remotes] == ["openai"]
    assert settings.aliases == (("assistant", "smollm2-135m-instruct"),)


def test_the_sample_names_no_unknown_setting(tmp_path: Path) -> None:
    data = tomllib.loads(_uncommented(tmp_path).read_text())
    assert set(data) - TABLES <= set(Settings.model_fields)
    assert all(set(table) <= set(ModelConfig.model_fields) for table in data["models"])
    assert all(set(table) <= set(RemoteConfig.model_fields) for table in data["remotes"])


def test_the_sample_shows_the_defaults(tmp_path: Path) -> None:
    shown = load_settings(_uncommented(tmp_path), environ={"LAAS_HOME": str(tmp_path)})
    defaults = Settings(home=tmp_path)
    differ = {name for name in set(Settings.model_fields) - TABLES if getattr(shown, name) != getattr(defaults, name)}
    assert differ <= EXAMPLES


def test_the_sample_says_which_settings_a_reload_applies() -> None:
    header = SAMPLE.read_text().split("\n\n")[0]
    named = set(re.findall(r"`(\w+)`|\[\[(\w+)\]\]", header))
    assert {a or b for a, b in named} >= set(fields_marked("apply"))
