"""A Ray node lost under load: calls, failures by type, time to detect, time back to full size.

    python -m benchmarks.node_loss                      # 8 workers, 3 nodes, 64 callers, 30 s
    python -m benchmarks.node_loss --events 8:remove,14:remove,20:add

A simulated cluster on this machine (``ray.cluster_utils.Cluster``: a head
with no CPUs and ``--nodes`` worker nodes of ``--cpus-per-node`` CPUs) hosts a
pool of ``--workers`` workers placed by ``RayLauncher`` (one CPU each,
``SPREAD``). ``--callers`` tasks call it for ``--duration`` seconds, half of
them with a session of their own. At each event the busiest node is removed
(its raylet and everything on it SIGKILLed) or a new node is added. Printed:
the calls, the failures by type, and for each event the time until the pool
saw it (its workers there gone) and until it was back at the size the
cluster can hold (with a worker on the new node, for an added one).

Killing the processes of a node on one machine closes their TCP connections
at once, so the pool hears of the loss within milliseconds; a real lost host
sends nothing, and only the heartbeat path (``heartbeat_timeout``) and Ray's
own health checks stand for it. Everything runs on loopback; the run stops by
itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

TARGET = "benchmarks.corral_app:app"


@dataclass
class Event:
    at: float  #: seconds after the load started
    what: str  #: "remove" or "add"
    node: str = ""  #: the node removed or added
    done_at: float | None = None  #: when it was carried out (monotonic)
    capacity: int = 0  #: workers the cluster can hold after it
    detected: float | None = None  #: seconds until no worker of a removed node was ready
    first_worker: float | None = None  #: seconds until a worker ran on an added node
    full: float | None = None  #: seconds until the pool had `capacity` ready workers


@dataclass
class Tally:
    ok: int = 0
    failed: collections.Counter[str] = field(default_factory=collections.Counter)
    first_failure_after: dict[int, float] = field(default_factory=dict)


def _parse_events(text: str) -> list[Event]:
    events = []
    for part in filter(None, text.split(",")):
        at, _, what = part.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1.0
        if what not in ("remove", "add") or not 0 <= seconds < 600:
            raise argparse.ArgumentTypeError(f"{part!r} is not SECONDS:remove or SECONDS:add")
        events.append(Event(seconds, what))
    return sorted(events, key=lambda e: e.at)


async def _caller(pool: Any, index: int, stop_at: float, tally: Tally, events: list[Event]) -> None:
    import corral

    session = f"caller-{index}" if index % 2 else None
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        try:
            await pool.call("cpu_1ms", session=session, timeout=30.0)
            tally.ok += 1
        except corral.CorralError as exc:
            tally.failed[type(exc).__name__] += 1
            now = time.monotonic()
            for number, event in enumerate(events):
                if event.done_at is not None and number not in tally.first_failure_after:
                    tally.first_failure_after[number] = now - event.done_at
            if isinstance(exc, corral.PoolFailed | corral.PoolClosed):
                await asyncio.sleep(0.05)


async def _watch(pool: Any, events: list[Event], stop_at: float) -> None:
    """Poll status() (50 ms) for each event's detection and return to full size."""
    loop = asyncio.get_running_loop()
    while loop.time() < stop_at:
        if events and events[-1].full is not None:
            return  # the last event is settled: the earlier ones were, or were cut short
        now = time.monotonic()
        status = pool.status()
        ready_nodes = [w.node_id for w in status.workers if w.state in ("ready", "busy")]
        for number, event in enumerate(events):
            if event.done_at is None:
                continue
            if any(later.done_at is not None for later in events[number + 1 :]):
                continue  # the next event came first: this one's figures stop here
            since = now - event.done_at
            if event.what == "remove" and event.detected is None and event.node not in ready_nodes:
                event.detected = since
            if event.what == "add" and event.first_worker is None and event.node in ready_nodes:
                event.first_worker = since
            if event.full is None and len(ready_nodes) >= event.capacity:
                if event.what == "remove" and event.detected is None:
                    continue
                event.full = since
        await asyncio.sleep(0.05)


@dataclass
class _Shared:
    """What the pool's thread and the main thread (which drives the cluster) share."""

    ready: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    pool: Any = None
    load_started: float = 0.0
    load_elapsed: float = 0.0
    tally: Tally = field(default_factory=Tally)
    stats: Any = None
    error: BaseException | None = None


async def _busiest(pool: Any) -> str:
    return str(pool.status().nodes[0].id)


async def _serve(args: argparse.Namespace, events: list[Event], shared: _Shared) -> None:
    """The pool and its callers, on this thread's own event loop."""
    import corral
    from corral.ray import RayLauncher

    launcher = RayLauncher(
        host="127.0.0.1", num_cpus=1, scheduling_strategy="SPREAD", start_timeout=args.start_timeout
    )
    pool = corral.Pool(
        TARGET,
        size=args.workers,
        launcher=launcher,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        restart_backoff=args.restart_backoff,
        restart_backoff_max=args.restart_backoff_max,
        startup_timeout=120,
    )
    started = time.monotonic()
    async with pool:
        await pool.wait_ready(timeout=300)
        print(
            f"pool of {args.workers} ready over {args.nodes} nodes in "
            f"{time.monotonic() - started:.1f} s: "
            + ", ".join(f"{n.id[:8]}={n.workers}" for n in pool.status().nodes),
            flush=True,
        )
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + args.duration
        shared.loop, shared.pool = loop, pool
        shared.load_started = time.monotonic()
        shared.ready.set()
        tasks = [
            asyncio.ensure_future(_caller(pool, i, stop_at, shared.tally, events))
            for i in range(args.callers)
        ]
        # The watch outlives the load by up to --settle seconds: a return to
        # full size that takes longer than the run is still measured.
        watcher = asyncio.ensure_future(_watch(pool, events, stop_at + args.settle))
        await asyncio.gather(*tasks)
        shared.load_elapsed = time.monotonic() - shared.load_started
        await watcher
        shared.stats = pool.stats()


def _serve_in_thread(args: argparse.Namespace, events: list[Event], shared: _Shared) -> None:
    try:
        asyncio.run(_serve(args, events, shared))
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
        shared.error = exc
    finally:
        shared.ready.set()


def run(args: argparse.Namespace) -> int:
    """Ray's cluster on this (main) thread, where it must be; the pool on its own thread.

    Adding a node blocks for seconds (and must run on the main thread): the
    pool's event loop must not wait for it.
    """
    import ray
    import structlog
    from ray.cluster_utils import Cluster

    # corral's events (worker.lost, worker.placement_failed...) would drown the figures.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    events: list[Event] = args.events
    system_config = {
        "health_check_period_ms": args.health_check_period_ms,
        "health_check_failure_threshold": args.health_check_failure_threshold,
    }
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "_system_config": dict(system_config)},
    )
    shared = _Shared()
    thread = threading.Thread(target=_serve_in_thread, args=(args, events, shared), name="pool")
    try:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=args.cpus_per_node)
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        thread.start()
        shared.ready.wait()
        for event in events:
            if shared.error is not None or shared.loop is None:
                break
            time.sleep(max(0.0, shared.load_started + event.at - time.monotonic()))
            alive = len(cluster.worker_nodes)
            if event.what == "remove":
                busiest = asyncio.run_coroutine_threadsafe(
                    _busiest(shared.pool), shared.loop
                ).result(30)
                node = next(n for n in cluster.worker_nodes if n.node_id == busiest)
                event.node = node.node_id
                event.capacity = min(args.workers, (alive - 1) * args.cpus_per_node)
                event.done_at = time.monotonic()
                cluster.remove_node(node, allow_graceful=False)
            else:
                node = cluster.add_node(num_cpus=args.cpus_per_node)
                event.node = node.node_id
                event.capacity = min(args.workers, (alive + 1) * args.cpus_per_node)
                event.done_at = time.monotonic()  # from when the node has joined Ray
            print(
                f"t={event.done_at - shared.load_started:5.1f}s {event.what} node "
                f"{event.node[:8]}: the cluster holds {event.capacity} workers",
                flush=True,
            )
        thread.join()
        if shared.error is not None:
            raise shared.error
        _report(args, events, shared.tally, shared.stats, shared.load_elapsed, system_config)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        cluster.shutdown()
    return 0


def _seconds(value: float | None) -> str:
    return "not before the next event or the end" if value is None else f"{value:.2f} s"


def _report(
    args: argparse.Namespace,
    events: list[Event],
    tally: Tally,
    stats: Any,
    elapsed: float,
    system_config: dict[str, int],
) -> None:
    failed = sum(tally.failed.values())
    print()
    print(
        f"calls: {tally.ok:,} ok, {failed:,} failed in {elapsed:.1f} s "
        f"({tally.ok / elapsed:,.0f}/s) by {args.callers} callers"
    )
    print("failures by type: " + (", ".join(f"{k} {v}" for k, v in tally.failed.items()) or "none"))
    for number, event in enumerate(events):
        print(f"event {number + 1}: t={event.at:g}s {event.what} node {event.node[:8]}")
        if event.what == "remove":
            first = tally.first_failure_after.get(number)
            print(f"  first failed call after:        {_seconds(first)}")
            print(f"  detected (its workers gone):    {_seconds(event.detected)}")
        else:
            print(f"  a worker on the new node after: {_seconds(event.first_worker)}")
        print(f"  back to {event.capacity} ready workers after: {_seconds(event.full)}")
    print(
        f"starts: {stats.restarts} replacements, {stats.failed_starts} failed starts, "
        f"of which {stats.placement_failures} placement failures (not counted against "
        f"max_restarts); pool failed at the end: {stats.failed}"
    )
    print(
        "knobs: "
        f"heartbeat_interval={args.heartbeat_interval}s heartbeat_timeout="
        f"{args.heartbeat_timeout}s restart_backoff={args.restart_backoff}s "
        f"restart_backoff_max={args.restart_backoff_max}s start_timeout="
        f"{args.start_timeout}s; Ray "
        + " ".join(f"{k}={v}" for k, v in system_config.items())
        + f"; {args.cpus_per_node} CPUs per node, 1 per worker; cpu count here {os.cpu_count()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.node_loss", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--cpus-per-node", type=int, default=3)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument(
        "--events",
        type=_parse_events,
        default="8:remove,14:add",
        help="SECONDS:remove or SECONDS:add, comma-separated (default: 8:remove,14:add)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=60.0,
        help="seconds after the load to keep watching for a return to full size",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--restart-backoff", type=float, default=0.1)
    parser.add_argument("--restart-backoff-max", type=float, default=2.0)
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--health-check-period-ms", type=int, default=3000)
    parser.add_argument("--health-check-failure-threshold", type=int, default=5)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 600:
        parser.error("--duration must be in (0, 600] seconds")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
