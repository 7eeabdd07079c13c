"""corral.tools: pools of interactive command-line programs (REPLs, shells, sqlite3, bc).

    from corral.tools import ToolPool

    async with ToolPool("python3 -i -q", size=3, prompt=">>> ") as tools:
        async with tools.instance() as repl:
            await repl.run("1+1")          # -> "2\\n"

Each instance is one program in a session of a corral worker
(``corral.tools._worker:app``); see docs/tools.md.
"""

from ._errors import ToolError, ToolExited, ToolStartError, ToolTimeout
from ._pool import ReadResult, ToolHealth, ToolInstance, ToolPool, ToolStatus

__all__ = [
    "ReadResult",
    "ToolError",
    "ToolExited",
    "ToolHealth",
    "ToolInstance",
    "ToolPool",
    "ToolStartError",
    "ToolStatus",
    "ToolTimeout",
]

for _name in __all__:
    globals()[_name].__module__ = "corral.tools"
del _name
