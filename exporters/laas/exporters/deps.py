"""Imports of the optional `export` extra, failing with an error that says how to install it."""

from __future__ import annotations

import importlib
from types import ModuleType

from laas.exporters.errors import MissingExtra

EXTRA = "export"


def require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(
            f"this step needs {module.split('.')[0]!r} ({e}), which is in laas' optional extra {EXTRA!r}: "
            f"pip install 'laas[{EXTRA}]' (from a checkout: pip install -e '.[{EXTRA}]')") from e
