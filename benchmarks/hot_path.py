"""Python per sequential call on each side, in-process and without I/O, against the floor.

    python -m benchmarks.hot_path                 # 20,000 calls per block, 5 rounds
    python -m benchmarks.hot_path --calls 2000 --rounds 1

On one CPU a sequential call's latency is the parent's CPU plus the worker's;
what corral adds to the floor's is Python on each side. This measures that
Python alone, with this process's CPU clock, so that neither the other side
nor the machine's other jobs are in the figure:

- ``parent``: ``Pool.call("noop")`` on a real pool, with the worker's pipe
  replaced by a reply fed back through ``loop.call_soon`` (so one call is one
  write, one loop round with the reply, one round for the caller, as with a
  real worker, minus the system calls); the floor's ``FloorPool.call`` the same
  way.
- ``worker``: the worker's main thread (``MainThreadRuntime``) fed one Call
  frame per read, its replies written to ``/dev/null``; the floor's worker
  loop (decode a tuple, call, encode, write) the same way. The worker's
  large-buffer path is on, as in a pool with default settings.

Blocks alternate, corral and floor, and each figure is the median of its
rounds. In the real alternation of the two processes each microsecond here
costs about 2 to 2.5 (docs/performance.md, "Sequential latency on one CPU").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from benchmarks.floor import FloorPool
from benchmarks.tasks import TASKS
from corral._bench_floor import settle_malloc


async def _corral_parent(pool: Any, n: int) -> float:
    from corral._framing import FrameEncoder
    from corral._messages import Result

    loop = asyncio.get_running_loop()
    worker = pool.workers[0]
    connection = worker._launched.connection
    protocol = connection._reader.get_protocol()
    writer = connection._writer
    first = worker._next_id
    encoder = FrameEncoder()
    replies = iter([bytes(encoder.encode(Result(first + i, None))) for i in range(n)])
    real = writer._write
    writer._write = lambda data: loop.call_soon(protocol.data_received, next(replies))
    try:
        call = pool.call
        started = time.process_time()
        for _ in range(n):
            await call("noop")
        return (time.process_time() - started) / n * 1e6
    finally:
        writer._write = real


class _Replies:
    """The floor worker's write transport, answering each call through ``call_soon``."""

    def __init__(self, protocol: asyncio.Protocol, replies: Iterator[bytes]) -> None:
        self._loop = asyncio.get_running_loop()
        self._protocol = protocol
        self._replies = replies

    def write(self, data: bytes) -> None:
        self._loop.call_soon(self._protocol.data_received, next(self._replies))


async def _floor_parent(floor: FloorPool, n: int) -> float:
    encode = msgspec.msgpack.Encoder().encode
    worker = floor.workers[0]
    bodies = (encode((worker.next_id + 1 + i, None)) for i in range(n))
    replies = iter([len(body).to_bytes(4, "big") + body for body in bodies])
    real = worker.writer
    worker.writer = _Replies(worker.reader.get_protocol(), replies)  # type: ignore[assignment,arg-type]
    try:
        call = floor.call
        started = time.process_time()
        for _ in range(n):
            await call("noop")
        return (time.process_time() - started) / n * 1e6
    finally:
        worker.writer = real


async def parent(n: int, rounds: int) -> tuple[float, float]:
    """Median CPU per call (µs) of corral's parent and the floor's, replies fed back."""
    import corral

    corral_us: list[float] = []
    floor_us: list[float] = []
    async with FloorPool(1) as floor, corral.Pool("benchmarks.corral_app:app", size=2) as pool:
        await pool.call("noop")
        await floor.call("noop")
        for _ in range(rounds):
            corral_us.append(await _corral_parent(pool, n))
            floor_us.append(await _floor_parent(floor, n))
    return statistics.median(corral_us), statistics.median(floor_us)


def worker(n: int, rounds: int, app_path: str = "benchmarks.corral_app") -> tuple[float, float]:
    """Median CPU per call (µs) of corral's worker main thread and the floor's loop."""
    import importlib

    from corral._blocking_writer import BlockingFrameWriter
    from corral._framing import FrameDecoder, FrameEncoder
    from corral._messages import Call, WorkerBound
    from corral._shm import LargeBuffers
    from corral.worker._main_thread import MainThreadRuntime

    app: Any = importlib.import_module(app_path).app
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        # As a worker of a pool with default settings: its large-buffer path on
        # (no segment is made: every buffer here is small).
        large = LargeBuffers("corral-hotpath-", 256 * 1024, "w")
        encoder = FrameEncoder(large_buffers=large)
        decoder: FrameDecoder[Any] = FrameDecoder(WorkerBound, large_buffers=large)  # type: ignore[arg-type]
        runtime = MainThreadRuntime(
            app, "w1", -1, BlockingFrameWriter(null, encoder), encoder, decoder
        )
        sender = FrameEncoder()
        encode, decode = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder().decode
        corral_us: list[float] = []
        floor_us: list[float] = []
        for round_ in range(rounds):
            frames = [
                bytes(sender.encode(Call(round_ * n + i + 1, "noop")))  # ids only ever grow
                for i in range(n)
            ]
            feed, start = decoder.feed, runtime._start
            started = time.process_time()
            for frame in frames:
                for message in feed(frame):
                    start(message)
            corral_us.append((time.process_time() - started) / n * 1e6)
            bodies = [encode((i, "noop", ())) for i in range(n)]
            write = os.write
            started = time.process_time()
            for body in bodies:
                call_id, method, args = decode(body)
                out = encode((call_id, TASKS[method](*args)))
                view = memoryview(len(out).to_bytes(4, "big") + out)
                while view:
                    view = view[write(null, view) :]
            floor_us.append((time.process_time() - started) / n * 1e6)
        return statistics.median(corral_us), statistics.median(floor_us)
    finally:
        os.close(null)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hot_path")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    settle_malloc()
    rows = [
        ("parent", *asyncio.run(parent(args.calls, args.rounds))),
        ("worker, sync-only app", *worker(args.calls, args.rounds)),
        ("worker, mixed app", *worker(args.calls, args.rounds, "benchmarks.corral_mixed_app")),
    ]
    heads = ("Python per sequential call", "corral", "floor", "over", "ratio")
    print(f"{heads[0]:28} {heads[1]:>10} {heads[2]:>10} {heads[3]:>9} {heads[4]:>7}")
    for name, ours, floor in rows:
        over, ratio = ours - floor, ours / floor
        print(f"{name:28} {ours:7.2f} us {floor:7.2f} us {over:6.2f} us {ratio:6.2f}x")


if __name__ == "__main__":
    main()
