"""Tokens (hashed, scoped, revocable), the security settings, the secure-default listen check, the
local-only rules and the sandbox of chat templates."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from laas.core.errors import InvalidArgument
from laas.core.types import SamplingParams
from laas.daemon import tokens
from laas.daemon.app.runtime import clamp_keep_alive
from laas.daemon.audit import bounded
from laas.daemon.privacy import PrivacyRules
from laas.daemon.security import credential_defaults, is_loopback, listen_refusal, metrics_refusal, tokens_path
from laas.daemon.settings import Settings, SettingsError, load_settings
from laas.daemon.tokens import ANONYMOUS, Principal, TokenStore


def test_tokens_are_stored_hashed_and_checked(tmp_path: Path) -> None:
    file = tmp_path / "tokens"
    token, entry = tokens.create(file, "alice", frozenset({"generate", "offload"}))
    text = file.read_text()
    assert token not in text and hashlib.sha256(token.encode()).hexdigest() in text
    assert file.stat().st_mode & 0o777 == 0o600
    store = TokenStore(file)
    principal = store.authenticate(token)
    assert principal == Principal(entry.id, "alice", frozenset({"generate", "offload"}))
    for wrong in (token + "x", token[:-1], "laas_" + entry.id + "_", "", "laas__", token.upper()):
        assert store.authenticate(wrong) is None
    other, _ = tokens.create(file, "bob", frozenset(), local_only=True)
    bob = store.authenticate(other)  # the store rereads the changed file
    assert bob is not None and bob.local_only and not bob.scopes
    assert [e.name for e in tokens.revoke(file, "alice")] == ["alice"]
    assert store.authenticate(token) is None and store.authenticate(other) is not None


@pytest.mark.parametrize("line", ["abc alice generate", "abc alice root " + "0" * 64, "abc alice generate 1234",
                                  "abc alice generate " + "0" * 64 + " admin"])
def test_malformed_token_files_are_refused(tmp_path: Path, line: str) -> None:
    (tmp_path / "tokens").write_text(line + "\n")
    with pytest.raises(tokens.TokenFileError, match="tokens:1"):
        TokenStore(tmp_path / "tokens")


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:7734", True), ("127.8.9.1:1", True), ("[::1]:7734", True), ("localhost:7734", True),
    ("0.0.0.0:7734", False), ("[::]:7734", False), (":7734", False), ("192.168.1.2:7734", False),
    ("laas.example:7734", False),
])
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_listen_refusal_is_the_secure_default(tmp_path: Path) -> None:
    open_tcp = Settings(home=tmp_path, listen="0.0.0.0:7734,unix:/run/laas/laasd.sock")
    assert "TLS" in (listen_refusal(open_tcp, tokens=False) or "")
    tls = Settings(home=tmp_path, listen="0.0.0.0:7734", tls_cert="c", tls_key="k")
    assert "tokens" in (listen_refusal(tls, tokens=False) or "") and listen_refusal(tls, tokens=True) is None
    assert listen_refusal(Settings(home=tmp_path, listen="127.0.0.1:1,unix:/x.sock"), tokens=False) is None
    override = Settings(home=tmp_path, listen="0.0.0.0:7734", dangerously_listen_without_tls_or_tokens=True)
    assert listen_refusal(override, tokens=False) is None


def test_systemd_credentials_fill_unset_paths(tmp_path: Path) -> None:
    for name in ("laas.tls-cert", "laas.tls-key", "laas.tokens"):
        (tmp_path / name).write_text("x")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "LAAS_HOME": str(tmp_path)}
    s = load_settings(environ=env)
    assert (s.tls_cert, s.tls_key, s.tokens_file, s.tls_client_ca) == (
        str(tmp_path / "laas.tls-cert"), str(tmp_path / "laas.tls-key"), str(tmp_path / "laas.tokens"), "")
    assert credential_defaults(env, {"tls_cert": "/etc/mine.pem"}).get("tls_cert") is None
    assert tokens_path(Settings(home=tmp_path / "none")) is None


@pytest.mark.parametrize(("config", "field"), [
    ('tls_cert = "/c"', "tls_key"), ('tls_client_ca = "/ca"', "tls_client_ca"),
    ('redact_patterns = ["("]', "redact_patterns[0]"), ("max_streams_per_token = 0", "max_streams_per_token"),
    ("max_tokens_limit = 0", "max_tokens_limit"),
])
def test_bad_security_settings_name_the_field(tmp_path: Path, config: str, field: str) -> None:
    (tmp_path / "c.toml").write_text(config + "\n")
    with pytest.raises(SettingsError) as info:
        load_settings(tmp_path / "c.toml", environ={"LAAS_HOME": str(tmp_path)})
    assert info.value.field == field


def test_local_only_rules() -> None:
    rules = PrivacyRules(local_only_models=frozenset({"secret"}))
    offload = Principal("1", "a", frozenset({"generate", "offload"}))
    assert rules.local_only_reason("m", offload, client_asked=False) == ""
    assert rules.local_only_reason("m", ANONYMOUS, client_asked=False) == ""
    assert "client" in rules.local_only_reason("m", offload, client_asked=True)
    assert "model secret" in rules.local_only_reason("secret", offload, client_asked=False)
    assert "offload" in rules.local_only_reason("m", Principal("2", "b", frozenset({"generate"})), False)
    assert "local-only" in rules.local_only_reason("m", Principal("3", "c", local_only=True), False)
    assert "every request" in PrivacyRules(local_only=True).local_only_reason("m", offload, False)
    PrivacyRules(max_tokens_limit=8).check(SamplingParams(max_tokens=8))
    with pytest.raises(InvalidArgument) as info:
        PrivacyRules(max_tokens_limit=8).check(SamplingParams(max_tokens=9))
    assert info.value.field == "sampling.max_tokens"


def test_a_token_file_others_can_write_is_refused_and_one_they_can_read_warned(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Red-team item 18: the token file's permissions are checked whenever it is (re)read."""
    file = tmp_path / "tokens"
    token, _ = tokens.create(file, "alice", frozenset({"generate"}))
    file.chmod(0o644)
    with caplog.at_level("WARNING", logger="laas.daemon.tokens"):
        store = TokenStore(file)
    assert "readable by group or others (mode 644)" in caplog.text and store.authenticate(token) is not None
    file.chmod(0o664)
    with pytest.raises(tokens.TokenFileError, match="writable by group or others"):
        store.authenticate(token)  # fails closed: the access interceptor answers UNAVAILABLE
    with pytest.raises(tokens.TokenFileError, match="writable"):
        TokenStore(file)  # and the daemon does not start with it


def test_an_optional_token_file_turns_checks_on_when_it_appears(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens", optional=True)
    assert not store.in_force()
    token, _ = tokens.create(tmp_path / "tokens", "first", frozenset({"generate"}))
    assert store.in_force() and store.authenticate(token) is not None
    (tmp_path / "tokens").unlink()
    assert store.in_force()  # once seen, required: a vanished file fails closed
    with pytest.raises(tokens.TokenFileError):
        store.authenticate(token)


@pytest.mark.parametrize(("asked", "default", "admin", "granted"), [
    (None, 300.0, False, None), (0.0, 300.0, False, 300.0), (1e300, 300.0, False, 3600.0),
    (-1.0, 300.0, False, 3600.0), (1000.0, 300.0, False, 1000.0), (0.0, 7200.0, False, 7200.0),
    (9000.0, 7200.0, False, 7200.0), (0.0, -1.0, False, None), (0.0, 300.0, True, 0.0), (-1.0, 300.0, True, -1.0),
])
def test_keep_alive_is_clamped_without_models_admin(asked: float | None, default: float, admin: bool,
                                                    granted: float | None) -> None:
    assert clamp_keep_alive(asked, default, admin) == granted


def test_audit_fields_are_bounded() -> None:
    assert bounded("x" * 300) == "x" * 256 + "...[44 more chars]"
    assert bounded("short") == "short" and bounded(3) == 3
    assert bounded(["a"] * 1030)[-1] == "...[6 more items]" and len(bounded(["a"] * 1030)) == 1025


def test_metrics_listen_follows_the_listen_rule(tmp_path: Path) -> None:
    assert metrics_refusal(Settings(home=tmp_path, metrics_listen="127.0.0.1:9100"), tokens=False) is None
    assert metrics_refusal(Settings(home=tmp_path, metrics_listen=":9100"), tokens=False) is None  # binds loopback
    assert "TLS" in (metrics_refusal(Settings(home=tmp_path, metrics_listen="0.0.0.0:9100"), tokens=True) or "")
    tls = Settings(home=tmp_path, metrics_listen="[::]:9100", tls_cert="c", tls_key="k")
    assert "tokens" in (metrics_refusal(tls, tokens=False) or "") and metrics_refusal(tls, tokens=True) is None
    override = Settings(home=tmp_path, metrics_listen="0.0.0.0:9100", dangerously_listen_without_tls_or_tokens=True)
    assert metrics_refusal(override, tokens=False) is None
