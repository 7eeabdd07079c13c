"""The DSPy example (examples/dspy_service): real DSPy programs in real workers, offline.

Skipped when DSPy is not installed (``nox -s dspy`` installs it). The workers
run DSPy's own ``DummyLM`` with answers scripted here through the example's
settings (environment variables), so nothing reaches a network: one test
checks that with an audit hook in the worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("dspy")

import httpx
from asgi_lifespan import LifespanManager

from corral import Pool, RemoteError, SessionLost, WorkerStartError
from corral.pytest_plugin import PoolFactory

WORKER = "examples.dspy_service.worker:app"
AUDITED_WORKER = "tests.workers.dspy_audited:app"

QA = "question: str, context: list[str] -> answer: str, confidence: float"
LONG_ANSWER = " ".join(f"sentence {i} of a long answer." for i in range(40))
SCRIPT = {
    "capital of France": {
        "reasoning": "Paris is the capital.",
        "answer": "Paris",
        "confidence": 0.9,
    },
    "capital of Italy": {"reasoning": "Rome is the capital.", "answer": "Rome", "confidence": 0.8},
    "long answer": {"reasoning": "It takes a while.", "answer": LONG_ANSWER, "confidence": 0.5},
}
# What every test's workers read at start-up: the scripted DummyLM, small stream chunks.
ENV = {
    "DSPY_SERVICE_LM": "dummy",
    "DSPY_SERVICE_SCRIPT": json.dumps(SCRIPT),
    "DSPY_SERVICE_CHUNK_CHARS": "16",
}
STARTUP = 60.0  # importing DSPy on a loaded machine takes seconds


async def dspy_pool(corral_pool: PoolFactory, size: int = 1, target: str = WORKER) -> Pool:
    return await corral_pool(target, size=size, env=ENV, startup_timeout=STARTUP)


def france(context: list[str] | None = None) -> dict[str, Any]:
    return {"question": "What is the capital of France?", "context": context or ["Europe"]}


async def test_a_program_built_in_a_session_is_kept_and_reused(corral_pool: PoolFactory) -> None:
    pool = await dspy_pool(corral_pool)
    built = await pool.call("build", "qa", QA, session="alice", timeout=30)
    assert built["inputs"] == ["question", "context"]
    assert built["outputs"] == ["answer", "confidence"]

    first = await pool.call("run", "qa", france(), session="alice", timeout=30)
    second = await pool.call(
        "run", "qa", {"question": "And the capital of Italy?", "context": []}, session="alice"
    )
    assert first["outputs"] == {"answer": "Paris", "confidence": 0.9}
    assert second["outputs"] == {"answer": "Rome", "confidence": 0.8}
    # The same program object served both calls: its call count went on.
    assert (first["calls"], second["calls"]) == (1, 2)
    assert first["worker_pid"] == second["worker_pid"]
    assert await pool.call("programs", session="alice") == {
        "qa": {"kind": "predict", "signature": QA}
    }


async def test_chain_of_thought_adds_its_reasoning(corral_pool: PoolFactory) -> None:
    pool = await dspy_pool(corral_pool)
    await pool.call("build", "cot", QA, kind="chain_of_thought", session="s", timeout=30)
    result = await pool.call("run", "cot", france(), session="s", timeout=30)
    assert result["outputs"] == {
        "reasoning": "Paris is the capital.",
        "answer": "Paris",
        "confidence": 0.9,
    }


@pytest.mark.parametrize("size", [1, 2])
async def test_two_sessions_do_not_see_each_others_programs(
    corral_pool: PoolFactory, size: int
) -> None:
    # size=1: both sessions share one worker; size=2: placement spreads them.
    pool = await dspy_pool(corral_pool, size=size)
    await pool.call("build", "qa", QA, session="alice", timeout=30)
    await pool.call("build", "summary", "text -> summary", session="bob", timeout=30)

    with pytest.raises(RemoteError) as missing:
        await pool.call("run", "qa", france(), session="bob", timeout=30)
    assert missing.value.type.endswith("ProgramNotFound")
    assert "'qa'" in missing.value.message and "summary" in missing.value.message
    assert set(await pool.call("programs", session="alice")) == {"qa"}
    assert set(await pool.call("programs", session="bob")) == {"summary"}
    assert await pool.call("programs", session="carol") == {}


async def test_a_worker_crash_loses_the_session_once_and_the_next_call_rebuilds(
    corral_pool: PoolFactory,
) -> None:
    pool = await dspy_pool(corral_pool)
    await pool.call("build", "qa", QA, session="alice", timeout=30)
    before = await pool.call("run", "qa", france(), session="alice", timeout=30)
    async with pool.checkout(session="alice", timeout=30) as worker:
        pid = worker.pid
    os.kill(pid, signal.SIGKILL)

    with pytest.raises(SessionLost):
        await pool.call("run", "qa", france(), session="alice", timeout=30)
    # The next call lands in a fresh, empty session on the replacement worker:
    # the program is gone and says so, then building it again works.
    with pytest.raises(RemoteError) as missing:
        await pool.call("run", "qa", france(), session="alice", timeout=30)
    assert missing.value.type.endswith("ProgramNotFound")
    await pool.call("build", "qa", QA, session="alice", timeout=30)
    after = await pool.call("run", "qa", france(), session="alice", timeout=30)
    assert after["outputs"] == before["outputs"]
    assert after["calls"] == 1
    assert after["worker_pid"] != pid


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        ("question answer", "exactly one '->'"),
        ("question: str -> answer: nonsense_type", "nonsense_type"),
        ("question ->", "no output field"),
        (" -> answer", "no input field"),
    ],
)
async def test_a_bad_signature_is_a_clear_remote_error_and_loses_nothing(
    corral_pool: PoolFactory, signature: str, reason: str
) -> None:
    pool = await dspy_pool(corral_pool)
    await pool.call("build", "qa", QA, session="alice", timeout=30)
    with pytest.raises(RemoteError) as bad:
        await pool.call("build", "broken", signature, session="alice", timeout=30)
    assert bad.value.type.endswith("SignatureError")
    assert repr(signature) in bad.value.message
    assert reason in bad.value.message
    # The worker stayed, and so did the session's other program.
    result = await pool.call("run", "qa", france(), session="alice", timeout=30)
    assert result["calls"] == 1
    assert set(await pool.call("programs", session="alice")) == {"qa"}


async def test_unknown_kind_and_wrong_inputs_are_clear_errors(corral_pool: PoolFactory) -> None:
    pool = await dspy_pool(corral_pool)
    with pytest.raises(RemoteError) as kind:
        await pool.call("build", "qa", QA, kind="react", session="s", timeout=30)
    assert kind.value.type.endswith("SignatureError")
    assert "'react'" in kind.value.message and "chain_of_thought" in kind.value.message
    await pool.call("build", "qa", QA, session="s", timeout=30)
    with pytest.raises(RemoteError) as inputs:
        await pool.call("run", "qa", {"question": "?", "colour": "red"}, session="s", timeout=30)
    assert inputs.value.type.endswith("InputError")
    assert "missing ['context']" in inputs.value.message
    assert "unexpected ['colour']" in inputs.value.message


async def test_a_long_answer_streams_in_chunks_then_the_whole_prediction(
    corral_pool: PoolFactory,
) -> None:
    pool = await dspy_pool(corral_pool)
    await pool.call("build", "qa", QA, kind="chain_of_thought", session="alice", timeout=30)
    question = {"question": "Give me a long answer.", "context": []}
    items = [item async for item in pool.stream("stream", "qa", question, session="alice")]

    deltas = [item["delta"] for item in items[:-1]]
    final = items[-1]
    # DSPy's StreamListener cut the answer field out of the LM's text stream:
    # many chunks, no field headers, and together exactly the parsed answer.
    assert len(deltas) > 10
    assert all(len(delta) <= 32 for delta in deltas)
    assert "".join(deltas).strip() == LONG_ANSWER
    assert final["field"] == "answer"
    assert final["outputs"]["answer"] == LONG_ANSWER
    assert final["outputs"]["confidence"] == 0.5
    assert final["calls"] == 1
    # Streaming ran the session's program: the next plain call counts on.
    again = await pool.call("run", "qa", question, session="alice", timeout=30)
    assert again["calls"] == 2


async def test_another_text_field_streams_on_request_and_a_number_does_not(
    corral_pool: PoolFactory,
) -> None:
    pool = await dspy_pool(corral_pool)
    await pool.call("build", "cot", QA, kind="chain_of_thought", session="s", timeout=30)
    items = [x async for x in pool.stream("stream", "cot", france(), "reasoning", session="s")]
    assert "".join(item["delta"] for item in items[:-1]).strip() == "Paris is the capital."
    assert items[-1]["field"] == "reasoning"
    with pytest.raises(RemoteError) as number:
        async for _ in pool.stream("stream", "cot", france(), "confidence", session="s"):
            pass
    assert number.value.type.endswith("InputError")
    assert "reasoning, answer" in number.value.message


async def test_nothing_reaches_for_the_network(corral_pool: PoolFactory) -> None:
    # The audited worker installs an audit hook before DSPy is imported: every
    # socket connect or DNS lookup is recorded and refused (as with no route).
    pool = await dspy_pool(corral_pool, target=AUDITED_WORKER)
    # The hook works: a connection attempt is refused and recorded.
    assert "network refused" in await pool.call("probe_network")
    assert await pool.call("network_attempts", clear=True) != []
    await pool.call("build", "qa", QA, session="s", timeout=30)
    await pool.call("build", "cot", QA, kind="chain_of_thought", session="s", timeout=30)
    await pool.call("run", "qa", france(), session="s", timeout=30)
    await pool.call("run", "cot", france(), session="s", timeout=30)
    question = {"question": "a long answer please", "context": []}
    assert [x async for x in pool.stream("stream", "qa", question, session="s")]
    assert await pool.call("network_attempts") == []


async def test_a_worker_with_bad_settings_does_not_start_and_says_why() -> None:
    env = {**ENV, "DSPY_SERVICE_SCRIPT": "[1, 2]"}
    pool = Pool(WORKER, size=1, env=env, startup_timeout=STARTUP, max_restarts=0)
    with pytest.raises(WorkerStartError) as failed:
        await pool.start()
    assert "DSPY_SERVICE_SCRIPT must map a piece of question text" in str(failed.value)


# --- the FastAPI front ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def service(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    for name, value in {**ENV, "DSPY_SERVICE_WORKERS": "1"}.items():
        monkeypatch.setenv(name, value)
    from examples.dspy_service.app import app

    async with (
        LifespanManager(app, startup_timeout=STARTUP, shutdown_timeout=30) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://dspy.test"
        ) as client,
    ):
        yield client


async def test_the_http_front_keeps_programs_per_user_and_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, bob = {"X-User": "alice"}, {"X-User": "bob"}
    async with service(monkeypatch) as client:
        built = await client.put("/programs/qa", json={"signature": QA}, headers=alice)
        assert built.status_code == 200, built.text
        ran = await client.post("/programs/qa", json={"inputs": france()}, headers=alice)
        assert ran.status_code == 200, ran.text
        assert ran.json()["outputs"] == {"answer": "Paris", "confidence": 0.9}

        missing = await client.post("/programs/qa", json={"inputs": france()}, headers=bob)
        assert missing.status_code == 404
        assert missing.json()["error"] == "ProgramNotFound"
        bad = await client.put("/programs/x", json={"signature": "a b"}, headers=bob)
        assert bad.status_code == 422
        assert "exactly one '->'" in bad.json()["detail"]

        question = {"question": "one long answer", "context": []}
        async with client.stream(
            "POST", "/programs/qa/stream", json={"inputs": question}, headers=alice
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) async for line in response.aiter_lines() if line]
        assert "".join(line["delta"] for line in lines[:-1]).strip() == LONG_ANSWER
        assert lines[-1]["outputs"]["answer"] == LONG_ANSWER

        assert (await client.delete("/session", headers=alice)).status_code == 204
        gone = await client.post("/programs/qa", json={"inputs": france()}, headers=alice)
        assert gone.status_code == 404


async def test_the_http_front_says_409_when_a_crash_lost_the_programs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice = {"X-User": "alice"}
    async with service(monkeypatch) as client:
        await client.put("/programs/qa", json={"signature": QA}, headers=alice)
        ran = await client.post("/programs/qa", json={"inputs": france()}, headers=alice)
        os.kill(ran.json()["worker_pid"], signal.SIGKILL)
        lost = await client.post("/programs/qa", json={"inputs": france()}, headers=alice)
        assert lost.status_code == 409
        assert lost.json()["error"] == "SessionLost"
        rebuilt = await client.put("/programs/qa", json={"signature": QA}, headers=alice)
        assert rebuilt.status_code == 200
        again = await client.post("/programs/qa", json={"inputs": france()}, headers=alice)
        assert again.json()["outputs"]["answer"] == "Paris"
