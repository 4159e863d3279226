"""`laasd` without laas' `daemon` extra: one line naming the extra and what is missing, no traceback."""

from __future__ import annotations

import importlib.metadata

import pytest

from laas.daemon import launcher

pytestmark = pytest.mark.fast


def test_the_installed_daemon_extra_is_complete() -> None:
    assert launcher.missing() == []
    assert launcher.missing("no-such-distribution") == []  # laas run from a source tree: nothing to check


def test_a_missing_distribution_of_the_extra_stops_laasd_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    requires = ["grpcio<2,>=1.85.1", 'llama-cpp-python==0.3.36; extra == "daemon"',
                "no-such-distribution>=1; extra == 'daemon'", "not-installed-either; extra == 'dev'",
                "also-absent[x]>=2; python_version >= '3' and extra == 'daemon'"]
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires if name == "laas" else None)
    assert launcher.missing() == ["no-such-distribution", "also-absent"]
    assert launcher.main() == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert out.err == ("laasd: the daemon needs laas' `daemon` extra, not installed here (missing: "
                       "no-such-distribution, also-absent): pip install 'laas[daemon]'\n")
