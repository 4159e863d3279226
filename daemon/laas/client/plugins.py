"""Commands that other slices plug into `laas`, through the entry point group `laas.cli`.

Layer: client. The client imports no slice above it: a distribution that adds commands to `laas` (the
exporters' `laas export` and `laas eval`) names a module in `[project.entry-points."laas.cli"]`, and the
CLI finds it with importlib.metadata. The module has:

    COMMANDS: tuple[str, ...]          the sub-commands it adds
    add_parsers(sub) -> None           adds them to `laas`'s sub-parsers (cheap: import heavy code in run)
    run(args) -> int                   runs one of them; the exit code

A command of laas' own extras (OPTIONAL) that no plugin provides still shows in `laas --help`, saying
what to install, and running it says so (exit 2) instead of argparse's "invalid choice".
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol, TypeAlias, cast

GROUP = "laas.cli"
# The commands laas' optional extras bring, and the extras that bring them.
OPTIONAL = {"export": "daemon,export", "eval": "daemon,export"}

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Plugin(Protocol):
    @property
    def COMMANDS(self) -> Sequence[str]: ...

    def add_parsers(self, sub: Subparsers) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


@dataclass(frozen=True, slots=True)
class Plugins:
    """The plugins found: the loaded ones by command, and the entry points that failed to load."""

    by_command: dict[str, Plugin]
    broken: tuple[str, ...] = ()

    def missing(self, command: str) -> str:
        """Why `command` (one of OPTIONAL) cannot run, and what to install."""
        why = f"; a plugin failed to load: {'; '.join(self.broken)}" if self.broken else ""
        extras = OPTIONAL[command]
        return f"`laas {command}` is not installed: pip install 'laas[{extras}]' (from a checkout: " \
               f"pip install -e '.[{extras}]'){why}"


def load() -> list[Plugin | str]:
    """Each entry point of GROUP, loaded; a string ("name = value: error") for one that fails to load.

    A broken plugin must not take `laas generate` down with it, so its error is kept, not raised.
    """
    found: list[Plugin | str] = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            found.append(cast(Plugin, ep.load()))
        except Exception as e:
            found.append(f"{ep.name} = {ep.value}: {type(e).__name__}: {e}")
    return found


def mount(sub: Subparsers, found: Sequence[Plugin | str]) -> Plugins:
    """Adds the plugins' commands to `sub`, and a stand-in for each optional command none provides."""
    by_command: dict[str, Plugin] = {}
    for plugin in found:
        if isinstance(plugin, str):
            continue
        plugin.add_parsers(sub)
        by_command.update(dict.fromkeys(plugin.COMMANDS, plugin))
    for command, extras in OPTIONAL.items():
        if command not in by_command:
            # No option prefix: whatever follows (`--help` too) is taken, and main says what to install.
            stand_in = sub.add_parser(command, help=f"not installed: pip install 'laas[{extras}]'", add_help=False,
                                      prefix_chars="\0")
            stand_in.add_argument("rest", nargs="*")
    return Plugins(by_command, tuple(p for p in found if isinstance(p, str)))
