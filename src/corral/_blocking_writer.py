"""The worker's writer: whole frames onto a blocking descriptor, from any thread.

Owns: writing frames so that two threads never interleave theirs. Must not
touch: the event loop (a worker's main thread has none) or what frames mean.
Kept apart from ``_transport`` so that a worker imports no asyncio for it.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Any

from ._framing import FrameEncoder

__all__ = ["BlockingFrameWriter"]


class BlockingFrameWriter:
    """The worker's writer: whole frames, written by any thread, never interleaved.

    The descriptor is blocking (or, for a socket whose reading side is
    non-blocking, waited on until writable): a frame is written completely
    before the next one starts, under a lock, so the worker's control thread can answer a Ping
    while its event loop is busy running a sync handler.
    """

    def __init__(self, fd: int, encoder: FrameEncoder) -> None:
        os.set_blocking(fd, True)
        self._fd = fd
        self._encoder = encoder
        self._lock = threading.Lock()
        self.closed = False

    def write(self, data: bytes | bytearray) -> None:
        """Write complete frames; raises BrokenPipeError once the pool is gone."""
        with self._lock:
            if self.closed:
                raise BrokenPipeError("the worker's wire is closed")
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            if written == len(data):
                return  # the common case: one system call, no view
            view = memoryview(data)[written:]
            write = os.write
            fd = self._fd
            while view:
                try:
                    view = view[write(fd, view) :]
                except BlockingIOError:
                    # A socket whose reading side made it non-blocking: wait for room.
                    select.select((), (fd,), ())

    def send_now(self, message: Any) -> None:
        """Encode and write one message at once (from any thread)."""
        self.write(self._encoder.encode(message))

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self._fd)
