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

Segments are plain files of a tmpfs written with ``write()``; ``bytes`` are
read with ``read()`` and arrays and tables are mapped (``map``) so the value
received views the segment, copy-on-write. Nothing here needs
``multiprocessing.shared_memory`` or its resource tracker (which unlinks
segments that other processes still use).

Reuse (docs/decisions/0023): the sender keeps a few segments, a bounded
``SegmentPool``, whose pages stay allocated between messages, so a large
message is copied into memory that exists instead of faulting in fresh pages.
A pooled segment keeps a private name (``<prefix><origin>s<k>``) and is lent
under a hard link with an ordinary message name. The receiver takes a shared
``flock`` on what it opens and keeps it as long as it reads or maps the
segment; the sender writes into a pooled segment again only once the message
name is gone (the receiver unlinked it, or a cleanup did) and no shared lock is
held (every view was released).

Views of bytes (``large_bytes="memoryview"``, docs/decisions/0031): the
receiver keeps a shared mapping of each segment its sender keeps for reuse, made
once, and each value it receives through one is a read-only view of that
mapping, holding its own descriptor (and shared lock) until it is released: no
mapping, page-table or unmapping work per message. A one-off segment is mapped
for its value alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import struct
import weakref
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
    "SegmentPool",
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
MIB = 1024 * 1024
#: A sender keeps at most this many segments for reuse ...
POOL_SLOTS = 4
#: ... holding at most this many bytes between them (per side of a worker's connection).
POOL_BYTES = 256 * MIB
_log = get_logger("corral")


class LostSegment(ProtocolError):
    """A message names a segment that is not there: its writer died, or broke the rules."""


def new_pool_prefix() -> str:
    """A prefix no other pool uses: ``corral-<pid>-<random>-``."""
    # os.urandom, not the secrets module: that one loads OpenSSL (4 MiB in every worker)
    return f"{SEGMENT_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-"


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


def _copy(mapping: mmap.mmap, data: memoryview) -> None:
    """Copy ``data`` to the start of a pooled segment's mapping."""
    with memoryview(mapping) as target:
        target[: data.nbytes] = data


# madvise(2) advice that faults a whole range in with one call (Linux 5.14+);
# older kernels refuse it and the pages fault in one at a time, as before.
_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23


def _populate(mapping: mmap.mmap, advice: int) -> None:
    with contextlib.suppress(OSError, ValueError):
        mapping.madvise(advice)


_BYTES = (bytes, bytearray)  # a tuple: ``bytes | bytearray`` would build a union per call


def _size_of(value: Any) -> int:
    """Bytes in a bytes-like value (0 for anything else, or a non-contiguous view)."""
    if isinstance(value, _BYTES):
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


class _Slot:
    """One reusable segment: its descriptor, size, private name and current loan."""

    __slots__ = ("capacity", "fd", "home", "lent", "mapping")

    def __init__(self, fd: int, capacity: int, home: str) -> None:
        self.fd = fd
        self.capacity = capacity
        self.home = home
        self.lent: str | None = None  # the message name it was last lent under
        # Mapped once, pages faulted in once: reuse is a plain memory copy.
        self.mapping = mmap.mmap(fd, capacity)
        _populate(self.mapping, _MADV_POPULATE_WRITE)


class SegmentPool:
    """A sender's few reusable segments, bounded in number and in bytes.

    ``take(size)`` gives a free segment of at least ``size`` bytes (the smallest
    that fits), making one if the bounds allow, or None: the caller then writes
    a one-off segment. A segment is free when the name it was lent under is gone
    and no reader holds a shared lock on it (docs/protocol.md, "Reuse").
    """

    __slots__ = (
        "__weakref__",
        "_release",
        "_slots",
        "directory",
        "max_bytes",
        "max_slots",
        "prefix",
    )

    def __init__(
        self,
        prefix: str,
        directory: str = SHM_DIR,
        max_slots: int = POOL_SLOTS,
        max_bytes: int = POOL_BYTES,
    ) -> None:
        self.prefix = prefix  # the worker's prefix plus the side's letter
        self.directory = directory
        self.max_slots = max_slots
        self.max_bytes = max_bytes
        self._slots: list[_Slot] = []
        # Dropped without close() (a connection that was never closed): still released.
        self._release = weakref.finalize(self, _release_slots, self._slots, directory)

    @property
    def held(self) -> int:
        """Bytes of /dev/shm the pool keeps (lent or free)."""
        return sum(slot.capacity for slot in self._slots)

    def _free(self, slot: _Slot) -> bool:
        if slot.lent is not None:
            if os.path.lexists(os.path.join(self.directory, slot.lent)):
                return False  # not yet opened by its reader
            slot.lent = None
        try:
            fcntl.flock(slot.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a reader still maps it
        fcntl.flock(slot.fd, fcntl.LOCK_UN)
        return True

    def take(self, size: int) -> _Slot | None:
        """A free segment of at least ``size`` bytes, or None (use a one-off)."""
        best: _Slot | None = None
        free: list[_Slot] = []
        for slot in self._slots:
            if self._free(slot):
                free.append(slot)
                if slot.capacity >= size and (best is None or slot.capacity < best.capacity):
                    best = slot
        if best is not None:
            return best
        capacity = max(1 << (size - 1).bit_length(), 64 * 1024)
        if capacity > self.max_bytes:
            return None
        # Make room: drop free segments, largest first, until the new one fits the bounds.
        free.sort(key=lambda s: s.capacity, reverse=True)
        while free and (
            len(self._slots) >= self.max_slots or self.held + capacity > self.max_bytes
        ):
            self._drop(free.pop(0))
        if len(self._slots) >= self.max_slots or self.held + capacity > self.max_bytes:
            return None  # every segment is lent: this message goes in a one-off
        used = {slot.home for slot in self._slots}
        home = next(
            name for k in range(self.max_slots + 1) if (name := f"{self.prefix}s{k}") not in used
        )
        path = os.path.join(self.directory, home)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a dropped segment whose name was reused
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            # Allocated now, so that a full /dev/shm is an OSError here and never
            # a SIGBUS when the mapping is written later.
            os.posix_fallocate(fd, 0, capacity)
            slot = _Slot(fd, capacity, home)
        except OSError:
            os.close(fd)
            os.unlink(path)
            return None  # no room: a one-off segment (or the pipes) instead
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        self._slots.append(slot)
        return slot

    def write(self, slot: _Slot, name: str, data: memoryview) -> None:
        """Fill ``slot`` with ``data`` and lend it under ``name`` (a hard link)."""
        try:
            _copy(slot.mapping, data)
            os.link(os.path.join(self.directory, slot.home), os.path.join(self.directory, name))
        except BaseException:
            self._drop(slot)
            raise
        slot.lent = name

    def _drop(self, slot: _Slot) -> None:
        self._slots.remove(slot)
        _release_slots([slot], self.directory)

    def close(self) -> None:
        """Unlink every segment kept; what readers still map stays valid."""
        self._release()


def _release_slots(slots: list[_Slot], directory: str) -> None:
    """Unmap, close and unlink pooled segments (the list is emptied)."""
    while slots:
        slot = slots.pop()
        slot.mapping.close()
        os.close(slot.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, slot.home))


_HOLDERS: dict[int, Any] = {}  # capacity -> its ctypes array type (powers of two: few)


def _holder_type(capacity: int) -> Any:
    """The ctypes array type that holds a value's view of a kept mapping.

    ctypes is imported here, on the first such view, never before; the type is
    hashable (by identity) because hashing a ``memoryview`` hashes its exporter.
    """
    holder = _HOLDERS.get(capacity)
    if holder is None:
        import ctypes

        holder = type("_Held", (ctypes.c_ubyte * capacity,), {"__hash__": object.__hash__})
        _HOLDERS[capacity] = holder
    return holder


class _KeptMappings:
    """A receiver's mappings of the segments its sender keeps for reuse.

    A segment that still has a link once its message name is unlinked is one
    its sender keeps (``<prefix><p|w>s<k>``): it is mapped once, shared, and
    the mapping kept, at most ``POOL_SLOTS`` of them, each forgotten as soon as
    its sender has dropped the segment. Each value is a read-only ``memoryview``
    of a ``ctypes`` array over the mapping, whose finalizer closes the value's
    own descriptor and so releases its shared lock: the sender writes into the
    segment again only once every view of that value is gone.
    """

    __slots__ = ("__weakref__", "_mappings", "_release")

    def __init__(self) -> None:
        # inode -> (a descriptor without a lock, the mapping)
        self._mappings: dict[int, tuple[int, mmap.mmap]] = {}
        # Dropped without close() (a connection that was never closed): still let go.
        self._release = weakref.finalize(self, _forget_mappings, self._mappings)

    def view(self, fd: int, size: int) -> memoryview:
        """A read-only view of the first ``size`` bytes of the segment open on ``fd``.

        Takes ``fd`` (which holds the value's shared lock): it is closed when
        the view and every slice of it are released.
        """
        info = os.fstat(fd)
        self._forget_dropped()
        mapping = self._mapping(fd, info) if info.st_nlink else None
        if mapping is None:  # a one-off segment: mapped for this value alone
            alone = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            os.close(fd)  # the mapping holds a duplicate, and with it the lock
            _populate(alone, _MADV_POPULATE_READ)
            return memoryview(alone)
        holder = _holder_type(len(mapping)).from_buffer(mapping)
        weakref.finalize(holder, os.close, fd)
        return memoryview(holder).cast("B")[:size].toreadonly()

    def _mapping(self, fd: int, info: os.stat_result) -> mmap.mmap | None:
        kept = self._mappings.get(info.st_ino)
        if kept is not None and os.path.samestat(os.fstat(kept[0]), info):
            return kept[1]
        try:
            # A descriptor of its own, so the kept mapping holds no lock: only values do.
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None  # no /proc: every value gets a mapping of its own
        try:
            # Shared and writable, as ctypes needs; what is handed out is read-only.
            mapping = mmap.mmap(own, info.st_size)
        except BaseException:
            os.close(own)
            raise
        _populate(mapping, _MADV_POPULATE_READ)
        while len(self._mappings) >= POOL_SLOTS:
            self._drop(next(iter(self._mappings)))
        self._mappings[info.st_ino] = (own, mapping)
        return mapping

    def _forget_dropped(self) -> None:
        """Forget mappings of segments their sender no longer keeps (their pages go)."""
        for inode, (own, _) in list(self._mappings.items()):
            if os.fstat(own).st_nlink == 0:
                self._drop(inode)

    def _drop(self, inode: int) -> None:
        own, _ = self._mappings.pop(inode)
        os.close(own)  # the mapping itself goes with the last view of it

    def close(self) -> None:
        self._release()


def _forget_mappings(mappings: dict[int, tuple[int, mmap.mmap]]) -> None:
    """Close the kept descriptors (the dict is emptied); mappings go with their last view."""
    while mappings:
        _, (own, _) = mappings.popitem()
        os.close(own)


class LargeBuffers:
    """One side of one worker's connection: writes and reads its segments.

    ``prefix`` is the worker's (the pool's prefix plus the worker's number);
    ``origin`` is one letter, ``p`` for the pool and ``w`` for the worker, so the
    two sides never pick the same name. Buffers strictly larger than
    ``threshold`` bytes go out of band.
    """

    __slots__ = (
        "_counter",
        "_kept_views",
        "_warned",
        "directory",
        "origin",
        "pool",
        "prefix",
        "threshold",
        "views",
    )

    def __init__(
        self,
        prefix: str,
        threshold: int,
        origin: str,
        directory: str = SHM_DIR,
        *,
        views: bool = False,
    ) -> None:
        _check_prefix(prefix)
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        if origin not in ("p", "w"):
            raise ValueError(f"origin must be 'p' or 'w', got {origin!r}")
        self.prefix = prefix
        self.threshold = threshold
        self.origin = origin
        self.directory = directory
        self.views = views
        self._kept_views = _KeptMappings() if views else None
        self._counter = 0
        self._warned = False
        self.pool = SegmentPool(prefix + origin, directory)

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
            kwargs = message.kwargs
            return bool(kwargs) and any(_size_of(v) > threshold for v in kwargs.values())
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
            self.unavailable(exc)
            return None
        return Offloaded(swapped, written, total)

    def _swap(self, value: Any, found: list[tuple[str, Any]]) -> Any:
        """``value`` with each large buffer in it replaced by a reference."""
        kind = type(value)
        if kind is bytes or kind is bytearray or kind is memoryview:
            size = _size_of(value)
            if size <= self.threshold:
                return value
            name = self.new_name()
            found.append((name, value))
            return msgspec.msgpack.Ext(LARGE_BUFFER_EXT, _SIZE.pack(size) + name.encode())
        if kind is list or kind is tuple:
            items = [self._swap(item, found) for item in value]
            return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
        if kind is dict:
            mapping = {key: self._swap(item, found) for key, item in value.items()}
            return mapping if any(mapping[k] is not v for k, v in value.items()) else value
        return value

    def unavailable(self, exc: OSError) -> None:
        """A segment could not be written: say so once; the caller sends in band."""
        if not self._warned:
            self._warned = True
            _log.warning("large_buffers.unavailable", directory=self.directory, error=str(exc))

    def new_name(self) -> str:
        """A segment name no message of this side has used."""
        self._counter += 1
        return f"{self.prefix}{self.origin}{self._counter}"

    def _write(self, name: str, buffer: Any) -> None:
        with memoryview(buffer) as view, view.cast("B") as raw:
            self.write_segment(name, raw)

    def write_segment(self, name: str, raw: memoryview) -> None:
        """Put ``raw`` in the segment ``name``: a pooled one if free, else a new file."""
        if raw.format != "B" or raw.ndim != 1:
            raw = raw.cast("B")
        slot = self.pool.take(raw.nbytes) if raw.nbytes else None
        if slot is not None:
            self.pool.write(slot, name, raw)
            return
        path = os.path.join(self.directory, name)
        fd = os.open(path, _WRITE_FLAGS, 0o600)
        try:
            _fill(fd, raw)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    def close(self) -> None:
        """Unlink the pooled segments and forget the other side's (end of the connection).

        Views already handed out stay valid: each holds its mapping.
        """
        self.pool.close()
        if self._kept_views is not None:
            self._kept_views.close()

    def discard(self, names: list[str]) -> None:
        """Unlink segments written for a message that will not be sent."""
        for name in names:
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                continue

    # --- receiving ------------------------------------------------------------------

    def load(self, data: bytes, budget: int) -> bytes | memoryview:
        """The bytes of the segment a reference names, which is unlinked.

        A copy (``bytes``), or with ``views`` a read-only ``memoryview`` of a
        shared mapping of the segment (``_KeptMappings``): no copy, and the
        descriptor and shared lock that keep a pooled segment from being
        written again live exactly as long as the view (and any slice of it).

        Raises LostSegment if it is missing, ProtocolError for a malformed
        reference, a name outside this worker's prefix, a segment smaller than
        the reference says, or a size over ``budget``.
        """
        fd, size, name = self._open(data, budget)
        kept = self._kept_views
        if kept is None or size == 0:
            try:
                return _read_all(fd, size, name)
            finally:
                os.close(fd)
        try:
            return kept.view(fd, size)  # owns ``fd`` from here on
        except BaseException:
            os.close(fd)
            raise

    def map(self, data: bytes, budget: int) -> tuple[mmap.mmap, int]:
        """Map the segment a reference names (copy-on-write), unlink it; also its size.

        The mapping holds a duplicate of the descriptor, and with it the shared
        lock that keeps a pooled segment from being reused under it, until the
        mapping is released: when the last view of it goes.
        """
        fd, size, name = self._open(data, budget)
        try:
            if size == 0:
                raise ProtocolError(f"large-buffer segment {name!r} referenced with size 0")
            mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
            _populate(mapping, _MADV_POPULATE_READ)  # no copy: read faults share the pages
            return mapping, size
        finally:
            os.close(fd)

    def parse(self, data: bytes) -> tuple[int, str]:
        """The size and name in a reference (checked: well-formed, under this prefix)."""
        if len(data) <= _SIZE.size or len(data) > _SIZE.size + _MAX_NAME:
            raise ProtocolError(f"malformed large-buffer reference ({len(data)} bytes)")
        (size,) = _SIZE.unpack(data[: _SIZE.size])
        name = data[_SIZE.size :].decode("ascii", errors="replace")
        if not name.startswith(self.prefix) or not set(name) <= _NAME_CHARS:
            raise ProtocolError(f"large-buffer reference outside this worker's segments: {name!r}")
        return size, name

    def _open(self, data: bytes, budget: int) -> tuple[int, int, str]:
        """Open, lock (shared), unlink and check the segment a reference names."""
        size, name = self.parse(data)
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            raise LostSegment(f"large-buffer segment {name!r} is missing") from None
        except OSError as exc:
            raise ProtocolError(f"cannot open large-buffer segment {name!r}: {exc}") from None
        try:
            # Held while this side reads or maps it: its sender may reuse it only after.
            fcntl.flock(fd, fcntl.LOCK_SH)
            # Unlinked by a cleanup meanwhile? The descriptor still reads it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size < size:
                raise ProtocolError(
                    f"large-buffer segment {name!r} holds {info.st_size} bytes, "
                    f"the reference says {size}"
                )
            if size > budget:
                raise ProtocolError(
                    f"large buffer of {size} bytes is over what is left of the message "
                    f"limit ({budget} bytes)"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd, size, name


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
