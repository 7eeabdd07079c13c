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
import sys
from typing import Any, Generic, TypeVar

from ._errors import ProtocolError
from ._streamed import StreamFrameDecoder, StreamFrameEncoder, pieces
from ._transport import TruncatedStream

__all__ = ["StreamReadProtocol", "StreamingTransport"]

_READ_SIZE = 256 * 1024  # the pool's reads of frames (buffers are read in place)
T = TypeVar("T")


class StreamingTransport:
    """The pool's data socket as ``FrameWriter`` sees it: frames, then their buffers.

    Python 3.12+ sends a list of buffers with one ``sendmsg`` and keeps what
    the socket did not take as views (no copy); 3.11's ``writelines`` would
    join them, so there each piece is written on its own, and the transport
    copies only what the socket cannot take at once.
    """

    __slots__ = ("_encoder", "_transport", "_writelines")

    def __init__(self, transport: asyncio.WriteTransport, encoder: StreamFrameEncoder) -> None:
        self._transport = transport
        self._encoder = encoder
        self._writelines = sys.version_info >= (3, 12)

    def write(self, data: bytes | bytearray) -> None:
        parts = self._encoder.take_parts(data)
        if parts is None:
            self._transport.write(data)
            return
        chunks = pieces(data, parts)
        if self._writelines:
            self._transport.writelines(chunks)
        else:
            for piece in chunks:
                self._transport.write(piece)

    def close(self) -> None:
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class StreamReadProtocol(asyncio.BufferedProtocol, Generic[T]):
    """The pool's reading side of a data socket: frames, and buffers read in place.

    Delivers to a ``_transport.FrameListener`` exactly as ``_ReadProtocol`` does.
    """

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
        if not messages:
            return
        received = self._listener.frame_received
        for message in messages:
            received(message)
        batch = self._batch
        if batch is not None:
            batch.wrote_since_read = False
            if len(messages) > 1:
                batch.cork()
        self._listener.frames_done()

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
