"""Worker apps for the reliability tests: well-behaved helpers and wire-hostile handlers.

The hostile handlers write straight onto the worker's protocol write descriptor
(the second of ``--fds READ,WRITE,CONTROL`` in the worker's argv), bypassing the
runtime's writer, to send the parent bytes no honest worker would.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import msgspec

from corral._messages import Result
from corral.worker import App, Context

app = App()


def _wire_fd() -> int:
    return int(sys.argv[sys.argv.index("--fds") + 1].split(",")[1])


def _write_all(data: bytes) -> None:
    fd = _wire_fd()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _frame(message: object) -> bytes:
    body = msgspec.msgpack.encode(message)
    return len(body).to_bytes(4, "big") + body


# --- well-behaved helpers ----------------------------------------------------------


@app.handler
def add(a: int, b: int) -> int:
    return a + b


@app.handler
def echo(value):
    return value


@app.handler
def pid() -> int:
    return os.getpid()


@app.handler
async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.handler
async def async_echo_after(value, seconds: float):
    await asyncio.sleep(seconds)
    return value


@app.handler
async def echo_stream(value, n: int, seconds: float = 0.0):
    """Yields ``[value, 0]``, ``[value, 1]``, ... with a pause before each item."""
    for i in range(n):
        if seconds:
            await asyncio.sleep(seconds)
        yield [value, i]


@app.handler
async def remember(key, value, seconds: float = 0.0, *, ctx: Context):
    if seconds:
        await asyncio.sleep(seconds)
    ctx.session[key] = value
    return value


@app.handler
async def recall(key, seconds: float = 0.0, *, ctx: Context):
    if seconds:
        await asyncio.sleep(seconds)
    return ctx.session.get(key)


# hold(key) waits until release(key) is called on the same worker: a call that stays
# in flight for exactly as long as the test wants, with no timing involved.
_holds: dict[str, asyncio.Event] = {}


def _hold_event(key: str) -> asyncio.Event:
    event = _holds.get(key)
    if event is None:
        event = _holds[key] = asyncio.Event()
    return event


@app.handler
async def hold(key: str) -> str:
    await _hold_event(key).wait()
    return key


@app.handler
async def release(key: str) -> None:
    _hold_event(key).set()


# --- wire-hostile handlers ------------------------------------------------------------


@app.handler
def garbage_frame() -> None:
    """A valid 4-byte length, then bytes that are not MessagePack (0xc1 is never used)."""
    _write_all(b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")
    time.sleep(30)  # only eviction ends this worker


@app.handler
def huge_length_header() -> None:
    """Announces a 4 GiB frame."""
    _write_all(b"\xff\xff\xff\xff")
    time.sleep(30)


@app.handler
def zero_length_frame() -> None:
    _write_all(b"\x00\x00\x00\x00")
    time.sleep(30)


@app.handler
def truncated_frame_then_close() -> None:
    """Half a frame, then the worker closes its end of the wire but keeps running."""
    _write_all(b"\x00\x00\x00\x20" + b"\x93" + b"\x03" * 7)
    os.close(_wire_fd())
    time.sleep(30)


@app.handler
def truncated_frame_then_exit() -> None:
    """Half a frame, then the worker exits (code 0, as if all were well)."""
    _write_all(b"\x00\x00\x00\x20" + b"\x93" + b"\x03" * 7)
    os._exit(0)


@app.handler
def reply_for_unknown_id() -> None:
    """A well-formed Result for a call id the parent never issued."""
    _write_all(_frame(Result(999999, 1)))
    time.sleep(30)


@app.handler
def duplicate_reply(value, *, ctx: Context):
    """Answers its own call twice: once by hand, once by returning."""
    _write_all(_frame(Result(ctx.call_id, value)))
    return value


@app.handler
def flood_stderr(total: int, line: int) -> int:
    """Writes ``total`` bytes to stderr in lines of ``line`` bytes (0: no newline at all)."""
    one_mib = 1 << 20
    chunk = (b"x" * (line - 1) + b"\n") * max(1, one_mib // line) if line else b"x" * one_mib
    written = 0
    while written < total:
        piece = chunk[: total - written]
        view = memoryview(piece)
        while view:
            view = view[os.write(2, view) :]
        written += len(piece)
    os.write(2, b"\nflood done\n")
    return written


@app.handler
def killed_mid_frame() -> None:
    """Dies of SIGKILL halfway through writing a frame, as an OOM kill would do it."""
    import signal

    _write_all(b"\x00\x01\x00\x00" + b"\x93" + b"\x03" * 1000)  # 65536 announced, 1001 sent
    os.kill(os.getpid(), signal.SIGKILL)


@app.handler
def big_result(n: int) -> bytes:
    """A result big enough to take a while to write (for SIGKILL-during-write repros)."""
    return b"y" * n
