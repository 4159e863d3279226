"""`laas` finds the commands other slices add through the entry point group `laas.cli`, says what to
install when they are not there, and keeps working when a plugin is broken."""

from __future__ import annotations

import importlib.util
from importlib.metadata import EntryPoint

import pytest

from laas.client import cli, plugins
from laas.exporters import cli as exporters_cli

pytestmark = pytest.mark.fast


def _with_entry_points(monkeypatch: pytest.MonkeyPatch, *points: EntryPoint) -> None:
    monkeypatch.setattr(plugins, "entry_points", lambda group: [p for p in points if p.group == group])


def _help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines


def test_the_installed_entry_point_mounts_export_and_eval(capsys: pytest.CaptureFixture[str]) -> None:
    plugin: plugins.Plugin = exporters_cli  # mypy checks the module against the protocol
    assert set(plugin.COMMANDS) == set(plugins.OPTIONAL)
    found = plugins.load()
    assert exporters_cli in found  # pyproject's [project.entry-points."laas.cli"], as installed
    text = _help(capsys)
    assert "export a GGUF file" in text and "evaluate a served model" in text
    assert "not installed" not in text  # this environment has the daemon and export extras
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert "--block-size" in capsys.readouterr().out  # the exporters' own parser, not a stand-in


def test_without_the_plugin_the_commands_say_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    _with_entry_points(monkeypatch)
    assert "not installed: pip install 'laas[daemon,export]'" in _help(capsys)
    for argv in (["export", "model.gguf", "--name", "x"], ["eval", "--help"], ["--target", "h:1", "eval"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"`laas {argv[-1] if argv[0] == '--target' else argv[0]}` is not installed" in err
        assert "pip install 'laas[daemon,export]'" in err and "pip install -e '.[daemon,export]'" in err


def test_a_broken_plugin_is_reported_and_the_rest_still_works(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    _with_entry_points(monkeypatch,
                       EntryPoint("broken", "laas.no_such_module", plugins.GROUP),
                       EntryPoint("exporters", "laas.exporters.cli", plugins.GROUP),
                       EntryPoint("elsewhere", "laas.no_such_module", "another.group"))
    text = _help(capsys)
    assert "failed to load (laas.cli):" in text and "broken = laas.no_such_module: ModuleNotFoundError" in text
    assert "elsewhere" not in text and "export a GGUF file" in text
    # A command of the client itself parses as before: this one fails on the unreachable target, not on
    # the plugin.
    assert cli.main(["--target", "127.0.0.1:1", "--timeout", "2", "tokenize", "hi"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_a_command_whose_packages_are_missing_names_them(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "llama_cpp") else real(name, *a))
    assert "(not installed: torch; pip install 'laas[daemon,export]')" in _help(capsys)
    assert cli.main(["eval", "some-model"]) == 1
    assert capsys.readouterr().err.startswith("laas eval: needs llama_cpp, not installed: pip install")
