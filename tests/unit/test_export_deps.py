"""A missing heavy dependency is named together with the extra that brings it."""

from __future__ import annotations

from pathlib import Path

import pytest

from laas.exporters.deps import require
from laas.exporters.errors import ExportError, MissingExtra
from laas.exporters.source import describe_source


def test_missing_module_names_the_export_extra() -> None:
    with pytest.raises(MissingExtra, match=r"'laas_no_such_module'.*optional extra 'export'.*laas\[export\]"):
        require("laas_no_such_module.sub")


def test_present_module_is_returned() -> None:
    assert require("json").dumps([1]) == "[1]"


def test_sources_are_recognised_by_what_they_are(tmp_path: Path) -> None:
    root = tmp_path
    (root / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    source = describe_source(root / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (source.kind, source.name) == ("gguf", "smollm2-135m-instruct")
    (root / "My_Model").mkdir()
    (root / "My_Model" / "config.json").write_text("{}")
    assert describe_source(root / "My_Model").kind == "hf"
    assert describe_source("HuggingFaceTB/SmolLM2-135M").name == "smollm2-135m"
    (root / "weights.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match=r"must be a \.gguf file"):
        describe_source(root / "weights.bin")
