"""Arrays and tables as MessagePack extensions: NumPy, Arrow and pandas values.

Owns: turning ``numpy.ndarray``, ``pyarrow.Table``/``RecordBatch`` and
``pandas.DataFrame``/``Series`` into extension values (``ARRAY_EXT``,
``ARROW_EXT``, ``PANDAS_EXT``) and back, with each value's buffer inline in the
frame or, over the large-buffer threshold, in a shared-memory segment (written
and mapped through ``_shm.LargeBuffers``), and refusing what would need pickle.
Must not touch: framing, pipes or processes (``_framing`` drives this module).

numpy, pyarrow and pandas are never imported here: a value is recognised by
its type's module, which is already loaded if such a value exists, and an
extension arriving imports what it needs then. A message without them costs a
dictionary look-up per unsupported type, and nothing for supported ones
(msgspec calls ``enc_hook`` only for types it does not know).

Layouts are in docs/protocol.md, "Arrays and tables".
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from ._errors import ProtocolError

if TYPE_CHECKING:
    from ._shm import LargeBuffers
    from ._streamed import StreamedBuffers

__all__ = ["ARRAY_EXT", "ARROW_EXT", "PANDAS_EXT", "ArrayCodec", "OverLimit"]

LARGE_BUFFER_EXT = 1  # corral._shm.LARGE_BUFFER_EXT (a segment reference)
STREAMED_BUFFER_EXT = 5  # corral._streamed.STREAMED_BUFFER_EXT (a buffer after the frame)
ARRAY_EXT = 2
ARROW_EXT = 3
PANDAS_EXT = 4
EXTENSIONS = frozenset((ARRAY_EXT, ARROW_EXT, PANDAS_EXT))

_encode = msgspec.msgpack.encode
_MAX_DIMS = 64  # numpy's own limit
# numpy's descr conversions are Python code: cached for the dtypes seen.
_DESCRS: dict[Any, Any] = {}
_DTYPES: dict[str, Any] = {}
_frombuffer: Any = None  # numpy.frombuffer, once an array has arrived


class OverLimit(Exception):
    """The buffers moved out of band so far are over the message limit."""


def _reference(code: int, data: memoryview) -> Any:
    """The payload of a nested extension: only buffer references may appear."""
    if code != LARGE_BUFFER_EXT and code != STREAMED_BUFFER_EXT:
        raise ProtocolError(f"unexpected extension type {code} inside an array or table")
    return msgspec.msgpack.Ext(code, bytes(data))


_decode_payload = msgspec.msgpack.Decoder(ext_hook=_reference).decode
# An array's payload, checked as it is decoded (in C): descr, shape, order, buffer.
_ArrayPayload = tuple[
    Any,
    Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=_MAX_DIMS)],
    Literal["C", "F"],
    bytearray | msgspec.msgpack.Ext,  # inline bytes, decoded into a private copy; or a reference
]
_decode_array_payload = msgspec.msgpack.Decoder(_ArrayPayload, ext_hook=_reference).decode


class ArrayCodec:
    """One side's encoder hook and extension reader for arrays and tables.

    ``start()`` before each message; the segments written for it are in
    ``written`` (with ``total`` bytes) until ``discard()`` unlinks them or the
    next ``start()`` forgets them (the frame was sent: the receiver owns them).
    With ``stream`` (a TCP connection, ``_streamed``), large buffers follow the
    frame instead.
    """

    __slots__ = ("_encoders", "large", "limit", "stream", "total", "written")

    def __init__(self, large: LargeBuffers | None, limit: int) -> None:
        self.large = large
        self.stream: StreamedBuffers | None = None
        self.limit = limit
        self.written: list[str] = []
        self.total = 0
        self._encoders: dict[type, Callable[[Any], msgspec.msgpack.Ext]] = {}

    def start(self) -> None:
        self.written = []
        self.total = 0

    def discard(self) -> None:
        if self.written and self.large is not None:
            self.large.discard(self.written)
        self.written = []
        self.total = 0

    # --- encoding -----------------------------------------------------------------

    def enc_hook(self, value: Any) -> msgspec.msgpack.Ext:
        """msgspec's hook: an extension for an array or table; TypeError for the rest."""
        kind = type(value)
        encoder = self._encoders.get(kind)
        if encoder is None:
            encoder = self._encoder_for(kind)
        return encoder(value)

    def _encoder_for(self, kind: type) -> Callable[[Any], msgspec.msgpack.Ext]:
        module = kind.__module__.partition(".")[0]
        encoder: Callable[[Any], msgspec.msgpack.Ext] | None = None
        if module == "numpy":
            np = sys.modules["numpy"]
            if kind is np.ndarray or kind is np.memmap:
                encoder = self._ndarray
        elif module == "pyarrow":
            pa = sys.modules["pyarrow"]
            if kind is pa.Table or kind is pa.RecordBatch:
                encoder = self._arrow
        elif module == "pandas":
            pd = sys.modules["pandas"]
            if kind is pd.DataFrame or kind is pd.Series:
                encoder = self._pandas
        if encoder is None:
            raise TypeError(f"Encoding objects of type {_qualified(kind)} is unsupported")
        self._encoders[kind] = encoder
        return encoder

    def _buffer(self, raw: memoryview) -> Any:
        """``raw`` as it goes in a payload: inline (bin), or a segment reference (ext 1)."""
        large = self.large
        size = raw.nbytes
        stream = self.stream
        if stream is not None and size > stream.threshold:
            self.total += size
            if self.total > self.limit:
                raise OverLimit(
                    f"message with {self.total} bytes of buffers is over the limit of "
                    f"{self.limit} bytes"
                )
            return stream.add(raw)
        if large is None or size <= large.threshold:
            return raw
        self.total += size
        if self.total > self.limit:
            raise OverLimit(
                f"message with {self.total} bytes of buffers is over the limit of "
                f"{self.limit} bytes"
            )
        name = large.new_name()
        try:
            large.write_segment(name, raw)
        except OSError as exc:
            # /dev/shm missing or full: this buffer goes in band, as bytes do.
            large.unavailable(exc)
            self.total -= size
            return raw
        self.written.append(name)
        return msgspec.msgpack.Ext(LARGE_BUFFER_EXT, size.to_bytes(8, "big") + name.encode())

    def _ndarray(self, array: Any) -> msgspec.msgpack.Ext:
        dtype = array.dtype
        descr = _DESCRS.get(dtype)
        if descr is None:
            descr = _descr(dtype)
        large, stream, nbytes = self.large, self.stream, array.nbytes
        if (large is None or nbytes <= large.threshold) and (
            stream is None or nbytes <= stream.threshold
        ):
            # Inline (neither shared memory nor the stream after the frame takes
            # it), the common case for small arrays: one C call copies the
            # bytes in the order they are laid out (a strided array: C order).
            order = "F" if array.flags.fnc else "C"
            return msgspec.msgpack.Ext(
                ARRAY_EXT, _encode((descr, array.shape, order, array.tobytes("A")))
            )
        np = sys.modules["numpy"]
        flags = array.flags
        if flags.c_contiguous:
            order, contiguous = "C", array
        elif flags.f_contiguous:
            order, contiguous = "F", array.T  # the same bytes, C-contiguous
        else:
            order, contiguous = "C", np.ascontiguousarray(array)  # strided: one copy
        if not array.nbytes:
            raw = memoryview(b"")
        elif dtype.kind in "biuf" and dtype.isnative:
            raw = memoryview(contiguous)  # a native format: cast to bytes without a copy
        else:
            # no (native) buffer format for these: their bytes, as unsigned bytes
            raw = memoryview(contiguous.reshape(-1).view(np.uint8))
        payload = [descr, list(array.shape), order, self._buffer(raw)]
        return msgspec.msgpack.Ext(ARRAY_EXT, _encode(payload))

    def _arrow(self, value: Any) -> msgspec.msgpack.Ext:
        pa = sys.modules["pyarrow"]
        kind = "table" if isinstance(value, pa.Table) else "batch"
        raw = _ipc_stream(pa, value, "pyarrow." + type(value).__name__)
        return msgspec.msgpack.Ext(ARROW_EXT, _encode([kind, self._buffer(raw)]))

    def _pandas(self, value: Any) -> msgspec.msgpack.Ext:
        pd = sys.modules["pandas"]
        import pyarrow as pa  # a pandas value travels as Arrow: corral[arrow]

        name: Any = None
        if isinstance(value, pd.Series):
            kind, name = "series", value.name
            if not (name is None or isinstance(name, str | int | float | bool)):
                raise TypeError(
                    f"pandas.Series named {name!r} cannot be sent: its name must be "
                    "a str, int, float, bool or None"
                )
            frame = value.to_frame(name="__series__")
        else:
            kind, frame = "frame", value
        what = "pandas." + type(value).__name__
        try:
            table = pa.Table.from_pandas(frame, preserve_index=None)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise TypeError(f"{what} cannot be sent: {exc}") from exc
        raw = _ipc_stream(pa, table, what)
        return msgspec.msgpack.Ext(PANDAS_EXT, _encode([kind, name, self._buffer(raw)]))

    # --- decoding -----------------------------------------------------------------

    def decode(self, code: int, data: memoryview, budget: int) -> tuple[Any, int]:
        """The value of an extension of ours, and the segment bytes it used."""
        payload: Any = None
        if code == ARRAY_EXT and _frombuffer is not None:
            # The common case in as few steps as it takes: a one-dimensional
            # inline array of a dtype seen before. Anything else: the general path.
            try:
                payload = _decode_array_payload(data)
            except msgspec.DecodeError as exc:  # a ValidationError too
                raise ProtocolError(f"malformed extension {code}: {exc}") from exc
            descr, shape, _, raw = payload
            if type(raw) is bytearray and len(shape) == 1 and type(descr) is str:
                dtype = _DTYPES.get(descr)
                if dtype is not None and 0 < shape[0] * dtype.itemsize <= len(raw):
                    return _frombuffer(raw, dtype, shape[0]), 0
        try:
            if payload is None:
                payload = (_decode_array_payload if code == ARRAY_EXT else _decode_payload)(data)
        except msgspec.DecodeError as exc:  # a ValidationError too
            raise ProtocolError(f"malformed extension {code}: {exc}") from exc
        shaped = type(payload) is tuple or (type(payload) is list and len(payload) > 0)
        if not shaped:
            raise ProtocolError(f"malformed extension {code}: not an array")
        raw = payload[-1]
        # Inline bytes become a private, writable copy (an array's already are);
        # a reference, a mapping.
        if type(raw) is bytearray:
            buffer, used = raw, 0
        elif type(raw) is bytes:
            buffer, used = bytearray(raw), 0
        else:
            buffer, used = self._open(raw, budget)
        try:
            if code == ARRAY_EXT:
                return _read_ndarray(payload, buffer), used
            if code == ARROW_EXT:
                return _read_arrow(payload, buffer), used
            return _read_pandas(payload, buffer), used
        except ProtocolError:
            raise
        except ImportError as exc:
            raise ProtocolError(
                f"an extension {code} value arrived but {exc.name} is not installed here"
            ) from exc
        except Exception as exc:  # any failure of numpy's or Arrow's reader: a bad frame
            raise ProtocolError(f"malformed extension {code}: {exc!r}") from exc

    def _open(self, buffer: Any, budget: int) -> tuple[Any, int]:
        """A writable buffer of the value's bytes: a copy of inline ones, a mapping of a segment."""
        if isinstance(buffer, bytes):
            return bytearray(buffer), 0
        if isinstance(buffer, msgspec.msgpack.Ext) and buffer.code == STREAMED_BUFFER_EXT:
            if self.stream is None:
                raise ProtocolError("streamed buffer reference on a connection without them")
            return self.stream.take(
                bytes(buffer.data)
            ), 0  # counted when its frame's table was read
        if (
            isinstance(buffer, msgspec.msgpack.Ext)
            and buffer.code == LARGE_BUFFER_EXT
            and self.large is not None
        ):
            mapping, size = self.large.map(bytes(buffer.data), budget)
            return mapping, size
        raise ProtocolError("array or table buffer is neither inline bytes nor a segment reference")


def _descr(dtype: Any) -> Any:
    """A dtype's ``.npy`` description, remembered; TypeError for one that needs pickle."""
    if dtype.hasobject or dtype.kind not in "biufcmMSUV":
        raise TypeError(
            f"numpy.ndarray of dtype {dtype} cannot be sent: only fixed-size dtypes "
            "travel without pickle"
        )
    descr = sys.modules["numpy"].lib.format.dtype_to_descr(dtype)
    if len(_DESCRS) < 256:
        _DESCRS[dtype] = descr
    return descr


def _qualified(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _ipc_stream(pa: Any, value: Any, what: str) -> memoryview:
    """An Arrow table or batch as one Arrow IPC stream (schema, batches, end)."""
    sink = pa.BufferOutputStream()
    try:
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write(value)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise TypeError(f"{what} cannot be sent: {exc}") from exc
    return memoryview(sink.getvalue())


def _read_ndarray(payload: Any, buffer: Any) -> Any:
    """The array a payload describes, over ``buffer`` (its fields were checked on decoding)."""
    global _frombuffer
    np = sys.modules.get("numpy") or importlib.import_module("numpy")
    _frombuffer = np.frombuffer
    descr, shape, order, _ = payload
    dtype = _DTYPES.get(descr) if type(descr) is str else None
    if dtype is None:
        dtype = np.lib.format.descr_to_dtype(_tuples(descr))
        if dtype.hasobject:
            raise ProtocolError("array extension with an object dtype")
        if isinstance(descr, str) and len(_DTYPES) < 256:
            _DTYPES[descr] = dtype
    count = shape[0] if len(shape) == 1 else math.prod(shape)
    if count * dtype.itemsize > len(buffer):
        raise ProtocolError(
            f"array of {count * dtype.itemsize} bytes announced, {len(buffer)} received"
        )
    if count == 0:
        return np.empty(shape, dtype, order=order)
    flat = np.frombuffer(buffer, dtype, count)
    if order == "F":
        return flat.reshape(shape[::-1]).T
    return flat if len(shape) == 1 else flat.reshape(shape)


def _tuples(descr: Any) -> Any:
    """A dtype description as numpy.lib.format writes it (fields are tuples)."""
    if not isinstance(descr, list):
        return descr
    fields = []
    for field in descr:
        if not isinstance(field, list) or len(field) not in (2, 3):
            raise ProtocolError(f"malformed dtype field {field!r}")
        name, sub, *shape = field
        name = tuple(name) if isinstance(name, list) else name
        fields.append((name, _tuples(sub), *(tuple(s) for s in shape)))
    return fields


def _read_ipc(buffer: Any) -> Any:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.py_buffer(buffer))


def _read_arrow(payload: list[Any], buffer: Any) -> Any:
    if len(payload) != 2 or payload[0] not in ("table", "batch"):
        raise ProtocolError("malformed Arrow extension")
    reader = _read_ipc(buffer)
    if payload[0] == "table":
        return reader.read_all()
    batch = reader.read_next_batch()
    return batch


def _read_pandas(payload: list[Any], buffer: Any) -> Any:
    if len(payload) != 3 or payload[0] not in ("frame", "series"):
        raise ProtocolError("malformed pandas extension")
    frame = _read_ipc(buffer).read_all().to_pandas()
    if payload[0] == "series":
        series = frame["__series__"]
        series.name = payload[1]
        return series
    return frame
