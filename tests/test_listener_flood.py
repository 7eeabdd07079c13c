"""Strangers flooding the remote-worker listener cannot keep a launched worker out.

A flooder process keeps every handshake slot of the pool's listener full with
connections that never authenticate, and reconnects as soon as one is closed.
A worker corral launches still gets in (its connections knock with the
launch's ticket id, which reserves their slot), and no start fails because of
the strangers: with ``max_restarts=0`` a single counted failure would fail the
pool.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time

import pytest
from structlog.testing import capture_logs

from corral import Pool
from corral._launch._socket_launcher import SubprocessShimLauncher

TARGET = "tests.workers.basic:app"

# Bounded: it stops after 60 s, or as soon as its stdin closes.
FLOODER = textwrap.dedent(
    """
    import selectors, socket, sys, time
    port, width = int(sys.argv[1]), int(sys.argv[2])
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ, "stop")
    stop_at = time.monotonic() + 60
    opened = 0

    def knock():
        global opened
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect_ex(("127.0.0.1", port))
        except OSError:
            s.close()
            return
        opened += 1
        sel.register(s, selectors.EVENT_READ, "peer")

    for _ in range(width):
        knock()
    print("flooding", flush=True)
    while time.monotonic() < stop_at:
        for key, _ in sel.select(0.05):
            if key.data == "stop":
                raise SystemExit(0)
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:  # closed by the pool: come straight back
                sel.unregister(s)
                s.close()
                knock()
    """
)


@pytest.mark.timeout(120)
async def test_strangers_filling_every_handshake_slot_do_not_keep_a_replacement_out() -> None:
    launcher = SubprocessShimLauncher(handshake_timeout=30.0)
    # Two workers: the survivor keeps the listener (and its port) open throughout.
    async with Pool(
        TARGET, size=2, launcher=launcher, max_restarts=0, restart_backoff=0.05
    ) as pool:
        listener = launcher.listener
        assert listener is not None
        pid = await pool.call("pid")
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FLOODER,
            str(listener.port),
            str(listener.max_pending * 3),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        with capture_logs() as logged:
            flood_started = time.monotonic()
            try:
                assert flooder.stdout is not None
                assert await asyncio.wait_for(flooder.stdout.readline(), 30) == b"flooding\n"
                # Every slot is taken and strangers are being turned away.
                await asyncio.wait_for(listener.wait_rejected(listener.max_pending), 30)
                os.kill(pid, signal.SIGKILL)
                assert await pool._wait_until(lambda: pool.stats().restarts >= 1, 30)
                await pool.wait_ready(timeout=60)
                assert await pool.call("pid") != pid
                stats = pool.stats()
                assert stats.failed_starts == 0, pool.status().evictions
                assert not stats.failed
                assert listener.busy > listener.max_pending  # the flood went on meanwhile
                # One warning a second at most, each with its count: the log is not flooded.
                refusals = [e for e in logged if e["event"] == "listener.too_many_handshakes"]
                assert 1 <= len(refusals) <= time.monotonic() - flood_started + 1
                assert sum(e["refused"] for e in refusals) <= listener.busy
            finally:
                assert flooder.stdin is not None
                flooder.stdin.close()
                try:
                    await asyncio.wait_for(flooder.wait(), 10)
                except TimeoutError:
                    flooder.kill()
                    await flooder.wait()
