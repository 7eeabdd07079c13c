"""Reading until a marker splits a program's output the same way however it arrives.

A ``cat`` on pipes echoes what it is sent, in whatever pieces the pipes make of
it; reads until a marker must return exactly the text between markers, and
lose nothing, for any text and any way of cutting it into sends.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from corral.tools import ToolInstance, ToolPool

MARKER = "<>"

pytestmark = pytest.mark.skipif(shutil.which("cat") is None, reason="needs cat")


async def _read_parts(cat: ToolInstance, count: int) -> list[str]:
    texts = []
    for _ in range(count):
        result = await cat.read_until(MARKER, timeout=10)
        assert result.matched, result
        texts.append(result.text)
    return texts


async def _echo_and_split(cat: ToolInstance, pieces: list[str]) -> list[str]:
    sent = "".join(pieces) + MARKER  # ends with a marker, so every read can match
    # Reading starts first, so each piece may arrive while a read is waiting.
    reading = asyncio.ensure_future(_read_parts(cat, sent.count(MARKER)))
    for piece in [*pieces, MARKER]:
        if piece:
            await cat.send(piece, newline=False)
    return await reading


@pytest.mark.timeout(300)
def test_reads_until_a_marker_match_splitting_the_whole_text() -> None:
    with asyncio.Runner() as runner:
        tools = ToolPool(["cat"], size=1, mode="pipes")
        runner.run(tools.start())
        try:
            cat = tools.instances[0]

            @settings(max_examples=60, deadline=None)
            @given(st.lists(st.text(alphabet="a<>\né€", max_size=20), max_size=8))
            @example(["a<", ">b", "<", ">", "é"])  # a marker cut in two by the sends
            def check(pieces: list[str]) -> None:
                texts = runner.run(_echo_and_split(cat, pieces))
                assert texts == ("".join(pieces) + MARKER).split(MARKER)[:-1]
                leftover = runner.run(cat.read_until(quiet=0.05, timeout=5))
                assert leftover.text == ""  # nothing lost, nothing left behind

            check()
        finally:
            runner.run(tools.aclose())
