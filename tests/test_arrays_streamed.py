"""Arrow tables and pandas frames over the large-buffer paths, and arrays over TCP.

Every example here is over ``large_buffer_threshold``, so that it crosses the
path under test: shared memory on pipes, streamed buffers over TCP, plain and
compressed. Compression is chosen per pool, checked at the door, never imported
unless chosen; a worker whose corral does not stream gets buffers inline. A
pool's process SIGKILLed with arrays in flight leaves no segment and no process.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests._processes import parent_program

import corral
from corral import Pool
from corral._launch._socket_launcher import SubprocessShimLauncher
from corral._shm import SHM_DIR

np = pytest.importorskip("numpy")
pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")

TARGET = "tests.workers.streamed:app"
ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = 1024
CODECS = {"lz4": "lz4", "zstd": "zstandard"}
POOLED = re.compile(r"-[pw]s\d+$")  # a segment a sender keeps for reuse


def tcp(compression: str | None = None, **options: Any) -> Pool:
    return Pool(
        TARGET,
        size=1,
        launcher=SubprocessShimLauncher(),
        large_buffer_threshold=THRESHOLD,
        compression=compression,
        **options,
    )


PATHS: dict[str, Callable[[], Pool]] = {
    "shm": lambda: Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD),
    "tcp": lambda: tcp(),
    "tcp-lz4": lambda: tcp("lz4"),
    "tcp-zstd": lambda: tcp("zstd"),
}


@pytest.fixture(params=sorted(PATHS))
def path(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    codec = name.partition("-")[2]
    if codec:
        pytest.importorskip(CODECS[codec])
    return name


def streaming(pool: Pool) -> bool:
    """Whether the pool sends its worker's large buffers after the frame."""
    encoder = pool.workers[0]._launched._encoder  # type: ignore[attr-defined]
    return encoder is not None and encoder.streaming


def run_examples(path: str, check: Callable[[Pool, asyncio.Runner], Callable[..., None]]) -> None:
    with asyncio.Runner() as runner:
        pool = PATHS[path]()
        runner.run(pool.start())
        try:
            if path.startswith("tcp"):
                assert streaming(pool)
            else:
                assert pool.workers[0].spec.shm_prefix
            check(pool, runner)()
        finally:
            runner.run(pool.aclose())


EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def ipc_size(table: Any) -> int:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return int(sink.getvalue().size)


# --- round trips over the threshold ------------------------------------------------------


def test_arrow_tables_with_nulls_lists_and_dictionaries_cross_the_large_path(path: str) -> None:
    def check(pool: Pool, runner: asyncio.Runner) -> Callable[..., None]:
        @EXAMPLES
        @given(
            st.integers(150, 400).flatmap(
                lambda n: st.tuples(
                    st.lists(st.none() | st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n),
                    st.lists(
                        st.none() | st.lists(st.none() | st.floats(allow_nan=False), max_size=4),
                        min_size=n,
                        max_size=n,
                    ),
                    st.lists(
                        st.none() | st.sampled_from(["a", "bb", "ccc", "é"]),
                        min_size=n,
                        max_size=n,
                    ),
                )
            ),
            st.booleans(),
        )
        def round_trip(columns: Any, batch: bool) -> None:
            ints, lists, words = columns
            table = pa.table(
                {
                    "ints": pa.array(ints, pa.int64()),
                    "lists": pa.array(lists, pa.list_(pa.float64())),
                    "words": pa.array(words, pa.string()).dictionary_encode(),
                }
            )
            assert ipc_size(table) > THRESHOLD  # out of the frame, on every path
            value: Any = table.combine_chunks().to_batches()[0] if batch else table
            back = runner.run(pool.call("echo", {"t": value, "n": len(ints)}))
            assert type(back["t"]) is type(value)
            assert back["t"].schema == value.schema
            assert back["t"].equals(value)
            assert back["n"] == len(ints)

        return round_trip

    run_examples(path, check)


def test_pandas_frames_with_a_named_index_cross_the_large_path(path: str) -> None:
    def check(pool: Pool, runner: asyncio.Runner) -> Callable[..., None]:
        @EXAMPLES
        @given(
            st.lists(
                st.tuples(
                    st.integers(-1000, 1000),
                    st.floats(allow_nan=False) | st.none(),
                    st.text(max_size=4),
                ),
                min_size=100,
                max_size=300,
            ),
            st.sampled_from(["key", "when", 7]),
        )
        def round_trip(rows: Any, index_name: Any) -> None:
            frame = pd.DataFrame(rows, columns=["i", "f", "s"]).astype(
                {"i": "int64", "f": "float64", "s": "object"}
            )
            frame.index = pd.Index([3 * k for k in range(len(frame))], name=str(index_name))
            series = pd.Series(frame["i"].to_numpy(), index=frame.index, name="i")
            assert ipc_size(pa.Table.from_pandas(frame)) > THRESHOLD  # out of the frame
            back_frame, back_series = runner.run(pool.call("echo", [frame, series]))
            pd.testing.assert_frame_equal(back_frame, frame, check_dtype=False)  # str dtype
            assert back_frame.index.name == str(index_name)
            pd.testing.assert_series_equal(back_series, series)

        return round_trip

    run_examples(path, check)


def test_large_arrays_round_trip_both_ways_and_arrive_writable(path: str) -> None:
    base = np.arange(300_000, dtype=">f8").reshape(500, 600)
    noise = np.frombuffer(os.urandom(1 << 18), dtype="<u2")  # incompressible: sent as is
    cases = [base, np.asfortranarray(base), base[::3, ::2], base.astype("<c16"), noise]

    async def main() -> None:
        async with PATHS[path]() as pool:
            for array in cases:
                back = await pool.call("echo", [array, {"again": array}])
                for got in (back[0], back[1]["again"]):
                    assert got.dtype == array.dtype and np.array_equal(got, array)
                    assert got.flags.writeable
            ramp = await pool.call("ramp", 1 << 20)  # 8 MiB, made in the worker
            assert ramp[-1] == (1 << 20) - 1 and np.array_equal(ramp, np.arange(1 << 20))
            items = [a async for a in pool.stream("ramps", 50_000, 3)]
            assert [float(a.mean()) for a in items] == [0.0, 1.0, 2.0]

    asyncio.run(main())


async def test_results_encoded_on_two_worker_threads_at_once_all_arrive_whole() -> None:
    async with tcp() as pool:
        await pool.call("switch_often")  # the threads interleave inside the encoder
        sizes = [20_000 + 1000 * k for k in range(24)]
        calls = [pool.call("ramp" if k % 2 else "aramp", n) for k, n in enumerate(sizes)]
        for n, got in zip(sizes, await asyncio.gather(*calls), strict=True):
            assert np.array_equal(got, np.arange(n, dtype="<f8"))


# --- TCP: negotiation, compression at the door ---------------------------------------------


class _OldShimLauncher(SubprocessShimLauncher):
    """A shim from before streamed buffers: it knows nothing of ``stream_threshold``."""

    def _order(self, *args: Any, **kwargs: Any) -> Any:
        return msgspec.structs.replace(
            super()._order(*args, **kwargs), stream_threshold=0, compression=None
        )


async def test_a_worker_that_does_not_stream_gets_its_buffers_inline() -> None:
    async with Pool(
        TARGET, size=1, launcher=_OldShimLauncher(), large_buffer_threshold=THRESHOLD
    ) as pool:
        assert not streaming(pool)
        array = np.arange(100_000.0)
        assert np.array_equal(await pool.call("echo", array), array)
        assert np.array_equal(await pool.call("ramp", 100_000), array)


async def test_a_threshold_of_none_keeps_every_buffer_in_the_frame_over_tcp() -> None:
    async with Pool(
        TARGET, size=1, launcher=SubprocessShimLauncher(), large_buffer_threshold=None
    ) as pool:
        assert pool.workers[0]._launched._encoder is None  # type: ignore[attr-defined]
        array = np.arange(100_000.0)
        assert np.array_equal(await pool.call("echo", array), array)


def test_compression_is_checked_at_the_door() -> None:
    with pytest.raises(ValueError, match="compression must be None, 'lz4' or 'zstd'"):
        Pool(TARGET, compression="gzip")
    with pytest.raises(TypeError, match="compression must be"):
        Pool(TARGET, compression=True)
    assert Pool(TARGET, compression=None).config.compression is None


MISSING = textwrap.dedent(
    """
    import sys
    sys.modules["lz4"] = None  # as if corral[lz4] were not installed
    sys.modules["zstandard"] = None
    from corral import Pool
    for codec in ("lz4", "zstd"):
        try:
            Pool("tests.workers.streamed:app", compression=codec)
        except ImportError as exc:
            print(exc)
    """
)


def test_a_codec_that_is_not_installed_is_refused_naming_the_extra() -> None:
    done = subprocess.run(
        [sys.executable, "-c", MISSING],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "compression='lz4' needs the 'lz4' package, which is not installed here: "
        "pip install 'corral[lz4]'",
        "compression='zstd' needs the 'zstandard' package, which is not installed here: "
        "pip install 'corral[zstd]'",
    ]


async def test_a_worker_host_without_the_codec_fails_to_start_saying_so(tmp_path: Path) -> None:
    pytest.importorskip("lz4")
    fake = tmp_path / "lz4"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no lz4 on this host')\n")
    pool = tcp(
        "lz4",
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        max_restarts=0,
        startup_timeout=30,
    )
    with pytest.raises(corral.CorralError, match=r"corral\[lz4\]"):
        await pool.start()
    await pool.aclose()


NO_CODEC_IMPORT = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from corral import Pool
    from corral._launch._socket_launcher import SubprocessShimLauncher

    async def main():
        names = ["lz4", "zstandard"]
        async with Pool(
            "tests.workers.streamed:app", size=1, launcher=SubprocessShimLauncher()
        ) as pool:
            back = await pool.call("echo", np.zeros(1 << 20))
            assert back.shape == (1 << 20,)
            print("worker:", await pool.call("modules", names))
        print("pool:", sorted(n for n in names if n in sys.modules))

    asyncio.run(main())
    """
)


def test_no_codec_is_imported_unless_chosen() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_CODEC_IMPORT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if line.startswith(("worker:", "pool:"))]
    assert said == ["worker: []", "pool: []"]


async def test_compression_is_used_both_ways_when_chosen() -> None:
    pytest.importorskip("lz4")
    async with tcp("lz4") as pool:
        assert streaming(pool)
        assert await pool.call("modules", ["lz4", "zstandard"]) == ["lz4"]
        zeros = np.zeros(1 << 20)
        assert np.array_equal(await pool.call("echo", zeros), zeros)


# --- TCP: crashes -----------------------------------------------------------------------


async def test_a_worker_killed_while_streaming_a_result_is_a_crash_and_the_pool_goes_on() -> None:
    async with tcp() as pool:
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("die_while_streaming", 1 << 20)
        await pool.wait_ready(timeout=30)
        assert np.array_equal(await pool.call("echo", np.ones(1 << 16)), np.ones(1 << 16))


# --- the pool's process dies with arrays in flight ----------------------------------------

PARENT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import numpy as np
    from corral import Pool
    from corral._launch._socket_launcher import SubprocessShimLauncher

    async def main():
        fifo, how = sys.argv[1], sys.argv[2]
        options = {"launcher": SubprocessShimLauncher()} if how == "tcp" else {}
        async with Pool(
            "tests.workers.streamed:app", size=1, large_buffer_threshold=1024, **options
        ) as pool:
            worker = pool.workers[0]
            blocked = asyncio.ensure_future(
                pool.call("wait_for_fifo", fifo, np.arange(1 << 16, dtype="f8"))
            )
            assert await pool._wait_until(lambda: worker.inflight == 1, 10)
            queued = asyncio.ensure_future(pool.call("echo", np.ones(1 << 16)))
            assert await pool._wait_until(lambda: worker.inflight == 2, 10)
            pids = [worker.pid, worker._launched.pid]
            placement = getattr(worker._launched, "placement", None)
            if placement is not None:
                pids.append(placement.process.pid)
            report = {"prefix": worker.spec.shm_prefix, "pids": pids}
            sys.stdout.write(json.dumps(report) + "\\n")
            sys.stdout.flush()
            await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def segments(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.mark.parametrize("how", ["shm", "tcp"])
def test_parent_sigkill_with_arrays_in_flight_leaves_no_segment_and_no_process(
    tmp_path: Path, how: str
) -> None:
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    with parent_program(PARENT, str(fifo), how, reports='{"prefix"') as (parent, report):
        prefix = report["prefix"]
        if how == "shm":
            in_flight = [n for n in segments(prefix) if not POOLED.search(n)]
            assert len(in_flight) == 1  # the queued array, in /dev/shm
        # Stop the parent so that it reads nothing more, then let the worker
        # answer: its large results wait where only the shepherd can clean.
        os.kill(parent.pid, signal.SIGSTOP)
        with open(fifo, "wb", buffering=0) as writer:
            writer.write(b"g")
        if how == "shm":
            assert _wait_for(lambda: any(re.search(r"-w\d+$", n) for n in segments(prefix)))
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
        if prefix:
            assert segments(prefix) == []
        else:
            assert how == "tcp"  # nothing of it was ever in /dev/shm
