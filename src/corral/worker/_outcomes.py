"""What a worker says about a call that failed or cannot start, in words both runtimes share.

Owns: ``describe`` (an exception as the type name, message and traceback an
``Error`` frame carries, with a message even for a bare ``assert``) and
``refusal_of`` (the ``Error`` frame for a call that cannot start: no such handler,
a generator called with ``call()``, a deadline already past).
Must not touch: the wire, threads or event loops. Imports no asyncio: the
main-thread runtime of a sync-only worker uses it too, and imports traceback at
the first failure, not before: an idle worker never loads it.
"""

from __future__ import annotations

import os

from .._messages import Call, Error, ErrorKind
from ._app import App, Handler

__all__ = ["describe", "refusal_of"]

#: How many handler names a MethodNotFound message lists.
NOT_FOUND_LISTED = 8


def describe(exc: BaseException) -> tuple[str, str, str]:
    """``(type name, message, traceback)`` of a handler's exception."""
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    try:
        message = str(exc)
    except Exception as str_failure:  # noqa: BLE001 - a broken __str__ must not kill the worker
        message = f"<unprintable {kind.__name__}: {str_failure!r}>"
    if not message:
        message = _where(exc)
    import traceback

    return name, message, "".join(traceback.format_exception(exc))


def _where(exc: BaseException) -> str:
    """For an exception raised without a message (a bare ``assert``): where it was raised."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    what = "assertion failed" if isinstance(exc, AssertionError) else "raised"
    line = f": {last.line}" if last.line else ""
    return f"{what} at {os.path.basename(last.filename)}:{last.lineno} in {last.name}(){line}"


def refusal_of(app: App, call: Call, handler: Handler | None) -> Error | None:
    """Why this call cannot start, as its Error frame; None if it can."""
    if handler is None:
        known = sorted(app.handlers)
        listed = ", ".join(repr(n) for n in known[:NOT_FOUND_LISTED])
        extra = len(known) - NOT_FOUND_LISTED
        more = f" and {extra} more" if extra > 0 else ""
        return Error(
            call.id,
            ErrorKind.METHOD_NOT_FOUND,
            "MethodNotFound",
            f"no handler named {call.method!r}; this worker has {listed or 'none'}{more}",
        )
    if handler.kind.streams and not call.stream:
        return Error(
            call.id,
            ErrorKind.USAGE,
            "TypeError",
            f"handler {call.method!r} is {handler.kind.described}: use pool.stream(), "
            "not pool.call()",
        )
    if call.timeout is not None and call.timeout <= 0:
        return Error(
            call.id,
            ErrorKind.TIMEOUT,
            "TimeoutError",
            "deadline passed before the call started",
        )
    return None
