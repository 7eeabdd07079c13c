"""The worker-side registry: ``App`` holds handlers and lifecycle hooks; ``Context``.

Owns: how user functions are registered, classified (sync, async, sync or async
generator) and described. Must not touch: the wire, the event loop or the
process; the runtime reads what is registered here.

A plain function (the common handler) is classified from its code object, with
the answers ``inspect`` gives; anything else (a partial, a wrapper, a callable
object, a method) goes to ``inspect``, imported then: a worker whose handlers
are plain functions never loads it (docs/decisions/0029-idle-worker-memory.md).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from types import FunctionType
from typing import Any, TypeVar, overload

__all__ = ["App", "Context", "Handler", "HandlerKind"]

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What a handler that declares a ``ctx`` parameter receives.

    ``session`` is a dict that lives in this worker as long as the session does
    (None outside a session). ``cancelled`` turns true once the caller cancelled
    or the deadline passed, so a long sync handler can stop early; an async
    handler is cancelled for real.

    Attributes:
        call_id: The call's correlation id, as in the caller's errors.
        method: The name the handler was called by.
        worker_id: This worker's id (``"pool1-w2"``), as in the pool's logs.
        session_id: The call's session, or None.
        session: The session's state, a dict kept in this worker while the
            session lives; None outside a session.
        deadline: The call's deadline as a ``time.monotonic()`` value, or None.
    """

    __slots__ = (
        "_cancel_event",
        "_cancelled",
        "call_id",
        "deadline",
        "method",
        "session",
        "session_id",
        "worker_id",
    )

    def __init__(
        self,
        call_id: int,
        method: str,
        worker_id: str,
        session_id: str | None,
        session: dict[str, Any] | None,
        deadline: float | None,
    ) -> None:
        self.call_id = call_id
        self.method = method
        self.worker_id = worker_id
        self.session_id = session_id
        self.session = session
        self.deadline = deadline  # time.monotonic() value, or None
        self._cancelled = False
        self._cancel_event: threading.Event | None = None  # made on first wait

    @property
    def cancelled(self) -> bool:
        """True once the call was cancelled or its deadline passed."""
        if self._cancelled:
            return True
        deadline = self.deadline
        return deadline is not None and time.monotonic() >= deadline

    def _cancel(self) -> None:
        self._cancelled = True
        event = self._cancel_event
        if event is not None:
            event.set()

    def time_left(self) -> float | None:
        """Seconds until the call's deadline, or None when it has none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block (a sync handler) until cancelled or ``timeout``; True if cancelled."""
        if self._cancel_event is None:
            self._cancel_event = threading.Event()
            if self._cancelled:
                self._cancel_event.set()
        left = self.time_left()
        if left is not None and (timeout is None or left < timeout):
            return self._cancel_event.wait(left) or self.cancelled
        return self._cancel_event.wait(timeout)

    def __repr__(self) -> str:
        return (
            f"<corral.worker.Context call={self.call_id} method={self.method!r} "
            f"session={self.session_id!r} worker={self.worker_id}"
            f"{' cancelled' if self.cancelled else ''}>"
        )


class HandlerKind(enum.Enum):
    """How a handler runs: a plain function, a coroutine, or a (sync or async) generator."""

    SYNC = "sync"
    ASYNC = "async"
    SYNC_GEN = "sync generator"
    ASYNC_GEN = "async generator"

    @property
    def described(self) -> str:
        """The kind with its article: "a sync generator", "an async generator"."""
        return f"{'an' if self.value[0] in 'aeiou' else 'a'} {self.value}"

    @property
    def streams(self) -> bool:
        """True for generators: each item they yield is one chunk of a stream."""
        return self in (HandlerKind.SYNC_GEN, HandlerKind.ASYNC_GEN)


# CPython's code flags (``inspect.CO_*``): stable since 3.6.
_CO_GENERATOR = 0x20
_CO_COROUTINE = 0x80
_CO_ASYNC_GENERATOR = 0x200


def _is_plain(fn: Callable[..., Any]) -> bool:
    """A ``def`` or lambda with no attributes set on it (no ``__wrapped__``,
    ``__signature__``, coroutine mark...): inspect reads such a function from its
    code object alone, so this module can too."""
    return type(fn) is FunctionType and not fn.__dict__


def _kind_of(fn: Callable[..., Any]) -> HandlerKind:
    if _is_plain(fn):
        flags = fn.__code__.co_flags
        if flags & _CO_ASYNC_GENERATOR:
            return HandlerKind.ASYNC_GEN
        if flags & _CO_GENERATOR:
            return HandlerKind.SYNC_GEN
        return HandlerKind.ASYNC if flags & _CO_COROUTINE else HandlerKind.SYNC
    import inspect

    if inspect.isasyncgenfunction(fn):
        return HandlerKind.ASYNC_GEN
    if inspect.isgeneratorfunction(fn):
        return HandlerKind.SYNC_GEN
    if inspect.iscoroutinefunction(fn):
        return HandlerKind.ASYNC
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects
    # an object's own __call__ written in Python; one written in C (a builtin, a
    # partial) is sync
    own_call = not inspect.isfunction(fn) and not inspect.ismethod(fn)
    if own_call and (inspect.isfunction(call) or inspect.ismethod(call)):
        return _kind_of(call)
    return HandlerKind.SYNC


def _wants_context(fn: Callable[..., Any]) -> bool:
    if _is_plain(fn):
        code = fn.__code__
        # positional-or-keyword and keyword-only names, as inspect.signature reads them
        first, end = code.co_posonlyargcount, code.co_argcount + code.co_kwonlyargcount
        return "ctx" in code.co_varnames[first:end]
    import inspect

    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("ctx")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


class Handler:
    """One registered function and what the runtime needs to know about it.

    Attributes:
        name: The name callers use.
        fn: The registered function.
        kind: How it runs: sync, async, or a (sync or async) generator.
        streams: Whether it is a generator (its items travel as a stream).
        wants_context: Whether it declares a ``ctx`` parameter.
    """

    __slots__ = ("fn", "kind", "name", "streams", "wants_context")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self.kind = _kind_of(fn)
        self.streams = self.kind.streams  # read on every call: kept as a plain attribute
        self.wants_context = _wants_context(fn)

    def __repr__(self) -> str:
        return f"<corral.worker.Handler {self.name!r} {self.kind.value}>"


class App:
    """The handlers and hooks one worker process serves.

    >>> app = App()
    >>> @app.handler
    ... def add(a, b): return a + b

    Attributes:
        name: An optional name, shown in its repr.
        sync_mode: Where sync handlers run: ``"auto"``, ``"inline"`` or ``"thread"``.
        handlers: The registered handlers, by name.
        startup_hooks: The ``on_startup`` functions, in order.
        shutdown_hooks: The ``on_shutdown`` functions, in order.
        session_end_hooks: The ``on_session_end`` functions, in order.
    """

    def __init__(self, name: str | None = None, *, sync_mode: str = "auto") -> None:
        """``sync_mode`` says where sync handlers run; all of them on one thread:

        - ``"auto"`` (default): on the worker's main thread, which reads the
          calls (no event loop, no thread hop); async handlers run on an event
          loop of their own thread, and keep running while a sync one does;
        - ``"inline"``: the same as ``"auto"``;
        - ``"thread"``: on a dedicated thread, while the main thread's event
          loop reads the calls and runs async handlers (new calls are read
          while a sync handler runs, at the price of a thread hop per call).
        """
        if sync_mode not in ("auto", "inline", "thread"):
            raise ValueError(f"sync_mode must be 'auto', 'inline' or 'thread', got {sync_mode!r}")
        self.name = name
        self.sync_mode = sync_mode
        self.handlers: dict[str, Handler] = {}
        self.startup_hooks: list[Callable[[], Any]] = []
        self.shutdown_hooks: list[Callable[[], Any]] = []
        self.session_end_hooks: list[Callable[[str, dict[str, Any]], Any]] = []

    @overload
    def handler(self, name_or_fn: F, /) -> F: ...

    @overload
    def handler(self, name_or_fn: str | None = None, /) -> Callable[[F], F]: ...

    def handler(self, name_or_fn: str | F | None = None, /) -> F | Callable[[F], F]:
        """Register a handler under its function name, or under an explicit name."""
        if callable(name_or_fn):
            return self._register(name_or_fn.__name__, name_or_fn)
        explicit = name_or_fn

        def decorate(fn: F) -> F:
            return self._register(explicit or fn.__name__, fn)

        return decorate

    def _register(self, name: str, fn: F) -> F:
        if not isinstance(name, str) or not name:
            raise ValueError(f"handler name must be a non-empty string, got {name!r}")
        if name in self.handlers:
            raise ValueError(f"a handler named {name!r} is already registered")
        self.handlers[name] = Handler(name, fn)
        return fn

    @property
    def has_async_handlers(self) -> bool:
        """True if any handler is async: the worker then starts an event loop on a thread."""
        return any(
            h.kind in (HandlerKind.ASYNC, HandlerKind.ASYNC_GEN) for h in self.handlers.values()
        )

    def on_startup(self, fn: F) -> F:
        """Run once per worker before it reports ready; may be async."""
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: F) -> F:
        """Run once when the worker stops gracefully; may be async."""
        self.shutdown_hooks.append(fn)
        return fn

    def on_session_end(self, fn: F) -> F:
        """Run with ``(session_id, state)`` when a session is closed; may be async."""
        self.session_end_hooks.append(fn)
        return fn

    def __repr__(self) -> str:
        return f"<corral.worker.App {self.name or ''} handlers={sorted(self.handlers)}>"
