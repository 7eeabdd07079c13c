"""How frames move between the two ends: pipes driven by the event loop.

Owns: the read side (bytes -> FrameDecoder -> one callback per message), the
pool's write side (a frame is written at once unless a burst is under way: then
the rest of that loop tick is coalesced, over every connection of the loop,
into one write per pipe; see ``TickBatch``), the optional control channel
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
import weakref
from typing import Any, Generic, Protocol, TypeVar

from ._blocking_writer import BlockingFrameWriter
from ._errors import ProtocolError
from ._framing import FrameDecoder, FrameEncoder

__all__ = [
    "BlockingFrameWriter",
    "TickBatch",
    "FrameConnection",
    "FrameListener",
    "FrameWriter",
    "PipeConnection",
    "StreamEnd",
    "TruncatedStream",
    "open_frame_reader",
    "open_pipe_connection",
    "tick_batch",
]

T = TypeVar("T")
READ_SIZE = 64 * 1024  # at most what one read of a pipe returns (its default capacity)
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


class TickBatch:
    """When the pool's writes are coalesced: one per event loop, shared by its writers.

    A frame is written at once (no added latency) unless a burst is under way:
    a second frame sent before any reply was read, or the callers woken by a
    read that brought several replies. Then the batch is corked: frames are
    queued on their writers and written together, one write per pipe, when the
    loop's current round of callbacks ends. A sequential caller thus costs no
    callback and no extra loop round per call, and a burst costs one write per
    pipe, not one per frame.
    """

    __slots__ = ("__weakref__", "_dirty", "_loop", "corked", "wrote_since_read")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[FrameWriter] = []
        self.corked = False
        self.wrote_since_read = False

    def cork(self) -> None:
        """Queue frames until the end of this round of the loop's callbacks."""
        if not self.corked:
            self.corked = True
            self._loop.call_soon(self.flush)

    def queued(self, writer: FrameWriter) -> None:
        self._dirty.append(writer)

    def flush(self) -> None:
        self.corked = False
        dirty, self._dirty = self._dirty, []
        for writer in dirty:
            writer.flush()


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TickBatch] = (
    weakref.WeakKeyDictionary()
)


def tick_batch(loop: asyncio.AbstractEventLoop) -> TickBatch:
    """The loop's ``TickBatch`` (made on first use)."""
    batch = _batches.get(loop)
    if batch is None:
        batch = _batches[loop] = TickBatch(loop)
    return batch


class StreamEnd:
    """What a reading protocol does when its peer's side ends: one rule for pipes and sockets.

    The connection breaks once, with ``TruncatedStream`` if the decoder holds part
    of a frame, else with no error. Mixed into ``_ReadProtocol`` and
    ``_stream_transport.StreamReadProtocol``, which set these three attributes.
    """

    _broken: bool
    _decoder: Any
    _listener: Any

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


class _ReadProtocol(StreamEnd, asyncio.Protocol, Generic[T]):
    _decoder: FrameDecoder[T]

    def __init__(
        self,
        decoder: FrameDecoder[T],
        listener: FrameListener[T],
        batch: TickBatch | None = None,
    ) -> None:
        self._decoder = decoder
        self._listener = listener
        self._broken = False
        self._batch = batch  # the pool's writers: a read ends a burst, or starts one

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
        batch = self._batch
        if batch is not None:
            batch.wrote_since_read = False
            if len(messages) > 1:
                batch.cork()  # several callers wake up next round: one write for all
        listener.frames_done()
        failed = self._decoder.failed  # after frames that arrived whole (a lost segment)
        if failed is not None:
            self._broken = True
            listener.connection_broken(failed)


class _WriteProtocol(asyncio.Protocol):
    def connection_lost(self, exc: Exception | None) -> None:
        return None


class FrameWriter:
    """Frames onto an asyncio write transport, coalesced in bursts (``TickBatch``)."""

    __slots__ = ("_append", "_batch", "_closed", "_queued", "_release", "_transport", "_write")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.WriteTransport,
        encoder: FrameEncoder,
    ) -> None:
        self._transport = transport
        self._write = transport.write
        self._append = encoder.append
        self._release = encoder.close
        self._batch = tick_batch(loop)
        self._queued = bytearray()  # frames waiting for the batch's flush
        self._closed = False

    def send(self, message: Any) -> int:
        """Write one message (now, or when the burst's round ends); returns its size."""
        if self._closed:
            return 0
        batch = self._batch
        if not batch.corked:
            if not batch.wrote_since_read:
                batch.wrote_since_read = True
                frame = bytearray()
                size = self._append(message, frame)
                self._write(frame)
                return size
            batch.cork()  # a second frame before any reply: a burst
        queued = self._queued
        if not queued:
            size = self._append(message, queued)
            batch.queued(self)
            return size
        return self._append(message, queued)

    def flush(self) -> None:
        """Write what is queued (the batch calls this when the round ends)."""
        if self._queued and not self._closed:
            data, self._queued = self._queued, bytearray()
            self._write(data)

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
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
    read_fd: int,
    listener: FrameListener[T],
    decoder: FrameDecoder[T],
    batch: TickBatch | None = None,
) -> asyncio.ReadTransport:
    """Deliver the frames arriving on ``read_fd`` to ``listener``, on the running loop.

    ``batch``: the writers whose bursts this connection's replies end or start.
    """
    loop = asyncio.get_running_loop()
    read_file = os.fdopen(read_fd, "rb", buffering=0)
    try:
        reader, _ = await loop.connect_read_pipe(
            lambda: _ReadProtocol(decoder, listener, batch), read_file
        )
    except BaseException:
        read_file.close()
        raise
    if hasattr(reader, "max_size"):
        # asyncio reads up to 256 KiB at a time into a new bytes object: over
        # malloc's mmap threshold, so every read of a small reply would map and
        # unmap memory (three system calls). A pipe holds 64 KiB: read that much.
        reader.max_size = READ_SIZE
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
        batch = tick_batch(asyncio.get_running_loop())
        reader = await open_frame_reader(read_fd, listener, decoder, batch)
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
