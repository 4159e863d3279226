"""`laasd`'s entry point: checks that laas' `daemon` extra is installed, then runs the daemon's CLI.

Layer: composition root. `pip install laas` is the client (the SDK and `laas`) only; the daemon's native
and serving packages (llama-cpp-python, onnxruntime, ...) come with `pip install 'laas[daemon]'`. Without
them `laasd` says so in one line (exit 1) instead of a traceback from deep inside an import. The list is
read from the installed distribution's metadata (pyproject.toml's `daemon` extra), not kept here.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

EXTRA = "daemon"
_IN_EXTRA = re.compile(rf"""extra\s*==\s*["']{EXTRA}["']""")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def missing(distribution: str = "laas") -> list[str]:
    """The distributions of the `daemon` extra that are not installed ([] when laas itself is not
    installed as a distribution, e.g. run from a source tree: there is nothing to check against)."""
    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    absent = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        name = _NAME.match(spec.strip())
        if name is None or not _IN_EXTRA.search(marker):
            continue
        try:
            importlib.metadata.distribution(name.group())
        except importlib.metadata.PackageNotFoundError:
            absent.append(name.group())
    return absent


def main() -> int:
    absent = missing()
    if absent:
        print(f"laasd: the daemon needs laas' `{EXTRA}` extra, not installed here (missing: {', '.join(absent)}): "
              f"pip install 'laas[{EXTRA}]'", file=sys.stderr)
        return 1
    from laas.daemon.cli import main as run

    return run()


if __name__ == "__main__":
    sys.exit(main())
