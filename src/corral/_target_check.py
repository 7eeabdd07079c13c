"""The parent's look at a target (``"package.module:app"``) before any worker starts.

Owns: the target's syntax, and a best-effort reading of the target module's
source for the one mistake a new user makes first: naming a function (often a
handler) instead of the App. Must not touch: user code. The parent never imports
the target (docs/decisions/0021-checks-at-the-door.md): it finds the
module's file with the import system's path finder, which runs no package
``__init__``, and parses it with ``ast``. It refuses only what it can be sure of;
anything it cannot follow is left to the worker, whose loader says the same
thing in its own words (``corral.worker.__main__.load_target``).
"""

from __future__ import annotations

import ast
import importlib.machinery
import keyword
from collections.abc import Iterator

__all__ = ["check_target"]

_SHAPE = "target must look like 'package.module:app'"
# Decorators known to return the function they decorate: corral's own.
_TRANSPARENT_DECORATORS = frozenset({"handler", "on_startup", "on_shutdown", "on_session_end"})
# Names whose use means the module binds names in ways a reading cannot follow.
_DYNAMIC = frozenset({"globals", "vars", "exec", "setattr", "__getattr__"})


def _dotted(text: str) -> bool:
    return bool(text) and all(
        part.isidentifier() and not keyword.iskeyword(part) for part in text.split(".")
    )


def check_target(target: object, *, python: str | None = None) -> str:
    """Return ``target`` if it can name an App; raise TypeError/ValueError if it cannot.

    ``python`` is the workers' interpreter: when it is not the parent's, the
    module is left to the worker (the parent cannot know that interpreter's path).
    """
    if not isinstance(target, str):
        raise TypeError(f"target must be a str like 'package.module:app', got {target!r}")
    module, sep, attr = target.partition(":")
    if not sep:
        raise ValueError(f"{_SHAPE}, got {target!r}: no ':' between the module and the App")
    if not module:
        raise ValueError(f"{_SHAPE}, got {target!r}: the module name is missing")
    if not attr:
        raise ValueError(f"{_SHAPE}, got {target!r}: the App's name after ':' is missing")
    if module.endswith(".py"):
        raise ValueError(
            f"{_SHAPE}, got {target!r}: name the module, not its file "
            f"({module[:-3].replace('/', '.')!r})"
        )
    if not _dotted(module):
        raise ValueError(f"{_SHAPE}, got {target!r}: {module!r} is not a module name")
    if not _dotted(attr):
        raise ValueError(f"{_SHAPE}, got {target!r}: {attr!r} is not an attribute name")
    if python is None and "." not in attr:
        tree = _parse(module)
        if tree is not None:
            _check_binding(target, tree, attr)
    return target


def _parse(module: str) -> ast.Module | None:
    """The module's syntax tree, found without importing anything; None if out of reach."""
    path: list[str] | None = None
    spec = None
    parts = module.split(".")
    for i in range(len(parts)):
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), path)
        except (ImportError, OSError, ValueError):
            return None
        if spec is None:
            return None
        if i < len(parts) - 1:
            locations = spec.submodule_search_locations
            if locations is None:
                return None
            path = list(locations)
    if spec is None or not spec.has_location or not (spec.origin or "").endswith(".py"):
        return None
    try:
        with open(spec.origin or "", encoding="utf-8") as f:
            return ast.parse(f.read(), spec.origin or "<target>")
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None  # the worker reports it, with the interpreter's own message


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import time: the body and the blocks of if/try/with/for/while/match."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _module_level(getattr(stmt, field, []))
        for handler in getattr(stmt, "handlers", []):
            yield from _module_level(handler.body)
        for case in getattr(stmt, "cases", []):  # match statements
            yield from _module_level(case.body)


def _binds(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return stmt.name == name
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        return any((a.asname or a.name.partition(".")[0]) == name for a in stmt.names)
    targets: list[ast.expr] = []
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, ast.AnnAssign | ast.AugAssign | ast.For | ast.AsyncFor):
        targets = [stmt.target]
    elif isinstance(stmt, ast.With | ast.AsyncWith):
        targets = [item.optional_vars for item in stmt.items if item.optional_vars is not None]
    elif isinstance(stmt, ast.Delete):
        targets = stmt.targets
    return any(
        isinstance(node, ast.Name) and node.id == name
        for target in targets
        for node in ast.walk(target)
    )


def _unfollowable(tree: ast.Module, name: str) -> bool:
    """True if the module may bind ``name`` in a way a reading cannot see."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return True
        if isinstance(node, ast.Global) and name in node.names:
            return True
        if isinstance(node, ast.NamedExpr) and node.target.id == name:
            return True
        if isinstance(node, ast.Name) and node.id in _DYNAMIC:
            return True
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return True
    return False


def _transparent(decorator: ast.expr) -> bool:
    if isinstance(decorator, ast.Call):
        decorator = decorator.func
    return isinstance(decorator, ast.Attribute) and decorator.attr in _TRANSPARENT_DECORATORS


def _needs_arguments(fn: ast.FunctionDef) -> bool:
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    required = len(positional) - len(args.defaults)
    return required > 0 or any(d is None for d in args.kw_defaults)


def _apps_in(tree: ast.Module) -> list[str]:
    """Names bound at module level to ``App(...)`` (or ``something.App(...)``)."""
    found = []
    for stmt in _module_level(tree.body):
        if isinstance(stmt, ast.Assign | ast.AnnAssign) and isinstance(stmt.value, ast.Call):
            func = stmt.value.func
            callee = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if callee == "App":
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                found += [t.id for t in targets if isinstance(t, ast.Name)]
    return found


def _check_binding(target: str, tree: ast.Module, name: str) -> None:
    bindings = [stmt for stmt in _module_level(tree.body) if _binds(stmt, name)]
    if not bindings or _unfollowable(tree, name):
        return
    if not all(isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef) for b in bindings):
        return
    if any(not _transparent(d) for b in bindings for d in b.decorator_list):  # type: ignore[attr-defined]
        return
    module = target.partition(":")[0]
    apps = _apps_in(tree)
    hint = (
        f"; did you mean {', '.join(f'`{module}:{a}`' for a in apps)}?"
        if apps
        else "; name the App (or a factory that takes no arguments and returns one)"
    )
    if all(isinstance(b, ast.AsyncFunctionDef) for b in bindings):
        raise TypeError(f"`{target}` is a coroutine function, not a corral.worker.App{hint}")
    if all(isinstance(b, ast.FunctionDef) and _needs_arguments(b) for b in bindings):
        raise TypeError(f"`{target}` is a function, not a corral.worker.App{hint}")
