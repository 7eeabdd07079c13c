"""The DSPy example's worker app under a network audit: every attempt is recorded and refused.

An audit hook goes in before the example's ``on_startup`` imports DSPy, so the
import, the LM's configuration and every call are covered. A connect or a DNS
look-up raises ``OSError(ENETUNREACH)``, as on a machine with no route out, and
is listed by ``network_attempts``.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from examples.dspy_service.worker import app

_ATTEMPTS: list[str] = []
_WATCHED = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto"}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event not in _WATCHED:
        return
    if event == "socket.connect" and getattr(args[0], "family", None) == 1:  # AF_UNIX: local
        return
    _ATTEMPTS.append(f"{event} {args!r}")
    raise OSError(errno.ENETUNREACH, f"network refused in this test worker ({event})")


sys.addaudithook(_audit)


@app.handler
def probe_network() -> str:
    """Try to reach a host, as a library would: the hook must refuse it."""
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        return str(exc)
    return "connected"


@app.handler
def network_attempts(*, clear: bool = False) -> list[str]:
    attempts = list(_ATTEMPTS)
    if clear:
        _ATTEMPTS.clear()
    return attempts
