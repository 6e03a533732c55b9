"""Legacy behaviour the deployed clients rely on (issue 21), and a pause
that a client can ask for without toggling.

The requests are the bytes the deployed piccolo3 client sends
(``PiccoloBaseClient.a_put``: ``json.dumps([args, kwargs])``, every keyword
of ``record_sequence`` present, None where not given).

On ba916b9: ``autointegration -5`` was refused where legacy clamped it to
-1, so ``piccolo3-record -a -2`` failed; channels came in config order
where legacy listed (and recorded) them sorted.
"""

import asyncio
import json

from .helpers import ServerTestCase
from .test_wire import coro


def deployed_put(*args, **kwargs):
    """The payload of the deployed client's ``a_put(resource, *args, **kwargs)``."""
    return json.dumps([args, kwargs]).encode()


class LegacyTests(ServerTestCase):

    async def deployed(self, path, *args, **kwargs):
        response = await self.request("PUT", path, raw=deployed_put(*args, **kwargs))
        return str(response.code), response.payload.decode()

    @coro
    async def test_autointegration_below_minus_one_clamps(self):
        code, text = await self.deployed("control/autointegration", -5)
        self.assertTrue(code.startswith("2.04"), (code, text))
        self.assertEqual(await self.get("control/autointegration"), -1)
        await self.put("control/autointegration", 3)
        # piccolo3-record -a -2 -n 1 run: PiccoloControl.record_sequence
        code, text = await self.deployed(
            "control/record_sequence", run="minus_two", nsequence=1, auto=-2, delay=0.0,
            target=None, at_time=None, interval=None, end_time=None)
        self.assertTrue(code.startswith("2.04"), (code, text))
        self.assertEqual(await self.get("control/autointegration"), -1)
        await self.wait_for("control/status", lambda s: s == "idle")
        self.assertEqual(await self.get("control/fault"), "")
        self.assertEqual(sorted(await self.get("data_dir/runs/minus_two/spectra_list")),
                         ["b000000_s000000_dark.pico", "b000000_s000000_light.pico"])
        # still refused: what legacy refused too (not a number), and above the top
        for bad in ("x", 1000001, 2.5):
            code, text = await self.deployed("control/autointegration", bad)
            self.assertTrue(code.startswith("4.00"), (bad, code, text))

    @coro
    async def test_channels_and_spectrometers_in_legacy_order(self):
        """The instrument config lists upwelling, then downwelling, and
        QEP00981 before FLMT01234; legacy listed channels sorted (they were
        its shutters' sorted names) and recorded each channel's
        spectrometers by sorted name."""
        self.assertEqual(await self.get("spectrometer/channels"), ["downwelling", "upwelling"])
        self.assertEqual(await self.get("shutter/shutters"), ["downwelling", "upwelling"])
        statuses = []
        self.service.control.status.watch(statuses.append)
        await self.put("control/record_sequence", {"run": "order", "nsequence": 1, "auto": 0})
        await asyncio.sleep(0.05)
        await self.wait_for("control/status", lambda s: s == "idle")
        self.assertEqual(await self.get("control/fault"), "")
        steps = [s for s in dict.fromkeys(statuses) if s not in ("idle", "waiting")]
        self.assertEqual(steps, ["autointegrate downwelling", "autointegrate upwelling",
                                 "downwelling dark", "upwelling dark",
                                 "downwelling light", "upwelling light"])
        for name, data in self.load_run("order").items():
            entries = [(s["Metadata"]["Direction"], s["Metadata"]["SerialNumber"])
                       for s in data["Spectra"]]
            self.assertEqual(entries, [("downwelling", "sim_FLMT01234"),
                                       ("downwelling", "sim_QEP00981"),
                                       ("upwelling", "sim_FLMT01234"),
                                       ("upwelling", "sim_QEP00981")], name)


class PausedTests(ServerTestCase):
    """``PUT /control/paused``: pause or resume in one step on the server;
    ``GET /control/pause`` keeps toggling as legacy did."""

    async def paused(self, value):
        response = await self.request("PUT", "control/paused", raw=deployed_put(value))
        self.assertTrue(str(response.code).startswith("2.04"), response)
        return json.loads(response.payload)

    @coro
    async def test_resume_never_pauses_and_pause_never_resumes(self):
        seen = []
        self.service.control.status.watch(seen.append)
        await self.put("control/record_sequence", {"run": "long", "nsequence": 200,
                                                   "auto": -1, "delay": 0.02})
        await self.wait_for("control/current_sequence", lambda s: s >= 1)
        # a resume of a batch that runs changes nothing (a toggle paused it)
        self.assertIs(await self.paused(False), False)
        self.assertFalse(await self.get("control/paused"))
        await self.wait_for("control/current_sequence", lambda s: s >= 3)
        self.assertNotIn("paused", seen)
        self.assertIs(await self.paused(True), True)
        await self.wait_for("control/status", lambda s: s == "paused")
        self.assertIs(await self.paused(True), False)          # still paused
        self.assertEqual(await self.get("control/status"), "paused")
        sequence = await self.get("control/current_sequence")
        self.assertIs(await self.paused(False), True)
        await self.wait_for("control/current_sequence", lambda s: s > sequence)
        self.assertFalse(await self.get("control/paused"))
        # the legacy toggle still works, and agrees with /control/paused
        await self.get("control/pause")
        await self.wait_for("control/status", lambda s: s == "paused")
        self.assertTrue(await self.get("control/paused"))
        await self.get("control/pause")
        await self.wait_for("control/status", lambda s: s != "paused")
        await self.get("control/abort")
        await self.wait_for("control/status", lambda s: s == "idle")
        self.assertFalse(await self.get("control/paused"))
        response = await self.request("PUT", "control/paused", raw=deployed_put(False))
        self.assertEqual((str(response.code)[:4], response.payload),
                         ("4.00", b"nothing to resume: piccolo system is idle"))

    @coro
    async def test_pause_asked_before_the_step_then_resumed(self):
        """A pause asked for takes effect at the next step; a resume before
        that step cancels it (status never reads "paused")."""
        seen = []
        self.service.control.status.watch(seen.append)
        await self.put("control/record_sequence", {"run": "quick", "nsequence": 3,
                                                   "auto": -1, "delay": 1.5})
        control = self.service.control
        for _ in range(400):            # in the delay after the first light set
            if "upwelling light" in seen and control.status.value == "waiting":
                break
            await asyncio.sleep(0.01)
        self.assertEqual(control.status.value, "waiting")
        self.assertIs(await self.paused(True), True)
        self.assertIs(await self.paused(False), True)
        await self.wait_for("control/status", lambda s: s == "idle")
        self.assertNotIn("paused", seen)
        self.assertEqual(len(await self.get("data_dir/runs/quick/spectra_list")), 5)
