"""The status page in a real headless browser: live workers, an eviction, the replacement.

Needs Debian's chromium (``apt-get install chromium``) and the ``playwright``
Python package, whose browser downloads are never used: Playwright drives
/usr/bin/chromium. Run with ``nox -s browser``. The screenshot is saved to
artifacts/status-page.png.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "status-page.png"

# This machine has no route to the internet: keep chromium from trying.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason="Debian's chromium is not installed (apt-get install chromium)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the playwright package is not installed (nox -s browser installs it)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("uvicorn") is None, reason="uvicorn is not installed"
    ),
    pytest.mark.timeout(180),
]

LIVE_ROWS = "#workers tr.worker:is([data-state=ready], [data-state=busy])"
CALLS_SERVED = """() => [...document.querySelectorAll('#workers td.calls')]
    .reduce((sum, td) => sum + Number(td.textContent.replace(/,/g, '')), 0)"""


def test_the_page_shows_live_workers_an_eviction_and_the_replacement(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright
    from tests._serve import serve_in_thread, status_demo_app

    with serve_in_thread(status_demo_app(size=2)) as base, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 760},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(30_000)
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{base}/corral/")

            # Two live workers, and their calls served going up between two polls.
            page.wait_for_function(f"document.querySelectorAll('{LIVE_ROWS}').length === 2")
            first = page.evaluate(CALLS_SERVED)
            page.wait_for_function(f"({CALLS_SERVED})() > {first}")
            pids = page.eval_on_selector_all(
                "#workers tr.worker", "rows => rows.map(row => Number(row.dataset.pid))"
            )
            assert len(pids) == 2 and all(pid > 0 for pid in pids)

            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
            row = page.wait_for_selector(f'#evictions tr.eviction[data-pid="{victim}"]')
            assert row is not None
            assert row.get_attribute("data-kind") == "died"
            assert "signal SIGKILL" in row.inner_text()

            # The replacement: two live workers again, none of them the victim.
            page.wait_for_function(
                f"""() => {{
                    const rows = [...document.querySelectorAll('{LIVE_ROWS}')];
                    return rows.length === 2 && rows.every(r => r.dataset.pid !== '{victim}')
                        && rows.every(r => r.dataset.pid !== '');
                }}"""
            )
            now = page.eval_on_selector_all(
                "#workers tr.worker", "rows => rows.map(row => Number(row.dataset.pid))"
            )
            assert victim not in now and pids[1] in now
            # Calls still flow after the eviction: the replacement serves too.
            after = page.evaluate(CALLS_SERVED)
            page.wait_for_function(f"({CALLS_SERVED})() > {after}")
            assert page.inner_text("#live") == "live"

            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert SCREENSHOT.stat().st_size > 10_000
            # Everything the page loaded came from this server.
            assert requested and all(url.startswith(base) for url in requested)
        finally:
            context.close()
