"""Small assertions shared by test modules."""

from __future__ import annotations

import psutil


def assert_sleeper_is_gone(pid: int) -> None:
    """The leak check killed and reaped the leaked ``sleep``: its pid names no live sleep."""
    try:
        survivor = psutil.Process(pid)
        assert survivor.status() == psutil.STATUS_ZOMBIE or "sleep" not in survivor.cmdline()
    except psutil.NoSuchProcess:
        pass
