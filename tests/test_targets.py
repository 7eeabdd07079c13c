"""How a worker finds its target: the parent's sys.path and working directory carry over."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from corral import Pool


@pytest.fixture
def private_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module importable only through a sys.path entry the parent added at run time."""
    package = tmp_path / "only_parent_sees_this"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "app.py").write_text(
        textwrap.dedent(
            """
            from corral.worker import App

            app = App()

            @app.handler
            def where() -> str:
                return __file__
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return str(package / "app.py")


async def test_a_module_only_the_parents_sys_path_reaches_works_as_target(
    private_module: str,
) -> None:
    assert "only_parent_sees_this" not in "".join(sys.argv)
    async with Pool("only_parent_sees_this.app:app", size=1) as pool:
        assert await pool.call("where") == private_module


async def test_the_parent_environment_is_inherited_and_env_overrides(monkeypatch) -> None:
    monkeypatch.setenv("CORRAL_TEST_INHERITED", "from-parent")
    async with Pool("tests.workers.basic:app", size=1, env={"CORRAL_TEST_EXTRA": "x"}) as pool:
        env = await pool.call("environ", ["CORRAL_TEST_INHERITED", "CORRAL_TEST_EXTRA"])
        assert env == {"CORRAL_TEST_INHERITED": "from-parent", "CORRAL_TEST_EXTRA": "x"}


async def test_a_factory_function_is_accepted_as_target() -> None:
    async with Pool("tests.workers.basic:make_app", size=1) as pool:
        assert await pool.call("add", 2, 3) == 5
