"""A message is written whole or not at all, whatever fails while it is encoded.

Buffers nested below the top level are found only once the message has been
encoded; if moving them out of band then fails (over the limit, say), the frame
already begun must go too, or the next frame lands after a half-written one and
the peer reads garbage. Checked at the encoder and through real workers, on
both sides of the connection.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

import pytest
from tests.workers.large import pattern

import corral
from corral import Pool
from corral._framing import FrameDecoder, FrameEncoder
from corral._launch._socket_launcher import SubprocessShimLauncher
from corral._messages import Call, ParentBound, Result, WorkerBound
from corral._shm import SHM_DIR, LargeBuffers, new_pool_prefix

TARGET = "tests.workers.large:app"
KIB = 1024
MIB = 1024 * KIB
LIMIT = 2 * MIB


def segments(prefix: str) -> list[str]:
    """Segments in flight (not those a sender keeps for reuse: ``<p|w>s<k>``)."""
    return sorted(
        name
        for name in os.listdir(SHM_DIR)
        if name.startswith(prefix) and not re.search(r"-[pw]s\d+$", name)
    )


OVERSIZE_NESTED = [
    pytest.param([pattern(300 * KIB) for _ in range(8)], id="8x300KiB-in-a-list"),
    pytest.param([pattern(3 * MIB)], id="3MiB-in-a-list"),
    pytest.param({"a": [1, ("x", pattern(3 * MIB))]}, id="3MiB-deep-in-a-dict"),
]


@pytest.mark.parametrize("value", OVERSIZE_NESTED)
@pytest.mark.parametrize("origin", ["p", "w"])
def test_an_oversize_nested_buffer_leaves_the_output_buffer_as_it_was(
    value: object, origin: str
) -> None:
    prefix = new_pool_prefix() + "1-"
    encoder = FrameEncoder(LIMIT, LargeBuffers(prefix, 256 * KIB, origin))
    out = bytearray()
    encoder.append(Result(1, b"before"), out)
    before = bytes(out)
    message = Call(2, "echo", (value,), {}) if origin == "p" else Result(2, value)
    with pytest.raises(corral.PayloadTooLarge):
        encoder.append(message, out)
    assert bytes(out) == before
    assert segments(prefix) == []
    encoder.append(Result(3, b"after"), out)
    decoded = FrameDecoder(ParentBound, LIMIT).feed(out)
    assert [(m.id, m.value) for m in decoded] == [(1, b"before"), (3, b"after")]  # type: ignore[union-attr]


@pytest.mark.parametrize("value", OVERSIZE_NESTED)
def test_an_oversize_nested_call_leaves_the_output_buffer_as_it_was_without_shm(
    value: object,
) -> None:
    encoder = FrameEncoder(LIMIT)
    out = bytearray()
    encoder.append(Call(1, "pid", (), {}), out)
    before = bytes(out)
    with pytest.raises(corral.PayloadTooLarge):
        encoder.append(Call(2, "echo", (value,), {}), out)
    assert bytes(out) == before
    assert len(FrameDecoder(WorkerBound, LIMIT).feed(out)) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "size"), [pytest.param(8, 300 * KIB, id="8x300KiB"), pytest.param(1, 3 * MIB, id="3MiB")]
)
async def test_an_oversize_nested_result_on_shm_is_payload_too_large_and_the_worker_stays(
    n: int, size: int
) -> None:
    async with Pool(TARGET, size=1, max_message_size=LIMIT) as pool:
        pid = await pool.call("pid")
        with pytest.raises(corral.PayloadTooLarge):
            await pool.call("make_many", n, size)
        assert await pool.call("pid") == pid
        assert await pool.call("make_many", 2, 300 * KIB) == [pattern(300 * KIB)] * 2
        assert segments(pool._shm_prefix) == []


@pytest.mark.parametrize("path", ["shm", "pipes", "tcp"])
async def test_an_oversize_nested_argument_in_a_burst_fails_alone(path: str) -> None:
    options: dict[str, Any] = {
        "shm": {"large_buffer_threshold": 256 * KIB},
        "pipes": {"large_buffer_threshold": None},
        "tcp": {"launcher": SubprocessShimLauncher()},
    }[path]
    async with Pool(TARGET, size=1, max_message_size=LIMIT, **options) as pool:
        pid = await pool.call("pid")
        outcomes = await asyncio.gather(
            pool.call("pid"),
            pool.call("echo", [pattern(300 * KIB) for _ in range(8)]),
            pool.call("echo", [pattern(3 * MIB)]),
            pool.call("echo", b"harmless"),
            return_exceptions=True,
        )
        assert outcomes[0] == pid
        assert isinstance(outcomes[1], corral.PayloadTooLarge)
        assert isinstance(outcomes[2], corral.PayloadTooLarge)
        assert outcomes[3] == b"harmless"
        assert await pool.call("pid") == pid
        assert segments(pool._shm_prefix) == []
