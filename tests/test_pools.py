"""corral.Pools: workloads, rules, fallback, circuit breakers and retries over real pools."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from structlog.testing import capture_logs

from corral import (
    AllPoolsFailed,
    BreakerConfig,
    CircuitOpen,
    CorralError,
    Pool,
    PoolOverloaded,
    Pools,
    RemoteError,
    RetryPolicy,
    Rule,
    WorkerCrashed,
    WorkerStartError,
    Workload,
)

TARGET = "tests.workers.basic:app"


def two_pools(**breaker: float) -> Pools:
    return Pools(
        Pool(TARGET, size=1, name="a", max_waiting=0),
        Pool(TARGET, size=1, name="b"),
        workloads={"main": Workload(["a", "b"]), "only_a": ["a"], "only_b": ["b"]},
        breaker=BreakerConfig(**breaker) if breaker else None,  # type: ignore[arg-type]
    )


async def test_a_workload_name_picks_its_pool() -> None:
    async with two_pools() as pools:
        routed = await pools.call_routed("add", 1, 2, workload="only_b")
        assert (routed.value, routed.pool, routed.workload, routed.attempts) == (
            3,
            "b",
            "only_b",
            (),
        )
        assert await pools.call("add", 2, 3) == 5  # the default: the first workload
        stats = pools.stats()
        assert stats.routes["b"].served == 1 and stats.routes["a"].served == 1
        assert stats.workloads == {"main": 1, "only_a": 0, "only_b": 1}
        with pytest.raises(ValueError, match="unknown workload 'nope'"):
            await pools.call("add", 1, 2, workload="nope")


async def test_rules_pick_by_method_by_predicate_and_by_weight() -> None:
    pools = Pools(
        Pool(TARGET, size=1, name="a"),
        Pool(TARGET, size=1, name="b"),
        workloads={"a": ["a"], "b": ["b"]},
        rules=[
            Rule("b", methods=["math.*"]),
            Rule("b", methods=["echo"], when=lambda m, args, kw: args[0] == "big"),
            Rule({"a": 0, "b": 1}, methods=["pid"]),
        ],
        default="a",
    )
    async with pools:
        assert (await pools.call_routed("math.mul", 3, 4)).pool == "b"
        assert (await pools.call_routed("echo", "big")).pool == "b"
        assert (await pools.call_routed("echo", "small")).pool == "a"
        assert {(await pools.call_routed("pid")).pool for _ in range(5)} == {"b"}
        assert (await pools.call_routed("add", 1, 1)).pool == "a"
        assert pools.route_of("math.mul") == "b"


async def test_an_overloaded_pool_falls_back_to_the_next_and_says_so() -> None:
    async with two_pools() as pools:
        busy = asyncio.create_task(pools.call("async_sleep", 0.5, workload="only_a"))
        await asyncio.sleep(0)  # hand the slow call to a's only worker
        # a has 16 slots per worker; fill them so the next call must wait, and max_waiting=0
        fillers = [
            asyncio.create_task(pools.call("async_sleep", 0.5, workload="only_a"))
            for _ in range(15)
        ]
        await asyncio.sleep(0)
        routed = await pools.call_routed("add", 1, 2, workload="main")
        assert routed.pool == "b"
        assert [(p, type(e)) for p, e in routed.attempts] == [("a", PoolOverloaded)]
        assert pools.stats().routes["a"].fallbacks == 1
        await asyncio.gather(busy, *fillers)


async def test_a_crash_falls_back_only_for_idempotent_calls() -> None:
    async with two_pools() as pools:
        with pytest.raises(WorkerCrashed):
            await pools.call("exit_now", workload="main")
        await pools["a"].wait_ready(timeout=30)
        # idempotent: the crash on a sends it on to b, where it crashes too
        with pytest.raises(AllPoolsFailed) as info:
            await pools.call("exit_now", workload="main", idempotent=True)
        assert [p for p, _ in info.value.attempts] == ["a", "b"]
        assert all(isinstance(e, WorkerCrashed) for _, e in info.value.attempts)
        assert "a: WorkerCrashed" in str(info.value) and "b: WorkerCrashed" in str(info.value)
        assert info.value.workload == "main"


async def test_a_remote_error_never_falls_back() -> None:
    async with two_pools() as pools:
        with pytest.raises(RemoteError):
            await pools.call("fail", "no", workload="main", idempotent=True)
        stats = pools.stats().routes
        assert (stats["a"].served, stats["a"].fallbacks, stats["b"].routed) == (1, 0, 0)


async def test_an_open_breaker_refuses_in_microseconds_then_recovers() -> None:
    async with two_pools(min_calls=2, cooldown=0.5) as pools:
        for _ in range(2):
            await pools["a"].wait_ready(timeout=30)
            with pytest.raises(WorkerCrashed):
                await pools.call("exit_now", workload="only_a")
        assert pools.stats().routes["a"].breaker == "open"
        started = time.perf_counter()
        with pytest.raises(CircuitOpen) as info:
            await pools.call("add", 1, 2, workload="only_a")
        assert time.perf_counter() - started < 0.05
        assert info.value.pool == "a" and 0 < info.value.retry_after <= 0.5
        # A chain goes past the open breaker at once.
        routed = await pools.call_routed("add", 1, 2, workload="main")
        assert routed.pool == "b" and isinstance(routed.attempts[0][1], CircuitOpen)
        # After the cool-down a probe goes through; a healthy pool closes the breaker.
        await pools["a"].wait_ready(timeout=30)
        await asyncio.sleep(0.5)
        assert (await pools.call_routed("add", 1, 2, workload="main")).pool == "a"
        stats = pools.stats().routes["a"]
        assert stats.breaker == "closed"
        assert stats.transitions == {
            "closed->open": 1,
            "open->half_open": 1,
            "half_open->closed": 1,
        }
        assert stats.circuit_open == 2


async def test_remote_errors_count_against_the_breaker_only_when_asked() -> None:
    for count, expected in ((False, "closed"), (True, "open")):
        async with Pools(
            Pool(TARGET, size=1, name="a"),
            breaker=BreakerConfig(min_calls=2, count_remote_errors=count),
        ) as pools:
            for _ in range(2):
                with pytest.raises(RemoteError):
                    await pools.call("fail", "x")
            assert pools.stats().routes["a"].breaker == expected


async def test_every_kind_of_call_counts_an_answered_error_as_served() -> None:
    """A RemoteError is the pool answering: plain, session and checkout calls count it alike."""
    async with two_pools() as pools:
        with pytest.raises(RemoteError):
            await pools.call("fail", "plain", workload="only_a")
        with pytest.raises(RemoteError):
            await pools.call("fail", "in a session", session="s1", workload="only_a")
        with pytest.raises(RemoteError):
            async with pools.checkout(workload="only_a") as lease:
                await lease.call("fail", "in a checkout")
        stats = pools.stats().routes["a"]
        assert (stats.routed, stats.served, stats.failed) == (3, 3, 0)


async def test_per_method_breakers_keep_other_methods_flowing() -> None:
    async with Pools(
        Pool(TARGET, size=1, name="a"), breaker=BreakerConfig(min_calls=2, per_method=True)
    ) as pools:
        for _ in range(2):
            with pytest.raises(WorkerCrashed):
                await pools.call("exit_now")
        with pytest.raises(CircuitOpen):
            await pools.call("exit_now")
        await pools["a"].wait_ready(timeout=30)
        assert await pools.call("add", 1, 2) == 3
        assert pools.breakers()["a:exit_now"].state.value == "open"
        assert pools.breakers()["a:add"].state.value == "closed"


async def test_a_session_stays_on_its_pool_whatever_the_rules_say() -> None:
    async with two_pools(min_calls=2, failure_rate=0.3, cooldown=30) as pools:
        await pools.call("remember", "k", 1, session="s1", workload="only_b")
        # Later calls name another workload: the session does not move.
        assert await pools.call("recall", "k", session="s1", workload="only_a") == 1
        assert pools.session_pool("s1") == "b"
        routed = await pools.call_routed("recall", "k", session="s1", workload="main")
        assert (routed.value, routed.pool) == (1, "b")
        # Its pool's breaker open: the session call is refused, never moved.
        for _ in range(2):
            with pytest.raises(WorkerCrashed):
                await pools.call("exit_now", workload="only_b")
        with pytest.raises(CircuitOpen) as info:
            await pools.call("recall", "k", session="s1", workload="main")
        assert info.value.session == "s1"
        await pools.close_session("s1")
        assert pools.session_pool("s1") is None


async def test_retry_rounds_back_off_and_spend_the_budget() -> None:
    pools = Pools(
        Pool(TARGET, size=1, name="a", max_waiting=0),
        workloads={"a": Workload(["a"], retries=3, retry=RetryPolicy(backoff=0.01))},
        retry=RetryPolicy(budget_ratio=0.0, budget_min=1),
    )
    async with pools:
        slow = [asyncio.create_task(pools.call("async_sleep", 1.0)) for _ in range(16)]
        await asyncio.sleep(0)
        with pytest.raises(AllPoolsFailed) as info:
            await pools.call("add", 1, 2)
        # round 0 overloaded, round 1 overloaded (the one retry the budget has),
        # rounds 2 and 3 refused by the budget
        kinds = [str(e) for _, e in info.value.attempts]
        assert len(kinds) == 4
        assert sum("retry budget" in k for k in kinds) == 2
        stats = pools.stats().routes["a"]
        assert (stats.retries, stats.retries_denied) == (1, 2)
        await asyncio.gather(*slow)


async def test_the_deadline_covers_every_pool_tried() -> None:
    async with two_pools() as pools:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            await pools.call("sleep", 5.0, workload="main", timeout=0.3)
        assert time.perf_counter() - started < 3.0


async def test_a_stream_falls_back_before_its_first_item() -> None:
    async with two_pools(min_calls=1, cooldown=30) as pools:
        with pytest.raises(WorkerCrashed):
            await pools.call("exit_now", workload="only_a")
        stream = pools.stream("count", 3, workload="main")
        assert [x async for x in stream] == [0, 1, 2]
        assert stream.pool == "b"
        assert [type(e) for _, e in stream.attempts] == [CircuitOpen]


async def test_a_checkout_falls_back_when_its_pool_refuses() -> None:
    async with two_pools(min_calls=1, cooldown=30) as pools:
        with pytest.raises(WorkerCrashed):
            await pools.call("exit_now", workload="only_a")
        async with pools.checkout(workload="main") as lease:
            assert await lease.call("add", 1, 2) == 3
        assert pools.stats().routes["b"].served == 1


async def test_pools_start_together_and_a_bad_one_closes_the_rest() -> None:
    good = Pool(TARGET, size=1, name="good")
    pools = Pools(good, Pool("tests.workers.bad:startup_fails", size=1, name="bad"))
    with pytest.raises(WorkerStartError):
        await pools.start()
    assert good.stats().closed


async def test_bad_configurations_are_refused() -> None:
    a = Pool(TARGET, size=1, name="a")
    with pytest.raises(ValueError, match="unknown pools"):
        Pools(a, workloads={"w": ["nope"]})
    with pytest.raises(ValueError, match="unknown workload"):
        Pools(a, rules=[Rule("nope")])
    with pytest.raises(ValueError, match="share a name"):
        Pools(a, Pool(TARGET, size=1, name="a"))
    with pytest.raises(TypeError):
        Pools(a, workloads={"w": "a"})
    with pytest.raises(TypeError):
        Rule("a", methods="add")


async def test_fallbacks_and_breaker_moves_are_logged() -> None:
    async with two_pools(min_calls=1, cooldown=30) as pools:
        with capture_logs() as logs:
            with pytest.raises(CorralError):
                await pools.call("exit_now", workload="only_a")
            await pools.call("add", 1, 2, workload="main")
    events = {e["event"]: e for e in logs}
    assert events["breaker.open"]["pool"] == "a"
    assert events["breaker.open"]["reason"] == "1 of 1 calls failed"
    assert events["route.fallback"]["error_type"] == "CircuitOpen"


async def test_careless_arguments_get_clear_errors_before_any_pool_is_tried() -> None:
    async with Pools(Pool(TARGET, size=1, name="a"), rules=[Rule("a", methods=["x*"])]) as pools:
        with pytest.raises(TypeError, match="method must be a str"):
            await pools.call(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="timeout must be a number"):
            await pools.call("add", 1, 2, timeout="5")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout must be a finite number"):
            await pools.call("add", 1, 2, timeout=float("inf"))
        with pytest.raises(TypeError, match="session must be a str"):
            await pools.call("add", 1, 2, session=5)  # type: ignore[arg-type]
        assert pools.stats().routes["a"].routed == 0


async def test_a_probe_stream_dropped_unfinished_gives_its_probe_back() -> None:
    async with two_pools(min_calls=1, cooldown=30) as pools:
        with pytest.raises(WorkerCrashed):
            await pools.call("exit_now", workload="only_a")
        await pools["a"].wait_ready(timeout=30)
        breaker = pools.breakers()["a"]
        breaker.opened_at -= 30  # the cool-down is over
        stream = pools.stream("count", 3, workload="only_a")
        assert await stream.__anext__() == 0
        assert breaker.probes_inflight == 1
        del stream
        gc.collect()
        assert breaker.probes_inflight == 0
        assert breaker.state.value == "half_open"  # a dropped probe says nothing


async def test_log_routes_logs_every_served_call() -> None:
    async with Pools(Pool(TARGET, size=1, name="a"), log_routes=True) as pools:
        with capture_logs() as logs:
            await pools.call("add", 1, 2)
    served = [e for e in logs if e["event"] == "route.served"]
    assert served == [
        {
            "event": "route.served",
            "log_level": "debug",
            "workload": "a",
            "method": "add",
            "pool": "a",
            "fallbacks": 0,
            "round": 0,
        }
    ]
