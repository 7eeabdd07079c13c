"""Every public name has a docstring: the API reference is rendered from them.

Public means: the names in ``__all__`` of ``corral``, ``corral.asgi``,
``corral.worker``, ``corral.tools`` and ``corral.pytest_plugin`` (and the plugin's fixtures), and
the public methods and properties those classes define. Module-level constants
are checked in the source, where mkdocstrings reads their docstrings: a string
literal right after the assignment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import corral
import corral.asgi
import corral.otel
import corral.prometheus
import corral.pytest_plugin
import corral.tools
import corral.worker

PUBLIC_MODULES = [
    corral,
    corral.asgi,
    corral.worker,
    corral.pytest_plugin,
    corral.tools,
    corral.otel,
    corral.prometheus,
]


def _fixtures(module: ModuleType) -> dict[str, Any]:
    """The public pytest fixtures ``module`` defines, by fixture name."""
    found: dict[str, Any] = {}
    for attr, obj in vars(module).items():
        marker = getattr(obj, "_fixture_function_marker", None) or getattr(
            obj, "_pytestfixturefunction", None
        )
        if marker is None:
            continue
        name = getattr(marker, "name", None) or attr
        if not name.startswith("_"):
            found[name] = obj
    return found


def _own_doc(obj: Any) -> str | None:
    """The docstring written for ``obj``, not one inherited or generated."""
    if isinstance(obj, type):
        doc = obj.__dict__.get("__doc__")  # a class's __doc__ is never inherited
        if doc and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return None  # the signature dataclasses write when there is no docstring
    else:
        doc = getattr(obj, "__doc__", None)
    return doc.strip() if isinstance(doc, str) and doc.strip() else None


def _unwrap(member: Any) -> Any:
    if isinstance(member, (staticmethod, classmethod)):
        return member.__func__
    if isinstance(member, property):
        return member.fget
    return member


def _is_corral(cls: type) -> bool:
    return (cls.__module__ or "").split(".")[0] == "corral"


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties defined by ``cls`` or its corral bases."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not _is_corral(klass):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(member, (property, staticmethod, classmethod)) or inspect.isfunction(
                member
            ):
                yield name, _unwrap(member)


def _assigned_names_with_docstrings(module: ModuleType) -> tuple[set[str], set[str]]:
    """Module-level names assigned in ``module``'s source, and those followed by a string."""
    source = Path(inspect.getfile(module)).read_text()
    body = ast.parse(source).body
    assigned: set[str] = set()
    documented: set[str] = set()
    for node, after in zip(body, [*body[1:], None], strict=True):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        assigned |= names
        if (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            documented |= names
    return assigned, documented


def _undocumented() -> list[str]:
    missing: list[str] = []
    for module in PUBLIC_MODULES:
        if _own_doc(module) is None:
            missing.append(module.__name__)
        assigned, documented = _assigned_names_with_docstrings(module)
        objects = {name: getattr(module, name) for name in module.__all__}
        objects.update(_fixtures(module))
        for name, obj in objects.items():
            qualified = f"{module.__name__}.{name}"
            if name in assigned:  # a constant or alias: documented in the source
                if name not in documented:
                    missing.append(qualified)
                continue
            if name == "__version__":
                continue
            if _own_doc(obj) is None:
                missing.append(qualified)
            if isinstance(obj, type):
                for member_name, member in _members(obj):
                    if _own_doc(member) is None:
                        missing.append(f"{qualified}.{member_name}")
    return sorted(set(missing))


def test_every_public_name_has_a_docstring() -> None:
    missing = _undocumented()
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(missing)


def test_the_walk_finds_what_it_should() -> None:
    # The check above passes vacuously if the walk finds nothing: make sure it
    # reaches classes, their methods and properties, and the plugin's fixture.
    walked = {
        name: list(_members(getattr(module, name)))
        for module in PUBLIC_MODULES
        for name in module.__all__
        if isinstance(getattr(module, name), type)
    }
    assert {"call", "stream", "checkout", "stats"} <= {n for n, _ in walked["Pool"]}
    assert "cancelled" in {n for n, _ in walked["Context"]}
    assert "corral_pool" in _fixtures(corral.pytest_plugin)


def test_a_name_without_a_docstring_is_reported() -> None:
    @dataclasses.dataclass
    class Undocumented:
        size: int

        def grow(self) -> None:
            pass

    Undocumented.__module__ = "corral.example"
    assert _own_doc(Undocumented) is None  # not the signature dataclasses write
    assert [(name, _own_doc(member)) for name, member in _members(Undocumented)] == [("grow", None)]
