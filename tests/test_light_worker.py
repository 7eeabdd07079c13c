"""A worker imports at start only what serving calls needs (docs/performance.md).

Every module a worker imports costs memory in each worker and time at each
start; the parent's side of corral, structlog and rich (which structlog loads
when it is installed) are not needed to serve calls, and asyncio only by apps
with async code. typing_extensions (which msgspec would import and which
imports inspect) is not needed on the Python versions corral supports, and
inspect, logging and traceback wait for the first handler, event or failure that
needs them (docs/decisions/0029-idle-worker-memory.md); user code imports them
as usual.
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import Pool, RemoteError
from corral.worker import Context
from corral.worker._app import Handler, HandlerKind

# Never imported by an idle worker; a name covers its submodules.
HEAVY = (
    "rich",
    "structlog",
    "corral._pool",
    "corral._handle",
    "corral._launch",
    "shutil",
    "typing_extensions",
)
# What asyncio imports itself, so only a worker without it goes without them.
DEFERRED = ("inspect", "ast", "dis", "tokenize", "logging", "traceback", "linecache")


def _heavy(modules: list[str], names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` in ``modules`` that a bare interpreter has not loaded
    itself (3.13 starts with linecache, for one)."""
    bare = _bare_modules()
    return [
        m for m in modules if m not in bare and any(m == n or m.startswith(n + ".") for n in names)
    ]


@functools.cache
def _bare_modules() -> frozenset[str]:
    """What ``python -c`` has imported before it runs any code."""
    listed = subprocess.run(
        [sys.executable, "-c", "import sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return frozenset(listed.stdout.split())


@pytest.mark.parametrize(
    ("target", "also_absent"),
    [
        ("tests.workers.light:app", ("asyncio", "concurrent", *DEFERRED)),  # no loop
        ("tests.workers.basic:app", ()),  # async handlers: asyncio, on a thread of its own
    ],
)
async def test_an_idle_worker_imports_nothing_heavy(
    target: str, also_absent: tuple[str, ...]
) -> None:
    async with Pool(target, size=1) as pool:
        modules = await pool.call("loaded_modules")
    assert "corral.worker" in modules  # the probe sees the worker's own modules
    assert _heavy(modules, HEAVY + also_absent) == []


async def test_a_forked_worker_imports_no_typing_extensions_either() -> None:
    # The preload template imports the worker's runtime (asyncio too) before it
    # forks; msgspec comes in there the way a spawned worker imports it.
    async with Pool("tests.workers.light:app", size=1, preload=["tests.workers.light"]) as pool:
        modules = await pool.call("loaded_modules")
    assert "corral.worker._template" in modules  # it was forked from the template
    assert _heavy(modules, ("typing_extensions",)) == []


async def test_what_an_idle_worker_skipped_still_works_for_user_code() -> None:
    async with Pool("tests.workers.light:app", size=1) as pool:
        # typing_extensions imports as usual, and msgspec reads its names
        outcome = await pool.call("typed_dict_with_typing_extensions", b'{"x": 1}')
        assert outcome == {"point": {"x": 1}, "hints": ["label", "x"]}
        with pytest.raises(RemoteError, match="missing required field `x`"):
            await pool.call("typed_dict_with_typing_extensions", b'{"label": "a"}')
        # a failure still carries its traceback (traceback is imported for it)
        with pytest.raises(RemoteError, match="on purpose") as failed:
            await pool.call("fails")
        assert "raise ValueError" in (failed.value.traceback or "")
        assert (await pool.call("with_context")).startswith("pool")


@pytest.mark.parametrize(
    "argv",
    [
        ["pkg.mod:app"],
        ["pkg.mod:app", "--fds", "3,4,5", "--worker-id", "pool1-w1"],
        ["--fds=3,4", "pkg.mod:app", "--max-message-size", "1024", "--shm-prefix", "corral-1-"],
        ["pkg.mod:app", "--large-buffer-threshold", "262144", "--worker-id=w"],
    ],
)
def test_the_worker_reads_its_command_line_as_argparse_would(argv: list[str]) -> None:
    # The fast reading (no argparse imported) gives what argparse gives.
    from corral.worker.__main__ import _parse_args, _parser

    assert vars(_parse_args(argv)) == vars(_parser().parse_args(argv))


@pytest.mark.parametrize(
    "argv", [[], ["pkg.mod:app", "--bogus"], ["pkg.mod:app", "--fds"], ["a:b", "c:d"]]
)
def test_a_bad_worker_command_line_gets_argparse_s_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from corral.worker.__main__ import _parse_args

    with pytest.raises(SystemExit) as exited:
        _parse_args(argv)
    assert exited.value.code == 2
    assert "usage: python -m corral.worker" in capsys.readouterr().err


# --- a handler's kind and ctx, read without inspect: the same answers as inspect's ----


def _kind_by_inspect(fn: Callable[..., Any]) -> HandlerKind:
    """What the registry answered with inspect, except that a callable whose
    ``__call__`` is not written in Python (a builtin, a partial) is sync instead
    of recursing without end."""
    if inspect.isasyncgenfunction(fn):
        return HandlerKind.ASYNC_GEN
    if inspect.isgeneratorfunction(fn):
        return HandlerKind.SYNC_GEN
    if inspect.iscoroutinefunction(fn):
        return HandlerKind.ASYNC
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects
    own_call = not inspect.isfunction(fn) and not inspect.ismethod(fn)
    if own_call and (inspect.isfunction(call) or inspect.ismethod(call)):
        return _kind_by_inspect(call)
    return HandlerKind.SYNC


def _wants_context_by_inspect(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get("ctx")
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def _plain(a: int) -> int:
    return a


def _positional(a: int, ctx: Context) -> None: ...


def _keyword(a: int, *, ctx: Context) -> None: ...


def _positional_only(ctx: Context, /) -> None: ...


def _var_keyword(**ctx: Any) -> None: ...


def _var_positional(*ctx: Any) -> None: ...


def _ctx_default(ctx: Context | None = None) -> None: ...


def _ctx_local() -> None:
    ctx = 1
    del ctx


async def _coroutine(*, ctx: Context) -> None: ...


async def _async_gen(ctx: Context):  # type: ignore[no-untyped-def]
    yield 1


def _gen(n: int, *, ctx: Context):  # type: ignore[no-untyped-def]
    yield n


def _wrapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def _with_signature() -> None: ...


_with_signature.__signature__ = inspect.signature(_keyword)  # type: ignore[attr-defined]


class _Callable:
    def __call__(self, *, ctx: Context) -> None: ...


class _AsyncCallable:
    async def __call__(self, ctx: Context) -> None: ...


class _Methods:
    def method(self, ctx: Context) -> None: ...

    async def amethod(self) -> None: ...

    @staticmethod
    def static(*, ctx: Context) -> None: ...

    @classmethod
    def klass(cls, ctx: Context) -> None: ...


HANDLERS: list[Callable[..., Any]] = [
    _plain,
    _positional,
    _keyword,
    _positional_only,
    _var_keyword,
    _var_positional,
    _ctx_default,
    _ctx_local,
    _coroutine,
    _async_gen,
    _gen,
    _wrapped(_keyword),
    _wrapped(_coroutine),
    _wrapped(_gen),
    _with_signature,
    functools.partial(_positional, 1),
    functools.partial(_keyword, 1),
    functools.partial(_coroutine),
    functools.partial(_gen, 1),
    functools.partial(_wrapped(_coroutine)),
    _Callable(),
    _AsyncCallable(),
    _Methods().method,
    _Methods().amethod,
    _Methods.static,
    _Methods.klass,
    lambda ctx: None,
    lambda *, ctx=None: None,
    len,
    print,
    dict,
    _Methods,
]


@pytest.mark.parametrize(
    "fn",
    HANDLERS,
    ids=[f"{i}-{getattr(fn, '__name__', type(fn).__name__)}" for i, fn in enumerate(HANDLERS)],
)
def test_a_handler_is_read_as_inspect_reads_it(fn: Callable[..., Any]) -> None:
    handler = Handler("h", fn)
    assert handler.kind is _kind_by_inspect(fn)
    assert handler.wants_context is _wants_context_by_inspect(fn)


@st.composite
def _function_sources(draw: st.DrawFn) -> str:
    """Source of a function with any layout of parameters, ``ctx`` among them or not."""
    names = draw(st.lists(st.sampled_from(["a", "b", "ctx", "c"]), unique=True, max_size=4))
    cuts = sorted(draw(st.lists(st.integers(0, len(names)), min_size=2, max_size=2)))
    positional_only, ordinary, keyword_only = (
        names[: cuts[0]],
        names[cuts[0] : cuts[1]],
        names[cuts[1] :],
    )
    parts = [*positional_only, *(["/"] if positional_only else []), *ordinary]
    star = draw(st.sampled_from(["", "*args", "*ctx"]))
    if star and "ctx" in names and star == "*ctx":
        star = "*args"
    if star:
        parts.append(star)
    elif keyword_only:
        parts.append("*")
    parts += keyword_only
    if draw(st.booleans()) and "ctx" not in names and star != "*ctx":
        parts.append("**ctx")
    head = draw(st.sampled_from(["def", "async def"]))
    body = draw(st.sampled_from(["pass", "yield 1", "local = 1"]))
    return f"{head} f({', '.join(parts)}):\n    {body}\n"


@settings(max_examples=300, deadline=None)
@given(_function_sources())
def test_any_plain_function_is_read_as_inspect_reads_it(source: str) -> None:
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # a generated function
    fn = namespace["f"]
    handler = Handler("h", fn)
    assert handler.kind is _kind_by_inspect(fn)
    assert handler.wants_context is _wants_context_by_inspect(fn)
