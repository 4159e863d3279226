"""Finding daemons on the LAN (mDNS/DNS-SD): by instance name, or the least-loaded one serving a model.

Layer: edge (client side).

    from laas.client import Client, discovery
    with Client(discovery.find("laasd on kitchen").target) as laas: ...
    with Client(discovery.least_loaded("smollm2-135m-instruct").target) as laas: ...
    with Client.discovered(model="smollm2-135m-instruct") as laas: ...   # the same, in one call
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
from collections.abc import Sequence

from laas.client.mdns import Browser, DaemonRecord, zeroconf
from laas.core.errors import NotFound

__all__ = ["DaemonRecord", "browse", "find", "find_async", "least_loaded", "least_loaded_async"]


async def browse(wait_s: float = 2.0, interfaces: Sequence[str] = (), ip_version: str = "v4",
                 name: str | None = None) -> list[DaemonRecord]:
    """The daemons that answer within `wait_s` (returns as soon as `name` is seen, when given)."""
    azc = zeroconf(interfaces, ip_version)
    seen = asyncio.Event()
    browser = Browser(azc, lambda found, record: seen.set() if record is not None and found == name else None)
    browser.start()
    try:
        if name is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen.wait(), wait_s)
        else:
            await asyncio.sleep(wait_s)
        return sorted(browser.records.values(), key=lambda r: r.name)
    finally:
        await browser.aclose()
        await azc.async_close()


def _pick_least_loaded(records: list[DaemonRecord], model: str, match: str) -> DaemonRecord:
    serving = [r for r in records if r.serves(model) and r.free > 0 and fnmatch.fnmatchcase(r.name, match)]
    if not serving:
        raise NotFound(f"no daemon on the LAN serves {model or 'a default model'} with room for a request",
                       field="model")
    return min(serving, key=lambda r: (r.wait_ms, r.load, -r.free, r.name))


async def find_async(name: str, wait_s: float = 3.0, interfaces: Sequence[str] = ()) -> DaemonRecord:
    """The daemon advertised as `name`; NotFound if none answers within `wait_s`."""
    for record in await browse(wait_s, interfaces, name=name):
        if record.name == name:
            return record
    raise NotFound(f"no daemon named {name!r} answered on the LAN within {wait_s:g}s", field="name")


async def least_loaded_async(model: str = "", wait_s: float = 2.0, interfaces: Sequence[str] = (),
                             match: str = "*") -> DaemonRecord:
    """Of the daemons that serve `model` ("" any) and whose names match the glob `match`, the one with the
    least work queued, by their TXT figures (predicted wait, then requests in flight)."""
    return _pick_least_loaded(await browse(wait_s, interfaces), model, match)


def find(name: str, wait_s: float = 3.0, interfaces: Sequence[str] = ()) -> DaemonRecord:
    return asyncio.run(find_async(name, wait_s, interfaces))


def least_loaded(model: str = "", wait_s: float = 2.0, interfaces: Sequence[str] = (),
                 match: str = "*") -> DaemonRecord:
    return asyncio.run(least_loaded_async(model, wait_s, interfaces, match))
