"""The worker's settings, read from environment variables: which LM, and where DSPy writes.

Owns: parsing and validating the ``DSPY_SERVICE_*`` variables, and the
environment DSPy and LiteLLM must see before they are imported (no network
look-ups, a cache directory of ours). Must not touch: DSPy itself (nothing here
imports it, so the settings are checked before the heavy import).

The variables (all optional):

- ``DSPY_SERVICE_LM`` (``dummy``): ``dummy`` runs DSPy's offline ``DummyLM`` with
  scripted answers; anything else is a model name for ``dspy.LM``
  (``openai/gpt-4o-mini``...), which reads the provider's usual key variables.
- ``DSPY_SERVICE_SCRIPT`` (a small built-in script): the dummy's answers, as JSON
  (inline, or ``@path`` of a file) mapping a piece of question text to the
  output fields to answer with.
- ``DSPY_SERVICE_CHUNK_CHARS`` (``12``): the dummy streams its text in pieces of
  this many characters; ``DSPY_SERVICE_CHUNK_DELAY`` (``0``): seconds between two.
- ``DSPY_SERVICE_CACHE_DIR`` (``$TMPDIR/corral-dspy-<uid>``): DSPy's cache
  directory (``DSPY_CACHEDIR``), unless ``DSPY_CACHEDIR`` is set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_SCRIPT", "Settings", "SettingsError"]

LONG_STORY = " ".join(
    f"Step {i}: a worker process holds the program, and the answer streams as it is made."
    for i in range(1, 21)
)

DEFAULT_SCRIPT: dict[str, dict[str, Any]] = {
    "capital of France": {
        "reasoning": "France's capital city is Paris.",
        "answer": "Paris",
        "confidence": 0.95,
    },
    "long answer": {
        "reasoning": "A long question deserves a long answer.",
        "answer": LONG_STORY,
        "confidence": 0.5,
    },
}
"""What the dummy LM answers when ``DSPY_SERVICE_SCRIPT`` is not set."""


class SettingsError(ValueError):
    """A ``DSPY_SERVICE_*`` variable has a value the worker cannot use."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """How one worker sets DSPy up; built by ``Settings.from_env`` in ``on_startup``."""

    lm: str = "dummy"
    script: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: DEFAULT_SCRIPT
    )
    chunk_chars: int = 12
    chunk_delay: float = 0.0
    cache_dir: Path = dataclasses.field(
        default_factory=lambda: Path(tempfile.gettempdir()) / f"corral-dspy-{os.getuid()}"
    )

    @property
    def is_dummy(self) -> bool:
        """True when the worker runs DSPy's offline ``DummyLM``."""
        return self.lm == "dummy"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings; raises ``SettingsError`` naming the variable at fault."""
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            lm=env.get("DSPY_SERVICE_LM", defaults.lm).strip() or defaults.lm,
            script=_script(env["DSPY_SERVICE_SCRIPT"])
            if "DSPY_SERVICE_SCRIPT" in env
            else defaults.script,
            chunk_chars=_number(env, "DSPY_SERVICE_CHUNK_CHARS", int, defaults.chunk_chars, 1),
            chunk_delay=_number(env, "DSPY_SERVICE_CHUNK_DELAY", float, defaults.chunk_delay, 0),
            cache_dir=Path(env.get("DSPY_SERVICE_CACHE_DIR") or defaults.cache_dir),
        )

    def prepare_environment(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Set what DSPy and LiteLLM read at import or first use; call before importing dspy.

        ``LITELLM_LOCAL_MODEL_COST_MAP``: the model price map comes from the
        installed package, never downloaded. ``DSPY_CACHEDIR``: DSPy's disk cache
        goes to ``cache_dir`` (created here), not the home directory. A value
        already in the environment is left as it is.
        """
        env = os.environ if environ is None else environ
        env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        if "DSPY_CACHEDIR" not in env:
            self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            env["DSPY_CACHEDIR"] = str(self.cache_dir)


def _number(env: Mapping[str, str], name: str, kind: type, default: Any, least: float) -> Any:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if value < least:
        raise SettingsError(f"{name}={raw!r} must be at least {least}")
    return value


def _script(raw: str) -> dict[str, dict[str, Any]]:
    source = "DSPY_SERVICE_SCRIPT"
    if raw.startswith("@"):
        source = raw[1:]
        try:
            raw = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"DSPY_SERVICE_SCRIPT: cannot read {source}: {exc}") from None
    try:
        script = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(script, dict) or not all(
        isinstance(key, str) and isinstance(fields, dict) for key, fields in script.items()
    ):
        raise SettingsError(
            f"{source} must map a piece of question text to the output fields, "
            'e.g. {"capital of France": {"answer": "Paris"}}'
        )
    return script
