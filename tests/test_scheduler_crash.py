"""Acknowledged means committed: a burst of scheduler PUTs, each answered
2.04, then SIGKILL the moment the last answer arrives; every acknowledged
job and setting is in the database the next start reads."""

import asyncio
import os
import signal
import sys

from twisted.trial import unittest

from piccolo_twisted import scheduler as sch

from .helpers import asyncio_reactor
from .test_wire import coro

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "bench"))
from run import Server  # noqa: E402

BURST = 300


def find_database(datadir):
    for path in (os.path.join(datadir, ".piccolo", sch.DB_NAME),
                 os.path.join(datadir, sch.DB_NAME)):
        if os.path.exists(path):
            return path
    raise AssertionError(f"no scheduler database under {datadir}")


class KillAfterAcknowledgedTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        if not asyncio_reactor():
            raise unittest.SkipTest("needs --reactor=asyncio (aiocoap)")
        self.datadir = os.path.abspath(self.mktemp())
        os.makedirs(self.datadir)
        self.server = Server(datadir=self.datadir).start()
        self.addCleanup(self.server.stop)

    @coro
    async def test_sigkill_right_after_a_burst(self):
        import aiocoap
        ctx = await aiocoap.Context.create_client_context()
        base = f"coap://[::1]:{self.server.port}"

        async def put(path, raw):
            msg = aiocoap.Message(code=aiocoap.PUT, uri=f"{base}/{path}", payload=raw)
            return await asyncio.wait_for(ctx.request(msg).response, 20)
        try:
            # what the piccolo3 client sends for a scheduled batch
            jobs = [put("control/record_sequence",
                        b'[[], {"run": "k%d", "nsequence": 1, '
                        b'"at_time": "2099-01-01T00:00:00+00:00", "interval": 3600}]' % i)
                    for i in range(BURST)]
            settings = {"powerDelay": (b"[[1234], {}]", 1234),
                        "quietStart": (b'[["20:30:00"], {}]', "20:30:00+0000"),
                        "quietEnd": (b'[["05:45:00+0100"], {}]', "05:45:00+0100"),
                        "quietTimeEnabled": (b"[[true], {}]", True),
                        "powerOffEnabled": (b'[["true"], {}]', True)}
            sets = [put(f"control/scheduler/{k}", raw) for k, (raw, _) in settings.items()]
            answers = await asyncio.gather(*jobs, *sets)
            os.kill(self.server.proc.pid, signal.SIGKILL)
        finally:
            await ctx.shutdown()
        self.server.proc.wait()
        acked = [i for i, r in enumerate(answers[:BURST]) if r.code == aiocoap.CHANGED]
        self.assertEqual(len(acked), BURST, [r.payload for r in answers if not r.code.is_successful()])
        self.assertTrue(all(r.code == aiocoap.CHANGED for r in answers[BURST:]))
        # what the next start will read
        db, jobs, stored, state = sch.load_database(find_database(self.datadir))
        db.close()
        runs = sorted(int(j.args["run"][1:]) for j in jobs.values())
        self.assertEqual(runs, acked)
        for key, (_, value) in settings.items():
            self.assertEqual(stored.get(key), value, key)
