"""Streamed buffers, frame by frame: the layout of docs/protocol.md, "Streamed buffers".

A frame with large array buffers carries a table after its length, and the
buffers follow the body uncopied; a decoder reads them whole whatever the
reads' boundaries, directly into the value's memory when it reads the socket
itself, and refuses every malformed or oversized announcement before it
allocates for it. Frames without such buffers are the plain frames.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import PayloadTooLarge
from corral._errors import ProtocolError
from corral._framing import FrameDecoder, FrameEncoder
from corral._messages import ParentBound, Result
from corral._streamed import (
    STREAMED_FLAG,
    StreamFrameDecoder,
    StreamFrameEncoder,
    StreamingBlockingWriter,
    pieces,
)

np = pytest.importorskip("numpy")

THRESHOLD = 1024
ENTRY = struct.Struct(">BQQ")


def encoder(compression: str | None = None, max_size: int = 64 << 20) -> StreamFrameEncoder:
    enc = StreamFrameEncoder(max_size)
    enc.enable(THRESHOLD, compression)
    return enc


def wire(enc: StreamFrameEncoder, message: Any) -> bytes:
    """What a writer puts on the socket for one message: the frame, then its buffers."""
    frame = bytearray()
    enc.append(message, frame)
    parts = enc.take_parts(frame)
    return b"".join(bytes(p) for p in pieces(frame, parts or []))


def decoder(max_size: int = 64 << 20) -> StreamFrameDecoder[Any]:
    return StreamFrameDecoder(ParentBound, max_size)  # type: ignore[arg-type]


def test_a_large_array_follows_its_frame_as_raw_bytes_described_by_the_table() -> None:
    array = np.arange(1000, dtype="<f8")  # 8000 bytes: over the threshold
    data = wire(encoder(), Result(7, array))
    length = int.from_bytes(data[:4], "big")
    assert length & STREAMED_FLAG
    body_size = length & ~STREAMED_FLAG
    (count,) = struct.unpack(">I", data[4:8])
    assert count == 1
    codec, on_wire, raw = ENTRY.unpack(data[8:25])
    assert (codec, on_wire, raw) == (0, 8000, 8000)
    body = data[25 : 25 + body_size]
    assert data[25 + body_size :] == array.tobytes()  # the buffer, as it is in memory
    assert array.tobytes() not in body and body_size < 200
    # The body's array extension names buffer 0 with extension type 5.
    result = msgspec.msgpack.decode(body, ext_hook=lambda code, d: (code, bytes(d)))
    code, payload = result[2]
    assert code == 2
    inner = msgspec.msgpack.decode(payload, ext_hook=lambda code, d: (code, bytes(d)))
    assert inner == ["<f8", [1000], "C", (5, b"\x00\x00\x00\x00")]


def test_the_example_of_the_protocol_page_byte_for_byte() -> None:
    data = wire(encoder(), Result(1, np.zeros(1000)))
    head = bytes.fromhex(
        "80 00 00 17 00 00 00 01 00 00 00 00 00 00 00 1f 40 00 00 00 00 00 00 1f 40"
        "93 03 01 c7 11 02 94 a3 3c 66 38 91 cd 03 e8 a1 43 d6 05 00 00 00 00"
    )
    assert data == head + bytes(8000)


def test_a_frame_without_large_buffers_is_the_plain_frame() -> None:
    message = Result(3, [np.arange(4), b"x" * 5000, "text"])
    assert wire(encoder(), message) == bytes(FrameEncoder().encode(message))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 40_000), min_size=1, max_size=4),
    st.lists(st.integers(1, 70_000), min_size=1, max_size=8),
    st.sampled_from([None, "lz4", "zstd"]),
)
def test_any_split_of_the_stream_decodes_the_same_messages(
    sizes: list[int], cuts: list[int], compression: str | None
) -> None:
    enc = encoder(compression)
    sent = [
        Result(k, [np.arange(n, dtype=">i4") % 7, {"k": np.full(n // 3, 1.5)}])
        for k, n in enumerate(sizes)
    ]
    stream = b"".join(wire(enc, m) for m in sent)
    dec = decoder()
    got: list[Any] = []
    at = 0
    for cut in cuts * (len(stream) // sum(cuts) + 1):
        if at >= len(stream):
            break
        got += dec.feed(stream[at : at + cut])
        at += cut
    assert dec.buffered == 0
    assert [m.id for m in got] == [m.id for m in sent]
    for mine, theirs in zip(got, sent, strict=True):
        assert np.array_equal(mine.value[0], theirs.value[0])
        assert mine.value[0].dtype == theirs.value[0].dtype
        assert np.array_equal(mine.value[1]["k"], theirs.value[1]["k"])
        assert mine.value[0].flags.writeable


def test_compressible_buffers_are_compressed_and_small_ones_never() -> None:
    pytest.importorskip("lz4")
    enc = encoder("lz4")
    big = np.zeros(1 << 17)  # 1 MiB of zeros
    small = np.zeros(2000)  # 16000 bytes: streamed, under the compression threshold
    noise = np.frombuffer(os.urandom(1 << 17), dtype=np.uint8)  # incompressible: sent as is
    data = wire(enc, Result(1, [big, small, noise]))
    (count,) = struct.unpack(">I", data[4:8])
    entries = [ENTRY.unpack(data[8 + 17 * k : 25 + 17 * k]) for k in range(count)]
    assert entries[0][0] == 1 and entries[0][1] < (1 << 20) // 50 and entries[0][2] == 1 << 20
    assert entries[1] == (0, 16000, 16000)
    assert entries[2] == (0, 1 << 17, 1 << 17)
    (back,) = decoder().feed(data)
    assert np.array_equal(back.value[0], big) and np.array_equal(back.value[2], noise)


def test_a_large_buffer_whose_sample_does_not_compress_is_not_compressed_at_all() -> None:
    pytest.importorskip("lz4")
    enc = encoder("lz4")
    calls: list[int] = []
    stream = enc._stream
    assert stream is not None
    compress = stream._compress
    assert compress is not None
    stream._compress = lambda data: calls.append(data.nbytes) or compress(data)
    noise = np.frombuffer(os.urandom(4 << 20), dtype=np.uint8)
    data = wire(enc, Result(1, noise))
    assert calls == [64 * 1024]  # the sample only
    assert ENTRY.unpack(data[8:25]) == (0, 4 << 20, 4 << 20)
    calls.clear()
    wire(enc, Result(1, np.zeros(1 << 19)))  # 4 MiB of zeros: the sample pays, then the whole
    assert calls == [64 * 1024, 4 << 20]


def test_the_worker_reads_buffers_from_the_socket_into_the_value_itself() -> None:
    array = np.arange(1 << 20, dtype="<f8")  # 8 MiB: many reads
    enc = encoder()
    left, right = socket.socketpair()
    with left, right:
        writer = StreamingBlockingWriter(os.dup(left.fileno()), enc)
        frame = bytearray()
        enc.append(Result(1, array), frame)
        thread = threading.Thread(target=writer.write, args=(frame,))
        thread.start()
        dec = StreamFrameDecoder(ParentBound, 64 << 20, fd=right.fileno())  # type: ignore[arg-type]
        first = right.recv(4096)  # the head and the start of the buffer
        (message,) = dec.feed(first)  # the rest is read in place, blocking
        thread.join(timeout=30)
        writer.close()
    assert np.array_equal(message.value, array)
    base = message.value
    while isinstance(base, np.ndarray | memoryview):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    assert isinstance(base, mmap.mmap) and len(base) == array.nbytes  # no copy made of it


def test_a_stream_that_ends_inside_the_buffers_is_a_protocol_error() -> None:
    data = wire(encoder(), Result(1, np.ones(4096)))
    left, right = socket.socketpair()
    with right:
        left.sendall(data[:-100])
        left.close()
        dec = StreamFrameDecoder(ParentBound, fd=right.fileno())  # type: ignore[arg-type]
        with pytest.raises(ProtocolError, match="ended inside a frame's buffers"):
            dec.feed(right.recv(64))
        assert dec.failed is not None


def head(body: bytes, entries: list[tuple[int, int, int]]) -> bytes:
    table = struct.pack(">I", len(entries)) + b"".join(ENTRY.pack(*e) for e in entries)
    return (len(body) | STREAMED_FLAG).to_bytes(4, "big") + table + body


RESULT = 3  # the tag of Result
BODY = msgspec.msgpack.encode([RESULT, 1, None])  # a Result of None, as the worker sends it


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([], "announces 0 buffers"),
        ([(0, 10, 11)], "announced as 10 bytes"),
        ([(1, 20, 10)], "announced as 20 bytes"),
        ([(0, 1 << 20, 1 << 20)], "over the limit"),
        ([(0, 600_000, 600_000), (0, 600_000, 600_000)], "over the limit"),
    ],
)
def test_a_malformed_or_oversized_table_is_refused_before_anything_is_allocated(
    entries: list[tuple[int, int, int]], match: str
) -> None:
    dec = decoder(max_size=1 << 20)
    with pytest.raises(ProtocolError, match=match):
        dec.feed(head(BODY, entries)[: 8 + 17 * len(entries)])  # the body never came


@pytest.mark.parametrize(("codec", "module"), [(1, "lz4.frame"), (2, "zstandard")])
def test_a_buffer_that_decompresses_to_another_size_is_a_protocol_error(
    codec: int, module: str
) -> None:
    lib = pytest.importorskip(module)
    compress = lib.compress if codec == 1 else lib.ZstdCompressor().compress
    packed = compress(b"a" * 100_000)
    array = msgspec.msgpack.Ext(
        2, msgspec.msgpack.encode(["|u1", [50_000], "C", msgspec.msgpack.Ext(5, b"\0\0\0\0")])
    )
    body = msgspec.msgpack.encode([RESULT, 1, array])
    frame = head(body, [(codec, len(packed), 50_000)]) + packed  # says 50,000: holds 100,000
    with pytest.raises(ProtocolError, match="decompress"):
        decoder().feed(frame)
    garbage = head(body, [(codec, 100, 50_000)]) + os.urandom(100)
    with pytest.raises(ProtocolError, match="decompress"):
        decoder().feed(garbage)
    unknown = head(body, [(9, 100, 50_000)]) + os.urandom(100)
    with pytest.raises(ProtocolError, match="unknown codec 9"):
        decoder().feed(unknown)


def test_a_body_naming_a_buffer_twice_or_one_not_sent_is_a_protocol_error() -> None:
    ref = msgspec.msgpack.Ext(5, b"\0\0\0\0")
    array = msgspec.msgpack.Ext(2, msgspec.msgpack.encode(["|u1", [4], "C", ref]))
    twice = msgspec.msgpack.encode([RESULT, 1, [array, array]])
    with pytest.raises(ProtocolError, match="names no unused buffer"):
        decoder().feed(head(twice, [(0, 4, 4)]) + b"abcd")
    bad = msgspec.msgpack.Ext(2, msgspec.msgpack.encode(["|u1", [4], "C", ref]))
    none = msgspec.msgpack.encode([RESULT, 1, bad])
    plain = len(none).to_bytes(4, "big") + none  # no table: nothing was streamed
    with pytest.raises(ProtocolError, match="names no unused buffer"):
        decoder().feed(plain)


def test_a_plain_decoder_refuses_a_streamed_frame() -> None:
    data = wire(encoder(), Result(1, np.ones(4096)))
    with pytest.raises(ProtocolError, match="over the limit"):
        FrameDecoder(ParentBound).feed(data)  # type: ignore[arg-type]


def test_streamed_buffers_still_count_against_the_message_limit() -> None:
    enc = encoder(max_size=1 << 20)
    frame = bytearray(b"before")
    with pytest.raises(PayloadTooLarge):
        enc.append(Result(1, [np.ones(1 << 16), np.ones(1 << 16)]), frame)  # 2 x 512 KiB
    assert frame == b"before" and enc.take_parts(frame) is None


async def test_the_pool_keeps_what_the_socket_did_not_take_as_views_and_in_order() -> None:
    import asyncio

    from corral._stream_transport import StreamingTransport, StreamReadProtocol

    class Listener:
        def __init__(self) -> None:
            self.messages: list[Any] = []
            self.ended = asyncio.get_running_loop().create_future()

        def frame_received(self, message: Any) -> None:
            self.messages.append(message)

        def frames_done(self) -> None:
            return None

        def connection_broken(self, error: Any) -> None:
            if not self.ended.done():
                self.ended.set_result(error)

    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    listener = Listener()
    transport, _ = await loop.connect_accepted_socket(
        lambda: StreamReadProtocol(decoder(), listener), ours
    )
    enc = encoder()
    writer = StreamingTransport(loop, transport, enc)  # type: ignore[arg-type]
    array = np.arange(1 << 20, dtype="<f8")  # 8 MiB: far more than the socket holds
    expected = b""
    for k, value in enumerate([array, "small", array[::2].copy(), 7]):
        frame = bytearray()
        enc.append(Result(k, value), frame)
        expected += b"".join(bytes(p) for p in pieces(frame, enc.take_parts(frame) or []))
        enc.append(Result(k, value), frame := bytearray())
        writer.write(frame)
    assert writer.waiting > 0  # the socket took part; the rest waits...
    assert any(view.obj is array for view in writer._queue)  # ...as a view of the array
    received = bytearray()

    def read_all() -> None:
        theirs.settimeout(30)
        while len(received) < len(expected):
            received.extend(theirs.recv(1 << 20))

    await asyncio.to_thread(read_all)
    assert bytes(received) == expected
    assert writer.waiting == 0
    writer.close()
    theirs.close()
    assert await asyncio.wait_for(listener.ended, 10) is None
    assert writer.fileno == -1


async def test_a_socket_whose_peer_already_left_takes_writes_and_drops_them() -> None:
    import asyncio

    from corral._stream_transport import StreamingTransport

    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    lost = loop.create_future()

    class Reader(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_result(None)

    transport, _ = await loop.connect_accepted_socket(Reader, ours)
    theirs.close()  # the peer left during the launch, before the writer was made
    await asyncio.wait_for(lost, 10)
    assert transport.get_extra_info("socket").fileno() == -1
    writer = StreamingTransport(loop, transport, encoder())  # type: ignore[arg-type]
    assert writer.fileno == -1
    frame = bytearray()
    writer._encoder.append(Result(1, np.ones(4096)), frame)
    writer.write(frame)
    writer.close()
    assert writer.waiting == 0
