"""packaging/laasd.toml documents every setting: uncommented, it must load, and it must name them all."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from laas.daemon.settings import ModelConfig, RemoteConfig, Settings, load_settings

SAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "laasd.toml"


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
    assert {f.name for f in dataclasses.fields(Settings)} - {"models", "remotes", "aliases"} <= documented
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= documented
    assert {f.name for f in dataclasses.fields(RemoteConfig)} <= documented
    assert settings.listen == "127.0.0.1:7734"
    assert [m.name for m in settings.models] == ["gemma3-270m"]
    assert [r.name for r in settings.remotes] == ["openai"]
    assert settings.aliases == (("assistant", "smollm2-135m-instruct"),)
