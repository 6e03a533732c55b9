"""Observing a resource whose value spans several blocks while it changes
quickly (attack on issue 10: the piccolo3 client's scheduler observes
``/control/scheduler/jobs``; the dashboard's jobs list depends on it)."""

import asyncio
import json

from .helpers import ServerTestCase
from .test_wire import coro

FUTURE = "2030-06-01T10:00:00Z"


class MultiBlockObserveTests(ServerTestCase):

    @coro
    async def test_two_quick_changes_keep_the_observation(self):
        """Quick changes of a 5-block jobs list: aiocoap fetches the
        first notification's later blocks by plain GETs; handed blocks of
        the second notification's body it ended the observation
        (ResourceChanged) and the client never heard of the jobs again. The
        observation lives on and ends at the latest state."""
        import aiocoap
        for i in range(40):       # the client's record_sequence payload
            await self.put("control/record_sequence",
                           [[], {"run": f"observed_run_{i:02d}", "nsequence": None,
                                 "auto": None, "delay": None, "target": None,
                                 "at_time": FUTURE, "interval": 3600,
                                 "end_time": None}])
        msg = aiocoap.Message(code=aiocoap.GET, uri=f"{self.base}/control/scheduler/jobs",
                              observe=0)
        req = self.ctx.request(msg)
        first = await asyncio.wait_for(req.response, 10)
        jobs = json.loads(first.payload)
        self.assertGreater(len(first.payload), 1024)      # several blocks
        job = jobs[-1][0]
        seen = []

        async def collect():
            async for note in req.observation:
                seen.append(json.loads(note.payload))
        task = asyncio.ensure_future(collect())
        try:
            # what PiccoloScheduler.suspend/unsuspend send, back to back
            for _ in range(2):
                await self.put("control/scheduler/suspend", [[job], {}])
                await self.put("control/scheduler/unsuspend", [[job], {}])
                await self.put("control/scheduler/suspend", [[job], {}])
                for _ in range(100):
                    if task.done() or (seen and seen[-1][-1][5] == "suspended"):
                        break
                    await asyncio.sleep(0.05)
                self.assertFalse(task.done(), task.done() and repr(task.exception()))
                self.assertEqual(seen[-1][-1][5], "suspended")
                await self.put("control/scheduler/unsuspend", [[job], {}])
                for _ in range(100):
                    if task.done() or seen[-1][-1][5] == "active":
                        break
                    await asyncio.sleep(0.05)
                self.assertFalse(task.done(), task.done() and repr(task.exception()))
                self.assertEqual(seen[-1][-1][5], "active")
        finally:
            if not task.done():
                req.observation.cancel()
                task.cancel()
