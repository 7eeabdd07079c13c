"""The floor ``corral bench`` measures against: the least a pool of pipes can do.

Owns: a hand-written asyncio client and a blocking worker loop speaking
length-prefixed msgspec frames over two pipes (no supervision, deadlines or
sessions), the same design as the repository's ``benchmarks/floor.py``, here
so that the installed package can measure itself. Must not touch: corral's own
code; it imports only msgspec. The worker runs as
``python -m corral._bench_floor READ_FD WRITE_FD``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import msgspec

__all__ = ["FloorWorker", "settle_malloc"]

_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.Decoder().decode


def settle_malloc() -> None:
    """Put this process's malloc where a long-running process's is: call before measuring.

    glibc serves an allocation over its mmap threshold (128 KiB when a process
    starts) with an mmap of its own, and raises the threshold to the size of the
    first such block that is freed. Until then every read asyncio makes (256 KiB
    into a new bytes object) costs an ``mmap``, an ``mremap``, a ``munmap`` and
    two page faults: 15 to 25 us more per call for the floor's parent, which
    reads that way. A benchmark process that has never freed a large buffer
    would measure a floor no real application has. Freeing one 1 MiB block
    settles it. The repository's benchmarks use this one too.
    """
    settled = bytearray(1 << 20)
    del settled


def _noop() -> None:
    return None


def worker_main(read_fd: int, write_fd: int) -> None:
    reader = os.fdopen(read_fd, "rb", buffering=1 << 16)
    write = os.write
    while True:
        header = reader.read(4)
        if len(header) < 4:
            return
        call_id, _method, args = _DECODE(reader.read(int.from_bytes(header, "big")))
        _noop(*args)
        body = _ENCODE((call_id, None))
        view = memoryview(len(body).to_bytes(4, "big") + body)
        while view:
            view = view[write(write_fd, view) :]


class _Reader(asyncio.Protocol):
    def __init__(self, worker: FloorWorker) -> None:
        self.worker = worker
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        pending = self.worker.pending
        offset = 0
        while len(buffer) - offset >= 4:
            size = int.from_bytes(buffer[offset : offset + 4], "big")
            if len(buffer) - offset - 4 < size:
                break
            call_id, value = _DECODE(buffer[offset + 4 : offset + 4 + size])
            offset += 4 + size
            pending.pop(call_id).set_result(value)
        del buffer[:offset]


class FloorWorker:
    """One floor worker process and the calls pending on it."""

    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        to_worker_r, to_worker_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning, not waiting
            [sys.executable, "-m", "corral._bench_floor", str(to_worker_r), str(to_parent_w)],
            pass_fds=(to_worker_r, to_parent_w),
        )
        os.close(to_worker_r)
        os.close(to_parent_w)
        self.reader, _ = await loop.connect_read_pipe(
            lambda: _Reader(self), os.fdopen(to_parent_r, "rb", buffering=0)
        )
        self.writer, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(to_worker_w, "wb", buffering=0)
        )

    def call(self, method: str, *args: Any) -> asyncio.Future[Any]:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        body = _ENCODE((self.next_id, method, args))
        self.writer.write(len(body).to_bytes(4, "big") + body)
        return future

    async def close(self) -> None:
        self.writer.close()  # the worker sees EOF once the loop has closed the pipe
        self.reader.close()
        await asyncio.sleep(0)
        await asyncio.to_thread(self.proc.wait)


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]))
