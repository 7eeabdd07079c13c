"""The routing page of a Pools front in a real headless browser: pools, breakers, charts.

Like test_status_page.py: Debian's chromium driven by Playwright, run with
``nox -s browser``; the screenshot is saved to artifacts/routing-page.png.
A front of two pools of the demo worker is under load, and every third round
of calls one on pool ``a`` kills its worker, so its breaker opens (and later probes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Mount

from corral import BreakerConfig, Pool, Pools, Workload
from corral.asgi import FRONT_KEY, FrontState, open_front, routing_status_app

from .test_status_page import CHROMIUM, CHROMIUM_FLAGS, ROOT, pytestmark  # noqa: F401

SCREENSHOT = ROOT / "artifacts" / "routing-page.png"
DEMO_TARGET = "corral._demo_app:app"


async def _load(front: Pools) -> None:
    turn = 0
    while True:
        turn += 1
        calls = [front.call("square", i, workload="main_b") for i in range(6)]
        calls += [front.call("square", i, workload="main") for i in range(2)]
        if turn % 3 == 0:
            calls.append(front.call("crash", workload="only_a"))
        await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0.02)


def routing_demo_app() -> Starlette:
    def make_front() -> Pools:
        return Pools(
            Pool(DEMO_TARGET, size=1, name="a"),
            Pool(DEMO_TARGET, size=1, name="b"),
            workloads={
                "main": Workload(["a", "b"]),
                "main_b": Workload(["b", "a"]),
                "only_a": ["a"],
            },
            breaker=BreakerConfig(min_calls=2, failure_rate=0.1, cooldown=2.0),
            sample_interval=0.5,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[FrontState]:
        async with open_front(make_front) as state:
            load = asyncio.create_task(_load(state[FRONT_KEY]))
            try:
                yield state
            finally:
                load.cancel()
                await asyncio.gather(load, return_exceptions=True)

    return Starlette(
        routes=[Mount("/corral/routing", routing_status_app(interval=0.5))], lifespan=lifespan
    )


def test_the_routing_page_shows_pools_breakers_and_live_charts(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright
    from tests._serve import serve_in_thread

    with serve_in_thread(routing_demo_app()) as base, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1100},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            requested: list[str] = []
            errors: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{base}/corral/routing/")

            # A row per pool, and the workloads.
            page.wait_for_function("document.querySelectorAll('#pools tr.pool').length === 2")
            assert errors == []
            names = page.eval_on_selector_all(
                "#pools tr.pool", "rows => rows.map(row => row.dataset.pool)"
            )
            assert names == ["a", "b"]
            assert "a → b" in page.inner_text("#workloads")

            # Pool a's breaker opens: its history says so, and its chart marks it.
            page.wait_for_selector('#transitions tr.transition[data-target="open"]')
            marker = '.chart[data-pool="a"] line.marker[data-kind="{}"]'
            page.wait_for_selector(marker.format("breaker"), state="attached")
            page.wait_for_selector(marker.format("eviction"), state="attached")
            # Live charts: b's calls/s line grows point by point.
            calls_line = '.chart[data-pool="b"] polyline.calls'
            page.wait_for_function(
                f"Number(document.querySelector('{calls_line}').dataset.points) >= 3"
            )
            first = int(page.get_attribute(calls_line, "data-points") or 0)
            page.wait_for_function(
                f"Number(document.querySelector('{calls_line}').dataset.points) > {first}"
            )
            latency = '.chart[data-pool="b"] polyline.p99'
            assert int(page.get_attribute(latency, "data-points") or 0) >= 1
            assert page.inner_text("#live") == "live"

            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert SCREENSHOT.stat().st_size > 10_000
            assert requested and all(url.startswith(base) for url in requested)
        finally:
            context.close()
