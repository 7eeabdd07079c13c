"""docs/architecture.md names the code as it is: every name it cites exists.

The page cites code in backticks: modules (``_dispatch.py``, ``_launch/_local.py``,
``corral._launch``), classes and functions (``Dispatcher``, ``spawn_under_shepherd``)
and their members (``Pool.call``, ``WorkerHandle.frame_received``,
``Dispatcher.try_acquire``). Each one is looked up in corral's source, read with
``ast`` (nothing is imported): a name that was renamed or removed fails here, so
the page cannot drift from the code again.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "corral"
PAGE = ROOT / "docs" / "architecture.md"

# Names of other libraries and of the standard library the page may cite.
FOREIGN = ("asyncio.", "os.", "msgspec.", "structlog.", "subprocess.", "socket.", "sys.")
_CODE = re.compile(r"`([^`\n]+)`")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(\(\))?$")
_WORD = re.compile(r"^(_\w+|[A-Z][a-z]\w*[a-z]\w*)(\(\))?$")  # _private or CamelCase
_PATH = re.compile(r"^[\w/]+\.(py|html)$")
_LOG_CALL = {"debug", "info", "warning", "error", "exception"}


class _Index:
    """Every module, class, function and attribute corral's source defines."""

    def __init__(self) -> None:
        self.modules: set[str] = set()  # "_pool", "_launch._local", "worker._runtime"...
        self.paths: set[str] = set()  # "_pool.py", "_launch/_local.py"...
        self.names: set[str] = set()  # every top-level and member name
        self.members: dict[str, set[str]] = defaultdict(set)  # owner -> names
        self.events: set[str] = set()  # log event names: "worker.exited"...
        for path in PACKAGE.rglob("*.html"):
            self.paths.add(path.name)
        for path in PACKAGE.rglob("*.py"):
            relative = path.relative_to(PACKAGE)
            self.paths.add(str(relative))
            self.paths.add(relative.name)
            module = ".".join(relative.with_suffix("").parts)
            module = module.removesuffix(".__init__")
            self.modules.update({module, module.rsplit(".", 1)[-1], f"corral.{module}"})
            tree = ast.parse(path.read_text())
            for node in tree.body:
                self._top_level(module, node)
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in _LOG_CALL
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    self.events.add(node.args[0].value)

    def _top_level(self, module: str, node: ast.stmt) -> None:
        short = module.rsplit(".", 1)[-1]
        for name in _defined(node):
            self.names.add(name)
            for owner in (module, short, f"corral.{module}"):
                self.members[owner].add(name)
        if isinstance(node, ast.ClassDef):
            for item in ast.walk(node):
                for name in _defined(item) if item is not node else ():
                    self.members[node.name].add(name)
                if (
                    isinstance(item, ast.Attribute)
                    and isinstance(item.ctx, ast.Store)
                    and isinstance(item.value, ast.Name)
                    and item.value.id == "self"
                ):
                    self.members[node.name].add(item.attr)

    def exists(self, cited: str) -> bool:
        cited = cited.removesuffix("()")
        if _PATH.match(cited):
            return cited in self.paths or any((d / cited).is_file() for d in (ROOT, PACKAGE.parent))
        if cited in self.modules or cited in self.names or cited in self.events:
            return True
        if "." not in cited and any(cited in names for names in self.members.values()):
            return True  # a method or attribute cited by its name alone
        if hasattr(builtins, cited):
            return True
        parts = cited.split(".")
        if len(parts) > 1 and parts[0].islower() and parts[0] not in self.modules:
            return True  # a value, not a name: ``pool.stats()``, ``ctx.cancelled``
        for split in range(len(parts) - 1, 0, -1):  # the longest known owner first
            owner, rest = ".".join(parts[:split]), parts[split:]
            if owner in self.members or owner in self.modules:
                return self._resolves(owner, rest)
        return False

    def _resolves(self, owner: str, rest: list[str]) -> bool:
        for part in rest:
            if part not in self.members.get(owner, set()):
                return False
            owner = part
        return True


def _defined(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def cited_names(text: str) -> list[str]:
    """The code names a page cites (dotted names, private or CamelCase words, paths)."""
    found = []
    for token in _CODE.findall(text):
        token = token.strip()
        if token.startswith(FOREIGN):
            continue
        if _DOTTED.match(token) or _WORD.match(token) or _PATH.match(token):
            found.append(token)
    return found


def test_the_page_cites_enough_code_to_be_checked() -> None:
    cited = cited_names(PAGE.read_text())
    assert len(cited) > 60
    for name in ("Pool.call", "Dispatcher.try_acquire", "WorkerHandle.frame_received"):
        assert name in cited  # the path of one call is on the page


def test_every_name_the_architecture_page_cites_exists() -> None:
    index = _Index()
    missing = sorted({name for name in cited_names(PAGE.read_text()) if not index.exists(name)})
    assert not missing, f"docs/architecture.md cites names the code does not have: {missing}"


def test_a_name_that_does_not_exist_is_caught() -> None:
    index = _Index()
    assert index.exists("Pool.call") and index.exists("_launch/_local.py")
    assert not index.exists("Pool._acquire_now")  # the name of the old fast path
    assert not index.exists("WorkerHandle.no_such_method")
    assert not index.exists("_no_such_module.py")
    assert index.exists("worker.exited")  # a log event the code emits
    assert not index.exists("worker.no_such_event")
