"""The floor: the smallest asyncio client and worker speaking length-prefixed msgspec.

No supervision, no deadlines, no sessions: what a careful person would write by
hand in a hundred lines. corral is measured as a ratio to this.
Run as a worker with ``python -m benchmarks.floor READ_FD WRITE_FD``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import msgspec

_ENCODE = msgspec.msgpack.Encoder().encode
_DECODE = msgspec.msgpack.Decoder().decode


def worker_main(read_fd: int, write_fd: int) -> None:
    from benchmarks.tasks import TASKS

    reader = os.fdopen(read_fd, "rb", buffering=1 << 16)
    write = os.write
    while True:
        header = reader.read(4)
        if len(header) < 4:
            return
        call_id, method, args = _DECODE(reader.read(int.from_bytes(header, "big")))
        body = _ENCODE((call_id, TASKS[method](*args)))
        frame = len(body).to_bytes(4, "big") + body
        view = memoryview(frame)
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
    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        to_worker_r, to_worker_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - spawning, not waiting
            [sys.executable, "-m", "benchmarks.floor", str(to_worker_r), str(to_parent_w)],
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


class FloorPool:
    """N floor workers; each call goes to the one with the fewest calls pending."""

    def __init__(self, size: int) -> None:
        self.workers = [FloorWorker() for _ in range(size)]

    async def __aenter__(self) -> FloorPool:
        await asyncio.gather(*(w.start() for w in self.workers))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(w.close() for w in self.workers))

    async def call(self, method: str, *args: Any) -> Any:
        worker = min(self.workers, key=lambda w: len(w.pending))
        return await worker.call(method, *args)


if __name__ == "__main__":
    worker_main(int(sys.argv[1]), int(sys.argv[2]))
