"""Every example of the public API contract, as written, against real worker processes."""

from __future__ import annotations

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"


@pytest.fixture
async def pool():
    async with Pool(TARGET, size=2) as pool:
        yield pool


async def test_call_returns_the_handler_result(pool: Pool) -> None:
    assert await pool.call("add", 1, 2) == 3


async def test_call_with_timeout_returns_the_result(pool: Pool) -> None:
    assert await pool.call("add", 1, 2, timeout=5.0) == 3


async def test_handler_registered_under_an_explicit_name(pool: Pool) -> None:
    assert await pool.call("math.mul", 3, 4) == 12


async def test_async_handler(pool: Pool) -> None:
    assert await pool.call("fetch", "http://x") == b"http://x"


async def test_keyword_arguments_reach_the_handler(pool: Pool) -> None:
    assert await pool.call("add", a=1, b=2) == 3


async def test_session_state_lives_in_the_worker(pool: Pool) -> None:
    await pool.call("remember", "k", 1, session="user-42")
    assert await pool.call("recall", "k", session="user-42") == 1
    assert await pool.call("recall", "k", session="user-7") is None


async def test_session_stays_on_one_worker(pool: Pool) -> None:
    pids = {(await pool.call("whoami", session="user-42"))["pid"] for _ in range(20)}
    assert len(pids) == 1


async def test_new_sessions_spread_over_an_idle_pool(pool: Pool) -> None:
    a = await pool.call("whoami", session="a")
    b = await pool.call("whoami", session="b")
    assert a["pid"] != b["pid"]


async def test_stream_yields_each_item(pool: Pool) -> None:
    assert [x async for x in pool.stream("count", 5)] == [0, 1, 2, 3, 4]


async def test_stream_takes_session_and_timeout(pool: Pool) -> None:
    items = [x async for x in pool.stream("count", 3, session="s", timeout=5.0)]
    assert items == [0, 1, 2]


async def test_stream_on_a_plain_handler_yields_its_one_result(pool: Pool) -> None:
    assert [x async for x in pool.stream("add", 1, 2)] == [3]


async def test_call_on_a_generator_handler_is_a_clear_remote_error(pool: Pool) -> None:
    with pytest.raises(corral.RemoteError, match=r"pool.stream\(\)"):
        await pool.call("count", 3)


async def test_checkout_leases_one_worker(pool: Pool) -> None:
    async with pool.checkout(session="user-42", timeout=1.0) as worker:
        assert await worker.call("add", 1, 2) == 3
        assert isinstance(worker.id, str)
        assert worker.pid == await worker.call("pid")


async def test_checkout_session_sees_the_session_state(pool: Pool) -> None:
    await pool.call("remember", "k", "v", session="user-42")
    async with pool.checkout(session="user-42") as worker:
        assert await worker.call("recall", "k") == "v"


async def test_close_session_drops_its_state(pool: Pool) -> None:
    await pool.call("remember", "k", 1, session="user-42")
    await pool.close_session("user-42")
    assert await pool.call("recall", "k", session="user-42") is None


async def test_stats_is_a_snapshot(pool: Pool) -> None:
    await pool.call("add", 1, 2)
    await pool.call("remember", "k", 1, session="s")
    stats = pool.stats()
    assert stats.size == 2
    assert stats.ready == 2
    assert stats.sessions == 1
    assert stats.calls_ok == 2
    assert stats.waiting == 0
    assert stats.restarts == 0


async def test_explicit_start_and_aclose() -> None:
    pool = Pool(TARGET, size=1)
    await pool.start()
    try:
        assert await pool.call("add", 2, 2) == 4
    finally:
        await pool.aclose()
    await pool.aclose()  # idempotent
    with pytest.raises(corral.PoolClosed):
        await pool.call("add", 1, 1)


async def test_on_startup_runs_once_per_worker_before_ready(pool: Pool) -> None:
    assert await pool.call("startups") == 1


async def test_repr_shows_the_live_state(pool: Pool) -> None:
    text = repr(pool)
    assert "2 idle" in text and "0 waiting" in text and TARGET in text


async def test_size_defaults_to_the_number_of_cpus() -> None:
    import os

    assert Pool(TARGET).config.size == (os.cpu_count() or 1)


async def test_msgspec_native_types_round_trip(pool: Pool) -> None:
    import datetime
    import decimal
    import uuid

    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert await pool.call("echo", when) == when
    assert await pool.call("echo", {"a": [1, 2.5, None, True, b"x"]}) == {
        "a": [1, 2.5, None, True, b"x"]
    }
    assert await pool.call("echo", uuid.UUID(int=5)) == str(uuid.UUID(int=5))
    assert await pool.call("echo", decimal.Decimal("1.5")) == "1.5"
