"""The async-steps app under an event loop policy of the app's own.

corral cannot know what such a loop allows from another thread, so every async
call is handed over to the loop thread whole (decision 0028).
"""

from __future__ import annotations

import asyncio

from tests.workers.async_steps import app


class _OwnPolicy(asyncio.DefaultEventLoopPolicy):
    """Any policy but the default one, as uvloop's would be."""


asyncio.set_event_loop_policy(_OwnPolicy())

__all__ = ["app"]
