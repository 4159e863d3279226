"""`laas discover`: lists the daemons on the LAN as they appear, change and go.

One line per event: `+` a daemon appeared, `~` its record changed (load, models), `-` it went (a
goodbye, or its records expired). `--json` prints one object a line instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys

from laas.client.mdns import Browser, DaemonRecord, zeroconf


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("discover", help="list the daemons on the LAN (mDNS) as they appear and go")
    p.add_argument("--wait", type=float, help="stop after this many seconds (default: until interrupted)")
    p.add_argument("--interface", action="append", default=[], metavar="ADDRESS",
                   help="address of an interface to browse on (repeatable; default: all)")
    p.add_argument("--ip-version", choices=("v4", "v6", "all"), default="v4")
    p.add_argument("--json", action="store_true", help="one JSON object a line")


def _line(event: str, name: str, record: DaemonRecord | None, as_json: bool) -> str:
    if as_json:
        return json.dumps({"event": event, "name": name, **(dataclasses.asdict(record) if record else {})})
    if record is None:
        return f"- {name}"
    models = ",".join(record.models) + ("..." if record.model_count > len(record.models) else "")
    return (f"{event} {name}  {record.target}  models={models or '?'}  load={record.load} free={record.free} "
            f"wait={record.wait_ms:.0f}ms  auth={'yes' if record.auth else 'no'} tls={'yes' if record.tls else 'no'}")


async def _discover(args: argparse.Namespace) -> None:
    azc = zeroconf(args.interface, args.ip_version)
    known: set[str] = set()

    def show(name: str, record: DaemonRecord | None) -> None:
        event = "-" if record is None else ("~" if name in known else "+")
        (known.add if record is not None else known.discard)(name)
        print(_line(event, name, record, args.json), flush=True)

    browser = Browser(azc, show)
    browser.start()
    try:
        if args.wait is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(args.wait)
    finally:
        await browser.aclose()
        await azc.async_close()


def run(args: argparse.Namespace) -> int:
    with contextlib.suppress(BrokenPipeError):
        asyncio.run(_discover(args))
    sys.stdout.flush()
    return 0
