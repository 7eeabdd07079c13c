"""Streamed buffers: on a TCP connection, arrays' buffers follow their frame, uncopied.

Owns: the frame layout of a connection that negotiated streamed buffers (a
table of buffers after the length, the MessagePack body, then the raw buffers:
docs/protocol.md, "Streamed buffers"), both ends of it: the encoder that takes
large array and table buffers out of the body (compressing them if the pool
chose a codec), the writers that send them after their frame without copying
them (``os.writev``, in the worker and in the pool: ``_stream_transport``),
and the decoder that reads them straight into the memory the received value
will view (``os.readv`` in the worker, ``recv_into`` through an asyncio
``BufferedProtocol`` in the pool). Must not touch: pipes or shared memory (a
local worker never uses this), or what messages mean.

A frame without streamed buffers is byte for byte the plain frame of
``_framing``: a connection pays for this path only when it carries a large
array or table.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from ._arrays import OverLimit
from ._blocking_writer import BlockingFrameWriter
from ._compression import COMPRESSION_THRESHOLD, compressor, decompress
from ._errors import PayloadTooLarge, ProtocolError
from ._framing import DEFAULT_MAX_MESSAGE_SIZE, HEADER_SIZE, FrameDecoder, FrameEncoder

__all__ = [
    "STREAMED_BUFFER_EXT",
    "STREAMED_FLAG",
    "WIRE_PLAIN",
    "WIRE_STREAMED",
    "StreamFrameDecoder",
    "StreamFrameEncoder",
    "StreamedBuffers",
    "StreamingBlockingWriter",
    "pieces",
]

#: Wire versions a shim announces (``ShimStarted.wire``): plain frames only, or
#: plain frames and frames followed by streamed buffers.
WIRE_PLAIN = 1
WIRE_STREAMED = 2
#: Extension type of a streamed buffer's place in the body (payload: u32 index).
STREAMED_BUFFER_EXT = 5
#: Bit 31 of a frame's length: a buffer table follows the length.
STREAMED_FLAG = 0x8000_0000
MAX_BODY = STREAMED_FLAG - 1
#: Most buffers one frame may stream.
MAX_BUFFERS = 4096
#: A buffer of at least SAMPLE_FROM bytes is compressed only if SAMPLE_SIZE
#: bytes from its middle compress by a tenth.
SAMPLE_FROM = 1024 * 1024
SAMPLE_SIZE = 64 * 1024
_MAPPED_FROM = 1024 * 1024  # received buffers this large are anonymous mappings
_COUNT = struct.Struct(">I")
_ENTRY = struct.Struct(">BQQ")  # codec, bytes on the wire, bytes once decoded
_INDEX = struct.Struct(">I")
_IOV_MAX = 1024
_CODEC_NONE = 0

T = TypeVar("T")
R = TypeVar("R")


class StreamedBuffers:
    """One side's streamed buffers: those taken out of the frame being encoded,
    or those read for the frame being decoded."""

    __slots__ = ("_compress", "_out", "_taken", "codec", "incoming", "threshold")

    def __init__(self, threshold: int, compression: str | None = None) -> None:
        self.threshold = threshold
        self.codec = _CODEC_NONE
        self._compress = None
        if compression is not None:
            self.codec, self._compress = compressor(compression)
        # Per thread: a worker encodes on its main thread and its loop thread at once.
        self._out = threading.local()
        self.incoming: list[Any] = []  # the buffers of the frame being decoded
        self._taken: set[int] = set()

    @property
    def parts(self) -> list[Any]:
        """What follows the frame being encoded by this thread, in order."""
        parts: list[Any] = self._out.__dict__.setdefault("parts", [])
        return parts

    @property
    def entries(self) -> list[bytes]:
        """Their table entries."""
        entries: list[bytes] = self._out.__dict__.setdefault("entries", [])
        return entries

    def begin(self) -> None:
        self._out.parts = []
        self._out.entries = []

    def add(self, raw: memoryview) -> msgspec.msgpack.Ext:
        """Stream ``raw`` after the frame (compressed if that pays); its place in the body."""
        if raw.format != "B" or raw.ndim != 1:
            raw = raw.cast("B")
        size = raw.nbytes
        wire: Any = raw
        codec = _CODEC_NONE
        if self._compress is not None and size >= COMPRESSION_THRESHOLD and self._pays(raw):
            packed = self._compress(raw)
            if len(packed) < size:  # incompressible data goes as it is
                wire, codec = packed, self.codec
        parts = self.parts
        index = len(parts)
        if index >= MAX_BUFFERS:
            raise OverLimit(f"more than {MAX_BUFFERS} large buffers in one message")
        parts.append(wire)
        self.entries.append(_ENTRY.pack(codec, len(wire), size))
        return msgspec.msgpack.Ext(STREAMED_BUFFER_EXT, _INDEX.pack(index))

    def _pays(self, raw: memoryview) -> bool:
        """Whether compressing ``raw`` is worth it: for a large buffer, a sample from
        its middle must shrink by a tenth (random floats, say, never do)."""
        size = raw.nbytes
        if size < SAMPLE_FROM:
            return True
        assert self._compress is not None
        middle = (size - SAMPLE_SIZE) // 2
        return len(self._compress(raw[middle : middle + SAMPLE_SIZE])) < 0.9 * SAMPLE_SIZE

    def take(self, data: bytes) -> Any:
        """The received buffer a body's extension names (each at most once)."""
        if len(data) != _INDEX.size:
            raise ProtocolError(f"malformed streamed-buffer reference ({len(data)} bytes)")
        (index,) = _INDEX.unpack(data)
        if index >= len(self.incoming) or index in self._taken:
            raise ProtocolError(f"streamed-buffer reference {index} names no unused buffer")
        self._taken.add(index)
        return self.incoming[index]

    def receive(self, buffers: list[Any]) -> None:
        self.incoming = buffers
        self._taken = set()


class StreamFrameEncoder(FrameEncoder):
    """A ``FrameEncoder`` that, once ``enable``d, streams large buffers after the frame.

    ``append`` leaves the frame (length with bit 31 set, table, body) in the
    buffer and keeps the buffers to follow it; the connection's writer takes
    them with ``take_parts(buffer)`` when it writes that buffer, and writes
    each list of parts right after the frame that ends at its offset.
    """

    __slots__ = ("_pending", "_stream")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_size)
        self._stream: StreamedBuffers | None = None
        # id(buffer) -> (buffer, [(offset just after a frame, the parts that follow it)])
        self._pending: dict[int, tuple[bytearray, list[tuple[int, list[Any]]]]] = {}

    @property
    def streaming(self) -> bool:
        return self._stream is not None

    def enable(self, threshold: int, compression: str | None = None) -> None:
        """Stream buffers over ``threshold`` bytes from now on (the peer said it can read them)."""
        self._stream = StreamedBuffers(threshold, compression)
        self._arrays.stream = self._stream

    def append(self, message: Any, buffer: bytearray) -> int:
        stream = self._stream
        if stream is None:
            return super().append(message, buffer)
        stream.begin()
        start = len(buffer)
        try:
            size = super().append(message, buffer)
        except BaseException:
            stream.begin()
            raise
        if not stream.parts:
            return size
        parts = stream.parts
        if size > MAX_BODY:
            del buffer[start:]
            stream.begin()
            raise PayloadTooLarge(f"message body of {size} bytes is too large to stream")
        table = _COUNT.pack(len(parts)) + b"".join(stream.entries)
        stream.begin()
        body = start + HEADER_SIZE
        buffer[body:body] = table
        buffer[start:body] = (size | STREAMED_FLAG).to_bytes(HEADER_SIZE, "big")
        pending = self._pending.get(id(buffer))
        if pending is None:
            self._pending[id(buffer)] = (buffer, [(len(buffer), parts)])
        else:
            pending[1].append((len(buffer), parts))
        return size

    def take_parts(self, buffer: bytes | bytearray) -> list[tuple[int, list[Any]]] | None:
        """The buffers to write after frames in ``buffer`` (by offset), or None; forgotten here."""
        if not self._pending:
            return None
        pending = self._pending.pop(id(buffer), None)
        if pending is None:
            return None
        if pending[0] is not buffer:  # not the buffer they were appended to
            self._pending[id(pending[0])] = pending
            return None
        return pending[1]


def pieces(data: bytes | bytearray, parts: list[tuple[int, list[Any]]]) -> list[Any]:
    """``data`` cut at each offset, with the parts that follow it in between."""
    view = memoryview(data)
    out: list[Any] = []
    previous = 0
    for offset, buffers in parts:
        out.append(view[previous:offset])
        out.extend(buffers)
        previous = offset
    if previous < len(data):
        out.append(view[previous:])
    return out


class StreamingBlockingWriter(BlockingFrameWriter):
    """The worker's writer on a socket: frames, and after each its buffers, with ``writev``."""

    def __init__(self, fd: int, encoder: StreamFrameEncoder) -> None:
        super().__init__(fd, encoder)
        self._streaming = encoder

    def write(self, data: bytes | bytearray) -> None:
        parts = self._streaming.take_parts(data)
        if parts is None:
            super().write(data)
            return
        chunks = [p if isinstance(p, memoryview) else memoryview(p) for p in pieces(data, parts)]
        with self._lock:
            if self.closed:
                raise BrokenPipeError("the worker's wire is closed")
            _write_all(self._fd, chunks)


def _write_all(fd: int, chunks: list[memoryview]) -> None:
    """Write every chunk, in order, with as few ``writev`` calls as the kernel allows."""
    left = [c for c in chunks if c.nbytes]
    while left:
        try:
            written = os.writev(fd, left[:_IOV_MAX])
        except BlockingIOError:
            select.select((), (fd,), ())
            continue
        while written:
            first = left[0]
            if written >= first.nbytes:
                written -= first.nbytes
                left.pop(0)
            else:
                left[0] = first[written:]
                written = 0


def _memory(size: int) -> Any:
    """Writable memory for ``size`` bytes that are about to be read into it.

    A large buffer is an anonymous mapping: its pages are zeroed by the kernel
    when the read first touches them, where a ``bytearray`` would be written
    with zeros once more before the read copies over them.
    """
    if size < _MAPPED_FROM:
        return bytearray(size)
    return mmap.mmap(-1, size)


class _Incoming:
    """A frame whose body has arrived and whose buffers are being read."""

    __slots__ = ("body", "entries", "got", "index", "targets")

    def __init__(self, entries: list[tuple[int, int, int]], body: bytes) -> None:
        self.entries = entries
        self.body = body
        # Where each buffer is read: the value's own memory, or the compressed bytes.
        self.targets = [_memory(wire) for _, wire, _ in entries]
        self.index = 0
        self.got = 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self.index < len(self.targets) and self.got == len(self.targets[self.index]):
            self.index += 1
            self.got = 0

    @property
    def done(self) -> bool:
        return self.index == len(self.targets)

    def wanted(self) -> memoryview:
        return memoryview(self.targets[self.index])[self.got :]

    def filled(self, count: int) -> None:
        self.got += count
        self._skip_empty()

    def fill(self, data: memoryview) -> int:
        """Copy what of ``data`` belongs to the buffers; returns how much that was."""
        used = 0
        while not self.done and used < len(data):
            target = self.targets[self.index]
            count = min(len(target) - self.got, len(data) - used)
            target[self.got : self.got + count] = data[used : used + count]
            used += count
            self.filled(count)
        return used

    @property
    def received(self) -> int:
        return sum(len(t) for t in self.targets[: self.index]) + self.got

    def buffers(self) -> list[Any]:
        """The buffers as the body's values will view them (decompressed)."""
        out: list[Any] = []
        for (codec, _, size), target in zip(self.entries, self.targets, strict=True):
            out.append(target if codec == _CODEC_NONE else decompress(codec, target, size))
        return out


class StreamFrameDecoder(FrameDecoder[T]):
    """A ``FrameDecoder`` that also reads frames followed by streamed buffers.

    With ``fd`` (a worker's blocking socket), a frame's buffers are read from
    it with ``os.readv`` straight into their destination as soon as its body is
    complete; without, ``wanted()`` says where the next bytes should be read
    and ``filled(n)`` that ``n`` were (the pool's ``StreamReadProtocol``), and
    bytes given to ``feed`` that belong to buffers are copied there.
    """

    __slots__ = ("_fd", "_incoming", "_stream")

    def __init__(
        self,
        message_type: type[T],
        max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        fd: int | None = None,
    ) -> None:
        super().__init__(message_type, max_size)
        self._fd = fd
        self._incoming: _Incoming | None = None
        self._stream = StreamedBuffers(0)
        self._arrays.stream = self._stream

    @property
    def buffered(self) -> int:
        incoming = self._incoming
        if incoming is None:
            return len(self._buffer)
        return len(incoming.body) + incoming.received

    def wanted(self) -> memoryview | None:
        """Where the next bytes belong if they are a streamed buffer's; else None."""
        incoming = self._incoming
        if incoming is None or self._failed is not None:
            return None
        return incoming.wanted()

    def filled(self, count: int) -> list[T]:
        """``count`` bytes were read into ``wanted()``; the message, once its buffers are all in."""
        incoming = self._incoming
        assert incoming is not None
        incoming.filled(count)
        if not incoming.done:
            return []
        return self._guarded(self._finish)

    def feed(self, data: bytes | bytearray | memoryview) -> list[T]:
        messages: list[T] = []
        self._guarded(lambda: self._consume(memoryview(data), messages))
        return messages

    def _guarded(self, work: Callable[[], R]) -> R:
        if self._failed is not None:
            raise self._failed
        try:
            return work()
        except ProtocolError as exc:
            self._failed = exc
            self._buffer = bytearray()
            self._incoming = None
            raise

    def _consume(self, data: memoryview, messages: list[T]) -> list[T]:
        while True:
            incoming = self._incoming
            if incoming is not None:
                data = data[incoming.fill(data) :]
                if not incoming.done:
                    if self._fd is None:
                        return messages
                    self._read_in_place(incoming)
                messages.extend(self._finish())
                continue
            if not data:
                return messages
            if self._buffer:  # the start of a frame, from the last read
                buffer = self._buffer
                buffer += data
                view = memoryview(buffer)
                try:
                    used = self._head(view, messages)
                except BaseException:
                    view.release()
                    raise
                if used is None:
                    view.release()
                    return messages
                self._buffer = bytearray()  # the view keeps the old one until it is read
                data = view[used:]
                continue
            used = self._head(data, messages)
            if used is None:
                self._buffer += data  # an incomplete head: kept for the next read
                return messages
            data = data[used:]

    def _head(self, data: memoryview, messages: list[T]) -> int | None:
        """Decode a plain frame, or take a streamed frame's table and body; bytes used."""
        if len(data) < HEADER_SIZE:
            return None
        length = int.from_bytes(data[:HEADER_SIZE], "big")
        size = length & MAX_BODY
        if size == 0:
            raise ProtocolError("empty frame (length 0)")
        if size > self.max_size:
            raise ProtocolError(
                f"frame of {size} bytes announced, over the limit of {self.max_size} bytes"
            )
        if not length & STREAMED_FLAG:
            end = HEADER_SIZE + size
            if len(data) < end:
                return None
            self._budget = self.max_size - size
            messages.append(self._decode_body(data[HEADER_SIZE:end], []))
            return end
        table = HEADER_SIZE + _COUNT.size
        if len(data) < table:
            return None
        count: int = _COUNT.unpack(data[HEADER_SIZE:table])[0]
        if not 0 < count <= MAX_BUFFERS:
            raise ProtocolError(f"streamed frame announces {count} buffers (1..{MAX_BUFFERS})")
        body = table + count * _ENTRY.size
        if len(data) < body:
            return None
        entries = [_ENTRY.unpack_from(data, table + k * _ENTRY.size) for k in range(count)]
        total = size
        for codec, wire, raw in entries:
            if (codec == _CODEC_NONE and wire != raw) or (codec != _CODEC_NONE and wire >= raw):
                raise ProtocolError(
                    f"streamed buffer of {raw} bytes announced as {wire} bytes (codec {codec})"
                )
            total += raw
        if total > self.max_size:
            raise ProtocolError(
                f"streamed frame of {total} bytes announced, over the limit of "
                f"{self.max_size} bytes"
            )
        end = body + size
        if len(data) < end:
            return None
        self._incoming = _Incoming(entries, bytes(data[body:end]))
        return end

    def _read_in_place(self, incoming: _Incoming) -> None:
        """Read the rest of the buffers from the descriptor, into their destinations."""
        assert self._fd is not None
        while not incoming.done:
            try:
                count = os.readv(self._fd, [incoming.wanted()])
            except BlockingIOError:
                select.select((self._fd,), (), ())
                continue
            except OSError as exc:
                raise ProtocolError(f"connection failed inside a frame's buffers: {exc}") from None
            if not count:
                raise ProtocolError(
                    f"stream ended inside a frame's buffers ({incoming.received} bytes read)"
                )
            incoming.filled(count)

    def _finish(self) -> list[T]:
        incoming = self._incoming
        assert incoming is not None
        self._incoming = None
        buffers = incoming.buffers()
        self._budget = self.max_size - len(incoming.body)
        return [self._decode_body(memoryview(incoming.body), buffers)]

    def _decode_body(self, body: memoryview, buffers: list[Any]) -> T:
        self._stream.receive(buffers)
        try:
            return self._decode(body)
        except ProtocolError:
            raise
        except (msgspec.DecodeError, RecursionError, ValueError, TypeError, OverflowError) as exc:
            raise ProtocolError(f"malformed message: {exc}") from exc
        finally:
            self._stream.receive([])
