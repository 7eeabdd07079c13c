"""``corral top``: a live table of a pool's workers in the terminal (rich).

Owns: the two sources of a view (a pool this command starts, optionally under
the demo load; or a running service's ``status.json``), the demo load, and how
a ``PoolStatus.to_dict()`` body is drawn as rich tables. Both sources go
through the same JSON form, so a remote pool looks exactly like a local one.
Must not touch: pool internals (``Pool.status()`` and the public API only).
Imported by the command line alone: corral imports rich nowhere else, so the
library and its workers run without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

import corral

__all__ = ["demo_load", "render", "status_url", "top_pool", "top_url"]

DEMO_TARGET = "corral._demo_app:app"

_STATE_STYLES = {
    "ready": "green",
    "open": "green",
    "busy": "yellow",
    "starting": "blue",
    "new": "blue",
    "draining": "magenta",
    "recycled": "magenta",
    "stopping": "red",
    "closing": "red",
    "evicted": "red",
    "died": "bold red",
    "failed": "bold red",
    "failed_to_start": "bold red",
    "dead": "dim",
    "closed": "dim",
}
_EVICTIONS_SHOWN = 8


async def demo_load(pool: corral.Pool, *, crash_every: float | None = None) -> None:
    """Keep a pool of the demo worker busy until cancelled.

    Plain calls, a little CPU work, three users' sessions and a streamed
    reply, in a steady trickle. With ``crash_every``, one call in that many
    seconds (the first after a third of it) kills its worker, so the pool's
    replacement of it shows.
    """
    loop = asyncio.get_running_loop()
    next_crash = None if crash_every is None else loop.time() + crash_every / 3
    turn = 0
    while True:
        turn += 1
        calls: list[Any] = [pool.call("square", i) for i in range(8)]
        calls += [pool.call("digest", b"corral" * 8) for _ in range(2)]
        calls += [pool.call("chat", f"turn {turn}", session=f"user-{u}") for u in range(3)]
        if turn % 20 == 0:
            calls.append(_drain(pool.stream("tokens", "a streamed reply", delay=0.01)))
        if next_crash is not None and crash_every is not None and loop.time() >= next_crash:
            calls.append(pool.call("crash"))
            next_crash = loop.time() + crash_every
        # A killed worker fails its calls (WorkerCrashed, SessionLost): the load goes on.
        await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0.02)  # pacing: a steady trickle, not a busy loop


async def _drain(stream: corral.CallStream) -> None:
    async with stream:
        async for _ in stream:
            pass


# --- drawing ---------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{int(seconds // 86400)} d {int(seconds % 86400 // 3600)} h"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _styled(word: str) -> Text:
    return Text(word.replace("_", " "), style=_STATE_STYLES.get(word, ""))


def render(
    body: dict[str, Any], previous: dict[str, Any] | None = None, error: str | None = None
) -> RenderableType:
    """Draw one ``status.json`` body; ``previous`` (the body before) gives calls/s."""
    failed = sum(body["calls_failed"].values())
    header = Text.assemble(
        ("corral ", "bold"),
        (body["pool"], "bold cyan"),
        "  ",
        _styled(body["state"]),
        f"  {body['target']}\n",
        f"{body['ready']}/{body['size']} ready · {body['queue']['total']} waiting · "
        f"{body['sessions']} sessions · {body['calls_ok']:,} calls ok · {failed:,} failed · "
        f"{body['restarts']} restarts",
    )
    if error is not None:
        header.append(f"\n{error}", style="bold red")

    elapsed = body["time"] - previous["time"] if previous else 0.0
    before = {w["id"]: w["calls_served"] for w in previous["workers"]} if previous else {}
    workers = Table(box=box.SIMPLE_HEAD, title="workers", title_justify="left", expand=False)
    for name, justify in [
        ("worker", "left"),
        ("pid", "right"),
        ("state", "left"),
        ("uptime", "right"),
        ("calls served", "right"),
        ("calls/s", "right"),
        ("in flight", "right"),
        ("sessions", "right"),
        ("RSS", "right"),
        ("note", "left"),
    ]:
        workers.add_column(name, justify=justify)  # type: ignore[arg-type]
    for w in body["workers"]:
        rate = "-"
        if elapsed > 0 and w["id"] in before:
            rate = f"{max(0.0, (w['calls_served'] - before[w['id']]) / elapsed):.0f}"
        state = _styled(w["state"])
        if w["leased"]:
            state.append(" leased", style="yellow")
        workers.add_row(
            w["id"],
            "-" if w["pid"] is None else str(w["pid"]),
            state,
            _duration(w["uptime"]),
            f"{w['calls_served']:,}",
            rate,
            str(w["inflight"]),
            str(w["sessions"]),
            _mib(w["rss"]),
            w["note"] or "",
        )
    queue = body["queue"]
    waiting = Text(
        f"queue: {queue['total']} waiting ({queue['calls']} calls, {queue['checkouts']} "
        f"checkouts, {queue['sessions']} session calls)"
    )
    evictions = Table(
        box=box.SIMPLE_HEAD, title="recent evictions", title_justify="left", expand=False
    )
    for name in ("when", "worker", "pid", "kind", "reason"):
        evictions.add_column(name, justify="right" if name == "pid" else "left")
    for e in body["evictions"][:_EVICTIONS_SHOWN]:
        evictions.add_row(
            f"{_duration(body['time'] - e['time'])} ago",
            e["worker_id"],
            "-" if e["pid"] is None else str(e["pid"]),
            _styled(e["kind"]),
            e["reason"],
        )
    if not body["evictions"]:
        evictions.add_row("none since the pool started", "", "", "", "")
    return Group(header, workers, waiting, evictions)


def _console() -> Console:
    # Not a terminal (a pipe, a file, a test): one final frame, wide enough to read.
    return Console(width=None if sys.stdout.isatty() else 150)


# --- a pool of our own -------------------------------------------------------------------


async def top_pool(
    target: str,
    *,
    size: int,
    duration: float | None,
    interval: float,
    load: bool,
    crash_every: float | None,
) -> int:
    """Start a pool of ``target`` and show it live until ``duration`` or Ctrl-C."""
    console = _console()
    sys.path.insert(0, os.getcwd())  # a target in the current directory, as python -m would
    pool = corral.Pool(target, size=size)
    try:
        with console.status(f"starting {size} workers of {target} ..."):
            await pool.start()
    except corral.WorkerStartError:
        raise  # the command line says it in one line
    except corral.CorralError as exc:
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        return 1
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    worker = asyncio.ensure_future(demo_load(pool, crash_every=crash_every)) if load else None
    try:
        with Live(console=console, auto_refresh=False) as live:
            previous = None
            while True:
                body = pool.status(rss=True).to_dict()
                live.update(render(body, previous), refresh=True)
                previous = body
                if deadline is not None and loop.time() >= deadline:
                    break
                left = interval if deadline is None else min(interval, deadline - loop.time())
                await asyncio.sleep(max(0.0, left))
    finally:
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        with console.status("closing the pool ..."):
            await pool.aclose()
    return 0


# --- a running service --------------------------------------------------------------------


def status_url(url: str) -> str:
    """The JSON address of a status page: ``.../corral`` gives ``.../corral/status.json``."""
    return url if url.endswith(".json") else url.rstrip("/") + "/status.json"


def _fetch(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5.0) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error") or exc.reason
        except ValueError:
            reason = exc.reason
        raise OSError(f"HTTP {exc.code}: {reason}") from exc
    if not isinstance(body, dict) or "workers" not in body:
        raise ValueError("not a corral status document (is this a status_app's address?)")
    return body


def top_url(url: str, *, duration: float | None, interval: float) -> int:
    """Poll a service's status page JSON and show it live until ``duration`` or Ctrl-C."""
    console = _console()
    address = status_url(url)
    try:
        body = _fetch(address)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"corral top: cannot read {address}: {exc}\n")
        return 1
    deadline = None if duration is None else time.monotonic() + duration
    previous: dict[str, Any] | None = None
    error: str | None = None
    with Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(render(body, previous, error), refresh=True)
            if deadline is not None and time.monotonic() >= deadline:
                break
            left = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(0.0, left))
            try:
                body, previous, error = _fetch(address), body, None
            except (OSError, ValueError) as exc:
                error = f"{address}: {exc} (showing the last data; retrying)"
    return 0
