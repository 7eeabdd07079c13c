"""The corral worker app: DSPy programs built, kept and run per session.

Target string: ``"examples.dspy_service.worker:app"``. Owns: the handlers and
what a session holds (its programs, by name). Must not touch: HTTP
(``app.py``), or the environment once DSPy is imported (``settings.py`` prepares
it in ``on_startup``, before the import).

Each worker imports DSPy and configures its LM once, in ``on_startup``, from
``Settings.from_env()``; a worker whose settings are wrong fails to start, and
the pool reports ``WorkerStartError`` with the reason. A session's programs
live in ``ctx.session["programs"]``, in the worker that holds the session:

    await pool.call("build", "qa", "question: str -> answer: str", session="alice")
    await pool.call("run", "qa", {"question": "..."}, session="alice")
    async for item in pool.stream("stream", "qa", {"question": "..."}, session="alice"):
        ...   # {"delta": "..."} pieces of the answer, then {"field", "outputs", "calls"}

If the worker dies, its sessions die with it: the next call in the session gets
``SessionLost``, and the one after finds an empty session (``ProgramNotFound``)
where the program is built again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import structlog

from corral.worker import App, Context

from .settings import Settings

__all__ = ["KINDS", "InputError", "ProgramNotFound", "SignatureError", "app"]

app = App("dspy-service")
log = structlog.get_logger("examples.dspy_service")

KINDS = ("predict", "chain_of_thought")
"""The module kinds ``build`` makes: ``dspy.Predict`` and ``dspy.ChainOfThought``."""


class SignatureError(ValueError):
    """``build`` got a signature (or kind) that DSPy cannot make a program of."""


class ProgramNotFound(LookupError):
    """``run`` or ``stream`` named a program this session does not hold."""


class InputError(ValueError):
    """The inputs do not match the program's input fields, or the field to stream."""


@dataclasses.dataclass
class Program:
    """One built DSPy module in a session, with what it was built from."""

    kind: str
    signature: str  # as the caller wrote it
    fields: Any  # the dspy.Signature made of it
    module: Any  # dspy.Predict or dspy.ChainOfThought
    calls: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "signature": self.signature,
            "inputs": list(self.fields.input_fields),
            "outputs": list(self.fields.output_fields),
        }


@dataclasses.dataclass
class _Loaded:
    dspy: ModuleType
    settings: Settings


_loaded: _Loaded | None = None


def _dspy() -> ModuleType:
    if _loaded is None:  # on_startup runs before any call; this is a real bug if hit
        raise RuntimeError("DSPy is not loaded: the worker's on_startup did not run")
    return _loaded.dspy


@app.on_startup
def load_dspy() -> None:
    """Import DSPy and configure this worker's LM, once, before the worker is ready."""
    global _loaded
    settings = Settings.from_env()
    settings.prepare_environment()  # before the import: DSPy reads it then
    import dspy  # the heavy import, once per worker

    from .lm import make_lm

    dspy.configure(lm=make_lm(settings))
    _loaded = _Loaded(dspy, settings)
    log.info("dspy.ready", lm=settings.lm, dspy=dspy.__version__, pid=os.getpid())


def _programs(ctx: Context) -> dict[str, Program]:
    if ctx.session is None:
        raise InputError("programs live in a session: call with session=...")
    programs: dict[str, Program] = ctx.session.setdefault("programs", {})
    return programs


def _program(ctx: Context, name: str) -> Program:
    programs = _programs(ctx)
    try:
        return programs[name]
    except KeyError:
        held = ", ".join(sorted(programs)) or "none"
        raise ProgramNotFound(
            f"no program {name!r} in session {ctx.session_id!r} (it holds: {held}); "
            "build it first, or again if the session was lost"
        ) from None


def _make_signature(signature: str, instructions: str | None) -> Any:
    dspy = _dspy()
    if not isinstance(signature, str):
        raise SignatureError(f"a signature is a string, got {type(signature).__name__}")
    try:
        made = dspy.Signature(signature, instructions)
    # DSPy parses the string with Python's own parser and pydantic: these are
    # the ways a malformed string fails.
    except (ValueError, TypeError, SyntaxError, NameError, AttributeError, KeyError) as exc:
        raise SignatureError(f"invalid signature {signature!r}: {exc}") from exc
    if not made.input_fields:
        raise SignatureError(f"invalid signature {signature!r}: no input field before '->'")
    if not made.output_fields:
        raise SignatureError(f"invalid signature {signature!r}: no output field after '->'")
    return made


@app.handler
def build(
    name: str,
    signature: str,
    kind: str = "predict",
    instructions: str | None = None,
    *,
    ctx: Context,
) -> dict[str, Any]:
    """Build a program in this session (replacing one of the same name); describe it."""
    if kind not in KINDS:
        raise SignatureError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    dspy = _dspy()
    made = _make_signature(signature, instructions)
    module = dspy.Predict(made) if kind == "predict" else dspy.ChainOfThought(made)
    program = Program(kind=kind, signature=signature, fields=made, module=module)
    _programs(ctx)[name] = program
    return {"name": name, **program.describe()}


@app.handler
def programs(*, ctx: Context) -> dict[str, dict[str, str]]:
    """The programs this session holds: name -> kind and signature."""
    return {name: {"kind": p.kind, "signature": p.signature} for name, p in _programs(ctx).items()}


def _check_inputs(program: Program, inputs: Any) -> dict[str, Any]:
    if not isinstance(inputs, dict):
        raise InputError(f"inputs are a dict of field -> value, got {type(inputs).__name__}")
    expected = list(program.fields.input_fields)
    missing = [field for field in expected if field not in inputs]
    unexpected = [field for field in inputs if field not in expected]
    if missing or unexpected:
        raise InputError(
            f"inputs do not match {program.signature!r}: missing {missing}, unexpected {unexpected}"
        )
    return inputs


def _result(program: Program, prediction: Any) -> dict[str, Any]:
    return {"outputs": prediction.toDict(), "calls": program.calls, "worker_pid": os.getpid()}


@app.handler
def run(name: str, inputs: dict[str, Any], *, ctx: Context) -> dict[str, Any]:
    """Run the session's program ``name`` on ``inputs``: its outputs and its call count."""
    program = _program(ctx, name)
    prediction = program.module(**_check_inputs(program, inputs))
    program.calls += 1
    return {"program": name, **_result(program, prediction)}


def _stream_field(program: Program, field: str | None) -> str:
    # What the LM writes (with ChainOfThought, "reasoning" too) may stream;
    # by default, the caller's first str output.
    written = program.module.predictors()[-1].signature.output_fields
    streamable = [name for name, info in written.items() if info.annotation is str]
    if field is None:
        field = next(
            (name for name, info in program.fields.output_fields.items() if info.annotation is str),
            None,
        )
    if field not in streamable:
        raise InputError(
            f"cannot stream {field!r} of {program.signature!r}: "
            f"only its str outputs stream ({', '.join(streamable) or 'none'})"
        )
    return field


@app.handler
async def stream(
    name: str, inputs: dict[str, Any], field: str | None = None, *, ctx: Context
) -> AsyncIterator[dict[str, Any]]:
    """Run the program, streaming one output field as the LM produces it.

    Yields ``{"delta": text}`` pieces of ``field`` (default: the first str output
    that is not ``reasoning``) as DSPy's ``StreamListener`` cuts them out of the
    LM's stream, then ``{"field": ..., "outputs": ..., "calls": ...}`` once the
    prediction is complete. An LM that does not stream (or a cached answer)
    gives no delta: the outputs still come, whole, at the end.
    """
    dspy = _dspy()
    program = _program(ctx, name)
    checked = _check_inputs(program, inputs)
    target = _stream_field(program, field)
    listener = dspy.streaming.StreamListener(signature_field_name=target)
    streaming = dspy.streamify(program.module, stream_listeners=[listener])
    async for item in streaming(**checked):
        if isinstance(item, dspy.streaming.StreamResponse):
            if item.chunk:
                yield {"delta": item.chunk}
        elif isinstance(item, dspy.Prediction):
            program.calls += 1
            yield {"field": target, **_result(program, item)}
