"""The LM a worker runs: DSPy's offline ``DummyLM`` that streams, or a real ``dspy.LM``.

Owns: turning ``Settings`` into a ``dspy.LM``. Must not touch: sessions or
programs (``worker.py``), or the environment (``settings.py`` prepares it before
this module, which imports DSPy, is imported).

``DummyLM`` answers from a script and never opens a connection, but it returns
each answer whole, so through ``dspy.streamify`` it yields no chunk at all.
``ChunkedDummyEngine`` puts the same ``DummyLM`` behind DSPy's engine interface
(``complete`` and ``stream``, what ``dspy.LM(engine=...)`` accepts) and cuts its
text stream into pieces, as a provider streams tokens. Everything above the
engine, the chat adapter, ``streamify`` and the ``StreamListener`` that picks
the answer field out of the text, is DSPy's own code path for a real model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dspy
from dspy.clients.engines.dummy_engine import DummyEngine
from dspy.utils.dummies import DummyLM

from .settings import Settings

__all__ = ["ChunkedDummyEngine", "make_lm"]


class ChunkedDummyEngine:
    """A ``DummyLM`` as a DSPy engine whose text streams in ``chunk_chars`` pieces."""

    def __init__(self, dummy: DummyLM, *, chunk_chars: int, delay: float = 0.0) -> None:
        self._inner = DummyEngine(dummy)
        self.chunk_chars = chunk_chars
        self.delay = delay

    def complete(self, request: dspy.lm15.Request) -> dspy.lm15.Response:
        """The whole scripted answer at once (calls that do not stream)."""
        return self._inner.complete(request)

    def stream(self, request: dspy.lm15.Request) -> Iterator[Any]:
        """The scripted answer as stream events, its text split into small deltas."""
        for event in dspy.lm15.response_to_events(self.complete(request)):
            delta = getattr(event, "delta", None)
            if not isinstance(delta, dspy.lm15.TextDelta):
                yield event
                continue
            text, step = delta.text, self.chunk_chars
            for start in range(0, len(text), step):
                if self.delay:
                    time.sleep(self.delay)  # runs on DSPy's worker thread, not the event loop
                piece = dspy.lm15.TextDelta(
                    text=text[start : start + step], part_index=delta.part_index
                )
                yield dspy.lm15.StreamDeltaEvent(delta=piece)

    def close(self) -> None:
        """Nothing to release: the dummy holds no connection."""
        self._inner.close()


def make_lm(settings: Settings) -> dspy.BaseLM:
    """The worker's LM: the chunked dummy for ``lm="dummy"``, else ``dspy.LM(settings.lm)``."""
    if not settings.is_dummy:
        return dspy.LM(settings.lm)
    dummy = DummyLM({key: dict(fields) for key, fields in settings.script.items()})
    engine = ChunkedDummyEngine(dummy, chunk_chars=settings.chunk_chars, delay=settings.chunk_delay)
    # cache=False: scripted answers are not worth a disk cache, and a cached
    # answer would not stream.
    return dspy.LM("dummy/scripted", engine=engine, cache=False)
