"""The DSPy example without a web server: ``python -m examples.dspy_service.demo``.

Two users build programs in their own sessions, run them, stream a long answer
as it is produced, and then the worker holding one user's session is killed:
that user's next call gets ``SessionLost``, and the program is built again.
With no ``DSPY_SERVICE_*`` variables set, the workers run DSPy's offline
``DummyLM`` with the built-in script; a small delay between streamed pieces
(``DSPY_SERVICE_CHUNK_DELAY``, 0.02 s here unless set) makes the stream visible.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import structlog

from corral import Pool, RemoteError, SessionLost

QA = "question: str, context: list[str] -> answer: str, confidence: float"
FRANCE = {"question": "What is the capital of France?", "context": ["Europe"]}
LONG = {"question": "Give me a long answer: how does this work?", "context": []}


def say(line: str) -> None:
    print(line, flush=True)


async def main() -> None:
    env = {"DSPY_SERVICE_CHUNK_DELAY": os.environ.get("DSPY_SERVICE_CHUNK_DELAY", "0.02")}
    async with Pool(
        "examples.dspy_service.worker:app", size=2, env=env, startup_timeout=120.0
    ) as pool:
        say(f"pool ready: {pool.stats().ready} workers, each has imported DSPy once")

        # Each user's programs live in their own session, on one worker.
        await pool.call("build", "qa", QA, session="alice")
        await pool.call("build", "qa", QA, "chain_of_thought", session="bob")
        alice = await pool.call("run", "qa", FRANCE, session="alice")
        bob = await pool.call("run", "qa", FRANCE, session="bob")
        say(f"alice (Predict, worker {alice['worker_pid']}): {alice['outputs']}")
        say(f"bob (ChainOfThought, worker {bob['worker_pid']}): {bob['outputs']}")
        again = await pool.call("run", "qa", FRANCE, session="alice")
        say(f"alice again: the same program, call number {again['calls']}")
        try:
            await pool.call("run", "summary", {"text": "..."}, session="bob")
        except RemoteError as exc:
            say(f"bob has no 'summary': {exc.type.rpartition('.')[2]}")

        # A long answer, printed piece by piece as the worker produces it.
        say("alice streams a long answer:")
        async for item in pool.stream("stream", "qa", LONG, session="alice"):
            if "delta" in item:
                sys.stdout.write(item["delta"])
                sys.stdout.flush()
            else:
                say(
                    f"\n[done: {len(item['outputs']['answer'])} characters, "
                    f"confidence {item['outputs']['confidence']}]"
                )

        # The worker holding alice's session dies: her programs are gone.
        os.kill(alice["worker_pid"], signal.SIGKILL)
        try:
            await pool.call("run", "qa", FRANCE, session="alice")
        except SessionLost as exc:
            say(f"alice: SessionLost (worker {exc.pid} died, exit {exc.exit_code})")
        await pool.call("build", "qa", QA, session="alice")
        rebuilt = await pool.call("run", "qa", FRANCE, session="alice")
        say(f"alice rebuilt her program on worker {rebuilt['worker_pid']}: {rebuilt['outputs']}")
        bob = await pool.call("run", "qa", FRANCE, session="bob")
        say(f"bob did not notice: call number {bob['calls']} on worker {bob['worker_pid']}")
        await pool.wait_ready(timeout=120.0)  # the replacement has imported DSPy too
        say(f"replaced: {pool.stats().ready} workers ready, {pool.stats().restarts} restart")


if __name__ == "__main__":
    # The application decides about logging: here, corral's warnings and errors only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main())
