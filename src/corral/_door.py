"""Checks at the door: a caller's mistake is refused in the caller, before anything is sent.

Owns: the rules for every value a caller hands the parent that ends up on the
wire, on the event loop's timer heap or on a worker's command line: session ids,
method names, timeouts and the other durations, counts, and the shape of a
target. Each check is one call that returns the value to use (a float for a
timeout, a plain ``str`` for a session id) or raises ``TypeError`` (wrong kind of
value) or ``ValueError`` (right kind, wrong value) naming the parameter.
Must not touch: the pool's state, processes, the event loop, or user code; a
target's module is read as text (see ``_target_check``), never imported.

Why here and not in each entry point: a session id that is not a ``str`` reaches
the worker as a frame it cannot decode (it exits, taking its other sessions and
calls along), and a ``nan`` deadline poisons the loop's timer heap; one set of
rules, called first by every entry point, keeps both out.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import numbers
import reprlib
from typing import Any, Literal, overload

from ._target_check import check_target

__all__ = [
    "MAX_SECONDS",
    "check_count",
    "check_method",
    "check_seconds",
    "check_session",
    "check_session_required",
    "check_target",
    "check_timeout",
    "running_loop",
]

#: The longest timeout or duration accepted: about 31 years. Past it a clock sum
#: loses precision and threading's waits overflow; ``None`` means "no deadline".
MAX_SECONDS = 1e9


def _got(value: object) -> str:
    """How an error shows a refused value: its type, then its repr."""
    return "None" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"


def check_seconds(value: Any, name: str, *, unit: str = "seconds") -> float:
    """``value`` as a finite number of seconds in (0, MAX_SECONDS]; raises otherwise.

    Accepts int, float and other real numbers (numpy scalars included), never
    bool: ``timeout=True`` is a mistake, not one second.
    """
    kind = type(value)
    if kind is float or kind is int:
        if 0 < value <= MAX_SECONDS:
            return float(value)
    elif kind is bool or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of {unit} (int or float), got {_got(value)}")
    else:
        try:
            value = float(value)
        except OverflowError:
            value = math.inf if value > 0 else -math.inf
        if 0 < value <= MAX_SECONDS:
            return float(value)
    if value != value or value in (math.inf, -math.inf):  # no float(): ints may be huge
        raise ValueError(f"{name} must be a finite number of {unit}, got {reprlib.repr(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0 {unit}, got {reprlib.repr(value)}")
    raise ValueError(
        f"{name} must be at most {MAX_SECONDS:.0e} {unit}, got {reprlib.repr(value)} "
        "(None means no limit)"
    )


def check_timeout(value: Any, name: str = "timeout") -> float | None:
    """``None`` (no deadline) or ``value`` checked by :func:`check_seconds`."""
    if value is None:
        return None
    return check_seconds(value, name)


def _utf8(value: str, name: str) -> str:
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{name} must be valid UTF-8 text, got {reprlib.repr(value)} ({exc.reason})"
            ) from None
    return value


def check_session(value: Any) -> str | None:
    """A session id: ``None`` or a ``str`` (a str subclass becomes a plain str)."""
    if value is None or (type(value) is str and value.isascii()):
        return value  # the hot path: one type test
    if isinstance(value, str):
        return _utf8(str.__str__(value), "session")
    raise TypeError(f"session must be a str or None, got {_got(value)}")


def check_session_required(value: Any) -> str:
    """A session id where one is required (``close_session``): a ``str``."""
    if not isinstance(value, str):
        raise TypeError(f"session must be a str, got {_got(value)}")
    return _utf8(str.__str__(value), "session")


def check_method(value: Any) -> str:
    """A handler name: a ``str``."""
    if type(value) is str and value.isascii():
        return value  # the hot path: one type test
    if isinstance(value, str):
        return _utf8(str.__str__(value), "method")
    raise TypeError(f"method must be a str, got {_got(value)}: the handler's name")


@overload
def check_count(
    value: Any, name: str, *, minimum: int = 0, optional: Literal[False] = False
) -> int: ...


@overload
def check_count(value: Any, name: str, *, minimum: int = 0, optional: bool) -> int | None: ...


def check_count(value: Any, name: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    """An ``int`` >= ``minimum`` (never bool); ``None`` too when ``optional``."""
    if value is None and optional:
        return None
    if type(value) is not int and (
        isinstance(value, bool) or not isinstance(value, numbers.Integral)
    ):
        raise TypeError(f"{name} must be an int, got {_got(value)}")
    count = int(value)
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {count!r}")
    return count


def _async_library() -> str | None:
    """The async library running this thread (sniffio's answer), if sniffio is there."""
    try:
        sniffio: Any = importlib.import_module("sniffio")
        return str(sniffio.current_async_library())
    except Exception:  # noqa: BLE001 - no sniffio, or no async library: nothing to name
        return None


def running_loop(what: str) -> asyncio.AbstractEventLoop:
    """The running asyncio loop; a RuntimeError saying so when there is none (trio, sync code)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        library = _async_library()
        where = f"this is {library}" if library else "no asyncio event loop is running"
        raise RuntimeError(
            f"corral runs on asyncio, and {where}: {what} needs a running asyncio event loop "
            "(asyncio.run(), anyio.run(..., backend='asyncio'), or an asyncio server such "
            "as uvicorn); see docs/fastapi.md, 'anyio cancel scopes and trio'"
        ) from None
