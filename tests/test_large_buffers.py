"""Large buffers out of band: bytes over the threshold travel through /dev/shm.

Round trips must be exact at every size around the threshold, and no segment may
outlive its message: not after a normal call, not after a worker crash (before or
after it wrote its result, or in the middle of writing it), not after the pool's
own process is SIGKILLed, not after close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import msgspec
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests._processes import parent_program
from tests.workers.large import pattern

import corral
from corral import Pool
from corral._errors import ProtocolError
from corral._framing import FrameDecoder, FrameEncoder
from corral._messages import ParentBound, Result
from corral._shm import SHM_DIR, LargeBuffers, LostSegment, new_pool_prefix

TARGET = "tests.workers.large:app"
ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = 1024  # small, so that examples stay small
POOLED = re.compile(r"-[pw]s\d+$")  # a segment a sender keeps for reuse
# Crash safety holds whatever large bytes arrive as (copies, or views of their segments).
RECEIVED_AS = pytest.mark.parametrize("received_as", ["bytes", "memoryview"])


def segments(prefix: str, pooled: bool = False) -> list[str]:
    """Segments under ``prefix``: in flight, or also those kept for reuse (``<p|w>s<k>``)."""
    return sorted(
        name
        for name in os.listdir(SHM_DIR)
        if name.startswith(prefix) and (pooled or not POOLED.search(name))
    )


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Block until ``condition()`` holds (checked every millisecond) or the timeout passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


async def block_worker(
    pool: Pool, fifo: Path, size: int = 10
) -> tuple[asyncio.Future[Any], IO[bytes]]:
    """Start a call that blocks its worker's loop; returns once the handler waits.

    The handler waits for one byte on the FIFO: write it to ``writer`` to let it go.
    """
    os.mkfifo(fifo)
    blocked = asyncio.ensure_future(pool.call("make_after_fifo", str(fifo), size))
    writer = await asyncio.to_thread(open, fifo, "wb", buffering=0)  # once the handler opened it
    return blocked, writer


def ended(process: psutil.Process) -> bool:
    """The process has exited (reaped or not)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def plain(value: Any) -> Any:
    """What a value looks like on arrival: arrays as lists, every buffer as bytes."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


sizes = st.one_of(
    st.integers(0, 16),
    st.integers(THRESHOLD - 2, THRESHOLD + 2),
    st.integers(THRESHOLD + 3, 6 * THRESHOLD),
)
buffers = st.builds(
    lambda n, kind, fill: kind(bytes([fill]) * n),
    sizes,
    st.sampled_from([bytes, bytearray, memoryview]),
    st.integers(0, 255),
)
values = st.recursive(
    buffers | st.integers(-(2**63), 2**63) | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


def test_values_round_trip_exactly_at_every_size_around_the_threshold() -> None:
    with asyncio.Runner() as runner:
        pool = Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD)
        runner.run(pool.start())
        try:

            @settings(
                max_examples=60,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(
                args=st.lists(values, max_size=3),
                kwargs=st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=2),
            )
            def round_trip(args: list[Any], kwargs: dict[str, Any]) -> None:
                result = runner.run(pool.call("echo_all", *args, **kwargs))
                assert result == [plain(args), plain(kwargs)]
                assert segments(pool._shm_prefix) == []

            round_trip()
        finally:
            runner.run(pool.aclose())


@pytest.mark.parametrize("size", [THRESHOLD, THRESHOLD + 1, 3 * 2**20])
async def test_large_results_and_nested_results_arrive_whole(size: int) -> None:
    async with Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD) as pool:
        assert await pool.call("make", size) == pattern(size)
        assert await pool.call("make", size, nested=True) == {"outer": [1, ["x", pattern(size)]]}
        assert segments(pool._shm_prefix) == []


async def test_a_forked_worker_passes_large_buffers_both_ways() -> None:
    async with Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD, preload=["json"]) as pool:
        prefix = pool.workers[0].spec.shm_prefix
        data = pattern(THRESHOLD * 16)
        assert await pool.call("echo", data) == data
        assert segments(prefix) == []


async def test_stream_chunks_over_the_threshold_arrive_whole() -> None:
    async with Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD) as pool:
        items = [item async for item in pool.stream("chunks", 5, THRESHOLD - 2)]
        assert items == [pattern(THRESHOLD - 2 + i) for i in range(5)]
        assert segments(pool._shm_prefix) == []


async def test_a_queued_large_argument_waits_in_shared_memory_not_in_the_pipe(
    tmp_path: Path,
) -> None:
    async with Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD) as pool:
        worker = pool.workers[0]
        blocked, writer = await block_worker(pool, tmp_path / "go")
        queued = asyncio.ensure_future(pool.call("echo", pattern(THRESHOLD * 8)))
        assert await pool._wait_until(lambda: worker.inflight == 2, 5)
        assert [n[len(worker.spec.shm_prefix) :] for n in segments(worker.spec.shm_prefix)] == [
            "p1"
        ]
        with writer:
            writer.write(b"g")
        assert await blocked == pattern(10)
        assert await queued == pattern(THRESHOLD * 8)
        assert segments(pool._shm_prefix) == []


@pytest.mark.parametrize("threshold", [None, 0])
async def test_a_disabled_threshold_keeps_every_buffer_on_the_pipes(
    tmp_path: Path, threshold: int | None
) -> None:
    async with Pool(TARGET, size=1, large_buffer_threshold=threshold) as pool:
        worker = pool.workers[0]
        blocked, writer = await block_worker(pool, tmp_path / "go", 4 * 2**20)
        queued = asyncio.ensure_future(pool.call("echo", pattern(4 * 2**20)))
        assert await pool._wait_until(lambda: worker.inflight == 2, 5)
        assert segments(pool._shm_prefix) == []
        assert "--shm-prefix" not in worker.spec.command(3, 4, 5)
        with writer:
            writer.write(b"g")
        assert await blocked == pattern(4 * 2**20)
        assert await queued == pattern(4 * 2**20)


@RECEIVED_AS
async def test_a_worker_killed_before_reading_a_large_argument_leaves_no_segment(
    tmp_path: Path, received_as: str
) -> None:
    async with Pool(
        TARGET, size=1, large_buffer_threshold=THRESHOLD, large_bytes=received_as
    ) as pool:
        worker = pool.workers[0]
        blocked, writer = await block_worker(pool, tmp_path / "never")
        queued = asyncio.ensure_future(pool.call("echo", pattern(THRESHOLD * 8)))
        assert await pool._wait_until(lambda: worker.inflight == 2, 5)
        assert segments(worker.spec.shm_prefix) != []
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        for call in (blocked, queued):
            with pytest.raises(corral.WorkerCrashed):
                await call
        writer.close()
        # The pool has noticed (the callers were told): nothing is left.
        assert segments(worker.spec.shm_prefix, pooled=True) == []
        await pool.wait_ready(timeout=30)
        assert await pool.call("echo", pattern(THRESHOLD * 2)) == pattern(THRESHOLD * 2)
    assert segments(pool._shm_prefix, pooled=True) == []


@RECEIVED_AS
@pytest.mark.parametrize("preload", [(), ("json",)], ids=["spawned", "forked"])
async def test_a_worker_killed_after_writing_its_result_leaves_no_segment(
    tmp_path: Path, preload: tuple[str, ...], received_as: str
) -> None:
    # A forked worker (preload) has a forked shepherd: it must unlink the same way.
    async with Pool(
        TARGET,
        size=1,
        large_buffer_threshold=THRESHOLD,
        preload=list(preload),
        large_bytes=received_as,
    ) as pool:
        worker = pool.workers[0]
        prefix = worker.spec.shm_prefix
        assert worker.pid is not None and worker._launched is not None
        shepherd = psutil.Process(worker._launched.pid)
        call, writer = await block_worker(pool, tmp_path / "go", THRESHOLD * 8)
        # From here the pool's loop is blocked, so it reads nothing: the worker
        # writes its result segment and frame, then dies before the pool reads them.
        with writer:
            writer.write(b"g")
        assert wait_for(lambda: segments(prefix) == [prefix + "w1"])
        os.kill(worker.pid, signal.SIGKILL)
        # The shepherd unlinks what its worker left, then exits.
        assert wait_for(lambda: ended(shepherd))
        assert segments(prefix, pooled=True) == []
        # The Result frame names a segment that is gone: the exit status decides.
        with pytest.raises(corral.WorkerCrashed) as info:
            await call
        assert info.value.exit_code == -signal.SIGKILL
        assert segments(prefix, pooled=True) == []


async def test_a_worker_that_dies_while_writing_a_result_leaves_no_segment() -> None:
    async with Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD) as pool:
        prefix = pool.workers[0].spec.shm_prefix
        with pytest.raises(corral.WorkerCrashed) as info:
            await pool.call("die_while_writing", 4 * 2**20)
        assert info.value.exit_code == -signal.SIGKILL
        assert segments(prefix, pooled=True) == []


@RECEIVED_AS
async def test_the_pool_unlinks_what_a_worker_left_when_its_shepherd_is_gone_too(
    tmp_path: Path, received_as: str
) -> None:
    async with Pool(
        TARGET, size=1, large_buffer_threshold=THRESHOLD, large_bytes=received_as
    ) as pool:
        worker = pool.workers[0]
        assert worker._launched is not None
        blocked, writer = await block_worker(pool, tmp_path / "never")
        queued = asyncio.ensure_future(pool.call("echo", pattern(THRESHOLD * 8)))
        assert await pool._wait_until(lambda: worker.inflight == 2, 5)
        # SIGKILL the shepherd: it cleans nothing; the worker dies of its parent-death
        # signal, and the pool alone must unlink the queued argument's segment.
        os.kill(worker._launched.pid, signal.SIGKILL)
        for call in (blocked, queued):
            with pytest.raises(corral.WorkerCrashed):
                await call
        writer.close()
        assert segments(worker.spec.shm_prefix, pooled=True) == []


@RECEIVED_AS
async def test_closing_the_pool_with_large_calls_in_flight_leaves_nothing(
    tmp_path: Path, received_as: str
) -> None:
    pool = Pool(
        TARGET,
        size=1,
        large_buffer_threshold=THRESHOLD,
        drain_timeout=0.2,
        large_bytes=received_as,
    )
    await pool.start()
    prefix = pool._shm_prefix
    assert await pool.call("echo", pattern(THRESHOLD * 4)) == pattern(THRESHOLD * 4)
    blocked, writer = await block_worker(pool, tmp_path / "never")
    queued = asyncio.ensure_future(pool.call("echo", pattern(THRESHOLD * 8)))
    assert await pool._wait_until(lambda: pool.workers[0].inflight == 2, 5)
    assert segments(prefix) != []
    await pool.aclose()
    writer.close()
    for call in (blocked, queued):
        with pytest.raises(corral.PoolClosed):
            await call
    assert segments(prefix, pooled=True) == []


async def test_a_large_argument_over_the_message_limit_is_refused_before_any_write() -> None:
    async with Pool(
        TARGET, size=1, large_buffer_threshold=THRESHOLD, max_message_size=64 * 1024
    ) as pool:
        with pytest.raises(corral.PayloadTooLarge):
            await pool.call("echo", pattern(65 * 1024))
        with pytest.raises(corral.PayloadTooLarge):
            await pool.call("make", 65 * 1024)
        assert segments(pool._shm_prefix) == []
        assert await pool.call("echo", pattern(32 * 1024)) == pattern(32 * 1024)


async def test_an_argument_that_cannot_be_encoded_leaves_no_segment() -> None:
    async with Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD) as pool:
        with pytest.raises(corral.EncodeError):
            await pool.call("echo_all", pattern(THRESHOLD * 4), object())
        with pytest.raises(corral.EncodeError):
            await pool.call("echo_all", [pattern(THRESHOLD * 4), object()])
        assert segments(pool._shm_prefix) == []
        assert await pool.call("echo", pattern(THRESHOLD * 4)) == pattern(THRESHOLD * 4)


# --- the parent's process dies --------------------------------------------------------

PARENT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from corral import Pool
    from tests.workers.large import pattern

    async def main():
        fifo = sys.argv[1]
        async with Pool(
            "tests.workers.large:app", size=1, large_buffer_threshold=1024, large_bytes=sys.argv[2]
        ) as pool:
            worker = pool.workers[0]
            blocked = asyncio.ensure_future(pool.call("make_after_fifo", fifo, 8192))
            held = await asyncio.to_thread(open, fifo, "wb", buffering=0)  # the handler waits
            queued = asyncio.ensure_future(pool.call("echo", pattern(16384)))
            assert await pool._wait_until(lambda: worker.inflight == 2, 10)
            report = {
                "prefix": worker.spec.shm_prefix,
                "pids": [worker.pid, worker._launched.pid],
            }
            sys.stdout.write(json.dumps(report) + "\\n")
            sys.stdout.flush()
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


@RECEIVED_AS
def test_parent_sigkill_mid_call_leaves_no_segment(tmp_path: Path, received_as: str) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    with parent_program(PARENT, str(fifo), received_as, reports='{"prefix"') as (parent, report):
        prefix = report["prefix"]
        assert segments(prefix) == [prefix + "p1"]  # the queued argument
        # Stop the parent so it reads nothing more, then let the worker answer:
        # its results wait in segments that only the shepherd can now clean.
        os.kill(parent.pid, signal.SIGSTOP)
        with open(fifo, "wb", buffering=0) as writer:
            writer.write(b"g")
        assert wait_for(lambda: prefix + "w1" in segments(prefix))
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        procs = []
        for pid in report["pids"]:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=5)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert segments(prefix, pooled=True) == []


# --- references, decoded by hand ---------------------------------------------------------


def _reference(name: str, size: int) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(1, size.to_bytes(8, "big") + name.encode())


def _decode_result(large: LargeBuffers | None, value: Any) -> list[Any]:
    frame = FrameEncoder().encode(Result(1, value))
    decoder: FrameDecoder[Any] = FrameDecoder(ParentBound, large_buffers=large)  # type: ignore[arg-type]
    return decoder.feed(frame)


def test_a_reference_outside_the_workers_prefix_is_a_protocol_error() -> None:
    ours = LargeBuffers(new_pool_prefix() + "1-", THRESHOLD, "p")
    other = new_pool_prefix() + "1-w1"
    path = os.path.join(SHM_DIR, other)
    Path(path).write_bytes(b"x" * 10)
    try:
        with pytest.raises(ProtocolError, match="outside this worker"):
            _decode_result(ours, _reference(other, 10))
        assert os.path.exists(path)  # never opened, never unlinked
    finally:
        os.unlink(path)


def test_a_reference_whose_size_does_not_match_is_a_protocol_error() -> None:
    large = LargeBuffers(new_pool_prefix() + "1-", THRESHOLD, "p")
    name = large.prefix + "w1"
    Path(SHM_DIR, name).write_bytes(b"x" * 10)
    with pytest.raises(ProtocolError, match="holds 10 bytes"):
        _decode_result(large, _reference(name, 11))
    assert segments(large.prefix) == []  # unlinked all the same


def test_a_missing_segment_is_a_lost_segment() -> None:
    large = LargeBuffers(new_pool_prefix() + "1-", THRESHOLD, "p")
    with pytest.raises(LostSegment):
        _decode_result(large, _reference(large.prefix + "w7", 10))


def test_frames_before_a_lost_segment_are_delivered_and_the_loss_reported_after() -> None:
    # A worker that sent a small result, then a large one, then died: the first
    # result arrived whole and must reach its caller.
    large = LargeBuffers(new_pool_prefix() + "1-", THRESHOLD, "p")
    encoder = FrameEncoder()
    frames = encoder.encode(Result(1, "whole")) + encoder.encode(
        Result(2, _reference(large.prefix + "w7", 10))
    )
    decoder: FrameDecoder[Any] = FrameDecoder(ParentBound, large_buffers=large)  # type: ignore[arg-type]
    assert decoder.feed(frames) == [Result(1, "whole")]
    assert isinstance(decoder.failed, LostSegment)
    with pytest.raises(LostSegment):
        decoder.feed(b"")


def test_a_reference_over_the_message_limit_is_refused() -> None:
    large = LargeBuffers(new_pool_prefix() + "1-", THRESHOLD, "w")
    sender = LargeBuffers(large.prefix, THRESHOLD, "p")
    frame = FrameEncoder(1 << 20, sender).encode(Result(1, pattern(4096)))
    decoder: FrameDecoder[Any] = FrameDecoder(ParentBound, 2048, large)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="over what is left"):
        decoder.feed(frame)
    assert segments(large.prefix) == []


def test_without_the_large_buffer_path_a_reference_is_an_unknown_extension() -> None:
    with pytest.raises(ProtocolError, match="unknown MessagePack extension type 1"):
        _decode_result(None, _reference(new_pool_prefix() + "1-w1", 10))


def test_large_buffer_threshold_is_validated() -> None:
    with pytest.raises(ValueError, match="large_buffer_threshold"):
        corral.PoolConfig(large_buffer_threshold=-1)
    assert corral.PoolConfig(large_buffer_threshold=None).large_buffer_threshold is None


# --- large bytes as views (large_bytes="memoryview") -----------------------------------

VIEWS = {"large_buffer_threshold": THRESHOLD, "large_bytes": "memoryview"}


def mapped(prefix: str) -> list[str]:
    """Segments under ``prefix`` this process still maps."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if prefix in line]


async def test_opted_in_large_bytes_arrive_as_read_only_views_on_both_sides() -> None:
    async with Pool(TARGET, size=1, **VIEWS) as pool:
        big, small = pattern(THRESHOLD * 4), pattern(THRESHOLD)
        # the handler's argument
        assert await pool.call("describe", big) == ["memoryview", True, big]
        assert await pool.call("describe", small) == ["bytes", True, small]
        # the caller's result, and a view sent back as it came
        result = await pool.call("make", THRESHOLD * 4)
        assert type(result) is memoryview and result.readonly and result.format == "B"
        assert result == big and bytes(result) == big and hash(result) == hash(big)
        assert await pool.call("echo", result) == big
        assert type(await pool.call("make", THRESHOLD)) is bytes
        nested = await pool.call("make", THRESHOLD * 4, nested=True)
        assert type(nested["outer"][1][1]) is memoryview
        items = [item async for item in pool.stream("chunks", 3, THRESHOLD * 2)]
        assert [type(i) for i in items] == [memoryview] * 3
        assert [bytes(i) for i in items] == [pattern(THRESHOLD * 2 + i) for i in range(3)]
        del result, nested, items
        assert segments(pool._shm_prefix) == []


async def test_without_the_opt_in_large_bytes_still_arrive_as_bytes() -> None:
    async with Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD) as pool:
        assert type(await pool.call("make", THRESHOLD * 4)) is bytes
        assert (await pool.call("describe", pattern(THRESHOLD * 4)))[0] == "bytes"


def test_a_received_view_outlives_its_call_its_worker_and_its_pool() -> None:
    async def main() -> tuple[list[Any], str]:
        pool = Pool(TARGET, size=1, max_requests=2, **VIEWS)
        await pool.start()
        prefix = pool._shm_prefix
        first = await pool.call("make", THRESHOLD * 64)
        second = await pool.call("make", THRESHOLD * 65)  # the worker is recycled after it
        await pool.wait_ready(timeout=30)
        third = await pool.call("make", THRESHOLD * 66)
        await pool.aclose()
        return [first, second, third], prefix

    held, prefix = asyncio.run(main())
    assert [type(v) for v in held] == [memoryview] * 3
    assert [bytes(v) for v in held] == [pattern(THRESHOLD * k) for k in (64, 65, 66)]
    assert segments(prefix, pooled=True) == []  # every name is gone: the views hold the pages
    assert mapped(prefix) != []
    view = held[1][10:20]  # a slice keeps the pages too
    del held
    assert mapped(prefix) != []
    assert bytes(view) == pattern(THRESHOLD * 65)[10:20]
    del view
    assert mapped(prefix) == []


async def test_a_held_view_is_never_overwritten_by_later_results() -> None:
    async with Pool(TARGET, size=1, **VIEWS) as pool:
        held = [await pool.call("echo", bytes([k]) * (THRESHOLD * 32)) for k in range(8)]
        assert [bytes(v) == bytes([k]) * (THRESHOLD * 32) for k, v in enumerate(held)] == [True] * 8
        assert len(segments(pool.workers[0].spec.shm_prefix, pooled=True)) <= 8


async def test_a_worker_killed_after_sending_a_view_argument_back_leaves_no_segment() -> None:
    async with Pool(TARGET, size=1, **VIEWS) as pool:
        prefix = pool.workers[0].spec.shm_prefix
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("die_while_writing", THRESHOLD * 64)
        assert segments(prefix, pooled=True) == []
        await pool.wait_ready(timeout=30)
        assert await pool.call("echo", pattern(THRESHOLD * 8)) == pattern(THRESHOLD * 8)


def test_large_bytes_is_validated() -> None:
    with pytest.raises(ValueError, match="large_bytes"):
        corral.PoolConfig(large_bytes="view")  # type: ignore[arg-type]
    for wrong_type in (True, None, b"memoryview"):
        with pytest.raises(TypeError, match="large_bytes must be 'bytes' or 'memoryview'"):
            corral.PoolConfig(large_bytes=wrong_type)  # type: ignore[arg-type]
    assert corral.PoolConfig().large_bytes == "bytes"
    assert corral.PoolConfig(large_bytes="memoryview").large_bytes == "memoryview"


def flocks(pid: int) -> list[str]:
    """The flock(2) locks that process ``pid`` holds (a reader's hold on a segment)."""
    with open("/proc/locks") as locks:
        return [line for line in locks if " FLOCK " in line and line.split()[4] == str(pid)]


@pytest.mark.parametrize("sync_mode", ["inline", "thread"])
async def test_a_worker_lets_go_of_a_large_argument_once_its_call_is_done(sync_mode: str) -> None:
    # Not only when the next message arrives: a segment kept mapped by an idle
    # worker is a segment its sender cannot reuse for the next call.
    target = TARGET if sync_mode == "inline" else "tests.workers.large:threaded"
    async with Pool(target, size=1, **VIEWS) as pool:
        worker = pool.workers[0]
        assert worker.pid is not None
        big = pattern(THRESHOLD * 64)
        assert (await pool.call("describe", big))[2] == big
        assert wait_for(lambda: flocks(worker.pid) == [])


def minor_faults() -> int:
    with open("/proc/self/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


async def test_large_bytes_views_of_a_kept_segment_map_it_once() -> None:
    # Received views of the segment its sender keeps for reuse share one mapping of
    # it: no page is mapped again per message (a 16 MiB result is 4096 pages).
    size = 16 * 2**20
    async with Pool(TARGET, size=1, **VIEWS) as pool:
        for _ in range(3):
            assert len(await pool.call("make", size)) == size
        tail = pattern(size)[-3:]
        before = minor_faults()
        for _ in range(5):
            result = await pool.call("make", size)
            assert result[size - 3 :] == tail
            del result
        assert minor_faults() - before < 4096 // 16  # less than one message's pages


def open_segments(prefix: str) -> list[str]:
    """Segments under ``prefix`` this process holds open (a descriptor, or a mapping)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if prefix in target:
                held.append(target)
    return held + mapped(prefix)


async def test_a_dead_workers_kept_segments_are_let_go_by_the_pool() -> None:
    async with Pool(TARGET, size=1, **VIEWS) as pool:
        worker = pool.workers[0]
        prefix = worker.spec.shm_prefix
        for _ in range(3):
            assert len(await pool.call("make", THRESHOLD * 64)) == THRESHOLD * 64
        assert open_segments(prefix + "w") != []  # the worker's kept segment, mapped once
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        assert await pool._wait_until(lambda: worker not in pool.workers, 30)
        await pool.wait_ready(timeout=30)
        gc.collect()
        assert open_segments(prefix) == []
