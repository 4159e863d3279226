"""The daemon's one typed settings object: defaults < TOML file < LAAS_* environment < command line.

Layer: composition. Loaded once by the composition root (cli.py/app.py) and passed down; nothing
else reads the environment or the config file. The models, their checks and their reload marks are
in settings_models.py; this module reads the sources, merges them in order, and turns a failed check
into a SettingsError naming the field (a value of the wrong type is named as it was written: the TOML
key, the LAAS_* variable or the flag; a value out of bounds by its setting).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_origin

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from laas.core.addresses import DEFAULT_LISTEN, DEFAULT_PORT
from laas.daemon.security import credential_defaults
from laas.daemon.settings_models import (
    DEFAULT_MODEL_NAME,
    ENV_PREFIX,
    FLASH_ATTN,
    MODEL_FORMATS,
    ModelConfig,
    Reload,
    RemoteConfig,
    Settings,
    SettingsError,
    default_home,
    default_listen,
    fields_marked,
    reload_mark,
)

__all__ = ["DEFAULT_LISTEN", "DEFAULT_MODEL_NAME", "DEFAULT_PORT", "ENV_PREFIX", "FLASH_ATTN", "MODEL_FORMATS",
           "ModelConfig", "Reload", "RemoteConfig", "Settings", "SettingsError", "default_home", "default_listen",
           "fields_marked", "load_settings", "reload_mark", "reloaded", "settings_error"]

_TABLES = ("models", "remotes", "aliases")  # from the file only: no environment variable or flag sets them
# A value that has the right type but is refused: named by its setting, wherever it was written.
_VALUE_ERRORS = {"setting", "greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error",
                 "string_too_short", "string_too_long", "string_pattern_mismatch"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
# (value, the name it was written under) per setting
Values = dict[str, tuple[Any, str]]


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Builds Settings from a TOML file, LAAS_* variables and explicit overrides (flags), in that order."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {"home": default_home(environ), "listen": default_listen(environ)}
    written: dict[str, str] = {}
    file = _file_values(config_file) if config_file is not None else {}
    for layer in (file, _environ_values(environ), _override_values(overrides or {})):
        for name, (value, as_written) in layer.items():
            values[name], written[name] = value, as_written
    values.update(credential_defaults(environ, values))
    try:
        return Settings.model_validate(values)
    except ValidationError as e:
        raise settings_error(e, written) from None


def _file_values(path: Path) -> Values:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError(f"cannot read config {path}: {e.strerror}", field="config") from e
    except UnicodeDecodeError as e:
        raise SettingsError(f"config {path} is not UTF-8 text", field="config") from e
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config {path} is not valid TOML: {e}", field="config") from e
    return {key: (value, key) for key, value in data.items()}


def _environ_values(environ: Mapping[str, str]) -> Values:
    found: Values = {}
    for name, info in Settings.model_fields.items():
        env_name = ENV_PREFIX + name.upper()
        raw = environ.get(env_name)
        if name in _TABLES or not raw:
            continue
        value: Any = [x.strip() for x in raw.split(",") if x.strip()] if get_origin(info.annotation) is tuple else raw
        found[name] = (value, env_name)
    return found


def _override_values(overrides: Mapping[str, Any]) -> Values:
    return {name: (value, name) for name, value in overrides.items() if value is not None}


def settings_error(error: ValidationError, written: Mapping[str, str] | None = None) -> SettingsError:
    """The first refusal in `error`, naming its field; `written` maps a setting to the name it was written
    under (a wrong type names that)."""
    errors = error.errors(include_url=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        parent = unknown[0]["loc"][:-1]
        keys = sorted(str(e["loc"][-1]) for e in unknown if e["loc"][:-1] == parent)
        where = _where(parent)
        message = f"{where}: unknown key(s) {keys}" if where else f"unknown setting(s) {keys}"
        return SettingsError(message, field=_join(where, keys[0]))
    return _refused(errors[0], written or {})


def _refused(e: ErrorDetails, written: Mapping[str, str]) -> SettingsError:
    loc, kind, ctx = e["loc"], e["type"], e.get("ctx") or {}
    field = _join(_where(loc), str(ctx.get("field", "")))
    if kind == "setting":  # a sentence that names its setting, or what follows the field's name
        message = str(ctx["message"])
        whole = message.split(" ")[0].rstrip(":") in Settings.model_fields
        return SettingsError(message if whole else f"{field} {message}", field=field)
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()))
        return SettingsError(f"{field} must be {_BOUNDS[kind]} {limit}", field=field)
    if kind == "missing" or (kind == "string_too_short" and len(loc) > 1):
        return SettingsError(f"{field} is required", field=field)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return SettingsError(f"{field} must be a table", field=field)
    if kind not in _VALUE_ERRORS and len(loc) == 1 and str(loc[0]) in written:
        field = written[str(loc[0])]
    return SettingsError(f"{field}: {e['input']!r} is not valid: {e['msg']}", field=field)


def _where(loc: tuple[int | str, ...]) -> str:
    """pydantic's location as the operator writes it: models[0].path."""
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else part
    return where


def _join(where: str, field: str) -> str:
    return f"{where}.{field}" if where and field else where or field


def reloaded(current: Settings, new: Settings) -> tuple[Settings, tuple[str, ...]]:
    """What SIGHUP puts in force: `new`'s values of the fields marked "apply", `current`'s of the others;
    and the fields marked "restart" whose value changed (a restart applies those). SettingsError when the
    combination fails a check (the current settings then stay)."""
    applied = {name: getattr(new, name) for name in fields_marked("apply")}
    try:
        in_force = Settings.model_validate(dict(current) | applied)
    except ValidationError as e:
        raise settings_error(e) from None
    return in_force, tuple(n for n in fields_marked("restart") if getattr(new, n) != getattr(current, n))
