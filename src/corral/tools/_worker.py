"""The worker app that hosts interactive programs: ``corral.tools._worker:app``.

One program per session: ``tool.start`` puts a ToolProcess in ``ctx.session``;
every other handler works on that one. Ending the session (``close_session``)
stops it; stopping the worker stops them all; the worker's death kills them
(parent-death signal, same process group).

Tool-level failures (the program ended, did not start) come back as a result
``{"error": {...}}`` with the exit code and the output's tail, so the pool side
can raise a typed error carrying them; a bad argument raises as usual.

Must not touch: processes other than the ToolProcesses it made, or the pool side.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from corral.worker import App, Context

from .._log import get_logger
from ._process import ToolProcess, ToolSpec, ToolStartFailed

__all__ = ["app"]

app = App("corral.tools")
_live: set[ToolProcess] = set()
_SESSION_END_GRACE = 0.5


def _session(ctx: Context) -> dict[str, Any]:
    if ctx.session is None:
        raise RuntimeError(f"{ctx.method!r} must be called in a session (one tool per session)")
    return ctx.session


def _tool(ctx: Context) -> ToolProcess | dict[str, Any]:
    """The session's program, or the error result saying there is none."""
    tool = _session(ctx).get("tool")
    if tool is None:
        return {
            "error": {
                "kind": "not_started",
                "message": "no program runs in this session: start it first",
                "exit_code": None,
                "output_tail": "",
            }
        }
    assert isinstance(tool, ToolProcess)
    return tool


def _exited(tool: ToolProcess) -> dict[str, Any]:
    return {
        "error": {
            "kind": "exited",
            "message": f"{tool.spec.argv[0]!r} has ended",
            "exit_code": tool.exit_code,
            "output_tail": tool.output_tail(),
        }
    }


def _log(ctx: Context) -> Any:
    return get_logger("corral.tools").bind(
        worker_id=ctx.worker_id, session=ctx.session_id, call_id=ctx.call_id
    )


async def _replace(ctx: Context, spec: ToolSpec) -> dict[str, Any]:
    session = _session(ctx)
    old = session.pop("tool", None)
    if isinstance(old, ToolProcess):
        _live.discard(old)
        await old.stop(0.0)
    tool = ToolProcess(spec)
    try:
        banner = await tool.start()
    except ToolStartFailed as exc:
        _log(ctx).warning(
            "tool.start_failed", command=list(spec.argv), error=exc.message, exit=exc.exit_code
        )
        return {
            "error": {
                "kind": "start",
                "message": exc.message,
                "exit_code": exc.exit_code,
                "output_tail": exc.output_tail,
            }
        }
    session["tool"] = tool
    session["spec"] = spec
    _live.add(tool)
    _log(ctx).info("tool.started", command=list(spec.argv), tool_pid=tool.pid, mode=spec.mode)
    return {"pid": tool.pid, "banner": banner}


@app.handler("tool.start")
async def start(spec: dict[str, Any], *, ctx: Context) -> dict[str, Any]:
    """Start the program ``spec`` describes (ToolSpec fields); replaces a running one."""
    return await _replace(ctx, ToolSpec.from_dict(spec))


@app.handler("tool.restart")
async def restart(spec: dict[str, Any] | None = None, *, ctx: Context) -> dict[str, Any]:
    """Stop the session's program and start it again; ``spec`` if the session has none."""
    session = _session(ctx)
    known = session.get("spec")
    if known is None:
        if spec is None:
            raise ValueError("this session never started a program: pass its spec")
        known = ToolSpec.from_dict(spec)
    return await _replace(ctx, known)


@app.handler("tool.lease")
async def lease(spec: dict[str, Any], *, ctx: Context) -> dict[str, Any]:
    """Before an instance is handed out: nothing if its program runs, else a restart.

    The check is the process's exit status (``waitid`` without reaping), so a
    program killed while no one held it is never handed out dead.
    """
    tool = _session(ctx).get("tool")
    if isinstance(tool, ToolProcess) and not tool.has_ended():
        return {"restarted": False}
    if isinstance(tool, ToolProcess):
        _log(ctx).info("tool.ended_between_leases", tool_pid=tool.pid)
    result = await restart(spec, ctx=ctx)
    return result if "error" in result else {**result, "restarted": True}


@app.handler("tool.send")
async def send(data: str, *, ctx: Context) -> dict[str, Any]:
    """Queue ``data`` for the program's input; returns at once with the bytes queued."""
    tool = _tool(ctx)
    if isinstance(tool, dict):
        return tool
    try:
        queued = tool.write(data.encode(tool.spec.encoding))
    except BrokenPipeError:
        return _exited(tool)
    return {"queued": queued}


@app.handler("tool.read_until")
async def read_until(
    marker: str | None = None,
    *,
    regex: bool = False,
    within: float = 30.0,
    quiet: float | None = None,
    use_prompt: bool = True,
    ctx: Context,
) -> dict[str, Any]:
    """Read until ``marker`` (default: the prompt), ``quiet`` seconds of silence, ``within``
    seconds, or the end of the program's output."""
    tool = _tool(ctx)
    if isinstance(tool, dict):
        return tool
    if marker is None and use_prompt:
        pattern = tool.spec.marker()
    else:
        pattern = tool.spec.marker(marker, regex) if marker is not None else None
    outcome = await tool.read_until(pattern, timeout=within, quiet=quiet)
    return outcome.as_dict()


@app.handler("tool.run")
async def run(line: str, *, within: float = 30.0, ctx: Context) -> dict[str, Any]:
    """Send ``line`` and a newline, then read until the prompt: one round trip."""
    tool = _tool(ctx)
    if isinstance(tool, dict):
        return tool
    if not tool.alive:
        return _exited(tool)
    try:
        tool.write((line + "\n").encode(tool.spec.encoding))
    except BrokenPipeError:
        return _exited(tool)
    outcome = await tool.read_until(tool.spec.marker(), timeout=within)
    if outcome.reason == "exited":
        return {**_exited(tool), "text": outcome.text}
    return outcome.as_dict()


@app.handler("tool.status")
async def status(*, ctx: Context) -> dict[str, Any]:
    """Alive, pid, uptime, bytes in and out, output not read yet, exit code."""
    tool = _tool(ctx)
    if isinstance(tool, dict):
        return tool
    return tool.status()


@app.handler("tool.health")
async def health(*, within: float = 5.0, ctx: Context) -> dict[str, Any]:
    """Is the program alive and, if it has a prompt, does an empty line bring it back?

    The probe runs only when no output is waiting to be read and no read is in
    progress, so it never takes output meant for the user.
    """
    tool = _tool(ctx)
    if isinstance(tool, dict):
        return {"ok": False, "alive": False, "latency": None, "detail": "not started"}
    if not tool.alive:
        return {"ok": False, "alive": False, "latency": None, "detail": "ended"}
    pattern = tool.spec.marker()
    if pattern is None:
        return {"ok": True, "alive": True, "latency": None, "detail": "alive (no prompt to probe)"}
    if tool.status()["buffered"] or tool.reading:
        return {"ok": True, "alive": True, "latency": None, "detail": "alive (busy: not probed)"}
    began = time.monotonic()
    try:
        tool.write(b"\n")
    except BrokenPipeError:
        return {"ok": False, "alive": False, "latency": None, "detail": "ended"}
    outcome = await tool.read_until(pattern, timeout=within)
    latency = time.monotonic() - began
    if outcome.reason == "marker":
        return {"ok": True, "alive": True, "latency": latency, "detail": "prompt answered"}
    return {
        "ok": False,
        "alive": tool.alive,
        "latency": None,
        "detail": f"no prompt after an empty line ({outcome.reason})",
    }


@app.handler("tool.interrupt")
async def interrupt(*, ctx: Context) -> None:
    """Send SIGINT to the program, as Ctrl-C would."""
    tool = _tool(ctx)
    if isinstance(tool, ToolProcess):
        tool.interrupt()


@app.handler("tool.stop")
async def stop(*, grace: float | None = None, ctx: Context) -> int | None:
    """Stop the session's program (input closed, then SIGKILL after ``grace``)."""
    tool = _session(ctx).pop("tool", None)
    if not isinstance(tool, ToolProcess):
        return None
    _live.discard(tool)
    code = await tool.stop(grace)
    _log(ctx).info("tool.stopped", tool_pid=tool.pid, exit=code)
    return code


@app.on_session_end
async def _session_ended(_session_id: str, state: dict[str, Any]) -> None:
    tool = state.pop("tool", None)
    if isinstance(tool, ToolProcess):
        _live.discard(tool)
        await tool.stop(_SESSION_END_GRACE)


@app.on_shutdown
async def _stop_all() -> None:
    tools = list(_live)
    _live.clear()
    await asyncio.gather(*(t.stop(_SESSION_END_GRACE) for t in tools))
