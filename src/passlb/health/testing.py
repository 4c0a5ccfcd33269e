"""Helpers to run the health checker in virtual time (for tests of any part).

``VirtualClock`` satisfies the scheduler's Clock protocol; time moves only when
the test calls ``advance``, which wakes the sleepers in deadline order and lets
the woken tasks run before moving on.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

# Loop turns given to woken tasks to reach their next await. A checker task
# needs one or two turns per probe with an immediate (fake) probe; the margin
# covers callbacks that schedule more work.
_SETTLE_TURNS = 20


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        wake = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(seconds, 0.0), next(self._order), wake))
        await wake

    async def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, waking every sleeper due on the way."""
        target = self._now + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, wake = heapq.heappop(self._sleepers)
            if wake.done():  # its sleeper was cancelled
                continue
            self._now = deadline
            wake.set_result(None)
            await settle()
        self._now = target


async def settle() -> None:
    """Let every ready task run until it waits again."""
    for _ in range(_SETTLE_TURNS):
        await asyncio.sleep(0)
