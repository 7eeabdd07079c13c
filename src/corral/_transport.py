"""How frames move between the two ends: a pair of pipes driven by the event loop.

Owns: the read side (bytes -> FrameDecoder -> one callback per message) and the
write side (frames sent in one loop tick are written with one system call). Used
by both the pool and the worker. Must not touch: what messages mean, or how the
process at the other end was started (that is the launcher's job); a socket
transport would offer the same ``FrameConnection`` surface.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Generic, Protocol, TypeVar

from ._errors import ProtocolError
from ._framing import FrameDecoder, FrameEncoder

__all__ = ["FrameConnection", "FrameListener", "PipeConnection", "open_pipe_connection"]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class FrameListener(Protocol[T_contra]):
    """What a connection reports to its owner."""

    def frame_received(self, message: T_contra) -> None: ...

    def connection_broken(self, error: ProtocolError | None) -> None:
        """The peer sent a bad frame (``error``) or closed its end (None)."""


class FrameConnection(Protocol):
    """The transport seam: anything that carries frames to one worker."""

    def send(self, message: Any) -> int:
        """Queue one message; raises EncodeError/PayloadTooLarge with nothing sent."""

    def close(self) -> None: ...


class _ReadProtocol(asyncio.Protocol, Generic[T]):
    def __init__(self, decoder: FrameDecoder[T], listener: FrameListener[T]) -> None:
        self._decoder = decoder
        self._listener = listener
        self._broken = False

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            self._broken = True
            self._listener.connection_broken(exc)
            return
        received = self._listener.frame_received
        for message in messages:
            received(message)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._broken:
            return
        self._broken = True
        if self._decoder.buffered:
            self._listener.connection_broken(
                ProtocolError(f"stream ended inside a frame ({self._decoder.buffered} bytes)")
            )
        else:
            self._listener.connection_broken(None)


class _WriteProtocol(asyncio.Protocol):
    def connection_lost(self, exc: Exception | None) -> None:
        return None


class PipeConnection:
    """Frames over two pipe ends; writes of one loop tick are coalesced."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reader: asyncio.ReadTransport,
        writer: asyncio.WriteTransport,
        encoder: FrameEncoder,
    ) -> None:
        self._loop = loop
        self._reader = reader
        self._writer = writer
        self._append = encoder.append
        self._pending = bytearray()
        self._flush_scheduled = False
        self._closed = False

    def send(self, message: Any) -> int:
        """Queue one message for this tick's write; returns its encoded size."""
        if self._closed:
            return 0
        size = self._append(message, self._pending)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return size

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed or not self._pending:
            return
        data, self._pending = self._pending, bytearray()
        self._writer.write(data)

    @property
    def write_buffer_size(self) -> int:
        return len(self._pending) + self._writer.get_write_buffer_size()

    def close(self) -> None:
        """Flush what is queued (best effort) and close both pipe ends."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._writer.close()
        self._reader.close()

    def abort(self) -> None:
        """Close both ends at once, dropping anything unsent."""
        self._closed = True
        self._writer.abort()
        self._reader.close()


async def open_pipe_connection(
    read_fd: int,
    write_fd: int,
    listener: FrameListener[T],
    decoder: FrameDecoder[T],
    encoder: FrameEncoder,
) -> PipeConnection:
    """Attach two pipe descriptors to the running loop; the connection owns them."""
    loop = asyncio.get_running_loop()
    read_file = os.fdopen(read_fd, "rb", buffering=0)
    write_file = os.fdopen(write_fd, "wb", buffering=0)
    try:
        reader, _ = await loop.connect_read_pipe(
            lambda: _ReadProtocol(decoder, listener), read_file
        )
    except BaseException:
        read_file.close()
        write_file.close()
        raise
    try:
        writer, _ = await loop.connect_write_pipe(_WriteProtocol, write_file)
    except BaseException:
        reader.close()
        write_file.close()
        raise
    return PipeConnection(loop, reader, writer, encoder)
