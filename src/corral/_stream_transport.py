"""The pool's end of a socket with streamed buffers: written uncopied, read in place.

Owns: the two asyncio pieces of a placed worker's data socket that know about
streamed buffers (``_streamed``): ``StreamingTransport``, which writes each
frame's buffers after it, and ``StreamReadProtocol``, which reads buffers
straight into the memory of the value being received. Must not touch: the
layout (``_streamed``), the handshake or the launch (``_launch``). Kept apart
from ``_streamed`` so that a worker imports no asyncio for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
from typing import Any, Generic, TypeVar

from ._errors import ProtocolError
from ._streamed import StreamFrameDecoder, StreamFrameEncoder, pieces
from ._transport import StreamEnd

__all__ = ["StreamReadProtocol", "StreamingTransport"]

_READ_SIZE = 256 * 1024  # the pool's reads of frames (buffers are read in place)
_IOV_MAX = 1024
T = TypeVar("T")


class StreamingTransport:
    """The pool's data socket as ``FrameWriter`` sees it: frames, then their buffers.

    Writes go out with ``os.writev`` on a duplicate of the socket's descriptor
    (the asyncio transport keeps reading the original): what the socket does
    not take at once waits as views of the frames and of the arrays, never as
    a copy (asyncio's transports copy it into a buffer of their own, and
    Python 3.11's ``writelines`` joins everything first). The loop watches the
    duplicate for room while anything waits. ``close`` lets what waits drain,
    then lets the descriptor go; a write error drops it at once (the reading
    side sees the connection end).
    """

    __slots__ = ("_closing", "_encoder", "_fd", "_loop", "_queue", "_transport", "_watching")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.Transport,
        encoder: StreamFrameEncoder,
    ) -> None:
        self._loop = loop
        self._transport = transport
        self._encoder = encoder
        fileno = transport.get_extra_info("socket").fileno()
        if transport.is_closing() or fileno < 0:
            self._fd = -1  # the peer is already gone: writes are dropped, as on a closed transport
        else:
            self._fd = os.dup(fileno)
            os.set_blocking(self._fd, False)
        self._queue: collections.deque[memoryview] = collections.deque()
        self._watching = False
        self._closing = False

    @property
    def fileno(self) -> int:
        """The duplicate descriptor it writes with (-1 once released)."""
        return self._fd

    @property
    def waiting(self) -> int:
        """Bytes written but not yet taken by the socket."""
        return sum(view.nbytes for view in self._queue)

    def write(self, data: bytes | bytearray) -> None:
        if self._fd < 0:
            return  # the connection is gone: as a closed transport, drop it
        parts = self._encoder.take_parts(data)
        queue = self._queue
        if parts is None:
            queue.append(memoryview(data))
        else:
            for piece in pieces(data, parts):
                view = piece if isinstance(piece, memoryview) else memoryview(piece)
                if view.nbytes:
                    queue.append(view)
        if not self._watching:
            self._send()

    def _send(self) -> None:
        queue = self._queue
        while queue:
            batch = list(itertools.islice(queue, _IOV_MAX))
            try:
                written = os.writev(self._fd, batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._release()  # the peer is gone; the reading side reports it
                return
            while written:
                first = queue[0]
                if written >= first.nbytes:
                    written -= first.nbytes
                    queue.popleft()
                else:
                    queue[0] = first[written:]
                    written = 0
        if queue:
            if not self._watching:
                self._watching = True
                self._loop.add_writer(self._fd, self._send)
        else:
            if self._watching:
                self._watching = False
                self._loop.remove_writer(self._fd)
            if self._closing:
                self._release()

    def _release(self) -> None:
        if self._fd < 0:
            return
        if self._watching:
            self._watching = False
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.remove_writer(self._fd)
        self._queue.clear()
        os.close(self._fd)
        self._fd = -1

    def close(self) -> None:
        """Close the transport; this descriptor goes once what waits is written."""
        self._closing = True
        self._transport.close()
        if not self._queue:
            self._release()

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class StreamReadProtocol(StreamEnd, asyncio.BufferedProtocol, Generic[T]):
    """The pool's reading side of a data socket: frames, and buffers read in place.

    Delivers to a ``_transport.FrameListener`` exactly as ``_ReadProtocol`` does.
    """

    _decoder: StreamFrameDecoder[T]

    def __init__(self, decoder: StreamFrameDecoder[T], listener: Any, batch: Any = None) -> None:
        self._decoder = decoder
        self._listener = listener
        self._batch = batch
        self._scratch = bytearray(_READ_SIZE)
        self._view = memoryview(self._scratch)
        self._direct = False
        self._broken = False

    def get_buffer(self, sizehint: int) -> memoryview:
        wanted = self._decoder.wanted()
        if wanted is not None:
            self._direct = True
            return wanted
        self._direct = False
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        if self._broken:
            return
        decoder = self._decoder
        try:
            direct = self._direct
            messages = decoder.filled(nbytes) if direct else decoder.feed(self._view[:nbytes])
        except ProtocolError as exc:
            self._broken = True
            self._listener.connection_broken(exc)
            return
        received = self._listener.frame_received
        for message in messages:
            received(message)
        batch = self._batch
        if batch is not None:
            batch.wrote_since_read = False
            if len(messages) > 1:
                batch.cork()  # several callers wake up next round: one write for all
        self._listener.frames_done()
