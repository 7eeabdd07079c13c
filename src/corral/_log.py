"""Where corral's log events go: the application's structlog, or the standard library's logging.

Owns: ``get_logger`` (a bound logger that decides, at each event, whether the
application has configured structlog) and ``Repeats`` (one line per interval for
an event that repeats, with the count of those it held back).

The rule (docs/decisions/0022-logging-routing.md): when the application has
configured structlog (``structlog.is_configured()``), an event goes through that
configuration, with its bound fields. Otherwise it goes to the standard library
logger of the same name (``corral``, ``corral.worker``, ``corral.tools``), with the
usual propagation: with nothing configured, Python shows WARNING and above on
stderr and drops the rest, and ``logging.basicConfig(level=logging.INFO)`` shows
them all. The choice is made at each event, not at import, because applications
configure logging after importing their libraries.

Must not touch: the configuration of structlog or of logging (both belong to the
application), stdout. Never imports structlog: an application that configured it
has imported it, so ``sys.modules`` is asked instead. That keeps worker start
light (importing structlog imports rich when rich is installed), and the
standard library's logging is imported at the first event that goes there, not
before: an idle worker never loads it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a sync-only worker never imports asyncio
    import asyncio
    import logging

__all__ = ["Logger", "Repeats", "get_logger"]

# logging's level numbers (logging.DEBUG ... logging.CRITICAL), fixed by its API.
_LEVELS = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
}


def _render(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in "='\"" for c in value):
        return value
    return repr(value)


class Logger:
    """A structlog-style bound logger: ``log.bind(worker_id=...).info("event", key=value)``.

    Bound fields and the event's own travel together to whichever backend is in
    force when the event happens. On the standard-library path the record's
    message is ``event key=value ...`` and ``record.corral`` holds the event as a
    dict (``{"event": ..., **fields}``) for handlers that format it themselves.
    """

    __slots__ = ("_context", "_name", "_std", "_struct")

    def __init__(self, name: str, context: dict[str, Any]) -> None:
        self._name = name
        self._context = context
        self._std: logging.Logger | None = None  # the standard library's, at its first event
        self._struct: Any = None  # structlog's lazy proxy, made at the first event it takes

    @property
    def name(self) -> str:
        return self._name

    def bind(self, **values: Any) -> Logger:
        return Logger(self._name, {**self._context, **values})

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """``error`` with the exception being handled (its traceback) attached."""
        fields.setdefault("exc_info", True)
        self._emit("exception", event, fields)

    def log(self, level: str, event: str, /, **fields: Any) -> None:
        """The level by name: ``log("warning", ...)`` is ``warning(...)``."""
        self._emit(level, event, fields)

    def _emit(self, method: str, event: str, fields: dict[str, Any], stacklevel: int = 3) -> None:
        structlog = sys.modules.get("structlog")
        if structlog is not None and structlog.is_configured():
            if self._struct is None:
                # A lazy proxy: it reads structlog's configuration at each event.
                self._struct = structlog.get_logger(self._name, **self._context)
            getattr(self._struct, method)(event, **fields)
            return
        level = _LEVELS[method]
        std = self._std
        if std is None:
            import logging

            std = self._std = logging.getLogger(self._name)
        if not std.isEnabledFor(level):
            return  # the common case with nothing configured: below WARNING, nothing to do
        exc_info = fields.pop("exc_info", None)
        values = {**self._context, **fields}
        message = " ".join([event, *(f"{k}={_render(v)}" for k, v in values.items())])
        std.log(
            level,
            "%s",
            message,
            exc_info=exc_info,
            extra={"corral": {"event": event, **values}},
            stacklevel=stacklevel,  # the record names the line that logged, not this module
        )


def get_logger(name: str = "corral", **context: Any) -> Logger:
    """A logger named ``name`` (``corral`` or a child), bound with ``context``."""
    return Logger(name, context)


_MAX_KEYS = 1024


class _Window:
    __slots__ = ("fields", "held", "level", "started", "timer")

    def __init__(self, level: str, started: float) -> None:
        self.level = level
        self.started = started
        self.held = 0
        self.fields: dict[str, Any] = {}
        self.timer: asyncio.TimerHandle | None = None


class Repeats:
    """At most one line per key per ``interval`` seconds for an event that repeats.

    The first event of a key is logged as it happens. Those that follow within
    the interval are only counted; when the interval ends (on a timer of the
    running event loop, or at the next event of that key, or at ``flush()``),
    one line of the same event carries the fields of the last one held back and
    ``repeated``: how many it stands for. A storm of a million identical
    failures costs a counter increment each and about one line per second.
    """

    def __init__(
        self, log: Logger, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def log(self, level: str, key: Hashable, event: str, /, **fields: Any) -> None:
        """Log ``event`` at ``level`` (by name), or count it if ``key`` was logged lately."""
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.started < self._interval:
            window.held += 1
            window.fields = {"event": event, **fields}
            window.level = level
            if window.timer is None:
                window.timer = self._call_later(window.started + self._interval - now, key)
            return
        if window is not None:
            self._summarize(window)
        elif len(self._windows) >= _MAX_KEYS:
            self._forget_quiet()
        self._windows[key] = _Window(level, now)
        self._log._emit(level, event, fields, stacklevel=4)

    def flush(self) -> None:
        """Log every count held back now (a pool does this when it closes)."""
        for window in self._windows.values():
            self._summarize(window)
        self._windows.clear()

    def _forget_quiet(self) -> None:
        """Drop the windows with nothing held back, so many keys cannot grow memory."""
        for key in [k for k, w in self._windows.items() if not w.held]:
            del self._windows[key]

    def _call_later(self, delay: float, key: Hashable) -> asyncio.TimerHandle | None:
        try:
            import asyncio

            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # no loop: the count waits for the next event or flush()
        return loop.call_later(max(0.0, delay), self._interval_ended, key)

    def _interval_ended(self, key: Hashable) -> None:
        window = self._windows.get(key)
        if window is not None:
            window.timer = None
            self._summarize(window)
            window.started = self._clock()  # a storm goes on: one line per interval

    def _summarize(self, window: _Window) -> None:
        if window.timer is not None:
            window.timer.cancel()
            window.timer = None
        if window.held:
            fields = dict(window.fields)
            event = fields.pop("event")
            self._log.log(window.level, event, **fields, repeated=window.held)
            window.held = 0
