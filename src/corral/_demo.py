"""``corral demo``: a pool of the bundled worker under a visible, mixed workload.

Owns: the demo's script and what it prints. Must not touch: pool internals; it
uses only the public API, as an application would. Ends by itself in well under
30 s and closes its pool, so no process is left behind.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

import corral

TARGET = "corral._demo_app:app"


class _Recorder:
    """Latencies and outcomes of every call the demo makes."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()

    async def time(self, call: Callable[[], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        try:
            return await call()
        except corral.CorralError as exc:
            self.errors[type(exc).__name__] += 1
            raise
        finally:
            self.latencies.append(time.perf_counter() - started)


class _Screen:
    """Progress lines: rewritten in place on a terminal, printed plainly otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()

    def step(self, title: str) -> None:
        self.out.write(f"\n== {title}\n")
        self.out.flush()

    def progress(self, text: str) -> None:
        if self.live:
            self.out.write(f"\r   {text}\x1b[K")
            self.out.flush()

    def line(self, text: str) -> None:
        if self.live:
            self.out.write("\r\x1b[K")
        self.out.write(f"   {text}\n")
        self.out.flush()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_demo(size: int = 2, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Run the demo workload; return the summary it prints."""
    screen = _Screen(out)
    rec = _Recorder()
    began = time.perf_counter()
    screen.step(f"starting a pool of {size} workers ({TARGET})")
    started = time.perf_counter()
    async with corral.Pool(TARGET, size=size, cancel_grace=1.0) as pool:
        screen.line(f"ready in {(time.perf_counter() - started) * 1000:.0f} ms: {pool!r}")

        screen.step("plain calls: 2,000 squares, 200 at a time")
        total = 0
        for batch in range(10):
            results = await asyncio.gather(
                *(rec.time(functools.partial(pool.call, "square", i)) for i in range(200))
            )
            total += sum(results)
            screen.progress(f"{(batch + 1) * 200:>5} / 2000 calls")
        screen.line(f"2000 calls, sum of squares {total:,}")

        screen.step("CPU work spread over the workers")
        hashes = await asyncio.gather(
            *(rec.time(functools.partial(pool.call, "digest", bytes([i]) * 64)) for i in range(40))
        )
        screen.line(f"40 digests, first {hashes[0]}")

        screen.step("sessions: 6 users, each pinned to one worker with its own history")
        homes: dict[str, str] = {}
        for turn in range(5):
            for user in range(6):
                reply = await rec.time(
                    functools.partial(pool.call, "chat", f"turn {turn}", session=f"user-{user}")
                )
                homes[f"user-{user}"] = reply["worker"]
            screen.progress(f"turn {turn + 1}/5")
        spread = collections.Counter(homes.values())
        screen.line(f"5 turns each; sessions per worker: {dict(sorted(spread.items()))}")

        screen.step("a streamed reply, word by word")
        words: list[str] = []
        stream_started = time.perf_counter()
        async for word in pool.stream(
            "tokens", "corral streams each item as soon as the worker yields it"
        ):
            words.append(word)
            screen.progress(" ".join(words))
        rec.latencies.append(time.perf_counter() - stream_started)
        screen.line(" ".join(words))

        screen.step("a worker killed mid-call (SIGKILL) while other calls run")
        bystanders = [
            asyncio.ensure_future(rec.time(functools.partial(pool.call, "square", i)))
            for i in range(50)
        ]
        crash_started = time.perf_counter()
        try:
            await rec.time(lambda: pool.call("crash"))
        except corral.WorkerCrashed as exc:
            detected = time.perf_counter() - crash_started
            screen.line(f"caller got WorkerCrashed after {detected * 1000:.0f} ms:")
            screen.line(f"  {str(exc).splitlines()[0]}")
        finished = await asyncio.gather(*bystanders, return_exceptions=True)
        ok = sum(not isinstance(r, BaseException) for r in finished)
        screen.line(
            f"{ok}/50 calls alongside it succeeded; {50 - ok} were queued on the killed "
            "worker and got WorkerCrashed"
        )
        refill_started = time.perf_counter()
        await pool.wait_ready(timeout=10)
        screen.line(
            f"back to {size} ready workers in "
            f"{(time.perf_counter() - refill_started) * 1000:.0f} ms: {pool!r}"
        )
        lost = 0
        for user in range(6):
            try:
                await rec.time(
                    functools.partial(pool.call, "chat", "hello again", session=f"user-{user}")
                )
            except corral.SessionLost:
                lost += 1
        screen.line(f"{lost} of 6 sessions lived on the killed worker: told SessionLost once")

        screen.step("a call past its deadline (timeout=0.3 s on 5 s of work)")
        try:
            await rec.time(lambda: pool.call("think", 5.0, timeout=0.3))
        except corral.CallTimeout as exc:
            screen.line(f"CallTimeout: {str(exc).splitlines()[0]}")
        await pool.wait_idle(timeout=10)
        screen.line(f"the worker stopped the work and stays: {pool!r}")

        stats = pool.stats()
    elapsed = time.perf_counter() - began
    summary = {
        "calls": len(rec.latencies),
        "ok": len(rec.latencies) - sum(rec.errors.values()),
        "errors": dict(rec.errors),
        "p50_ms": _percentile(rec.latencies, 0.50) * 1000,
        "p99_ms": _percentile(rec.latencies, 0.99) * 1000,
        "restarts": stats.restarts,
        "seconds": elapsed,
    }
    screen.step("summary")
    rows = [
        ("calls", f"{summary['calls']:,}"),
        ("succeeded", f"{summary['ok']:,}"),
        ("latency p50", f"{summary['p50_ms']:.2f} ms"),
        ("latency p99", f"{summary['p99_ms']:.2f} ms"),
        ("workers restarted", str(summary["restarts"])),
        *((f"error: {name}", str(count)) for name, count in sorted(rec.errors.items())),
        ("wall time", f"{elapsed:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        screen.line(f"{name:<{width}}  {value:>12}")
    screen.line("pool closed; no worker process is left.")
    return summary
