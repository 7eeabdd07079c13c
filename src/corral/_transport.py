"""How frames move between the two ends: pipes driven by the event loop.

Owns: the read side (bytes -> FrameDecoder -> one callback per message), the
pool's write side (the first frame of a loop tick is written at once, the rest
of that tick coalesced into one more write), the optional control channel
(heartbeats and cancels on a pipe of their own, so a worker can answer them
while its loop is busy), and the worker's blocking, thread-safe writer
(``_blocking_writer``, re-exported here). Must not touch: what messages mean,
or how the process at the other end was started (that is the launcher's job);
a socket transport would offer the same ``FrameConnection`` surface, sending
control messages in-band.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Generic, Protocol, TypeVar

from ._blocking_writer import BlockingFrameWriter
from ._errors import ProtocolError
from ._framing import FrameDecoder, FrameEncoder

__all__ = [
    "BlockingFrameWriter",
    "FrameConnection",
    "FrameListener",
    "FrameWriter",
    "PipeConnection",
    "TruncatedStream",
    "open_frame_reader",
    "open_pipe_connection",
]

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class FrameListener(Protocol[T_contra]):
    """What a connection reports to its owner."""

    def frame_received(self, message: T_contra) -> None: ...

    def connection_broken(self, error: ProtocolError | None) -> None:
        """The peer sent a bad frame (``error``) or closed its end (None)."""

    def frames_done(self) -> None:
        """Every frame of one read has been delivered."""


class FrameConnection(Protocol):
    """The transport seam: anything that carries frames to one worker."""

    def send(self, message: Any) -> int:
        """Queue one message; raises EncodeError/PayloadTooLarge with nothing sent."""

    def send_control(self, message: Any) -> int:
        """Queue a Ping or Cancel, which must reach the worker even while it is busy."""

    def close(self) -> None: ...


class TruncatedStream(ProtocolError):
    """The peer's stream ended inside a frame: a broken peer, or a dead one."""


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
        listener = self._listener
        received = listener.frame_received
        for message in messages:
            received(message)
        listener.frames_done()
        failed = self._decoder.failed  # after frames that arrived whole (a lost segment)
        if failed is not None:
            self._broken = True
            listener.connection_broken(failed)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._broken:
            return
        self._broken = True
        if self._decoder.buffered:
            self._listener.connection_broken(
                TruncatedStream(f"stream ended inside a frame ({self._decoder.buffered} bytes)")
            )
        else:
            self._listener.connection_broken(None)


class _WriteProtocol(asyncio.Protocol):
    def connection_lost(self, exc: Exception | None) -> None:
        return None


class FrameWriter:
    """Frames onto an asyncio write transport.

    The first frame of a loop tick is written at once (no added latency); frames
    sent later in the same tick are coalesced and written together when the tick
    ends, so a burst of calls costs one system call, not one each.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.WriteTransport,
        encoder: FrameEncoder,
    ) -> None:
        self._loop = loop
        self._transport = transport
        self._append = encoder.append
        self._release = encoder.close
        self._pending = bytearray()
        self._in_tick = False
        self._closed = False

    def send(self, message: Any) -> int:
        """Write one message (now, or at the end of this tick); returns its size."""
        if self._closed:
            return 0
        if self._in_tick:
            return self._append(message, self._pending)
        frame = bytearray()
        size = self._append(message, frame)
        self._transport.write(frame)
        self._in_tick = True
        self._loop.call_soon(self._end_tick)
        return size

    def _end_tick(self) -> None:
        self._in_tick = False
        if self._pending and not self._closed:
            data, self._pending = self._pending, bytearray()
            self._transport.write(data)

    def close(self) -> None:
        if self._closed:
            return
        self._end_tick()
        self._closed = True
        self._transport.close()
        self._release()  # segments kept for reuse: nothing more is sent


class PipeConnection:
    """Frames to a worker over pipes: calls on one, control messages on another."""

    def __init__(
        self,
        reader: asyncio.ReadTransport,
        writer: FrameWriter,
        control: FrameWriter | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._control = control
        self.send = writer.send
        self.send_control = (control or writer).send

    def close(self) -> None:
        """Write what is queued (best effort) and close every pipe end."""
        self._writer.close()
        if self._control is not None:
            self._control.close()
        self._reader.close()


async def open_frame_reader(
    read_fd: int, listener: FrameListener[T], decoder: FrameDecoder[T]
) -> asyncio.ReadTransport:
    """Deliver the frames arriving on ``read_fd`` to ``listener``, on the running loop."""
    loop = asyncio.get_running_loop()
    read_file = os.fdopen(read_fd, "rb", buffering=0)
    try:
        reader, _ = await loop.connect_read_pipe(
            lambda: _ReadProtocol(decoder, listener), read_file
        )
    except BaseException:
        read_file.close()
        raise
    return reader


async def _open_writer(fd: int, encoder: FrameEncoder) -> FrameWriter:
    loop = asyncio.get_running_loop()
    write_file = os.fdopen(fd, "wb", buffering=0)
    try:
        transport, _ = await loop.connect_write_pipe(_WriteProtocol, write_file)
    except BaseException:
        write_file.close()
        raise
    return FrameWriter(loop, transport, encoder)


async def open_pipe_connection(
    read_fd: int,
    write_fd: int,
    listener: FrameListener[T],
    decoder: FrameDecoder[T],
    encoder: FrameEncoder,
    control_fd: int | None = None,
) -> PipeConnection:
    """Attach pipe descriptors to the running loop; the connection owns them all."""
    owned = [read_fd, write_fd] + ([control_fd] if control_fd is not None else [])
    opened: list[asyncio.BaseTransport | FrameWriter] = []
    try:
        owned.remove(read_fd)  # each opener owns its descriptor from here, even on failure
        reader = await open_frame_reader(read_fd, listener, decoder)
        opened.append(reader)
        owned.remove(write_fd)
        writer = await _open_writer(write_fd, encoder)
        opened.append(writer)
        control = None
        if control_fd is not None:
            owned.remove(control_fd)
            control = await _open_writer(control_fd, encoder)
    except BaseException:
        for thing in opened:
            thing.close()
        for fd in owned:
            os.close(fd)
        raise
    return PipeConnection(reader, writer, control)
