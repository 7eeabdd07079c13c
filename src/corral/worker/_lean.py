"""What a worker process does at start so that an idle worker holds little memory.

Owns: ``import_msgspec`` (msgspec imported without typing_extensions, which
changes nothing msgspec does on the Pythons corral supports) and
``trim_heap`` (the C heap's free pages handed back to the system once start-up
is over). Must not touch: the wire, the app, or any module user code imports:
user code imports typing_extensions (or anything else) as usual.

Why (docs/decisions/0029-idle-worker-memory.md): msgspec's ``_utils`` tries
``from typing_extensions import get_type_hints, Required, NotRequired`` and
falls back to ``typing``'s when that import fails. On Python 3.11 and later
typing_extensions' ``Required``/``NotRequired`` *are* ``typing``'s, and its
``get_type_hints(..., include_extras=True)`` returns ``typing.get_type_hints``'
own result, so both branches give msgspec the same objects and the same
answers. Taking the fallback saves importing typing_extensions and the
``inspect``, ``ast``, ``dis`` and ``tokenize`` modules it imports: about 1.4 MiB
in every worker.
"""

from __future__ import annotations

import sys

__all__ = ["import_msgspec", "trim_heap"]

_BLOCKED = "typing_extensions"


def import_msgspec() -> None:
    """Import msgspec, with msgspec's own fallback in place of typing_extensions.

    Leaves ``sys.modules`` as an ordinary import would, but for typing_extensions
    not being there yet: a later ``import typing_extensions`` works as usual.
    Does an ordinary import when msgspec or typing_extensions is loaded already,
    on a Python older than 3.11, or if this msgspec cannot do without it.
    """
    if sys.version_info < (3, 11) or "msgspec" in sys.modules or _BLOCKED in sys.modules:
        import msgspec  # an ordinary import

        return
    sys.modules[_BLOCKED] = None  # type: ignore[assignment]  # an import of it raises ImportError
    try:
        import msgspec  # with its fallback
    except ImportError:
        # A msgspec that needs typing_extensions after all: forget what was
        # half-imported and import it the ordinary way below.
        for name in [m for m in sys.modules if m == "msgspec" or m.startswith("msgspec.")]:
            del sys.modules[name]
    finally:
        if _BLOCKED in sys.modules and sys.modules[_BLOCKED] is None:
            del sys.modules[_BLOCKED]
    import msgspec  # noqa: F401 - loaded above, or now the ordinary way


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``).

    Start-up (compiling modules that have no bytecode, importing the target)
    leaves free memory in the heap that an idle worker would keep resident:
    0.3 MiB when corral's modules were compiled at start. Elsewhere (no glibc)
    this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # loaded already: the worker asked for PR_SET_PDEATHSIG with it

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
