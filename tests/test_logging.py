"""Where corral's log events go (``corral._log``), and repeated events summarized.

With structlog left unconfigured, events go to the standard library's logging
(logger ``corral`` and its children) and so, with nothing configured either, only
warnings and errors appear, on stderr. With structlog configured by the
application, they go through that configuration. The choice is made per event.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

import corral
from corral import Pool
from corral._log import Repeats, get_logger

TARGET = "tests.workers.basic:app"


@pytest.fixture
def structlog_unconfigured() -> Iterator[None]:
    """structlog as a fresh process has it (not configured); restored after."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    structlog.reset_defaults()
    assert not structlog.is_configured()
    try:
        yield
    finally:
        if was_configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()


def test_unconfigured_events_go_to_the_standard_library_with_bound_fields(
    structlog_unconfigured: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = get_logger("corral.worker").bind(worker_id="pool1-w1", pid=42)
    with caplog.at_level(logging.DEBUG, logger="corral"):
        log.info("worker.started", call_id=7, target="a b")
    [record] = caplog.records
    assert record.name == "corral.worker"
    assert record.levelno == logging.INFO
    assert record.getMessage() == "worker.started worker_id=pool1-w1 pid=42 call_id=7 target='a b'"
    assert record.corral == {  # type: ignore[attr-defined]
        "event": "worker.started",
        "worker_id": "pool1-w1",
        "pid": 42,
        "call_id": 7,
        "target": "a b",
    }
    assert record.filename == "test_logging.py"  # the caller's line, not the helper's


def test_unconfigured_below_warning_is_dropped_by_default_levels(
    structlog_unconfigured: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = get_logger("corral")
    with caplog.at_level(logging.WARNING, logger="corral"):
        log.debug("quiet.debug")
        log.info("quiet.info")
        log.warning("loud.warning", n=1)
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("loud.error")
    assert [r.getMessage() for r in caplog.records] == ["loud.warning n=1", "loud.error"]
    assert caplog.records[1].exc_info is not None
    assert caplog.records[1].levelno == logging.ERROR


def test_configured_structlog_gets_the_events_even_when_configured_after_the_logger(
    structlog_unconfigured: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = get_logger("corral").bind(pool="p", worker_id="p-w1")  # made before configure
    with caplog.at_level(logging.DEBUG), capture_logs() as logs:
        log.debug("worker.spawning", call_id=3)
    assert logs == [
        {
            "event": "worker.spawning",
            "log_level": "debug",
            "pool": "p",
            "worker_id": "p-w1",
            "call_id": 3,
        }
    ]
    assert caplog.records == []  # not both


async def test_pool_events_reach_the_standard_library_unconfigured(
    structlog_unconfigured: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="corral"):
        async with Pool(TARGET, size=1, name="stdlib") as pool:
            worker = pool.workers[0]
            await pool.call("add", 1, 2)
    ready = [r for r in caplog.records if r.corral["event"] == "worker.ready"]  # type: ignore[attr-defined]
    assert len(ready) == 1
    assert ready[0].name == "corral"
    assert ready[0].corral["worker_id"] == worker.id  # type: ignore[attr-defined]
    assert ready[0].corral["pool"] == "stdlib"  # type: ignore[attr-defined]


# --- repeated events -----------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_repeats_log_the_first_then_one_line_with_the_count(
    structlog_unconfigured: None, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _Clock()
    repeats = Repeats(get_logger("corral"), interval=1.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="corral"):
        for i in range(1000):
            repeats.log("warning", "Overloaded", "call.failed", call_id=i)
        repeats.log("warning", "Other", "call.failed", call_id=-1)  # its own key
        assert [r.corral.get("call_id") for r in caplog.records] == [0, -1]  # type: ignore[attr-defined]
        clock.now += 1.5
        repeats.log("warning", "Overloaded", "call.failed", call_id=1000)
        repeats.flush()
    fields = [r.corral for r in caplog.records]  # type: ignore[attr-defined]
    assert fields[2] == {"event": "call.failed", "call_id": 999, "repeated": 999}
    assert fields[3] == {"event": "call.failed", "call_id": 1000}
    assert len(fields) == 4  # flush had nothing held back


def test_repeats_forget_quiet_keys() -> None:
    clock = _Clock()
    repeats = Repeats(get_logger("corral"), interval=1.0, clock=clock)
    for i in range(5000):
        repeats.log("info", ("MethodNotFound", f"m{i}"), "call.failed")
    assert len(repeats._windows) <= 1024


async def test_repeats_log_the_count_when_the_interval_ends_without_another_event(
    structlog_unconfigured: None, caplog: pytest.LogCaptureFixture
) -> None:
    summarized = asyncio.Event()

    class Signal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "repeated" in record.corral:  # type: ignore[attr-defined]
                summarized.set()

    handler = Signal()
    logging.getLogger("corral").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="corral"):
            repeats = Repeats(get_logger("corral"), interval=0.05)
            for _ in range(3):
                repeats.log("warning", "k", "call.failed")
            await asyncio.wait_for(summarized.wait(), 10)
    finally:
        logging.getLogger("corral").removeHandler(handler)
    assert [r.corral.get("repeated") for r in caplog.records] == [None, 2]  # type: ignore[attr-defined]


async def test_an_overloaded_pool_logs_a_count_not_a_line_per_shed_call() -> None:
    shed = 2000
    with capture_logs() as logs:
        async with Pool(TARGET, size=1, max_concurrency=1, max_waiting=1) as pool:
            busy = asyncio.ensure_future(pool.call("sleep", 30))
            waiting = asyncio.ensure_future(pool.call("add", 1, 1))
            assert await pool._wait_until(lambda: pool.stats().waiting == 1, 10)
            for _ in range(shed):
                with pytest.raises(corral.PoolOverloaded):
                    await pool.call("add", 2, 2)
            busy.cancel()
            assert await waiting == 2
            with pytest.raises(asyncio.CancelledError):
                await busy
            assert pool.stats().calls_failed["PoolOverloaded"] == shed
    lines = [e for e in logs if e["event"] == "call.failed" and e["error_type"] == "PoolOverloaded"]
    assert len(lines) <= 1 + 60  # the first, then at most one per second of the test
    assert sum(e.get("repeated", 1) for e in lines) == shed  # a summary stands for `repeated`


async def test_a_worker_logs_to_its_stderr_through_the_standard_library_with_its_ids(
    structlog_unconfigured: None,
) -> None:
    # Unconfigured in the worker too: the event goes through the worker's logging
    # (WARNING and above, on its stderr), with the traceback, and reaches the error.
    with pytest.raises(corral.WorkerStartError) as caught:
        async with Pool("tests.workers.bad:startup_fails", size=1, max_restarts=0):
            pass
    tail = caught.value.stderr_tail or ""
    assert "worker.startup_failed worker_id=" in tail, tail
    assert "RuntimeError: model file missing" in tail
    assert "Traceback" in tail


def test_worker_start_imports_neither_structlog_nor_rich() -> None:
    # What a worker process imports before it loads the application's module:
    # importing structlog would import rich too, when rich is installed.
    code = (
        "import sys, corral.worker.__main__, corral.worker._runtime\n"
        "print(sorted(m for m in ('structlog', 'rich') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
