"""The errors of corral.tools: a program failed to start, ended, or missed its prompt.

    CorralError
    └── ToolError                       about one program: command, exit code, output
        ├── ToolStartError (WorkerStartError)   it did not start or show its prompt
        ├── ToolExited                  it has ended; restart() the instance
        └── ToolTimeout (CallTimeout)   run() saw no prompt in time; .output has what came

Owns: these classes and how they render. Must not touch: processes or the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._errors import CallTimeout, CorralError, WorkerStartError, describe_exit

__all__ = ["ToolError", "ToolExited", "ToolStartError", "ToolTimeout"]

_TAIL_SHOWN = 2000


class ToolError(CorralError):
    """Something went wrong with one program.

    ``command`` is its argv, ``exit_code`` how it ended (negative for a
    signal, None if it runs), ``output_tail`` the last of its output.
    """

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] | None = None,
        output_tail: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.command = list(command) if command is not None else None
        self.output_tail = output_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.command is not None:
            text += f"\ncommand: {self.command!r}"
        if self.exit_code is not None and describe_exit(self.exit_code) not in text:
            text += f" ({describe_exit(self.exit_code)})"
        if self.output_tail:
            tail = self.output_tail[-_TAIL_SHOWN:].rstrip("\n")
            text += "\n--- tool output (tail) ---\n" + tail
        return text


class ToolStartError(ToolError, WorkerStartError):
    """The program could not start, ended before its prompt, or never showed it."""


class ToolExited(ToolError):
    """The program has ended (it exited or was killed); ``restart()`` brings it back."""


class ToolTimeout(ToolError, CallTimeout):
    """``run()`` saw no prompt before its timeout. ``output`` is what arrived meanwhile.

    The program still runs (perhaps still busy): ``interrupt()`` it, read on, or
    restart it.
    """

    def __init__(self, message: str, *, output: str, **context: Any) -> None:
        super().__init__(message, **context)
        self.output = output
