"""load_settings: defaults < TOML file < LAAS_* environment < overrides, and every refusal names its field."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from laas.core.addresses import DEFAULT_LISTEN
from laas.core.errors import InvalidArgument
from laas.daemon.liveness import LivenessCheck
from laas.daemon.server import Server
from laas.daemon.settings import (
    DEFAULT_MODEL_NAME,
    ModelConfig,
    RemoteConfig,
    Settings,
    SettingsError,
    default_home,
    load_settings,
    reload_mark,
    reloaded,
)

HOME_ENV = {"LAAS_HOME": "/srv/laas-test-home"}


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "laasd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(*args: object, **kwargs: object) -> SettingsError:
    with pytest.raises(SettingsError) as info:
        load_settings(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


# --- default_home ------------------------------------------------------------------------------------


def test_default_home_prefers_laas_home() -> None:
    env = {"LAAS_HOME": "/a/b", "XDG_DATA_HOME": "/x"}
    assert default_home(env) == Path("/a/b")


def test_default_home_expands_user_in_laas_home() -> None:
    assert default_home({"LAAS_HOME": "~/laas"}) == Path.home() / "laas"


def test_default_home_uses_xdg_data_home() -> None:
    assert default_home({"XDG_DATA_HOME": "/data"}) == Path("/data/laas")


def test_default_home_empty_values_fall_through() -> None:
    assert default_home({"LAAS_HOME": "", "XDG_DATA_HOME": "/data"}) == Path("/data/laas")
    assert default_home({"LAAS_HOME": "", "XDG_DATA_HOME": ""}) == Path.home() / ".local/share/laas"


def test_default_home_fallback() -> None:
    assert default_home({}) == Path.home() / ".local" / "share" / "laas"


# --- defaults ----------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load_settings(environ={})
    assert isinstance(s, Settings)
    assert s.listen == DEFAULT_LISTEN == "127.0.0.1:7734"
    assert s.home == Path.home() / ".local" / "share" / "laas"
    assert s.store == s.home / "models"
    assert s.default_model == DEFAULT_MODEL_NAME
    assert s.models == ()
    assert s.threads == (os.cpu_count() or 1)
    assert s.max_queue == 8
    assert s.default_max_tokens == 256
    assert s.drain_grace_s == 10.0
    assert s.log_level == "info"


def test_home_from_environ_argument_not_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAAS_HOME", "/from/process")
    monkeypatch.setenv("LAAS_THREADS", "77")
    s = load_settings(environ={"XDG_DATA_HOME": "/xdg"})
    assert s.home == Path("/xdg/laas")
    assert s.threads != 77


def test_settings_are_frozen() -> None:
    s = load_settings(environ=HOME_ENV)
    with pytest.raises(AttributeError):
        s.threads = 3  # type: ignore[misc]


# --- the TOML file -----------------------------------------------------------------------------------


def test_file_values(tmp_path: Path) -> None:
    path = config(tmp_path, """
listen = "0.0.0.0:9000"
home = "/opt/laas"
default_model = "other"
threads = 3
max_queue = 0
default_max_tokens = 64
drain_grace_s = 2.5
log_level = "DEBUG"
default_model_source = "pkg==1"
""")
    s = load_settings(path, environ={})
    assert s.listen == "0.0.0.0:9000"
    assert s.home == Path("/opt/laas")
    assert s.store == Path("/opt/laas/models")
    assert s.default_model == "other"
    assert s.threads == 3
    assert s.max_queue == 0
    assert s.default_max_tokens == 64
    assert s.drain_grace_s == 2.5
    assert s.log_level == "DEBUG"
    assert s.default_model_source == "pkg==1"


def test_file_home_expands_user(tmp_path: Path) -> None:
    s = load_settings(config(tmp_path, 'home = "~/models-home"'), environ={})
    assert s.home == Path.home() / "models-home"


def test_file_int_as_float_accepted_when_whole(tmp_path: Path) -> None:
    assert load_settings(config(tmp_path, "threads = 4.0"), environ=HOME_ENV).threads == 4
    assert isinstance(load_settings(config(tmp_path, "threads = 4.0"), environ=HOME_ENV).threads, int)


def test_file_float_setting_accepts_int(tmp_path: Path) -> None:
    s = load_settings(config(tmp_path, "drain_grace_s = 3"), environ=HOME_ENV)
    assert s.drain_grace_s == 3.0
    assert isinstance(s.drain_grace_s, float)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(config(tmp_path, ""), environ=HOME_ENV) == load_settings(environ=HOME_ENV)


def test_unknown_key_refused_naming_it(tmp_path: Path) -> None:
    err = refused(config(tmp_path, 'listen = "x:1"\nthread = 4\n'), environ=HOME_ENV)
    assert err.field == "thread"
    assert "thread" in str(err)
    assert isinstance(err, InvalidArgument)


def test_several_unknown_keys_field_is_the_first_alphabetically(tmp_path: Path) -> None:
    err = refused(config(tmp_path, "zeta = 1\nalpha = 2\n"), environ=HOME_ENV)
    assert err.field == "alpha"
    assert "zeta" in str(err)


def test_unknown_table_refused(tmp_path: Path) -> None:
    err = refused(config(tmp_path, "[server]\nport = 1\n"), environ=HOME_ENV)
    assert err.field == "server"


@pytest.mark.parametrize(("text", "field"), [
    ('threads = "four"', "threads"),
    ("threads = 2.5", "threads"),
    ("threads = true", "threads"),
    ("max_queue = [1]", "max_queue"),
    ('drain_grace_s = "soon"', "drain_grace_s"),
    ("listen = 7734", "listen"),
    ("log_level = 1", "log_level"),
    ("default_model = false", "default_model"),
])
def test_bad_types_refused_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    err = refused(config(tmp_path, text), environ=HOME_ENV)
    assert err.field == field
    assert field in str(err)


@pytest.mark.parametrize(("table", "field"), [
    ('speculation = "draft"', "speculation_draft"),
    ('speculation = "ngram"\nspeculation_draft = "small.gguf"', "speculation"),
    ('speculation_draft = ""', "speculation_draft"),
])
def test_a_draft_model_is_named_with_draft_speculation_only(tmp_path: Path, table: str, field: str) -> None:
    err = refused(config(tmp_path, f'[[models]]\nname = "m"\npath = "m.gguf"\n{table}\n'), environ=HOME_ENV)
    assert field in str(err)


@pytest.mark.parametrize(("text", "field"), [
    ("threads = 0", "threads"),
    ("threads = -1", "threads"),
    ("max_queue = -1", "max_queue"),
    ("default_max_tokens = 0", "default_max_tokens"),
    ("drain_grace_s = -0.5", "drain_grace_s"),
    ('log_level = "verbose"', "log_level"),
])
def test_out_of_range_values_refused(tmp_path: Path, text: str, field: str) -> None:
    assert refused(config(tmp_path, text), environ=HOME_ENV).field == field


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error", "Warning"])
def test_log_levels_accepted(tmp_path: Path, level: str) -> None:
    assert load_settings(config(tmp_path, f'log_level = "{level}"'), environ=HOME_ENV).log_level == level


def test_invalid_toml(tmp_path: Path) -> None:
    err = refused(config(tmp_path, "threads = = 3"), environ=HOME_ENV)
    assert err.field == "config"
    assert "not valid TOML" in str(err)


def test_missing_config_file(tmp_path: Path) -> None:
    err = refused(tmp_path / "nope.toml", environ=HOME_ENV)
    assert err.field == "config"
    assert "cannot read config" in str(err)


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    assert refused(tmp_path, environ=HOME_ENV).field == "config"


# --- environment -------------------------------------------------------------------------------------


def test_env_overrides_file(tmp_path: Path) -> None:
    path = config(tmp_path, 'threads = 3\nlisten = "a:1"\nhome = "/file/home"\ndrain_grace_s = 1.0\n')
    env = {"LAAS_THREADS": "5", "LAAS_HOME": "/env/home", "LAAS_DRAIN_GRACE_S": "0.25"}
    s = load_settings(path, environ=env)
    assert s.threads == 5
    assert s.home == Path("/env/home")
    assert s.drain_grace_s == 0.25
    assert s.listen == "a:1"  # not in the environment: the file's value stays


def test_env_every_scalar(tmp_path: Path) -> None:
    env = {
        "LAAS_LISTEN": "[::1]:1234",
        "LAAS_HOME": "/h",
        "LAAS_DEFAULT_MODEL": "m",
        "LAAS_THREADS": "2",
        "LAAS_MAX_QUEUE": "0",
        "LAAS_DEFAULT_MAX_TOKENS": "9",
        "LAAS_DRAIN_GRACE_S": "0",
        "LAAS_LOG_LEVEL": "error",
        "LAAS_DEFAULT_MODEL_SOURCE": "x==2",
    }
    s = load_settings(environ=env)
    assert (s.listen, s.home, s.default_model, s.threads, s.max_queue, s.default_max_tokens,
            s.drain_grace_s, s.log_level, s.default_model_source) == (
        "[::1]:1234", Path("/h"), "m", 2, 0, 9, 0.0, "error", "x==2")


def test_empty_env_value_is_ignored(tmp_path: Path) -> None:
    s = load_settings(config(tmp_path, "threads = 3"), environ={**HOME_ENV, "LAAS_THREADS": ""})
    assert s.threads == 3


def test_bad_env_value_names_the_variable() -> None:
    err = refused(environ={**HOME_ENV, "LAAS_THREADS": "many"})
    assert err.field == "LAAS_THREADS"
    assert "LAAS_THREADS" in str(err)


def test_env_value_out_of_range_refused() -> None:
    assert refused(environ={**HOME_ENV, "LAAS_MAX_QUEUE": "-2"}).field == "max_queue"


def test_env_xdg_data_home_used_when_no_laas_home() -> None:
    assert load_settings(environ={"XDG_DATA_HOME": "/xdg"}).home == Path("/xdg/laas")


def test_file_home_beats_xdg_but_not_laas_home(tmp_path: Path) -> None:
    path = config(tmp_path, 'home = "/file"')
    assert load_settings(path, environ={"XDG_DATA_HOME": "/xdg"}).home == Path("/file")
    assert load_settings(path, environ={"LAAS_HOME": "/env"}).home == Path("/env")


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides_beat_env_and_file(tmp_path: Path) -> None:
    path = config(tmp_path, 'listen = "file:1"\nlog_level = "warning"\nhome = "/file"\n')
    env = {"LAAS_LISTEN": "env:2", "LAAS_LOG_LEVEL": "error", "LAAS_HOME": "/env"}
    s = load_settings(path, environ=env, overrides={"listen": "flag:3", "log_level": "debug",
                                                    "home": Path("/flag")})
    assert (s.listen, s.log_level, s.home) == ("flag:3", "debug", Path("/flag"))


def test_none_overrides_do_not_override(tmp_path: Path) -> None:
    s = load_settings(config(tmp_path, 'listen = "file:1"'), environ={**HOME_ENV, "LAAS_LOG_LEVEL": "error"},
                      overrides={"listen": None, "log_level": None, "home": None})
    assert s.listen == "file:1"
    assert s.log_level == "error"
    assert s.home == Path(HOME_ENV["LAAS_HOME"])


def test_overrides_are_coerced_and_checked() -> None:
    assert load_settings(environ=HOME_ENV, overrides={"threads": "6"}).threads == 6
    assert load_settings(environ=HOME_ENV, overrides={"home": "~/x"}).home == Path.home() / "x"
    assert refused(environ=HOME_ENV, overrides={"threads": "x"}).field == "threads"
    assert refused(environ=HOME_ENV, overrides={"log_level": "loud"}).field == "log_level"


# --- [[models]] --------------------------------------------------------------------------------------


def test_models_tables(tmp_path: Path) -> None:
    path = config(tmp_path, """
[[models]]
name = "small"
path = "small.gguf"

[[models]]
name = "big"
path = "sub/big.gguf"
format = "gguf"
context_length = 8192
threads = 4
max_queue = 2
sha256 = "ab12"
""")
    s = load_settings(path, environ=HOME_ENV)
    assert s.models == (
        ModelConfig(name="small", path="small.gguf"),
        ModelConfig(name="big", path="sub/big.gguf", format="gguf", context_length=8192, threads=4,
                    max_queue=2, sha256="ab12"),
    )
    assert s.models[0].context_length == 4096
    assert s.models[0].threads is None
    assert s.models[0].max_queue is None
    assert s.models[0].sha256 is None


def test_models_survive_env_and_overrides(tmp_path: Path) -> None:
    path = config(tmp_path, '[[models]]\nname = "a"\npath = "a.gguf"\n')
    s = load_settings(path, environ={**HOME_ENV, "LAAS_THREADS": "2"}, overrides={"listen": "x:1"})
    assert [m.name for m in s.models] == ["a"]


def test_duplicate_model_names(tmp_path: Path) -> None:
    path = config(tmp_path, '[[models]]\nname = "a"\npath = "a.gguf"\n[[models]]\nname = "a"\npath = "b.gguf"\n')
    err = refused(path, environ=HOME_ENV)
    assert err.field == "models"
    assert "unique" in str(err)


@pytest.mark.parametrize(("body", "field"), [
    ('path = "a.gguf"', "models[0].name"),
    ('name = "a"', "models[0].path"),
    ('name = ""\npath = "a.gguf"', "models[0].name"),
    ('name = "a"\npath = "a.gguf"\nformat = "safetensors"', "models[0].format"),
    ('name = "a"\npath = "a.gguf"\ncontext_length = 15', "models[0].context_length"),
    ('name = "a"\npath = "a.gguf"\ncontext_length = "big"', "models[0].context_length"),
    ('name = "a"\npath = "a.gguf"\nthreads = 1.5', "models[0].threads"),
    ('name = "a"\npath = "a.gguf"\nsha256 = 5', "models[0].sha256"),
    ('name = 5\npath = "a.gguf"', "models[0].name"),
    ('name = "a"\npath = "a.gguf"\nctx = 1', "models[0].ctx"),
])
def test_bad_model_tables(tmp_path: Path, body: str, field: str) -> None:
    err = refused(config(tmp_path, f"[[models]]\n{body}\n"), environ=HOME_ENV)
    assert err.field == field


def test_bad_second_model_is_indexed(tmp_path: Path) -> None:
    path = config(tmp_path, '[[models]]\nname = "a"\npath = "a.gguf"\n[[models]]\nname = "b"\n')
    assert refused(path, environ=HOME_ENV).field == "models[1].path"


def test_unknown_model_keys_field_is_the_first_alphabetically(tmp_path: Path) -> None:
    path = config(tmp_path, '[[models]]\nname = "a"\npath = "a.gguf"\nzz = 1\naa = 2\n')
    err = refused(path, environ=HOME_ENV)
    assert err.field == "models[0].aa"
    assert "zz" in str(err)


def test_model_entry_not_a_table(tmp_path: Path) -> None:
    err = refused(config(tmp_path, 'models = ["a.gguf"]'), environ=HOME_ENV)
    assert err.field == "models[0]"
    assert "table" in str(err)


def test_model_min_context_length_accepted(tmp_path: Path) -> None:
    path = config(tmp_path, '[[models]]\nname = "a"\npath = "a.gguf"\ncontext_length = 16\n')
    assert load_settings(path, environ=HOME_ENV).models[0].context_length == 16


# --- regressions -------------------------------------------------------------------------------------


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "laasd.toml"
    path.write_bytes(b"listen = '\xff'\n")
    assert refused(path, environ={}).field == "config"


def test_models_must_be_an_array_of_tables(tmp_path: Path) -> None:
    assert refused(config(tmp_path, "models = 5\n"), environ={}).field == "models"
    error = refused(config(tmp_path, '[models]\nname = "a"\npath = "a.gguf"\n'), environ={})
    assert error.field == "models" and "[[models]]" in str(error)


@pytest.mark.parametrize(("key", "value"), [("threads", 0), ("max_queue", -3), ("context_length", 8)])
def test_per_model_limits(tmp_path: Path, key: str, value: int) -> None:
    text = f'[[models]]\nname = "a"\npath = "a.gguf"\n{key} = {value}\n'
    assert refused(config(tmp_path, text), environ={}).field == f"models[0].{key}"


@pytest.mark.parametrize("text", ["home = [1, 2]\n", "home = 5\n", "drain_grace_s = true\n",
                                  "drain_grace_s = nan\n", "drain_grace_s = inf\n"])
def test_values_of_the_wrong_type(tmp_path: Path, text: str) -> None:
    assert refused(config(tmp_path, text), environ={}).field == text.split(" ")[0]


def test_unknown_override(tmp_path: Path) -> None:
    assert refused(None, environ={}, overrides={"bogus": 1}).field == "bogus"


# --- systemd and operations settings -----------------------------------------------------------------


def test_systemd_directories_give_the_defaults_and_explicit_settings_win() -> None:
    env = {"STATE_DIRECTORY": "/var/lib/laas:/var/lib/other", "RUNTIME_DIRECTORY": "/run/laas"}
    settings = load_settings(environ=env)
    assert settings.home == Path("/var/lib/laas")
    assert settings.listen_addresses == (DEFAULT_LISTEN, "unix:/run/laas/laasd.sock")
    explicit = load_settings(environ=env | {"LAAS_HOME": "/srv/h", "LAAS_LISTEN": "unix:/tmp/x.sock"})
    assert explicit.home == Path("/srv/h")
    assert explicit.listen_addresses == ("unix:/tmp/x.sock",)


@pytest.mark.parametrize(("name", "value"), [
    ("listen", " , "), ("listen", "unix:"), ("log_format", "xml"), ("socket_mode", "660x"),
    ("socket_mode", "0999"), ("watchdog_stall_s", "0"),
])
def test_operations_settings_refused_with_their_field(name: str, value: str) -> None:
    error = refused(environ=HOME_ENV | {f"LAAS_{name.upper()}": value})
    assert error.field == name


def test_onnx_models_name_a_package_folder(tmp_path: Path) -> None:
    path = config(tmp_path, '[[models]]\nname = "small"\npath = "small-int4"\nformat = "onnx"\nthreads = 2\n')
    (model,) = load_settings(path, environ=HOME_ENV).models
    assert (model.format, model.path, model.threads) == ("onnx", "small-int4", 2)


# --- descriptions and reload marks -------------------------------------------------------------------


@pytest.mark.parametrize("model", [Settings, ModelConfig, RemoteConfig])
def test_every_field_is_described(model: type[Settings | ModelConfig | RemoteConfig]) -> None:
    assert [name for name, info in model.model_fields.items() if not (info.description or "").strip()] == []


# A changed, valid value of every setting (against BASE below): a new setting needs one, and a reload mark.
CHANGED: dict[str, object] = {
    "listen": "127.0.0.1:1", "http_listen": ("127.0.0.1:2",), "home": Path("/elsewhere"), "default_model": "m",
    "models": (ModelConfig(name="m", path="m.gguf"),), "remotes": (RemoteConfig(name="r", url="h:1", kind="peer"),),
    "aliases": (("a", "m"),), "threads": 97, "max_queue": 3, "parallel": 2, "flash_attn": "on", "speculation": "off",
    "speculation_draft_min": 2,
    "keep_alive_s": -1.0, "memory_budget_mb": 64, "engine_isolation": "in_process", "runner_max_crashes": 5,
    "runner_restart_backoff_s": 0.5, "preload": "all", "default_max_tokens": 9, "drain_grace_s": 1.5,
    "log_level": "debug", "log_format": "json", "socket_mode": "0600", "watchdog_stall_s": 5.0,
    "metrics_listen": "127.0.0.1:9100", "default_model_source": "pkg==2", "tls_cert": "c2", "tls_key": "k2",
    "tls_client_ca": "ca", "tokens_file": "/t", "dangerously_listen_without_tls_or_tokens": True, "audit_log": "",
    "audit_prompts": True, "local_only": True, "local_only_models": ("m",), "redact_cloud": False,
    "redact_peers": True, "redact_patterns": ("x+",), "max_tokens_limit": 16, "max_streams_per_token": 1,
    "discovery": "off", "discovery_name": "kitchen", "discovery_interfaces": ("127.0.0.1",),
    "discovery_ip_version": "all", "discovery_allow_unauthenticated": True, "discovery_peers": ("same-token",),
    "discovery_load_interval_s": 5.0, "discovery_ttl_s": 60, "hedge": True, "hedge_after": 2.0, "hedge_share": 0.5,
    "route_together_ms": 0.0,
}
BASE = Settings(home=Path("/srv/laas-test-home"), preload="none", tls_cert="c", tls_key="k")


def test_every_setting_has_a_reload_mark_and_a_changed_value_in_this_test() -> None:
    assert set(CHANGED) == set(Settings.model_fields)
    assert {reload_mark(name) for name in Settings.model_fields} == {"apply", "restart"}


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_a_reload_applies_or_warns_about_every_setting(name: str) -> None:
    new = Settings.model_validate(dict(BASE) | {name: CHANGED[name]})
    assert getattr(new, name) != getattr(BASE, name)
    in_force, warned = reloaded(BASE, new)
    applied = getattr(in_force, name) == getattr(new, name)
    assert applied is (reload_mark(name) == "apply") and applied is (name not in warned)
    assert warned in ((), (name,))
    others = {n for n in Settings.model_fields if n != name}
    assert all(getattr(in_force, n) == getattr(BASE, n) for n in others)


def test_a_reload_that_breaks_a_check_is_refused() -> None:
    current = Settings(home=Path("/h"), remotes=(RemoteConfig(name="m", url="h:1", kind="peer"),))
    clash = Settings(home=Path("/h"), models=(ModelConfig(name="m", path="m.gguf"),))  # a remote is named m
    with pytest.raises(SettingsError) as info:
        reloaded(current, clash)
    assert info.value.field == "remotes"


async def test_sighup_puts_the_applied_settings_in_force_and_warns_for_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    current = Settings(home=tmp_path, preload="none")
    new = Settings.model_validate(dict(current) | {"drain_grace_s": 1.5, "default_max_tokens": 9,
                                                   "watchdog_stall_s": 5.0, "default_model_source": "pkg==2"})
    server = Server(current, reload_settings=lambda: new)
    server._liveness = LivenessCheck(server.registry, current.watchdog_stall_s)  # startup's, with a watchdog
    with caplog.at_level(logging.WARNING):
        await server._reload()
    assert server._liveness.stall_s == 5.0
    assert server.settings.drain_grace_s == 1.5  # read at shutdown from server.settings
    assert server.settings.default_max_tokens == server.router.default_max_tokens == 9  # new requests' default
    assert server.settings.default_model_source == current.default_model_source
    assert "reload: default_model_source changed; a restart applies that" in caplog.text
