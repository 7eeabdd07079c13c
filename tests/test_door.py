"""Checked at the door: what a caller passes is refused in the caller, before anything is sent.

A session id and a method name are ``str``; a timeout is a finite number of seconds > 0;
a target names a module and an attribute. Anything else is a TypeError or ValueError
raised by the call itself, and the worker, its sessions and the other callers' calls
go on as if nothing had happened.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

import corral
from corral import Pool, PoolConfig
from corral._door import (
    MAX_SECONDS,
    check_count,
    check_method,
    check_session,
    check_target,
    check_timeout,
)
from corral._messages import Call, WorkerBound

TARGET = "tests.workers.basic:app"

NOT_A_STRING = [123, b"user-42", ("user", 42), 1.5, ["user"], True]
NOT_A_SESSION = [pytest.param(v, id=type(v).__name__) for v in NOT_A_STRING]
NOT_A_METHOD = [pytest.param(v, id=type(v).__name__) for v in [*NOT_A_STRING, None]]

# (value, the error it must raise)
BAD_TIMEOUTS = [
    pytest.param(math.nan, ValueError, id="nan"),
    pytest.param(math.inf, ValueError, id="inf"),
    pytest.param(-math.inf, ValueError, id="-inf"),
    pytest.param(0, ValueError, id="zero"),
    pytest.param(-1.0, ValueError, id="negative"),
    pytest.param(1e300, ValueError, id="beyond-any-clock"),
    pytest.param(10**400, ValueError, id="beyond-any-float"),
    pytest.param("5", TypeError, id="str"),
    pytest.param(b"5", TypeError, id="bytes"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(Decimal("5"), TypeError, id="Decimal"),
    pytest.param([5], TypeError, id="list"),
]


@pytest.fixture
async def pool():
    async with Pool(TARGET, size=1) as pool:
        yield pool


async def _first(stream: Any) -> Any:
    async for item in stream:
        return item
    return None


# --- session ids ---------------------------------------------------------------------


async def test_a_bad_session_id_fails_its_own_call_and_nothing_else(pool: Pool) -> None:
    """Today's failure: session=123 reached the worker, which could not decode it and died."""
    await pool.call("remember", "k", "kept", session="good")
    pid = await pool.call("pid")
    innocent = asyncio.ensure_future(pool.call("async_sleep", 0.5))
    await asyncio.sleep(0)  # the innocent call is on the wire now
    with pytest.raises(TypeError, match="session"):
        await pool.call("add", 1, 2, session=123)  # type: ignore[arg-type]
    assert await innocent == 0.5
    assert await pool.call("recall", "k", session="good") == "kept"
    assert await pool.call("pid") == pid
    assert pool.stats().restarts == 0


@pytest.mark.parametrize("session", NOT_A_SESSION)
async def test_call_refuses_a_session_id_that_is_not_a_str(pool: Pool, session: Any) -> None:
    with pytest.raises(
        TypeError, match=r"session must be a str or None, got " + type(session).__name__
    ):
        await pool.call("add", 1, 2, session=session)
    assert await pool.call("add", 1, 2, session="s") == 3
    assert pool.stats().restarts == 0


@pytest.mark.parametrize("session", NOT_A_SESSION)
async def test_stream_refuses_a_session_id_that_is_not_a_str(pool: Pool, session: Any) -> None:
    with pytest.raises(TypeError, match="session must be a str or None"):
        pool.stream("count", 3, session=session)
    assert [x async for x in pool.stream("count", 2, session="s")] == [0, 1]
    assert pool.stats().restarts == 0


@pytest.mark.parametrize("session", NOT_A_SESSION)
async def test_checkout_refuses_a_session_id_that_is_not_a_str(pool: Pool, session: Any) -> None:
    with pytest.raises(TypeError, match="session must be a str or None"):
        pool.checkout(session=session)
    async with pool.checkout(session="s") as worker:
        assert await worker.call("add", 1, 2) == 3
    assert pool.stats().restarts == 0 and pool.stats().leased == 0


@pytest.mark.parametrize("session", [*NOT_A_SESSION, pytest.param(None, id="None")])
async def test_close_session_refuses_anything_but_a_str(pool: Pool, session: Any) -> None:
    await pool.call("remember", "k", 1, session="s")
    with pytest.raises(TypeError, match="session must be a str, got"):
        await pool.close_session(session)
    assert await pool.call("recall", "k", session="s") == 1
    assert pool.stats().restarts == 0


async def test_a_session_id_that_utf8_cannot_encode_is_refused(pool: Pool) -> None:
    with pytest.raises(ValueError, match="session"):
        await pool.call("add", 1, 2, session="user-\ud800")
    assert await pool.call("add", 1, 2) == 3


# --- method names --------------------------------------------------------------------


async def test_a_bad_method_name_fails_its_own_call_and_nothing_else(pool: Pool) -> None:
    pid = await pool.call("pid")
    innocent = asyncio.ensure_future(pool.call("async_sleep", 0.5))
    await asyncio.sleep(0)
    with pytest.raises(TypeError, match="method"):
        await pool.call(123)  # type: ignore[arg-type]
    assert await innocent == 0.5
    assert await pool.call("pid") == pid
    assert pool.stats().restarts == 0


@pytest.mark.parametrize("method", NOT_A_METHOD)
async def test_call_refuses_a_method_name_that_is_not_a_str(pool: Pool, method: Any) -> None:
    shown = "None" if method is None else type(method).__name__
    with pytest.raises(TypeError, match=r"method must be a str, got " + shown):
        await pool.call(method, 1, 2)
    assert pool.stats().restarts == 0


@pytest.mark.parametrize("method", NOT_A_METHOD)
async def test_stream_and_lease_refuse_a_method_name_that_is_not_a_str(
    pool: Pool, method: Any
) -> None:
    with pytest.raises(TypeError, match="method must be a str"):
        pool.stream(method, 3)
    async with pool.checkout() as worker:
        with pytest.raises(TypeError, match="method must be a str"):
            await worker.call(method, 1, 2)
        with pytest.raises(TypeError, match="method must be a str"):
            worker.stream(method, 3)
        assert await worker.call("add", 1, 2) == 3
    assert pool.stats().restarts == 0


async def test_retries_must_be_a_count(pool: Pool) -> None:
    with pytest.raises(TypeError, match="retries"):
        await pool.call("add", 1, 2, retries="2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retries"):
        await pool.call("add", 1, 2, retries=-1)


# --- timeouts ------------------------------------------------------------------------


def _timeout_takers(pool: Pool) -> dict[str, Callable[[Any], Awaitable[Any]]]:
    async def in_lease(use: Callable[[corral.WorkerLease], Awaitable[Any]]) -> Any:
        async with pool.checkout() as worker:
            return await use(worker)

    return {
        "call": lambda t: pool.call("add", 1, 2, timeout=t),
        "stream": lambda t: _first(pool.stream("count", 3, timeout=t)),
        "checkout": lambda t: _enter(pool.checkout(timeout=t)),
        "lease.call": lambda t: in_lease(lambda w: w.call("add", 1, 2, timeout=t)),
        "lease.stream": lambda t: in_lease(lambda w: _first(w.stream("count", 3, timeout=t))),
        "wait_ready": lambda t: pool.wait_ready(timeout=t),
        "wait_idle": lambda t: pool.wait_idle(timeout=t),
        "reload": lambda t: pool.reload(timeout=t),
    }


async def _enter(checkout: Any) -> None:
    async with checkout:
        pass


TAKERS = [
    "call",
    "stream",
    "checkout",
    "lease.call",
    "lease.stream",
    "wait_ready",
    "wait_idle",
    "reload",
]


@pytest.mark.parametrize("taker", TAKERS)
async def test_every_timeout_is_a_finite_number_of_seconds(pool: Pool, taker: str) -> None:
    pid = await pool.call("pid")
    for case in BAD_TIMEOUTS:
        timeout, error = case.values
        with pytest.raises(error, match="timeout must be"):  # type: ignore[call-overload]
            await _timeout_takers(pool)[taker](timeout)
    assert await pool.call("pid") == pid
    stats = pool.stats()
    assert stats.leased == 0 and stats.waiting == 0 and stats.restarts == 0


async def test_a_nan_timeout_leaves_the_event_loop_alone(pool: Pool) -> None:
    """Today's failure: a nan deadline on the loop's timer heap stalled later sleeps."""
    for _ in range(20):
        with pytest.raises(ValueError, match="timeout must be"):
            await pool.call("add", 1, 2, timeout=math.nan)
    loop = asyncio.get_running_loop()
    assert not any(math.isnan(h.when()) for h in loop._scheduled)  # type: ignore[attr-defined]
    assert await asyncio.wait_for(pool.call("add", 1, 2), 10) == 3


async def test_good_timeouts_of_any_real_type_are_taken(pool: Pool) -> None:
    assert await pool.call("add", 1, 2, timeout=5) == 3
    assert await pool.call("add", 1, 2, timeout=5.0) == 3
    assert await pool.call("add", 1, 2, timeout=None) == 3


DURATIONS = [
    "call_timeout",
    "idle_timeout",
    "startup_timeout",
    "cancel_grace",
    "drain_timeout",
    "shutdown_grace",
    "kill_grace",
    "restart_window",
    "restart_backoff",
    "restart_backoff_max",
    "heartbeat_interval",
    "heartbeat_timeout",
    "max_lifetime",
    "session_ttl",
    "max_spawn_rate",
]


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize(("value", "error"), BAD_TIMEOUTS)
def test_every_duration_option_is_checked_like_a_timeout(
    name: str, value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match=f"{name} must be"):
        PoolConfig(**{name: value})
    with pytest.raises(error, match=f"{name} must be"):
        Pool(TARGET, **{name: value})


COUNTS = [
    "size",
    "max_concurrency",
    "max_message_size",
    "max_waiting",
    "max_restarts",
    "stream_window",
    "max_requests",
    "max_memory",
    "max_memory_hard",
    "max_sessions_per_worker",
    "large_buffer_threshold",
]


@pytest.mark.parametrize("name", COUNTS)
@pytest.mark.parametrize("value", [1.5, "4", True, math.nan], ids=["float", "str", "bool", "nan"])
def test_every_count_option_is_an_int(name: str, value: Any) -> None:
    with pytest.raises(TypeError, match=f"{name} must be an int"):
        PoolConfig(**{name: value})


def test_good_options_still_build() -> None:
    config = PoolConfig(call_timeout=5, session_ttl=0.5, stream_window=4, max_waiting=0)
    assert config.call_timeout == 5 and config.stream_window == 4


# --- targets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        ":app",
        "workers:",
        "workers",
        "",
        "workers::app",
        "work ers:app",
        "workers:app.",
        "1x:app",
        "workers.py:app",
        "class.x:app",
    ],
)
def test_a_malformed_target_is_refused_before_any_process_starts(target: str) -> None:
    with pytest.raises(ValueError, match=r"target must look like 'package\.module:app'"):
        Pool(target)


def test_a_target_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="target must be a str"):
        Pool(42)  # type: ignore[arg-type]


def test_a_target_naming_a_function_is_refused_before_any_process_starts() -> None:
    with pytest.raises(
        TypeError, match=r"`tests.workers.door:add` is a function, not a corral.worker.App"
    ):
        Pool("tests.workers.door:add")


def test_a_target_naming_a_decorated_handler_is_refused() -> None:
    """The new user's mistake: naming the handler instead of the App."""
    with pytest.raises(TypeError, match=r"`tests.workers.basic:add` is a function, not a corral"):
        Pool("tests.workers.basic:add")


def test_a_target_naming_a_coroutine_function_is_refused() -> None:
    with pytest.raises(TypeError, match=r"is a coroutine function, not a corral.worker.App"):
        Pool("tests.workers.door:fetch")


async def test_a_factory_target_still_works() -> None:
    async with Pool("tests.workers.door:make_app", size=1) as pool:
        assert await pool.call("positive", 2) == 2


async def test_a_function_the_parent_cannot_see_is_named_by_the_worker() -> None:
    """The worker's own check: said the same way when the parent could not look."""
    with pytest.raises(corral.WorkerStartError) as caught:
        async with Pool("tests.workers.door:add", size=1, python=_same_python()) as pool:
            await pool.call("positive", 1)
    assert "is a function, not a corral.worker.App" in caught.value.stderr_tail


def _same_python() -> str:
    import sys

    return sys.executable


# --- what errors say -----------------------------------------------------------------


async def test_call_on_an_async_generator_says_an(pool: Pool) -> None:
    with pytest.raises(corral.RemoteError, match=r"is an async generator: use pool\.stream\(\)"):
        await pool.call("count", 3)


async def test_method_not_found_names_itself_once(pool: Pool) -> None:
    with pytest.raises(corral.MethodNotFound) as caught:
        await pool.call("nope")
    text = str(caught.value)
    assert text.startswith("no handler named 'nope'")
    assert "MethodNotFound" not in text


async def test_a_failed_assertion_says_where() -> None:
    async with Pool("tests.workers.door:app", size=1) as pool:
        with pytest.raises(corral.RemoteError) as caught:
            await pool.call("positive", -1)
    error = caught.value
    assert error.type == "AssertionError"
    assert "door.py" in error.message and "assert n > 0" in error.message
    assert str(error).startswith("AssertionError: assertion failed at ")


async def test_a_set_arrives_as_a_list(pool: Pool) -> None:
    """Documented (docs/api.md): MessagePack has no set; a set travels as a list, like a tuple."""
    assert sorted(await pool.call("echo", {3, 1, 2})) == [1, 2, 3]
    assert await pool.call("echo", frozenset()) == []


# --- the other places a duration is taken ------------------------------------------


@pytest.mark.parametrize(("value", "error"), BAD_TIMEOUTS)
@pytest.mark.parametrize("name", ["startup_timeout", "read_timeout", "kill_grace"])
def test_tool_pool_durations_are_checked_like_a_timeout(
    name: str, value: Any, error: type[Exception]
) -> None:
    from corral.tools import ToolPool

    if name == "kill_grace" and value == 0:
        assert ToolPool("cat", mode="pipes", kill_grace=0).kill_grace == 0  # kill at once
        return
    with pytest.raises(error, match=f"{name} must be"):
        ToolPool("cat", mode="pipes", **{name: value})


async def test_tool_reads_check_their_timeouts_before_reaching_the_program() -> None:
    from corral.tools import ToolPool

    async with ToolPool("cat", mode="pipes", size=1) as tools:
        async with tools.instance() as cat:
            for case in BAD_TIMEOUTS:
                value, error = case.values
                with pytest.raises(error, match="timeout must be"):  # type: ignore[call-overload]
                    await cat.read_until("x", timeout=value)
                with pytest.raises(error, match="quiet must be"):  # type: ignore[call-overload]
                    await cat.read_until("x", timeout=1.0, quiet=value)
                with pytest.raises(error, match="timeout must be"):  # type: ignore[call-overload]
                    await cat.health(timeout=value)
            assert await cat.send("hello") > 0
            assert (await cat.read_until("hello", timeout=10.0)).matched
        with pytest.raises(ValueError, match="timeout must be"):
            tools.instance(timeout=math.nan)


@pytest.mark.parametrize(("value", "error"), BAD_TIMEOUTS)
@pytest.mark.parametrize("name", ["start_timeout", "handshake_timeout", "kill_timeout"])
def test_launcher_durations_are_checked_like_a_timeout(
    name: str, value: Any, error: type[Exception]
) -> None:
    from corral._launch._socket_launcher import SubprocessShimLauncher

    with pytest.raises(error, match=f"{name} must be"):
        SubprocessShimLauncher(**{name: value})


@pytest.mark.parametrize("env", [{"A": 1}, {1: "a"}, {"A=B": "c"}, {"A": "b\0c"}, {"": "x"}])
def test_env_must_map_names_to_text(env: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="env"):
        Pool(TARGET, env=env)


@pytest.mark.parametrize("name", [42, "pool\n1", "pool\x00"])
def test_a_pool_name_is_printable_text(name: Any) -> None:
    with pytest.raises(TypeError, match="name must be a printable str"):
        Pool(TARGET, name=name)


@pytest.mark.parametrize(("value", "error"), BAD_TIMEOUTS)
def test_the_checkout_dependency_checks_its_timeout_when_built(
    value: Any, error: type[Exception]
) -> None:
    from corral.asgi import checkout_dependency

    with pytest.raises(error, match="timeout must be"):
        checkout_dependency(timeout=value)


# --- properties: whatever a caller passes, the frame the worker gets decodes -------

_ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(),
    st.decimals(allow_nan=True),
    st.fractions(),
    st.tuples(st.text(), st.integers()),
    st.lists(st.integers(), max_size=3),
    st.sampled_from(
        [math.nan, math.inf, -0.0, 1e-300, MAX_SECONDS * 2, 10**400, Fraction(10**400), "\ud800"]
    ),
)
_WORKER_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(WorkerBound)  # type: ignore[arg-type]


@given(method=_ANYTHING | st.text(), session=_ANYTHING | st.text(), timeout=_ANYTHING)
def test_anything_passed_is_refused_or_becomes_a_frame_the_worker_decodes(
    method: Any, session: Any, timeout: Any
) -> None:
    try:
        checked = (check_method(method), check_session(session), check_timeout(timeout))
    except (TypeError, ValueError):
        return
    name, sid, seconds = checked
    assert seconds is None or (isinstance(seconds, float) and 0 < seconds <= MAX_SECONDS)
    frame = msgspec.msgpack.encode(Call(1, name, (), {}, sid, seconds))
    call = _WORKER_DECODER.decode(frame)
    assert isinstance(call, Call) and (call.method, call.session) == (name, sid)


@given(value=_ANYTHING)
def test_a_count_is_an_int_in_range_or_refused(value: Any) -> None:
    try:
        count, refused = check_count(value, "n", minimum=1), ""
    except (TypeError, ValueError) as exc:
        count, refused = None, str(exc)
    if count is None:
        assert refused.startswith("n must be")
    else:
        assert type(count) is int and count >= 1 and not isinstance(value, bool)


# --- the parent's reading of a target: sure, or silent ------------------------------

_APP = "from corral.worker import App\napp = App()\n"
# Targets the parent must not refuse: each either is an App (or a factory), or is
# bound in a way a reading cannot follow, so the worker decides.
NOT_REFUSED = {
    "rebound": _APP + "def target(a): ...\ntarget = app\n",
    "factory": _APP + "def target(debug=False):\n    return app\n",
    "imported": _APP + "from os.path import join as target\n",
    "star": _APP + "from os.path import *\ndef target(a): ...\n",
    "getattr": _APP + "def target(a): ...\ndef __getattr__(name): return app\n",
    "decorated": _APP + "import functools\n@functools.cache\ndef target(a): ...\n",
    "global": _APP + "def target(a): ...\ndef swap():\n    global target\n    target = app\n",
    "in_match": _APP + "def target(a): ...\nmatch 1:\n    case 1:\n        target = app\n",
    "a_class": _APP + "class target:\n    def __init__(self, a): ...\n",
    "unparsable": "def target(a):\n    return (\n",
}


@pytest.mark.parametrize("source", NOT_REFUSED.values(), ids=list(NOT_REFUSED))
def test_the_parent_refuses_only_what_it_can_be_sure_of(
    source: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "door_target_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert check_target("door_target_mod:target") == "door_target_mod:target"


def test_the_parent_reads_a_package_module_without_running_its_init(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "door_target_pkg"
    package.mkdir()
    ran = tmp_path / "init-ran"
    (package / "__init__.py").write_text(f"open({str(ran)!r}, 'w').close()\n")
    (package / "workers.py").write_text(_APP + "@app.handler\ndef add(a, b): return a + b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match=r"did you mean `door_target_pkg\.workers:app`\?"):
        check_target("door_target_pkg.workers:add")
    assert not ran.exists()
