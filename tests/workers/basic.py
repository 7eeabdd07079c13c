"""The worker app of the public API examples, plus handlers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from corral.worker import App, Context

app = App()


@app.handler
def add(a: int, b: int) -> int:
    return a + b


@app.handler("math.mul")
def mul(a, b):
    return a * b


@app.handler
async def fetch(url: str) -> bytes:
    await asyncio.sleep(0)
    return url.encode()


@app.handler
async def count(n: int):
    for i in range(n):
        yield i


@app.handler
def remember(key, value, *, ctx: Context):
    ctx.session[key] = value


@app.handler
def recall(key, *, ctx: Context):
    return ctx.session.get(key)


@app.handler
def whoami(*, ctx: Context) -> dict:
    return {"pid": os.getpid(), "worker_id": ctx.worker_id, "session": ctx.session_id}


@app.handler
def echo(value):
    return value


@app.handler
def fail(message: str):
    raise ValueError(message)


@app.handler
def exit_now(code: int = 1):
    os._exit(code)


@app.handler
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.handler
async def async_sleep(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@app.handler
def noisy(text: str) -> str:
    print(text)
    print("x" * 10_000)
    os.write(1, b"raw bytes on fd 1\n")
    os.write(1, b"\x00\x00\x00\x05hello")  # looks like a frame header
    return text


@app.handler
def unencodable():
    return object()


@app.handler
def cooperative_wait(seconds: float, *, ctx: Context) -> bool:
    """Sleeps until cancelled or the time passes; returns whether it was cancelled."""
    return ctx.wait_cancelled(seconds)


@app.handler
def pid() -> int:
    return os.getpid()


startup_calls = 0


@app.on_startup
def _startup() -> None:
    global startup_calls
    startup_calls += 1


@app.handler
def startups() -> int:
    return startup_calls


@app.handler
def make_bytes(n: int) -> bytes:
    return b"y" * n


@app.handler
def write_garbage_to_wire() -> None:
    """Writes a frame that is not valid MessagePack straight onto the protocol pipe."""
    import sys

    write_fd = int(sys.argv[sys.argv.index("--fds") + 1].split(",")[1])
    os.write(write_fd, b"\x00\x00\x00\x03abc")
    time.sleep(5)


@app.handler
def noisy_then_sleep(text: str, seconds: float) -> None:
    import sys

    sys.stderr.write(text + "\n")
    sys.stderr.flush()
    time.sleep(seconds)


@app.handler
def spawn_grandchild() -> int:
    """Starts a long-lived child that inherits stdout/stderr; returns its pid."""
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    return child.pid


@app.handler
def environ(names: list[str]) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


def make_app() -> App:
    return app


@app.handler
def hold_the_gil() -> bool:
    """A catastrophic regular expression: C code that holds the GIL for a very long time."""
    import re
    import sys

    sys.stderr.write("holding the GIL now\n")
    sys.stderr.flush()
    return re.match(r"(a+)+$", "a" * 40 + "b") is not None


@app.handler
async def async_echo_after(value, seconds: float):
    await asyncio.sleep(seconds)
    return value


@app.handler
async def count_forever():
    i = 0
    while True:
        yield i
        i += 1
        await asyncio.sleep(0)


_produced = 0


@app.handler
async def count_and_report(n: int):
    global _produced
    _produced = 0
    for i in range(n):
        _produced += 1
        yield i


@app.handler
async def produced() -> int:
    return _produced


@app.handler
def ignore_sigterm() -> None:  # sync: signal handlers belong to the main thread
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@app.handler
def slow_words(n: int, seconds: float):
    """A sync generator whose every step takes a while."""
    for i in range(n):
        time.sleep(seconds)
        yield f"word{i}"


@app.handler
def close_the_wire_and_linger() -> None:
    """Closes the worker's end of the protocol pipe but keeps running."""
    import sys

    os.close(int(sys.argv[sys.argv.index("--fds") + 1].split(",")[1]))
    time.sleep(60)


@app.handler
def open_fds() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return found


@app.handler
def wire_fds() -> list[int]:
    import sys

    return [int(fd) for fd in sys.argv[sys.argv.index("--fds") + 1].split(",")]


@app.handler
def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


@app.handler
def crash_once(marker: str) -> str:
    """Dies the first time (leaving a marker file), succeeds afterwards."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("crashed")
        os._exit(1)
    return "ok"


_ballast: list[bytearray] = []


@app.handler
def allocate(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1  # touch every page so it counts in RSS
    _ballast.append(block)
    return len(_ballast)


_session_ends: list[str] = []


@app.on_session_end
def _session_ended(session_id: str, state: dict) -> None:
    _session_ends.append(session_id)


@app.handler
def ended_sessions() -> list[str]:
    return list(_session_ends)


@app.handler
def rlimits(names: list[str]) -> dict[str, list[int]]:
    import resource

    return {name: list(resource.getrlimit(getattr(resource, name))) for name in names}


@app.handler
def nested_asyncio_run(value: int) -> int:
    """A sync handler that runs an event loop of its own, as library code may."""

    async def double() -> int:
        await asyncio.sleep(0)
        return value * 2

    return asyncio.run(double())


@app.handler
def thread_name() -> str:
    import threading

    return threading.current_thread().name


@app.handler
async def async_thread_name() -> str:
    """The thread async code runs on once it has suspended (the loop's own)."""
    import threading

    await asyncio.sleep(0)
    return threading.current_thread().name


_flag = threading.Event()
_async_done = threading.Event()


@app.handler
async def async_wait_for_flag(seconds: float):
    """Runs on the loop while the main thread runs ``set_flag_and_wait_for_async``."""
    yield "started"
    flagged = await asyncio.to_thread(_flag.wait, seconds)
    _async_done.set()
    yield flagged


@app.handler
def set_flag_and_wait_for_async(seconds: float) -> bool:
    _flag.set()
    return _async_done.wait(seconds)


@app.handler
def loaded_modules() -> list[str]:
    import sys

    return sorted(sys.modules)
