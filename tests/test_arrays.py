"""NumPy arrays, Arrow tables and pandas frames across the pool, on every path.

Round trips must be exact (dtype, byte order, shape, layout-independent
contents, nulls, dictionaries, index), on the pipes, through shared memory and
over TCP. A received array views its segment: it must stay valid after its
call, after its worker is gone and after the pool is closed, and no segment may
be left once every view is released. Without these libraries nothing of them
is imported.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corral
from corral import Pool
from corral._launch._socket_launcher import SubprocessShimLauncher
from corral._shm import SHM_DIR

np = pytest.importorskip("numpy")
hnp = pytest.importorskip("hypothesis.extra.numpy")

TARGET = "tests.workers.arrays:app"
ROOT = Path(__file__).resolve().parent.parent
THRESHOLD = 1024
POOLED = re.compile(r"-[pw]s\d+$")

PATHS: dict[str, Callable[[], Pool]] = {
    "pipes": lambda: Pool(TARGET, size=1, large_buffer_threshold=None),
    "shm": lambda: Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD),
    "tcp": lambda: Pool(TARGET, size=1, launcher=SubprocessShimLauncher()),
}


def segments(prefix: str, pooled: bool = False) -> list[str]:
    return sorted(
        n for n in os.listdir(SHM_DIR) if n.startswith(prefix) and (pooled or not POOLED.search(n))
    )


def mapped(prefix: str) -> list[str]:
    """Segments under ``prefix`` this process still maps."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if prefix in line]


def same_array(a: Any, b: Any) -> bool:
    return (
        type(b) is np.ndarray
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.tobytes() == b.tobytes()  # NaNs compare equal as bits
    )


# --- strategies -----------------------------------------------------------------------

fixed_dtypes = (
    hnp.boolean_dtypes()
    | hnp.integer_dtypes(endianness="?")
    | hnp.unsigned_integer_dtypes(endianness="?")
    | hnp.floating_dtypes(endianness="?")
    | hnp.complex_number_dtypes(endianness="?")
    | hnp.datetime64_dtypes(endianness="?")
    | hnp.timedelta64_dtypes(endianness="?")
    | hnp.byte_string_dtypes(max_len=4)
    | hnp.unicode_string_dtypes(endianness="?", max_len=4)
    | st.just(np.dtype([("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")]))
)


@st.composite
def arrays(draw: st.DrawFn) -> Any:
    dtype = draw(fixed_dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12))
    array = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["C", "F", "strided", "reversed"]))
    if layout == "F":
        array = np.asfortranarray(array)
    elif layout == "strided" and array.ndim:
        array = np.repeat(array, 2, axis=0)[::2]
    elif layout == "reversed" and array.ndim:
        array = array[::-1]
    return array


# --- round trips -------------------------------------------------------------------


@pytest.fixture(params=sorted(PATHS))
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run_examples(path: str, check: Callable[[Pool, asyncio.Runner], Callable[..., None]]) -> None:
    with asyncio.Runner() as runner:
        pool = PATHS[path]()
        runner.run(pool.start())
        try:
            check(pool, runner)()
        finally:
            runner.run(pool.aclose())


EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_arrays_round_trip_exactly(path: str) -> None:
    def check(pool: Pool, runner: asyncio.Runner) -> Callable[..., None]:
        @EXAMPLES
        @given(arrays(), st.integers(0, 2))
        def round_trip(array: Any, depth: int) -> None:
            value: Any = array
            for _ in range(depth):
                value = {"k": [1, value]}
            back = runner.run(pool.call("echo", value))
            for _ in range(depth):
                back = back["k"][1]
            assert same_array(array, back), (array, back)

        return round_trip

    run_examples(path, check)


def test_large_arrays_round_trip_in_every_layout(path: str) -> None:
    base = np.arange(300_000, dtype=">f8").reshape(500, 600)
    cases = [base, np.asfortranarray(base), base[::3, ::2], base.T, base.astype("<c16")]

    async def main() -> None:
        async with PATHS[path]() as pool:
            for array in cases:
                back = await pool.call("echo", [array, {"again": array}])
                assert same_array(array, back[0]) and same_array(array, back[1]["again"])

    asyncio.run(main())


def test_arrow_tables_round_trip_with_nulls_lists_and_dictionaries(path: str) -> None:
    pa = pytest.importorskip("pyarrow")
    scalars = st.one_of(
        st.none(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=5),
    )

    def check(pool: Pool, runner: asyncio.Runner) -> Callable[..., None]:
        @EXAMPLES
        @given(
            st.integers(0, 30).flatmap(
                lambda n: st.tuples(
                    st.lists(st.none() | st.integers(-1000, 1000), min_size=n, max_size=n),
                    st.lists(
                        st.none() | st.lists(st.none() | st.floats(allow_nan=False), max_size=3),
                        min_size=n,
                        max_size=n,
                    ),
                    st.lists(
                        st.none() | st.sampled_from(["a", "bb", "ccc"]), min_size=n, max_size=n
                    ),
                )
            ),
            scalars,
            st.booleans(),
        )
        def round_trip(columns: Any, extra: Any, batch: bool) -> None:
            ints, lists, words = columns
            table = pa.table(
                {
                    "ints": pa.array(ints, pa.int64()),
                    "lists": pa.array(lists, pa.list_(pa.float64())),
                    "words": pa.array(words, pa.string()).dictionary_encode(),
                }
            )
            value: Any = table.to_batches()[0] if batch and table.num_rows else table
            back = runner.run(pool.call("echo", {"t": value, "extra": extra}))
            assert type(back["t"]) is type(value)
            assert back["t"].equals(value)
            assert back["t"].schema == value.schema
            assert back["extra"] == extra

        return round_trip

    run_examples(path, check)


def test_pandas_frames_and_series_round_trip_with_their_index(path: str) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")

    def check(pool: Pool, runner: asyncio.Runner) -> Callable[..., None]:
        @EXAMPLES
        @given(
            st.lists(
                st.tuples(
                    st.integers(-1000, 1000), st.floats(allow_nan=False), st.text(max_size=4)
                ),
                max_size=20,
            ),
            st.sampled_from(["key", None]),
            st.sampled_from(["s", 3, None]),
        )
        def round_trip(rows: Any, index_name: Any, series_name: Any) -> None:
            frame = pd.DataFrame(rows, columns=["i", "f", "s"]).astype(
                {"i": "int64", "f": "float64", "s": "object"}
            )
            frame.index = pd.Index([10 * k for k in range(len(frame))], name=index_name)
            series = pd.Series(frame["f"].to_numpy(), index=frame.index, name=series_name)
            back_frame, back_series = runner.run(pool.call("echo", [frame, series]))
            pd.testing.assert_frame_equal(back_frame, frame, check_dtype=False)
            assert back_frame.index.name == index_name
            pd.testing.assert_series_equal(back_series, series)

        return round_trip

    run_examples(path, check)


# --- refused values -------------------------------------------------------------------


async def test_object_arrays_are_refused_with_encode_error_naming_the_type() -> None:
    async with PATHS["shm"]() as pool:
        with pytest.raises(corral.EncodeError, match="dtype object"):
            await pool.call("echo", [np.array([object()], dtype=object)])
        with pytest.raises(corral.EncodeError, match=r"numpy\.ma\.MaskedArray"):
            await pool.call("echo", np.ma.masked_array([1.0, 2.0], mask=[0, 1]))
        with pytest.raises(corral.RemoteError, match="dtype object"):
            await pool.call("object_array")
        assert segments(pool._shm_prefix) == []
        assert same_array(np.arange(3), await pool.call("echo", np.arange(3)))


async def test_a_frame_with_python_objects_is_refused_naming_pandas() -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    async with PATHS["shm"]() as pool:
        with pytest.raises(corral.EncodeError, match=r"pandas\.DataFrame"):
            await pool.call("echo", pd.DataFrame({"x": [object(), object()]}))


async def test_an_array_over_the_message_limit_is_payload_too_large_with_nothing_left() -> None:
    async with Pool(
        TARGET, size=1, large_buffer_threshold=THRESHOLD, max_message_size=1 << 20
    ) as pool:
        pid = (await pool.call("loaded"), pool.workers[0].pid)
        with pytest.raises(corral.PayloadTooLarge):
            await pool.call("echo", [np.zeros(1 << 17), np.zeros(1 << 17)])  # 2 x 1 MiB
        with pytest.raises(corral.PayloadTooLarge):
            await pool.call("filled", 1 << 18, 1.0)  # 2 MiB result
        assert pool.workers[0].pid == pid[1]
        assert segments(pool._shm_prefix) == []


# --- zero copy and lifetime -------------------------------------------------------------


async def test_a_received_array_is_writable_copy_on_write_and_the_sender_is_untouched() -> None:
    async with PATHS["shm"]() as pool:
        sent = np.ones(1 << 16)
        dtype, shape, writeable, total = await pool.call("describe", sent)
        assert (dtype, shape, writeable, total) == ("float64", [1 << 16], True, float(1 << 16))
        back = await pool.call("scale_in_place", sent, 3.0)
        assert float(back.sum()) == 3.0 * (1 << 16) and float(sent.sum()) == float(1 << 16)
        back[0] = 7.0  # ours to write: it is a private copy-on-write view
        assert back[0] == 7.0


async def test_a_held_result_is_never_overwritten_by_later_results() -> None:
    async with PATHS["shm"]() as pool:
        held = [await pool.call("filled", 1 << 17, float(k)) for k in range(8)]
        for k, array in enumerate(held):
            assert float(array.min()) == float(array.max()) == float(k)
        kept = segments(pool.workers[0].spec.shm_prefix, pooled=True)
        assert len(kept) <= 8  # bounded: 4 per side at most
        del held, array
        gc.collect()
        again = [await pool.call("filled", 1 << 17, 9.0) for _ in range(4)]
        assert all(float(a.min()) == 9.0 for a in again)


async def test_segments_are_reused_and_bounded_under_many_large_calls() -> None:
    async with PATHS["shm"]() as pool:
        prefix = pool.workers[0].spec.shm_prefix
        for k in range(20):
            result = await pool.call("echo", np.full(1 << 17, float(k)))
            assert float(result[-1]) == float(k)
            del result
        kept = segments(prefix, pooled=True)
        assert segments(prefix) == []  # nothing in flight
        assert 1 <= len(kept) <= 4  # one segment each way was enough


def test_an_array_outlives_its_call_its_worker_and_its_pool() -> None:
    async def main() -> tuple[list[Any], str]:
        pool = Pool(TARGET, size=1, large_buffer_threshold=THRESHOLD, max_requests=2)
        await pool.start()
        prefix = pool._shm_prefix
        first = await pool.call("filled", 1 << 16, 1.0)
        second = await pool.call("filled", 1 << 16, 2.0)  # the worker is recycled after it
        await pool.wait_ready(timeout=30)
        third = await pool.call("filled", 1 << 16, 3.0)
        await pool.aclose()
        return [first, second, third], prefix

    held, prefix = asyncio.run(main())
    assert [float(a.sum()) for a in held] == [float(k * (1 << 16)) for k in (1, 2, 3)]
    assert segments(prefix, pooled=True) == []  # every name is gone: the views hold the pages
    assert mapped(prefix) != []
    del held
    gc.collect()
    assert mapped(prefix) == []


# --- nothing is imported without arrays -------------------------------------------------

NO_IMPORT = textwrap.dedent(
    """
    import asyncio, sys
    from corral import Pool

    async def main():
        async with Pool("tests.workers.arrays:app", size=1) as pool:
            assert await pool.call("echo", [b"x" * 2_000_000, {"a": 1}]) is not None
            print("worker:", sorted(await pool.call("loaded")))
        print("pool:", sorted(n for n in ("numpy", "pyarrow", "pandas") if n in sys.modules))

    asyncio.run(main())
    """
)


def test_a_pool_without_arrays_imports_none_of_their_libraries() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_IMPORT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if line.startswith(("worker:", "pool:"))]
    assert said == ["worker: []", "pool: []"]


# --- crashes and cancellation -----------------------------------------------------------


async def test_a_worker_killed_while_writing_an_array_leaves_no_segment() -> None:
    async with PATHS["shm"]() as pool:
        prefix = pool.workers[0].spec.shm_prefix
        with pytest.raises(corral.WorkerCrashed):
            await pool.call("die_while_writing", 1 << 20)
        assert segments(prefix, pooled=True) == []
        await pool.wait_ready(timeout=30)
        assert float((await pool.call("filled", 1 << 16, 2.0)).sum()) == 2.0 * (1 << 16)


async def test_a_cancelled_call_with_a_large_array_leaves_no_segment(tmp_path: Path) -> None:
    async with PATHS["shm"]() as pool:
        worker = pool.workers[0]
        fifo = tmp_path / "go"
        os.mkfifo(fifo)
        blocked = asyncio.ensure_future(pool.call("wait_for_fifo", str(fifo), 1))
        writer = await asyncio.to_thread(open, fifo, "wb", buffering=0)
        queued = asyncio.ensure_future(pool.call("echo", np.ones(1 << 18)))
        assert await pool._wait_until(lambda: worker.inflight == 2, 5)
        assert segments(worker.spec.shm_prefix) != []  # the argument, in /dev/shm
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        with writer:
            writer.write(b"g")
        assert await blocked == 1
        assert same_array(np.arange(4), await pool.call("echo", np.arange(4)))
        assert segments(worker.spec.shm_prefix) == []


# --- hostile array extensions --------------------------------------------------------

MALFORMED_ARRAYS = [
    ["<f8", [-1], "C", b""],  # negative dimension
    ["<f8", [1.5], "C", b"\0" * 8],  # a dimension that is not an int
    ["<f8", [True], "C", b"\0" * 8],  # nor a bool
    ["<f8", [1] * 65, "C", b"\0" * 8],  # more dimensions than numpy has
    ["<f8", [1], "X", b"\0" * 8],  # no such order
    ["<f8", [1], "C"],  # a field missing
    ["<f8", [1], "C", b"\0" * 8, 1],  # one too many
    ["<f8", [2], "C", b"\0" * 8],  # fewer bytes than the shape needs
    ["not a dtype", [1], "C", b"\0" * 8],
    ["|O", [1], "C", b"\0" * 8],  # object dtype
    ["<f8", "1", "C", b"\0" * 8],  # shape not a list
    ["<f8", [1], "C", "text"],  # buffer neither bytes nor a reference
    ["<f8", [1], "C", {"ext": 5}],  # an extension other than a segment reference
    {"a": 1},
    [],
]


@pytest.mark.parametrize("payload", MALFORMED_ARRAYS, ids=repr)
def test_a_malformed_array_extension_is_a_protocol_error(payload: Any) -> None:
    import msgspec

    from corral._errors import ProtocolError
    from corral._framing import FrameDecoder, FrameEncoder
    from corral._messages import ParentBound, Result

    if isinstance(payload, list) and len(payload) == 4 and payload[3] == {"ext": 5}:
        payload = [*payload[:3], msgspec.msgpack.Ext(5, b"\0" * 8)]
    frame = FrameEncoder().encode(
        Result(1, msgspec.msgpack.Ext(2, msgspec.msgpack.encode(payload)))
    )
    with pytest.raises(ProtocolError):
        FrameDecoder(ParentBound).feed(frame)  # type: ignore[arg-type]
