"""Frames: a 4-byte big-endian length, then one MessagePack-encoded message.

Owns: turning messages into framed bytes and a byte stream back into messages,
with the size limit and every malformed input mapped to ProtocolError. Must not
touch: sockets, pipes or the event loop; it is fed bytes and returns values.
Large buffers out of band are delegated to an optional ``_shm.LargeBuffers``,
which owns the only file I/O on this path; arrays and tables (NumPy, Arrow,
pandas) to ``_arrays.ArrayCodec``, called only for types msgspec does not know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

import msgspec

from ._arrays import EXTENSIONS, ArrayCodec, OverLimit
from ._errors import EncodeError, PayloadTooLarge, ProtocolError
from ._shm import LostSegment

if TYPE_CHECKING:
    from ._shm import LargeBuffers, Offloaded

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEADER_SIZE",
    "FrameDecoder",
    "FrameEncoder",
]

HEADER_SIZE = 4
MIB = 1024 * 1024
# A single 64 MiB argument or result plus the envelope fits with room to spare.
DEFAULT_MAX_MESSAGE_SIZE = 64 * MIB + 1 * MIB
# A frame's length field is 32 bits; larger limits cannot be expressed.
MAX_POSSIBLE_SIZE = 2**32 - 1

T = TypeVar("T")


# A read that holds one whole frame of at most this many bytes is decoded from a
# copy of its body (cheaper than views at this size); larger ones take the loop.
_ONE_FRAME_MAX = 4096

_LARGE_BUFFER_EXT = 1  # corral._shm.LARGE_BUFFER_EXT; not imported, to keep this module I/O-free


# Errors msgspec and the interpreter raise on hostile input (truncation, bad
# UTF-8, wrong types, deep nesting): all of them mean "not a valid message".
_DECODE_FAILURES = (msgspec.DecodeError, RecursionError, ValueError, TypeError, OverflowError)
_ENCODE_FAILURES = (TypeError, ValueError, OverflowError, RecursionError)


class FrameEncoder:
    """Appends framed messages to a bytearray, refusing any over the size limit.

    With ``large_buffers``, bytes-like values over its threshold are written to
    shared-memory segments and the frame carries references to them; the
    buffers count against ``max_size`` with the frame.
    """

    __slots__ = ("_arrays", "_encode_into", "_large", "max_size")

    def __init__(
        self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE, large_buffers: LargeBuffers | None = None
    ) -> None:
        if not 0 < max_size <= MAX_POSSIBLE_SIZE:
            raise ValueError(f"max_size must be in 1..{MAX_POSSIBLE_SIZE}, got {max_size}")
        self.max_size = max_size
        self._arrays = ArrayCodec(large_buffers, max_size)
        self._encode_into = msgspec.msgpack.Encoder(enc_hook=self._arrays.enc_hook).encode_into
        self._large = large_buffers

    def close(self) -> None:
        """Release the segments kept for reuse (the connection is done sending)."""
        if self._large is not None:
            self._large.close()

    def _encode(
        self, message: Any, buffer: bytearray, start: int, reserved: int = 0
    ) -> tuple[int, int]:
        """Encode one frame's body after ``start``: whole, or ``buffer`` as it was.

        Returns the body's size and the bytes its arrays put in segments (which
        stay written: ``self._arrays.discard()`` unlinks them). ``reserved`` is
        what the message's other out-of-band buffers already count.
        """
        arrays = self._arrays
        arrays.start()
        arrays.total = reserved
        try:
            self._encode_into(message, buffer, start + HEADER_SIZE)
        except BaseException as exc:  # noqa: BLE001 - _encode_failed undoes and re-raises
            self._encode_failed(exc, buffer, start)
        return len(buffer) - start - HEADER_SIZE, arrays.total - reserved

    def _encode_failed(self, exc: BaseException, buffer: bytearray, start: int) -> NoReturn:
        """Undo a failed encode (``buffer`` as it was, no segment left) and raise."""
        # msgspec leaves what it had written so far; a cyclic or too deeply
        # nested value fails with RecursionError.
        del buffer[start:]
        self._arrays.discard()
        if isinstance(exc, OverLimit):
            raise PayloadTooLarge(str(exc)) from None
        if isinstance(exc, _ENCODE_FAILURES):
            raise EncodeError(f"cannot encode message: {exc}") from exc
        raise exc

    def _abandon(self, buffer: bytearray, start: int) -> None:
        """Forget a frame begun at ``start`` and the segments its arrays used."""
        del buffer[start:]
        self._arrays.discard()

    def append(self, message: Any, buffer: bytearray) -> int:
        """Append one frame to ``buffer`` and return its payload size.

        On failure ``buffer`` is left exactly as it was, and no segment is left
        behind: EncodeError for a value MessagePack cannot hold, PayloadTooLarge
        for a message over the limit.
        """
        large = self._large
        if large is not None and large.wants(message):
            offloaded = large.offload(message, self.max_size)
            if offloaded is not None:
                return self._append_offloaded(offloaded, buffer, large)
        # ``_encode``, inlined: this runs for every frame either side sends.
        start = len(buffer)
        arrays = self._arrays
        arrays.start()
        try:
            self._encode_into(message, buffer, start + HEADER_SIZE)
        except BaseException as exc:  # noqa: BLE001 - _encode_failed undoes and re-raises
            self._encode_failed(exc, buffer, start)
        size = len(buffer) - start - HEADER_SIZE
        in_segments = arrays.total
        if large is not None and size > large.threshold:
            # A buffer over the threshold may be nested deeper than ``wants`` looks.
            try:
                offloaded = large.offload(message, self.max_size)
            except BaseException:
                # Over the limit, or not walkable: the frame begun above must not
                # stay, or the next one would follow a zero header.
                self._abandon(buffer, start)
                raise
            if offloaded is not None:
                self._abandon(buffer, start)  # encoded again, with references
                return self._append_offloaded(offloaded, buffer, large)
        if size + in_segments > self.max_size:
            self._abandon(buffer, start)
            raise PayloadTooLarge(
                f"message of {size + in_segments} bytes is over the limit of {self.max_size} bytes"
            )
        buffer[start : start + HEADER_SIZE] = size.to_bytes(HEADER_SIZE, "big")
        return size

    def _append_offloaded(
        self, offloaded: Offloaded, buffer: bytearray, large: LargeBuffers
    ) -> int:
        """Append the frame of a message whose buffers are already in segments."""
        start = len(buffer)
        try:
            size, in_segments = self._encode(offloaded.message, buffer, start, offloaded.total)
        except BaseException:
            large.discard(offloaded.names)
            raise
        total = size + in_segments + offloaded.total
        if total > self.max_size:
            self._abandon(buffer, start)
            large.discard(offloaded.names)
            raise PayloadTooLarge(
                f"message of {total} bytes (with its large buffers) is over "
                f"the limit of {self.max_size} bytes"
            )
        buffer[start : start + HEADER_SIZE] = size.to_bytes(HEADER_SIZE, "big")
        return size

    def encode(self, message: Any) -> bytearray:
        """One framed message as a new buffer."""
        buffer = bytearray()
        self.append(message, buffer)
        return buffer


class FrameDecoder(Generic[T]):
    """Incremental decoder: feed it bytes as they arrive, get whole messages back.

    The length of each frame is checked against the limit as soon as its header
    is complete, before any space for the body is used. After a ProtocolError
    the stream is unusable and every later ``feed`` raises again.
    """

    __slots__ = ("_arrays", "_budget", "_buffer", "_decode", "_failed", "_large", "max_size")

    def __init__(
        self,
        message_type: type[T],
        max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        large_buffers: LargeBuffers | None = None,
    ) -> None:
        if not 0 < max_size <= MAX_POSSIBLE_SIZE:
            raise ValueError(f"max_size must be in 1..{MAX_POSSIBLE_SIZE}, got {max_size}")
        self.max_size = max_size
        self._large = large_buffers
        self._budget = 0  # what the large buffers of the frame being decoded may still use
        self._arrays = ArrayCodec(large_buffers, max_size)
        self._decode = msgspec.msgpack.Decoder(message_type, ext_hook=self._extension).decode
        self._buffer = bytearray()
        self._failed: ProtocolError | None = None

    def _extension(self, code: int, data: memoryview) -> Any:
        """Arrays, tables and large-buffer references become values; others are refused."""
        if code in EXTENSIONS:
            # ``data`` is a view into the decoder's buffer; a traceback would keep
            # it (and the buffer's export) alive, and the buffer could not be cleared.
            try:
                value, used = self._arrays.decode(code, data, self._budget)
            finally:
                del data
            self._budget -= used
            return value
        if code != _LARGE_BUFFER_EXT or self._large is None:
            del data  # see above
            raise ProtocolError(f"unknown MessagePack extension type {code}")
        reference = bytes(data)  # small; a view must not outlive this call (see above)
        del data
        value = self._large.load(reference, self._budget)
        self._budget -= len(value)
        return value

    @property
    def failed(self) -> ProtocolError | None:
        """The error that ended this stream, once one has (later feeds raise it)."""
        return self._failed

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[T]:
        """Add received bytes; return the messages completed by them, in order.

        One pass over the read: each whole frame is decoded straight from the
        received bytes (no copy when nothing was left over from the last read);
        only an incomplete tail is kept for the next read.
        """
        if self._failed is not None:
            raise self._failed
        buffer = self._buffer
        if not buffer:
            # The common read of a sequential call: exactly one whole frame.
            # Decoded without the general loop's views and bookkeeping.
            available = len(data)
            if available > HEADER_SIZE:
                size = int.from_bytes(data[:HEADER_SIZE], "big")
                whole = size == available - HEADER_SIZE
                if whole and size <= _ONE_FRAME_MAX and size <= self.max_size:
                    self._budget = self.max_size - size
                    try:
                        return [self._decode(data[HEADER_SIZE:])]  # a small copy, no view
                    except ProtocolError as exc:
                        self._failed = exc
                        raise
                    except _DECODE_FAILURES as exc:
                        self._failed = ProtocolError(f"malformed message: {exc}")
                        raise self._failed from exc
            source: bytes | bytearray | memoryview = data
        else:
            buffer += data
            source = buffer
        messages: list[T] = []
        offset = 0
        available = len(source)
        decode = self._decode
        max_size = self.max_size
        view = memoryview(source)
        try:
            while available - offset >= HEADER_SIZE:
                size = int.from_bytes(view[offset : offset + HEADER_SIZE], "big")
                if size == 0:
                    raise ProtocolError("empty frame (length 0)")
                if size > max_size:
                    raise ProtocolError(
                        f"frame of {size} bytes announced, over the limit of {max_size} bytes"
                    )
                end = offset + HEADER_SIZE + size
                if end > available:
                    break
                self._budget = max_size - size
                try:
                    messages.append(decode(view[offset + HEADER_SIZE : end]))
                except ProtocolError:
                    raise
                except _DECODE_FAILURES as exc:
                    raise ProtocolError(f"malformed message: {exc}") from exc
                offset = end
        except ProtocolError as exc:
            view.release()
            self._failed = exc
            buffer.clear()
            if messages and isinstance(exc, LostSegment):
                # The frames before it arrived whole (their segments are already read):
                # deliver them; ``failed`` and the next feed report the loss.
                return messages
            raise
        if source is buffer:
            view.release()
            if offset:
                del buffer[:offset]
        elif offset < available:
            buffer += view[offset:]  # an incomplete frame: kept for the next read
            view.release()
        else:
            view.release()
        return messages
