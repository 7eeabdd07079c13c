"""Large buffers out of band: bytes above a threshold travel through /dev/shm.

Owns: the shared-memory segments of one worker's connection, seen from one
side: their names, writing them, reading and unlinking them, swapping large
bytes-like values in a message for references (MessagePack extension type
``LARGE_BUFFER_EXT``) and back, and unlinking whatever a dead worker left under
its prefix. Must not touch: framing or pipes (``_framing`` calls in here), or
processes (the handle and the shepherd decide when a worker is gone).

Ownership of a segment (docs/protocol.md, "Large buffers"):
- the side that sends a message creates its segments (``O_CREAT | O_EXCL``,
  mode 0600) under the worker's prefix, fills them, and closes them;
- the side that decodes the message opens each segment, unlinks it at once,
  and reads it into ``bytes``;
- a message that fails to encode after its segments were written unlinks them
  before the error is raised;
- whatever is left when a worker dies (a call still in the pipe, a result never
  read, a write cut short) is unlinked by prefix: by the pool when it sees the
  worker's exit, and by the shepherd when it ends, which also covers the death
  of the pool's process.

Segments are plain files of a tmpfs written with ``write()`` and read with
``read()``: each side copies the buffer once, and nothing here needs
``multiprocessing.shared_memory`` or its resource tracker.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import struct
from typing import Any

import msgspec

from ._errors import EncodeError, PayloadTooLarge, ProtocolError
from ._log import get_logger
from ._messages import Call, Chunk, Result

__all__ = [
    "LARGE_BUFFER_EXT",
    "SEGMENT_PREFIX",
    "SHM_DIR",
    "LargeBuffers",
    "LostSegment",
    "Offloaded",
    "new_pool_prefix",
    "unlink_segments",
]

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "corral-"
LARGE_BUFFER_EXT = 1
_SIZE = struct.Struct(">Q")
_MAX_NAME = 200
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_log = get_logger("corral")


class LostSegment(ProtocolError):
    """A message names a segment that is not there: its writer died, or broke the rules."""


def new_pool_prefix() -> str:
    """A prefix no other pool uses: ``corral-<pid>-<random>-``."""
    return f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"


def _check_prefix(prefix: str) -> None:
    if (
        not prefix.startswith(SEGMENT_PREFIX)
        or len(prefix) <= len(SEGMENT_PREFIX)
        or not set(prefix) <= _NAME_CHARS
    ):
        raise ValueError(f"segment prefix must be 'corral-' then [a-z0-9-], got {prefix!r}")


def unlink_segments(prefix: str, directory: str = SHM_DIR) -> int:
    """Unlink every segment whose name starts with ``prefix``; returns how many."""
    _check_prefix(prefix)
    removed = 0
    try:
        entries = os.listdir(directory)
    except OSError:
        return 0
    for name in entries:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                continue  # its reader took it meanwhile
            removed += 1
    return removed


def _fill(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd``."""
    while data:
        data = data[os.write(fd, data) :]


def _size_of(value: Any) -> int:
    """Bytes in a bytes-like value (0 for anything else, or a non-contiguous view)."""
    if isinstance(value, bytes | bytearray):
        return len(value)
    if isinstance(value, memoryview):
        return value.nbytes if value.c_contiguous else 0
    return 0


class Offloaded:
    """A message whose large buffers were written to segments, ready to encode."""

    __slots__ = ("message", "names", "total")

    def __init__(self, message: Any, names: list[str], total: int) -> None:
        self.message = message
        self.names = names
        self.total = total


class LargeBuffers:
    """One side of one worker's connection: writes and reads its segments.

    ``prefix`` is the worker's (the pool's prefix plus the worker's number);
    ``origin`` is one letter, ``p`` for the pool and ``w`` for the worker, so the
    two sides never pick the same name. Buffers strictly larger than
    ``threshold`` bytes go out of band.
    """

    __slots__ = ("_counter", "_warned", "directory", "origin", "prefix", "threshold")

    def __init__(self, prefix: str, threshold: int, origin: str, directory: str = SHM_DIR) -> None:
        _check_prefix(prefix)
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        if origin not in ("p", "w"):
            raise ValueError(f"origin must be 'p' or 'w', got {origin!r}")
        self.prefix = prefix
        self.threshold = threshold
        self.origin = origin
        self.directory = directory
        self._counter = 0
        self._warned = False

    # --- sending ------------------------------------------------------------------

    def wants(self, message: Any) -> bool:
        """True if a top-level argument, result or chunk is over the threshold.

        Cheap, so it runs on every message; buffers nested deeper are found
        only once the message has encoded to more than the threshold.
        """
        threshold = self.threshold
        kind = type(message)
        if kind is Call:
            for arg in message.args:
                if _size_of(arg) > threshold:
                    return True
            return any(_size_of(v) > threshold for v in message.kwargs.values())
        if kind is Result or kind is Chunk:
            return _size_of(message.value) > threshold
        return False

    def offload(self, message: Any, limit: int) -> Offloaded | None:
        """Write the message's large buffers to segments; None if it has none.

        Raises PayloadTooLarge, with nothing written, if the buffers alone are
        over ``limit``; EncodeError for a value that cannot be walked (cyclic).
        Returns None too if the segments cannot be written (no /dev/shm, out of
        space): the message then goes in band, as if this path did not exist.
        """
        kind = type(message)
        found: list[tuple[str, Any]] = []
        try:
            if kind is Call:
                args = tuple(self._swap(a, found) for a in message.args)
                kwargs = {k: self._swap(v, found) for k, v in message.kwargs.items()}
                if not found:
                    return None
                swapped = msgspec.structs.replace(message, args=args, kwargs=kwargs)
            elif kind is Result or kind is Chunk:
                value = self._swap(message.value, found)
                if not found:
                    return None
                swapped = msgspec.structs.replace(message, value=value)
            else:
                return None
        except RecursionError as exc:
            raise EncodeError(f"cannot encode message: {exc}") from exc
        total = sum(_size_of(buffer) for _, buffer in found)
        if total > limit:
            raise PayloadTooLarge(
                f"message with {total} bytes of buffers is over the limit of {limit} bytes"
            )
        written: list[str] = []
        try:
            for name, buffer in found:
                self._write(name, buffer)
                written.append(name)
        except OSError as exc:
            self.discard(written)
            if not self._warned:
                self._warned = True
                _log.warning("large_buffers.unavailable", directory=self.directory, error=str(exc))
            return None
        return Offloaded(swapped, written, total)

    def _swap(self, value: Any, found: list[tuple[str, Any]]) -> Any:
        """``value`` with each large buffer in it replaced by a reference."""
        kind = type(value)
        if kind is bytes or kind is bytearray or kind is memoryview:
            size = _size_of(value)
            if size <= self.threshold:
                return value
            self._counter += 1
            name = f"{self.prefix}{self.origin}{self._counter}"
            found.append((name, value))
            return msgspec.msgpack.Ext(LARGE_BUFFER_EXT, _SIZE.pack(size) + name.encode())
        if kind is list or kind is tuple:
            items = [self._swap(item, found) for item in value]
            return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
        if kind is dict:
            mapping = {key: self._swap(item, found) for key, item in value.items()}
            return mapping if any(mapping[k] is not v for k, v in value.items()) else value
        return value

    def _write(self, name: str, buffer: Any) -> None:
        path = os.path.join(self.directory, name)
        fd = os.open(path, _WRITE_FLAGS, 0o600)
        try:
            with memoryview(buffer) as view, view.cast("B") as raw:
                _fill(fd, raw)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    def discard(self, names: list[str]) -> None:
        """Unlink segments written for a message that will not be sent."""
        for name in names:
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                continue

    # --- receiving ------------------------------------------------------------------

    def load(self, data: bytes, budget: int) -> bytes:
        """Read the segment a reference names, unlink it, and return its bytes.

        Raises LostSegment if it is missing, ProtocolError for a malformed
        reference, a name outside this worker's prefix, a size that does not
        match, or one over ``budget``.
        """
        if len(data) <= _SIZE.size or len(data) > _SIZE.size + _MAX_NAME:
            raise ProtocolError(f"malformed large-buffer reference ({len(data)} bytes)")
        (size,) = _SIZE.unpack(data[: _SIZE.size])
        name = data[_SIZE.size :].decode("ascii", errors="replace")
        if not name.startswith(self.prefix) or not set(name) <= _NAME_CHARS:
            raise ProtocolError(f"large-buffer reference outside this worker's segments: {name!r}")
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            raise LostSegment(f"large-buffer segment {name!r} is missing") from None
        except OSError as exc:
            raise ProtocolError(f"cannot open large-buffer segment {name!r}: {exc}") from None
        try:
            # Unlinked by a cleanup meanwhile? The descriptor still reads it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                raise ProtocolError(
                    f"large-buffer segment {name!r} holds {info.st_size} bytes, "
                    f"the reference says {size}"
                )
            if size > budget:
                raise ProtocolError(
                    f"large buffer of {size} bytes is over what is left of the message "
                    f"limit ({budget} bytes)"
                )
            return _read_all(fd, size, name)
        finally:
            os.close(fd)


def _read_all(fd: int, size: int, name: str) -> bytes:
    pieces = []
    remaining = size
    while remaining:
        piece = os.read(fd, remaining)
        if not piece:
            raise ProtocolError(f"large-buffer segment {name!r} ended early")
        pieces.append(piece)
        remaining -= len(piece)
    if len(pieces) == 1:
        return pieces[0]
    return b"".join(pieces)
