"""The messages of corral's wire protocol (see docs/protocol.md).

Owns: the message types, their tags and field order, and the protocol version.
Must not touch: framing, I/O or any process; this module is pure data.

Every message is a frozen msgspec Struct encoded as a MessagePack array whose
first element is the message's integer tag. New fields are only ever appended,
with defaults, so an older peer can still decode a newer message; a change that
breaks that bumps ``PROTOCOL_VERSION``.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "Call",
    "Cancel",
    "CancelAck",
    "Chunk",
    "Credit",
    "End",
    "EndSession",
    "Error",
    "ErrorKind",
    "Hello",
    "Message",
    "ParentBound",
    "Ping",
    "Pong",
    "Result",
    "Shutdown",
    "WorkerBound",
]

PROTOCOL_VERSION = 1


class _Msg(msgspec.Struct, frozen=True, array_like=True, tag_field="t", gc=False):
    """Base: a frozen, array-encoded, integer-tagged message."""


# Each message repeats ``frozen=True``: msgspec inherits it at runtime anyway, but
# type checkers read Struct through ``dataclass_transform``, which does not.


# --- worker -> parent -------------------------------------------------------


class Hello(_Msg, tag=1, frozen=True):
    """First frame a worker sends, once its ``on_startup`` hooks have run."""

    protocol: int
    pid: int
    worker_id: str
    handlers: list[str]


class Result(_Msg, tag=3, frozen=True):
    """The return value of a call; ends that call."""

    id: int
    value: Any


class Error(_Msg, tag=4, frozen=True):
    """A call failed in the worker; ends that call. ``kind`` is one of ErrorKind."""

    id: int
    kind: str
    type: str
    message: str
    traceback: str = ""


class Chunk(_Msg, tag=5, frozen=True):
    """One item yielded by a streaming handler."""

    id: int
    value: Any


class End(_Msg, tag=6, frozen=True):
    """A stream finished normally; ends that call."""

    id: int


class CancelAck(_Msg, tag=8, frozen=True):
    """The worker has stopped the call named by a Cancel; always the last frame of it."""

    id: int


class Pong(_Msg, tag=10, frozen=True):
    """Answer to a Ping, with the same sequence number."""

    seq: int


# --- parent -> worker -------------------------------------------------------


class Call(_Msg, tag=2, frozen=True):
    """Run ``method(*args, **kwargs)``. ``timeout`` is the time left, in seconds.

    ``stream`` asks for Chunk/End frames; ``window`` is the number of chunks the
    worker may send before it waits for Credit. ``trace`` is the caller's W3C
    ``traceparent`` when the pool traces calls (see docs/observability.md).
    """

    id: int
    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    session: str | None = None
    timeout: float | None = None
    stream: bool = False
    window: int = 0
    trace: str | None = None


class Cancel(_Msg, tag=7, frozen=True):
    """Stop the call with this id; the worker answers with CancelAck."""

    id: int


class Ping(_Msg, tag=9, frozen=True):
    """Liveness probe; the worker answers with Pong at once, even while busy."""

    seq: int


class EndSession(_Msg, tag=11, frozen=True):
    """Drop the state of a session."""

    session: str


class Shutdown(_Msg, tag=12, frozen=True):
    """Finish the calls in flight, run ``on_shutdown`` hooks, then exit."""


class Credit(_Msg, tag=13, frozen=True):
    """The consumer took ``n`` more chunks of stream ``id``: the worker may send more."""

    id: int
    n: int


class ErrorKind:
    """Values of ``Error.kind``: how the parent should map the failure."""

    REMOTE = "remote"  # the handler raised -> RemoteError
    METHOD_NOT_FOUND = "method_not_found"  # -> MethodNotFound
    USAGE = "usage"  # call() on a generator, bad arguments -> RemoteError
    ENCODE = "encode"  # the result cannot be encoded -> RemoteError
    TOO_LARGE = "too_large"  # the result is over the size limit -> PayloadTooLarge
    TIMEOUT = "timeout"  # the deadline passed inside the worker -> CallTimeout


ParentBound = Hello | Result | Error | Chunk | End | CancelAck | Pong
WorkerBound = Call | Cancel | Ping | EndSession | Shutdown | Credit
Message = ParentBound | WorkerBound
