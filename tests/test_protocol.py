"""The wire protocol: message encoding (``_messages``) and framing (``_framing``).

Properties: every message survives FrameEncoder -> FrameDecoder, however the byte
stream is cut; arbitrary bytes only ever produce messages or ProtocolError. The
examples pin the limits and the hostile inputs named in docs/protocol.md.
"""

from __future__ import annotations

import datetime
import itertools
import tracemalloc
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral import EncodeError, PayloadTooLarge, ProtocolError
from corral._framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER_SIZE,
    MAX_POSSIBLE_SIZE,
    FrameDecoder,
    FrameEncoder,
)
from corral._messages import (
    PROTOCOL_VERSION,
    Call,
    Cancel,
    CancelAck,
    Chunk,
    Credit,
    End,
    EndSession,
    Error,
    ErrorKind,
    Hello,
    Message,
    ParentBound,
    Ping,
    Pong,
    Result,
    Shutdown,
    WorkerBound,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_pack = msgspec.msgpack.encode
MESSAGE_TYPES = get_args(Message)
UTC = datetime.UTC


def frame(payload: bytes) -> bytes:
    """A frame around ``payload``, built by hand (no limit checks)."""
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def tag_of(message: Any) -> int:
    tag = type(message).__struct_config__.tag
    assert isinstance(tag, int)
    return tag


def decode_all(
    message_type: Any, data: bytes, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> list[Any]:
    return FrameDecoder(message_type, max_size).feed(data)


# --- strategies -------------------------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what MessagePack holds
texts = st.text(max_size=12)

scalars = (
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=False)
    | texts
    | st.binary(max_size=16)
    # aware datetimes travel as the MessagePack timestamp extension (type -1)
    | st.datetimes(timezones=st.just(UTC))
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=16,
)
ERROR_KINDS = [value for name, value in vars(ErrorKind).items() if name.isupper()]
kinds = st.sampled_from(ERROR_KINDS) | texts

parent_bound = st.one_of(
    st.builds(
        Hello, protocol=ints, pid=ints, worker_id=texts, handlers=st.lists(texts, max_size=4)
    ),
    st.builds(Result, id=ints, value=values),
    st.builds(Error, id=ints, kind=kinds, type=texts, message=texts, traceback=texts),
    st.builds(Chunk, id=ints, value=values),
    st.builds(End, id=ints),
    st.builds(CancelAck, id=ints),
    st.builds(Pong, seq=ints),
)
worker_bound = st.one_of(
    st.builds(
        Call,
        id=ints,
        method=texts,
        args=st.lists(values, max_size=4).map(tuple),
        kwargs=st.dictionaries(texts, values, max_size=4),
        session=st.none() | texts,
        timeout=st.none() | st.floats(allow_nan=False),
        stream=st.booleans(),
        window=ints,
    ),
    st.builds(Cancel, id=ints),
    st.builds(Ping, seq=ints),
    st.builds(EndSession, session=texts),
    st.just(Shutdown()),
    st.builds(Credit, id=ints, n=ints),
)
messages = parent_bound | worker_bound


def cut(data: bytes, points: set[int]) -> list[bytes]:
    """``data`` split at ``points`` (empty pieces included)."""
    bounds = [0, *sorted(p for p in points if 0 <= p <= len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


as_buffer = st.sampled_from([bytes, bytearray, memoryview])


# --- round trips ------------------------------------------------------------------


@PROPERTY
@given(message=messages)
def test_every_message_round_trips(message: Any) -> None:
    data = FrameEncoder().encode(message)
    payload = bytes(data[HEADER_SIZE:])
    assert int.from_bytes(data[:HEADER_SIZE], "big") == len(payload)
    assert payload == _pack(message)
    # a MessagePack array: the integer tag, then the fields in order
    raw = msgspec.msgpack.decode(payload)
    assert raw[0] == tag_of(message)
    assert len(raw) == 1 + len(message.__struct_fields__)
    assert decode_all(Message, bytes(data)) == [message]


@PROPERTY
@given(message=parent_bound)
def test_parent_bound_messages_decode_only_as_parent_bound(message: Any) -> None:
    data = bytes(FrameEncoder().encode(message))
    assert decode_all(ParentBound, data) == [message]
    with pytest.raises(ProtocolError):
        decode_all(WorkerBound, data)


@PROPERTY
@given(message=worker_bound)
def test_worker_bound_messages_decode_only_as_worker_bound(message: Any) -> None:
    data = bytes(FrameEncoder().encode(message))
    assert decode_all(WorkerBound, data) == [message]
    with pytest.raises(ProtocolError):
        decode_all(ParentBound, data)


@PROPERTY
@given(sent=st.lists(messages, min_size=1, max_size=8), data=st.data())
def test_a_stream_cut_anywhere_decodes_to_the_same_messages(
    sent: list[Any], data: st.DataObject
) -> None:
    encoder = FrameEncoder()
    stream = bytearray()
    for message in sent:
        encoder.append(message, stream)
    points = data.draw(st.sets(st.integers(0, len(stream)), max_size=24), label="cuts")
    wrap = data.draw(as_buffer, label="piece type")
    decoder = FrameDecoder(Message)
    received: list[Any] = []
    for piece in cut(bytes(stream), points):
        received += decoder.feed(wrap(piece))
        assert decoder.buffered < len(stream)
    assert received == sent
    assert decoder.buffered == 0


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_a_read_of_exactly_one_frame_decodes_and_a_bad_one_ends_the_stream(wrap: Any) -> None:
    """The read of a sequential call holds one whole frame: it takes a shorter path
    through the decoder, with the same results and the same errors."""
    encoder = FrameEncoder()
    message = Call(7, "noop", (1, b"x"), {"k": [1.5]}, "s", 2.0, False, 0, None)
    decoder = FrameDecoder(WorkerBound)
    assert decoder.feed(wrap(bytes(encoder.encode(message)))) == [message]
    assert decoder.feed(wrap(bytes(encoder.encode(Cancel(7))))) == [Cancel(7)]
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError, match="malformed"):
        decoder.feed(wrap(frame(b"\x93\x03\x01")))  # a Result cut short inside its frame
    with pytest.raises(ProtocolError, match="malformed"):
        decoder.feed(wrap(bytes(encoder.encode(Cancel(8)))))  # the stream stays ended
    with pytest.raises(ProtocolError, match="unknown MessagePack extension"):
        FrameDecoder(ParentBound).feed(wrap(frame(_pack(Result(1, msgspec.msgpack.Ext(99, b"x"))))))


def test_byte_level_example() -> None:
    """The frame shown in docs/protocol.md; within a protocol version it changes only
    by fields appended at the end (here ``trace``: the last ``c0``)."""
    data = FrameEncoder().encode(Call(id=1, method="add", args=(1, 2)))
    assert bytes(data).hex(" ") == "00 00 00 10 9a 02 01 a3 61 64 64 92 01 02 80 c0 c0 c2 00 c0"
    assert PROTOCOL_VERSION == 1


# --- hostile input: fuzzing -----------------------------------------------------------


def feed_hostile(decoder: FrameDecoder[Any], pieces: list[bytes]) -> list[Any]:
    """Feed pieces; only messages or ProtocolError may come out, and the error sticks."""
    received: list[Any] = []
    first: ProtocolError | None = None
    rest: list[bytes] = []
    for i, piece in enumerate(pieces):
        try:
            received += decoder.feed(piece)
        except ProtocolError as exc:
            first, rest = exc, pieces[i + 1 :]
            break
    if first is not None:
        assert decoder.buffered == 0  # nothing is kept of a broken stream
        for later in [*rest, b"", bytes(FrameEncoder().encode(End(1)))]:
            with pytest.raises(ProtocolError) as again:
                decoder.feed(later)
            assert again.value is first
    assert all(isinstance(message, MESSAGE_TYPES) for message in received)
    return received


@FUZZ
@given(
    blob=st.binary(max_size=600),
    max_size=st.integers(1, 700),
    data=st.data(),
)
def test_random_bytes_give_messages_or_protocol_error(
    blob: bytes, max_size: int, data: st.DataObject
) -> None:
    points = data.draw(st.sets(st.integers(0, len(blob)), max_size=12), label="cuts")
    feed_hostile(FrameDecoder(Message, max_size), cut(blob, points))


# Starts of valid messages that end in an ``Any`` position, so that random bytes
# after them reach msgspec's value decoder (extensions, nesting, map keys).
VALUE_PREFIXES = [
    b"\x93\x03\x01",  # Result(1, ...
    b"\x93\x05\x01",  # Chunk(1, ...
    b"\x94\x02\x01\xa1m\x91",  # Call(1, "m", (...
    b"\x95\x02\x01\xa1m\x90\x81\xa1k",  # Call(1, "m", (), {"k": ...
]
# Bytes weighted towards 0xc0..0xdf, MessagePack's typed opcodes (nil, bool, bin,
# ext, numbers, str, array, map, the reserved 0xc1): st.binary alone rarely makes them.
msgpack_ish = st.lists(
    st.sampled_from(range(0xC0, 0xE0)) | st.integers(0, 255), min_size=1, max_size=48
).map(bytes)
hostile_bodies = st.binary(min_size=1, max_size=64) | st.builds(
    bytes.__add__, st.sampled_from(VALUE_PREFIXES), msgpack_ish
)


@FUZZ
@given(bodies=st.lists(hostile_bodies, min_size=1, max_size=6), data=st.data())
def test_whole_frames_with_random_bodies_never_stay_buffered(
    bodies: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frame(body) for body in bodies)
    points = data.draw(st.sets(st.integers(0, len(stream)), max_size=12), label="cuts")
    decoder = FrameDecoder(Message)
    received = feed_hostile(decoder, cut(stream, points))
    if len(received) == len(bodies):
        assert decoder.buffered == 0
    else:  # a body was not a valid message, and said so
        with pytest.raises(ProtocolError):
            decoder.feed(b"")


@FUZZ
@given(message=messages, data=st.data())
def test_corrupted_valid_frames_give_messages_or_protocol_error(
    message: Any, data: st.DataObject
) -> None:
    payload = bytearray(_pack(message))
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        at = data.draw(st.integers(0, len(payload) - 1), label="at")
        payload[at] = data.draw(st.integers(0, 255), label="byte")
    stream = frame(bytes(payload))
    points = data.draw(st.sets(st.integers(0, len(stream)), max_size=6), label="cuts")
    feed_hostile(FrameDecoder(Message), cut(stream, points))


# --- hostile input: examples ----------------------------------------------------------


def test_huge_length_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(Message)
    assert decoder.feed(b"\xff\xff\xff") == []  # not yet a whole header
    assert decoder.buffered == 3
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="4294967295 bytes announced"):
            decoder.feed(b"\xff")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # nothing was reserved for the announced body
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00" * 16)


def test_a_frame_within_the_limit_waits_for_its_body_without_reserving_it() -> None:
    decoder = FrameDecoder(Message, MAX_POSSIBLE_SIZE)
    assert decoder.feed(b"\xff\xff\xff\xff\x93") == []
    assert decoder.buffered == 5  # only what arrived


def test_empty_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="length 0"):
        decode_all(Message, b"\x00\x00\x00\x00")


def test_empty_frame_after_a_valid_one_is_a_protocol_error() -> None:
    decoder = FrameDecoder(Message)
    assert decoder.feed(frame(_pack(End(1)))) == [End(1)]
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00\x00\x00\x00")


def _result_of_size(size: int) -> Result:
    """A Result whose encoding is exactly ``size`` bytes (size >= 8)."""
    n = size - len(_pack(Result(1, b"")))
    while len(_pack(Result(1, b"x" * n))) > size:
        n -= 1
    message = Result(1, b"x" * n)
    assert len(_pack(message)) == size
    return message


@pytest.mark.parametrize("limit", [100, 300, 70_000])
def test_exactly_max_size_is_accepted_and_one_more_is_not(limit: int) -> None:
    fits = _result_of_size(limit)
    data = bytes(FrameEncoder(limit).encode(fits))
    assert decode_all(Message, data, limit) == [fits]

    over = _result_of_size(limit + 1)
    with pytest.raises(PayloadTooLarge):
        FrameEncoder(limit).encode(over)
    decoder = FrameDecoder(Message, limit)
    with pytest.raises(ProtocolError, match="over the limit"):
        decoder.feed(frame(_pack(over))[:HEADER_SIZE])  # the header is enough


@pytest.mark.parametrize("max_size", [0, -1, MAX_POSSIBLE_SIZE + 1])
def test_limits_outside_the_32_bit_length_are_refused(max_size: int) -> None:
    with pytest.raises(ValueError, match="max_size"):
        FrameEncoder(max_size)
    with pytest.raises(ValueError, match="max_size"):
        FrameDecoder(Message, max_size)


@pytest.mark.parametrize(
    "message",
    [
        Result(1, msgspec.msgpack.Ext(5, b"x")),
        Result(1, [1, {"a": msgspec.msgpack.Ext(127, b"")}]),
        Call(1, "m", (msgspec.msgpack.Ext(-2, b"\x00" * 8),)),
        Call(1, "m", kwargs={"k": msgspec.msgpack.Ext(0, b"")}),
    ],
    ids=["value", "nested", "negative-code", "kwarg"],
)
def test_unknown_extension_types_are_refused(message: Any) -> None:
    decoder = FrameDecoder(Message)
    with pytest.raises(ProtocolError, match="extension type"):
        decoder.feed(frame(_pack(message)))
    assert decoder.buffered == 0
    with pytest.raises(ProtocolError):
        decoder.feed(frame(_pack(End(1))))


def test_extension_in_a_typed_field_is_refused() -> None:
    with pytest.raises(ProtocolError):
        decode_all(Message, frame(_pack([6, msgspec.msgpack.Ext(5, b"x")])))


@pytest.mark.parametrize(
    "moment",
    [
        datetime.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=UTC),
        datetime.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),  # negative seconds
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_msgpack_timestamps_still_decode(moment: datetime.datetime) -> None:
    message = Result(1, {"at": moment, "many": [moment]})
    payload = _pack(message)
    assert b"\xd6\xff" in payload or b"\xd7\xff" in payload or b"\xc7\x0c\xff" in payload
    [decoded] = decode_all(Message, frame(payload))
    assert decoded == message
    assert decoded.value["at"].tzinfo is not None


def test_a_malformed_timestamp_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode_all(Message, frame(_pack(Result(1, msgspec.msgpack.Ext(-1, b"abc")))))


@pytest.mark.parametrize(
    "nest",
    [b"\x91", b"\x81\xa1k"],  # array of one; map of one with key "k"
    ids=["arrays", "maps"],
)
def test_deep_nesting_is_a_protocol_error(nest: bytes) -> None:
    payload = b"\x93\x03\x01" + nest * 100_000 + b"\xc0"  # Result(1, [[[...None...]]])
    decoder = FrameDecoder(Message)
    with pytest.raises(ProtocolError):
        decoder.feed(frame(payload))
    assert decoder.buffered == 0


def test_truncated_body_stays_buffered() -> None:
    data = bytes(FrameEncoder().encode(Result(7, "hello")))
    decoder = FrameDecoder(Message)
    assert decoder.feed(data[:-1]) == []
    assert decoder.feed(b"") == []
    assert decoder.buffered == len(data) - 1  # the transport reports this at end of stream
    assert decoder.feed(data[-1:]) == [Result(7, "hello")]
    assert decoder.buffered == 0


def test_array_length_beyond_the_frame_is_a_protocol_error() -> None:
    # claims 2**32-1 elements / bytes: refused as truncated, nothing allocated for it
    for payload in (b"\x93\x03\x01\xdd\xff\xff\xff\xff", b"\x93\x03\x01\xdb\xff\xff\xff\xff"):
        with pytest.raises(ProtocolError, match="truncated"):
            decode_all(Message, frame(payload))


def test_trailing_garbage_inside_a_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="trailing"):
        decode_all(Message, frame(_pack(End(1)) + b"\xc0"))


@pytest.mark.parametrize("tag", [0, 14, 99, -1, 2**64 - 1])
def test_unknown_tag_is_a_protocol_error(tag: int) -> None:
    with pytest.raises(ProtocolError):
        decode_all(Message, frame(_pack([tag, 1])))


@pytest.mark.parametrize(
    "raw",
    [
        ["6", 1],  # tag as a string
        [6, "1"],  # End.id as a string
        [6, True],  # bool is not an int
        [6, 1.0],  # float is not an int
        [6],  # missing id
        [],
        [2, 1, 5],  # Call.method not a str
        [2, 1, "m", {}],  # Call.args not an array
        [2, 1, "m", [], {1: 2}],  # Call.kwargs with a non-str key
        [2, 1, "m", [], {}, 5],  # Call.session not str or nil
        [2, 1, "m", [], {}, None, "soon"],  # Call.timeout not a number
        [2, 1, "m", [], {}, None, None, 1],  # Call.stream not a bool
        [1, 1, 2, "w", [3]],  # Hello.handlers not strings
        [4, 1, "remote", "T"],  # Error without its message
        {"t": 6, "id": 1},  # a map, not an array
        "End",
        None,
    ],
)
def test_wrong_shapes_and_field_types_are_protocol_errors(raw: Any) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        decode_all(Message, frame(_pack(raw)))


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", b"\x93\x03\x01\xa2\xff\xfe", b"\x93\x03\x01\x81\xa2\xff\xfe\x01"],
    ids=["reserved-opcode", "bad-utf8-value", "bad-utf8-key"],
)
def test_invalid_msgpack_and_utf8_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_all(Message, frame(payload))


def test_fields_appended_by_a_newer_peer_are_ignored_and_defaults_fill_in() -> None:
    newer = decode_all(Message, frame(_pack([6, 5, "a field from the future", [1]])))
    assert newer == [End(5)]
    assert decode_all(Message, frame(_pack([12, None]))) == [Shutdown()]
    older = decode_all(Message, frame(_pack([2, 9, "m"])))
    assert older == [Call(9, "m", (), {}, None, None, False, 0)]
    no_traceback = decode_all(Message, frame(_pack([4, 1, "remote", "ValueError", "bad"])))
    assert no_traceback == [Error(1, "remote", "ValueError", "bad", "")]


# --- encoder --------------------------------------------------------------------------


PREFILL = b"earlier frames \x00\x01\x02"


@pytest.mark.parametrize(
    "value",
    [object(), {1j: 1}, 2**64, -(2**63) - 1, {"a": [1, 2, object()]}],
    ids=["object", "complex-key", "int-too-big", "int-too-small", "nested-object"],
)
def test_unencodable_value_raises_encode_error_and_leaves_the_buffer(value: Any) -> None:
    buffer = bytearray(PREFILL)
    with pytest.raises(EncodeError) as info:
        FrameEncoder().append(Result(1, value), buffer)
    assert isinstance(info.value, TypeError)
    assert info.value.__cause__ is not None
    assert buffer == PREFILL


def _cyclic() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _deep() -> list[Any]:
    value: list[Any] = []
    for _ in range(100_000):
        value = [value]
    return value


@pytest.mark.parametrize("make", [_cyclic, _deep], ids=["cyclic", "deep"])
def test_cyclic_or_too_deep_value_raises_encode_error_and_leaves_the_buffer(make: Any) -> None:
    buffer = bytearray(PREFILL)
    with pytest.raises(EncodeError, match="recursion"):
        FrameEncoder().append(Call(1, "m", (make(),)), buffer)
    assert buffer == PREFILL


def test_message_over_the_limit_raises_payload_too_large_and_leaves_the_buffer() -> None:
    encoder = FrameEncoder(max_size=64)
    buffer = bytearray(PREFILL)
    encoder.append(End(1), buffer)
    before = bytes(buffer)
    with pytest.raises(PayloadTooLarge, match="over the limit of 64 bytes"):
        encoder.append(Result(2, b"x" * 65), buffer)
    assert buffer == before


@PROPERTY
@given(sent=st.lists(messages, min_size=1, max_size=5), prefill=st.binary(max_size=16))
def test_header_is_the_big_endian_payload_length(sent: list[Any], prefill: bytes) -> None:
    encoder = FrameEncoder()
    buffer = bytearray(prefill)
    offset = len(prefill)
    for message in sent:
        size = encoder.append(message, buffer)
        payload = _pack(message)
        assert size == len(payload)
        assert buffer[offset : offset + HEADER_SIZE] == size.to_bytes(4, "big")
        assert buffer[offset + HEADER_SIZE : offset + HEADER_SIZE + size] == payload
        offset += HEADER_SIZE + size
    assert len(buffer) == offset
    assert buffer[: len(prefill)] == prefill
    first = len(prefill) + HEADER_SIZE + len(_pack(sent[0]))
    assert encoder.encode(sent[0]) == buffer[len(prefill) : first]
