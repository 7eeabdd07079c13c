"""Compression of large streamed buffers: the codecs a pool may choose, by name and by id.

Owns: which codecs exist (``"lz4"``: the LZ4 frame format, from the ``lz4``
package; ``"zstd"``: the Zstandard frame format, from ``zstandard``), their ids
on the wire, checking a pool's choice at the door, and compressing and
decompressing one buffer with a bound on what decompression may produce. Must
not touch: frames or sockets (``_streamed`` decides what is compressed).

Neither package is imported unless a pool chose it, or a peer sent a buffer
compressed with it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ._errors import ProtocolError

__all__ = [
    "CODECS",
    "COMPRESSION_THRESHOLD",
    "check_compression",
    "compressor",
    "decompress",
]

#: Streamed buffers smaller than this are sent as they are: compressing them
#: costs more than it saves on any network worth using.
COMPRESSION_THRESHOLD = 64 * 1024

#: Codec name -> (id on the wire, module to import, extra that installs it).
CODECS: dict[str, tuple[int, str, str]] = {
    "lz4": (1, "lz4.frame", "lz4"),
    "zstd": (2, "zstandard", "zstd"),
}
_NAMES = {ident: name for name, (ident, _, _) in CODECS.items()}
_ZSTD_LEVEL = 1  # the fastest level: the point is to beat the network, not to archive


def _load(name: str) -> Any:
    _, module, extra = CODECS[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"compression={name!r} needs the {module.partition('.')[0]!r} package, which is "
            f"not installed here: pip install 'corral[{extra}]'"
        ) from exc


def check_compression(value: Any) -> str | None:
    """A pool's ``compression`` option, checked: None, or a codec that can be imported.

    Raises TypeError/ValueError for anything but None or a known codec name,
    and ImportError naming the extra to install when its package is missing.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"compression must be None, 'lz4' or 'zstd', got {type(value).__name__}")
    if value not in CODECS:
        raise ValueError(f"compression must be None, 'lz4' or 'zstd', got {value!r}")
    _load(value)
    return value


def compressor(name: str) -> tuple[int, Callable[[memoryview], bytes]]:
    """The codec's wire id and a function that compresses one buffer."""
    module = _load(name)
    if name == "lz4":

        def lz4(data: memoryview) -> bytes:
            return bytes(module.compress(data, store_size=True))

        return CODECS[name][0], lz4
    compress = module.ZstdCompressor(level=_ZSTD_LEVEL).compress
    return CODECS[name][0], compress


def decompress(ident: int, data: bytes | bytearray | memoryview, size: int) -> bytearray:
    """Exactly ``size`` bytes out of ``data``, compressed with codec ``ident``.

    ProtocolError for an unknown codec, one whose package is missing here, or
    data that does not decompress to exactly ``size`` bytes; decompression never
    produces more than ``size`` bytes, whatever the data says.
    """
    name = _NAMES.get(ident)
    if name is None:
        raise ProtocolError(f"streamed buffer compressed with unknown codec {ident}")
    try:
        module = _load(name)
    except ImportError as exc:
        raise ProtocolError(str(exc)) from None
    failures: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError)
    if name == "zstd":
        failures += (module.ZstdError,)
    try:
        if name == "lz4":
            lz4 = module.LZ4FrameDecompressor(return_bytearray=True)
            out: bytearray = lz4.decompress(data, max_length=size)
            whole = lz4.eof and not lz4.unused_data
        else:
            out = bytearray(size)
            view = memoryview(out)
            reader = module.ZstdDecompressor().stream_reader(data)
            got = 0
            while got < size:
                count = reader.readinto(view[got:])
                if not count:
                    break
                got += count
            view.release()
            whole = got == size and reader.read(1) == b""
    except failures as exc:
        raise ProtocolError(f"streamed buffer does not decompress ({name}): {exc}") from None
    if not whole or len(out) != size:
        raise ProtocolError(f"streamed buffer does not decompress ({name}) to {size} bytes")
    return out
