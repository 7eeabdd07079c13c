"""What installs what: the README's test command is the one CI runs, and the `test`
extra (for users' own tests with corral's pytest plugin) stays small."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _extras() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    return extras


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_ci_runs_the_readme_test_command_exactly() -> None:
    readme = (ROOT / "README.md").read_text()
    [command] = [line for line in readme.splitlines() if line.endswith("python -m pytest")]
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "'.[suite]'" in command


def test_the_test_extra_is_what_the_pytest_plugin_needs_and_no_more() -> None:
    test = _names(_extras()["test"])
    assert test == {"pytest", "pytest-asyncio", "pytest-timeout", "psutil"}


def test_the_suite_extra_brings_the_test_extra_and_the_heavy_layers() -> None:
    suite = _extras()["suite"]
    assert any(r.startswith("corral[") and "test" in r for r in suite)
    assert {"dspy", "playwright", "hypothesis"} <= _names(suite)
    noxfile = (ROOT / "noxfile.py").read_text()
    assert "'.[test]'" not in noxfile and '".[test]"' not in noxfile


def test_the_readme_lists_every_page_of_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = readme[readme.index("## All the pages") :]
    missing = [
        page.name
        for page in sorted((ROOT / "docs").glob("*.md"))
        if f"(docs/{page.name})" not in listed
    ]
    assert not missing, f"README's page list misses {missing}"


def test_the_readme_names_every_error_class() -> None:
    import corral

    readme = (ROOT / "README.md").read_text()
    errors = [
        name
        for name in corral.__all__
        if isinstance(getattr(corral, name), type)
        and issubclass(getattr(corral, name), corral.CorralError)
    ]
    assert "CorralError" in errors
    assert not [name for name in errors if f"`{name}`" not in readme]
