"""One test per row of the public error table, plus the details every error carries."""

from __future__ import annotations

import asyncio

import pytest

import corral
from corral import Pool

TARGET = "tests.workers.basic:app"


@pytest.fixture
async def pool():
    async with Pool(TARGET, size=2, cancel_grace=0.5) as pool:
        yield pool


def test_every_error_is_a_corral_error() -> None:
    for name in corral.__all__:
        obj = getattr(corral, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, corral.CorralError), name
            assert obj.__module__ == "corral"


async def test_remote_error_carries_type_message_traceback_and_worker_stays(pool: Pool) -> None:
    before = {w.pid for w in pool.workers}
    with pytest.raises(corral.RemoteError) as info:
        await pool.call("fail", "boom")
    err = info.value
    assert err.type == "ValueError"
    assert err.message == "boom"
    assert "raise ValueError(message)" in err.traceback
    assert err.method == "fail" and err.worker_id and err.pid and err.call_id
    assert {w.pid for w in pool.workers} == before


async def test_method_not_found_lists_some_that_exist(pool: Pool) -> None:
    with pytest.raises(corral.MethodNotFound) as info:
        await pool.call("no_such_method")
    assert isinstance(info.value, corral.RemoteError)
    assert "'add'" in str(info.value)
    assert await pool.call("add", 1, 1) == 2


async def test_worker_crashed_names_the_exit_and_the_worker_is_replaced(pool: Pool) -> None:
    with pytest.raises(corral.WorkerCrashed) as info:
        await pool.call("exit_now", 7)
    err = info.value
    assert not isinstance(err, corral.SessionLost)
    assert err.exit_code == 7
    assert err.pid is not None and err.worker_id is not None and err.method == "exit_now"
    assert "exit code 7" in str(err)
    await pool.wait_ready(timeout=10)
    assert pool.stats().restarts == 1


async def test_call_timeout_is_a_timeout_error_and_the_worker_survives(pool: Pool) -> None:
    with pytest.raises(corral.CallTimeout) as info:
        await pool.call("async_sleep", 30, timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert info.value.method == "async_sleep"
    await pool.wait_ready(timeout=5)
    assert pool.stats().restarts == 0
    assert await pool.call("add", 1, 1) == 2


async def test_call_timeout_replaces_a_worker_that_does_not_stop(pool: Pool) -> None:
    victim = await pool.call("pid")
    with pytest.raises(corral.CallTimeout):
        async with pool.checkout() as worker:
            victim = worker.pid
            await worker.call("sleep", 30, timeout=0.2)  # time.sleep ignores cancellation
    assert await pool._wait_until(lambda: victim not in {w.pid for w in pool.workers}, 5)
    await pool.wait_ready(timeout=10)
    assert pool.stats().restarts == 1


async def test_pool_timeout_when_no_worker_frees_up(pool: Pool) -> None:
    async with pool.checkout(), pool.checkout():
        with pytest.raises(corral.PoolTimeout) as info:
            async with pool.checkout(timeout=0.1):
                pass
    assert isinstance(info.value, TimeoutError)


async def test_pool_closed_before_start_and_after_close() -> None:
    pool = Pool(TARGET, size=1)
    with pytest.raises(corral.PoolClosed, match="not started"):
        await pool.call("add", 1, 1)
    async with pool:
        pass
    with pytest.raises(corral.PoolClosed):
        await pool.call("add", 1, 1)


async def test_session_lost_once_then_a_fresh_session(pool: Pool) -> None:
    await pool.call("remember", "k", 1, session="s")
    with pytest.raises(corral.SessionLost) as info:
        await pool.call("exit_now", 1, session="s")
    assert isinstance(info.value, corral.WorkerCrashed)
    assert info.value.session == "s"
    assert await pool.call("recall", "k", session="s") is None  # fresh, reported once


async def test_session_lost_reported_to_the_next_call_when_none_was_in_flight() -> None:
    async with Pool(TARGET, size=1) as pool:
        await pool.call("remember", "k", 1, session="s")
        with pytest.raises(corral.WorkerCrashed) as info:
            await pool.call("exit_now", 1)  # not in the session: not told of its loss
        assert not isinstance(info.value, corral.SessionLost)
        with pytest.raises(corral.SessionLost):
            await pool.call("recall", "k", session="s")
        assert await pool.call("recall", "k", session="s") is None


async def test_worker_start_error_carries_the_stderr_tail() -> None:
    with pytest.raises(corral.WorkerStartError) as info:
        async with Pool("tests.workers.no_such_module:app", size=2):
            pass
    err = info.value
    assert "No module named 'tests.workers.no_such_module'" in (err.stderr_tail or "")
    assert err.exit_code == 3


async def test_worker_start_error_for_a_failing_startup_hook() -> None:
    with pytest.raises(corral.WorkerStartError) as info:
        async with Pool("tests.workers.bad:startup_fails", size=1):
            pass
    assert "model file missing" in (info.value.stderr_tail or "")


async def test_worker_start_error_when_the_target_is_not_an_app() -> None:
    with pytest.raises(corral.WorkerStartError) as info:
        async with Pool("tests.workers.bad:not_an_app", size=1):
            pass
    assert "not a corral.worker.App" in (info.value.stderr_tail or "")


async def test_protocol_error_evicts_the_worker(pool: Pool) -> None:
    async with pool.checkout() as worker:
        bad = worker.pid
        with pytest.raises(corral.ProtocolError) as info:
            await worker.call("write_garbage_to_wire")
        assert worker.failed
    assert info.value.worker_id == worker.id
    await pool.wait_ready(timeout=10)
    assert bad not in {w.pid for w in pool.workers}
    assert await pool.call("add", 1, 1) == 2


async def test_payload_too_large_is_refused_before_sending() -> None:
    async with Pool(TARGET, size=1, max_message_size=1024) as pool:
        pid = await pool.call("pid")
        with pytest.raises(corral.PayloadTooLarge) as info:
            await pool.call("echo", b"x" * 2048)
        assert info.value.method == "echo"
        with pytest.raises(corral.PayloadTooLarge):
            await pool.call("make_bytes", 4096)  # a result over the limit
        assert await pool.call("pid") == pid  # the worker stays


async def test_encode_error_is_a_type_error_and_nothing_is_sent(pool: Pool) -> None:
    with pytest.raises(corral.EncodeError) as info:
        await pool.call("echo", object())
    assert isinstance(info.value, TypeError)
    assert "object" in str(info.value)
    assert pool.stats().inflight == 0
    assert await pool.call("add", 1, 1) == 2


async def test_unencodable_result_is_a_remote_error_naming_the_type(pool: Pool) -> None:
    with pytest.raises(corral.RemoteError, match="object"):
        await pool.call("unencodable")
    assert await pool.call("add", 1, 1) == 2


async def test_pool_overloaded_when_the_queue_is_full() -> None:
    async with Pool(TARGET, size=1, max_concurrency=1, max_waiting=1) as pool:
        first = asyncio.ensure_future(pool.call("async_sleep", 0.5))
        await asyncio.sleep(0)  # one turn of the loop: it takes the only slot
        assert pool.stats().inflight == 1
        second = asyncio.ensure_future(pool.call("add", 1, 1))
        await asyncio.sleep(0)
        assert pool.stats().waiting == 1
        with pytest.raises(corral.PoolOverloaded):
            await pool.call("add", 2, 2)
        assert await second == 2
        assert await first == 0.5


async def test_pool_failed_when_workers_keep_failing_to_start(tmp_path) -> None:
    async with Pool(
        "tests.workers.bad:dies_after_first_start",
        size=1,
        max_restarts=1,
        restart_backoff=0.01,
        env={"CORRAL_TEST_MARKER": str(tmp_path / "started-once")},
    ) as pool:
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("die")
        with pytest.raises(corral.PoolFailed) as info:
            await pool.wait_ready(timeout=20)
        assert "refusing to start again" in (info.value.stderr_tail or "")
        with pytest.raises(corral.PoolFailed):
            await pool.call("die")
