"""The data directory: run names, the server's own files, symlinks, the
index of runs and files, and the listings' wire answers."""

import asyncio
import json
import os
import shutil
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from piccolo_twisted import datadir as datadir_module
from piccolo_twisted import runindex
from piccolo_twisted.datadir import DataDir, check_run_name
from piccolo_twisted.errors import PiccoloError

from .helpers import ServerTestCase, make_service
from .test_wire import coro


def sync_thread(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


class RunNameTests(unittest.SynchronousTestCase):

    def test_length_in_utf8_bytes(self):
        self.assertEqual(check_run_name("a" * 100), "a" * 100)
        self.assertRaises(PiccoloError, check_run_name, "a" * 101)
        self.assertEqual(check_run_name("é" * 50), "é" * 50)          # 100 bytes
        self.assertRaises(PiccoloError, check_run_name, "é" * 50 + "a")
        self.assertRaises(PiccoloError, check_run_name, "\udcff")     # not UTF-8

    def test_one_visible_component(self):
        for bad in ("", ".", "..", ".piccolo", "a/b", "a\\b", "a\x00", None, 5):
            self.assertRaises(PiccoloError, check_run_name, bad)


class UmaskTests(unittest.TestCase):
    """Spectra 0644, runs 0755 whatever the umask (issue 10.7)."""

    def test_modes_under_umask_077(self):
        root = os.path.join(os.path.abspath(self.mktemp()), "data")
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)
        dd = DataDir(root, to_thread=sync_thread)
        dd.prepare()
        name = self.successResultOf(dd.save("r", 0, 0, "light", []))
        self.assertEqual(name, "b000000_s000000_light.pico")
        self.assertEqual(os.stat(root).st_mode & 0o777, 0o755)
        self.assertEqual(os.stat(os.path.join(root, "spectra")).st_mode & 0o777, 0o755)
        self.assertEqual(os.stat(os.path.join(root, "r")).st_mode & 0o777, 0o755)
        self.assertEqual(os.stat(os.path.join(root, "r", name)).st_mode & 0o777, 0o644)

    def test_missing_parents_0755_under_umask_077(self):
        """A data directory whose parents do not exist yet (``-o
        /home/pi/field/data``): the parents the server creates are 0755 too,
        or a 0700 parent hides every spectrum from the user copying them."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        root = os.path.join(base, "field", "2026", "data")
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)
        dd = DataDir(root, to_thread=sync_thread)
        dd.prepare()
        self.successResultOf(dd.save("r", 0, 0, "light", []))
        for path in (os.path.join(base, "field"), os.path.join(base, "field", "2026"),
                     root, os.path.join(root, "r")):
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o755, path)


class StateFilesTests(unittest.SynchronousTestCase):
    """The server's own files live in <datadir>/.piccolo (issue 11.1)."""

    def test_old_files_moved_runs_left(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        for name in ("scheduler.sqlite", "scheduler.sqlite-wal", "manhole_host_key"):
            with open(os.path.join(root, name), "w") as f:
                f.write(name)
        os.makedirs(os.path.join(root, "scheduler.sqlite-journal"))   # a run
        DataDir(root, to_thread=sync_thread).prepare()
        state = os.path.join(root, ".piccolo")
        self.assertEqual(sorted(os.listdir(state)),
                         ["manhole_host_key", "scheduler.sqlite", "scheduler.sqlite-wal"])
        with open(os.path.join(state, "scheduler.sqlite")) as f:
            self.assertEqual(f.read(), "scheduler.sqlite")
        self.assertEqual(sorted(os.listdir(root)),
                         [".piccolo", "scheduler.sqlite-journal"])


    def test_state_name_taken_by_a_file(self):
        """A file named .piccolo does not stop the start: it is moved aside
        and the state directory made (issue 15.3)."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        with open(os.path.join(root, ".piccolo"), "w") as f:
            f.write("junk")
        datadir = DataDir(root, to_thread=sync_thread)
        datadir.prepare()
        self.assertTrue(os.path.isdir(os.path.join(root, ".piccolo")))
        aside = [n for n in os.listdir(root) if n.startswith(".piccolo.unusable-")]
        self.assertEqual(len(aside), 1, os.listdir(root))
        with open(os.path.join(root, aside[0])) as f:
            self.assertEqual(f.read(), "junk")
        self.assertIn("moved aside", datadir.fault.value)

class FakeRun:
    """Builds a big run fast: one real file, the others hard links to it."""

    def __init__(self, root, run, batches, per_batch, kinds=("dark", "light")):
        path = os.path.join(root, run)
        os.makedirs(path, exist_ok=True)
        self.names = []
        for b in range(batches):
            for s in range(per_batch):
                for kind in kinds:
                    name = f"b{b:06d}_s{s:06d}_{kind}.pico"
                    full = os.path.join(path, name)
                    if len(self.names) % 50000 == 0:     # ext4: 65,000 links
                        with open(full, "w") as f:
                            f.write('{"Spectra": []}')
                        first = full
                    else:
                        os.link(first, full)
                    self.names.append(name)
        self.names.sort(reverse=True)


class IndexTests(unittest.TestCase):
    """The index answers as a listing would, and lists a directory again
    only when its mtime moved (issue 13)."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.big = FakeRun(self.root, "big", 20, 125)        # 5,000 files
        for i in range(50):
            os.makedirs(os.path.join(self.root, f"run{i:03d}"))
        # every read of a directory: a listing (scandir) or a pass over the
        # names (runindex.fingerprint: listdir)
        self.scans = []
        real_scandir, real_listdir = os.scandir, os.listdir

        def counting(path="."):
            self.scans.append(path)
            return real_scandir(path)

        def counting_names(path="."):
            self.scans.append(path)
            return real_listdir(path)
        self.patch(os, "scandir", counting)
        self.patch(os, "listdir", counting_names)
        # recorded a while ago: no mtime is fresh enough to be racy
        for d in [self.root] + [e.path for e in os.scandir(self.root)]:
            os.utime(d, (1e9, 1e9))
        self.dd = DataDir(self.root, to_thread=sync_thread)
        self.dd.prepare()
        self.assertTrue(self.dd._built)
        self.scans.clear()
        # the simulated listings are not racy: the files were made before
        for entry in self.dd._runs.values():
            self.assertIsNotNone(entry.keys)

    def get(self, what, run="big"):
        return self.successResultOf(self.dd.run_get(run, what))

    def test_answers_without_listing(self):
        body = self.get("spectra_list")
        self.assertEqual(json.loads(body), self.big.names)
        self.assertEqual(self.get("current_batch"), 19)
        self.assertEqual(self.get("current_batch", "run007"), -1)
        self.assertEqual(self.get("name"), "big")
        runs = json.loads(self.successResultOf(self.dd.all_runs(alpha=True)))
        self.assertEqual(runs, sorted(["big"] + [f"run{i:03d}" for i in range(50)]))
        # the body is encoded once: the same object comes back
        self.assertIs(self.get("spectra_list"), body)
        self.assertEqual(self.scans, [])

    def test_own_saves_update_without_listing(self):
        # a save moves the mtime as a change by hand in the same moment
        # would: the index checks the run's names against what it expects
        # (one pass over the names, no parsing or sorting: issue 20), and
        # never lists the run again
        passes = []
        fingerprint = runindex.fingerprint
        # a save's mtime is taken as settled at once (here the looks come
        # within RACY_NS of the save on a fast machine, and each look then
        # rightly checks again: the count would be the machine's speed)
        self.patch(runindex, "RACY_NS", -1)
        self.patch(runindex, "RACY_COARSE_NS", -1)

        def counting(fd, *rest):
            passes.append(fd)
            return fingerprint(fd, *rest)
        self.patch(runindex, "fingerprint", counting)
        self.get("spectra_list")
        self.successResultOf(self.dd.save("big", 20, 0, "dark", []))
        self.successResultOf(self.dd.save("big", 20, 0, "light", []))
        self.assertEqual(self.get("current_batch"), 20)
        names = json.loads(self.get("spectra_list"))
        self.assertEqual(names, ["b000020_s000000_light.pico",
                                 "b000020_s000000_dark.pico"] + self.big.names)
        self.assertEqual(names[:3], ["b000020_s000000_light.pico",
                                     "b000020_s000000_dark.pico",
                                     "b000019_s000124_light.pico"])
        self.assertEqual(self.successResultOf(self.dd.prepare_run("big")), 21)
        self.assertEqual(self.successResultOf(self.dd.prepare_run("new")), 0)
        self.successResultOf(self.dd.save("new", 0, 0, None, []))
        self.assertEqual(self.get("spectra_list", "new"), b'["b000000_s000000.pico"]')
        self.assertIn("new", json.loads(self.successResultOf(self.dd.all_runs())))
        self.assertEqual(len(self.scans), len(passes))      # no listing

    def bump_mtime(self, path):
        # a hand change in the same clock tick as our last look would not
        # move the mtime: make sure it does (and is not fresh), as time
        # passing would
        os.utime(path, (1.5e9, 1.5e9))

    def test_hand_changes_noticed(self):
        self.assertEqual(self.get("current_batch"), 19)
        run = os.path.join(self.root, "big")
        shutil.copy(os.path.join(run, self.big.names[0]),
                    os.path.join(run, "b000042_s000000_light.pico"))
        os.unlink(os.path.join(run, "b000000_s000000_dark.pico"))
        self.bump_mtime(run)
        self.assertEqual(self.get("current_batch"), 42)
        names = json.loads(self.get("spectra_list"))
        self.assertEqual(names[0], "b000042_s000000_light.pico")
        self.assertNotIn("b000000_s000000_dark.pico", names)
        self.assertEqual(len(names), 5000)
        self.assertEqual(len(self.scans), 1, self.scans)
        # a run made and one removed by hand
        os.makedirs(os.path.join(self.root, "byhand"))
        os.rmdir(os.path.join(self.root, "run000"))
        self.bump_mtime(self.root)
        runs = json.loads(self.successResultOf(self.dd.all_runs()))
        self.assertIn("byhand", runs)
        self.assertNotIn("run000", runs)
        self.successResultOf(self.dd.run_get("run001", "name"))
        self.failureResultOf(self.dd.run_get("run000", "name"))

    def test_leftover_temporaries_removed_at_build(self):
        run = os.path.join(self.root, "crashed")
        os.makedirs(run)
        with open(os.path.join(run, ".b000000_s000000_light.pico.999.tmp"), "w") as f:
            f.write("{")
        dd = DataDir(self.root, to_thread=sync_thread)
        dd.prepare()
        self.assertEqual(os.listdir(run), [])


class RunNameWireTests(ServerTestCase):

    @coro
    async def test_long_name_refused_when_set(self):
        import aiocoap
        name = "r" * 260
        for path, payload in (("data_dir/current_run", name),
                              ("control/record_sequence", {"run": name, "auto": -1}),
                              ("control/record_dark", {"run": name}),
                              ("control/record_sequence",
                               {"run": name, "at_time": "2099-01-01T00:00:00+0000"})):
            r = await self.request("PUT", path, payload)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, (path, r.payload))
            self.assertIn(b"too long", r.payload)
        self.assertEqual(await self.get("control/status"), "idle")
        self.assertEqual(await self.get("control/scheduler/jobs"), [])
        self.assertEqual(await self.get("data_dir/current_run"), "spectra")
        self.assertEqual(sorted(os.listdir(self.datadir)), [".piccolo", "spectra"])

    @coro
    async def test_run_named_like_server_files(self):
        """Run names equal to the server's old file names are harmless runs;
        a restart still starts (issue 11, first bullet)."""
        import aiocoap
        names = ("scheduler.sqlite-journal", "scheduler.sqlite", "manhole_host_key")
        for name in names:
            r = await self.request("GET", f"data_dir/runs/{name}/name")
            self.assertEqual(r.code, aiocoap.NOT_FOUND, r.payload)
            await self.put("data_dir/current_run", name)
        self.assertEqual(sorted(await self.put("data_dir/all_runs", [[], {"alpha": True}])),
                         sorted(names + ("spectra",)))
        await self.service.stopService().asFuture(asyncio.get_event_loop())
        self.service = make_service(self.datadir)
        self.service.privilegedStartService()
        self.service.startService()
        self.port = self.service.coap._port.getHost().port
        self.base = f"coap://[::1]:{self.port}"
        self.assertEqual(await self.get("control/scheduler/jobs"), [])
        self.assertTrue(os.path.isfile(os.path.join(self.datadir, ".piccolo",
                                                    "scheduler.sqlite")))
        for name in names:
            self.assertEqual(await self.get(f"data_dir/runs/{name}/current_batch"), -1)


class ListingWireTests(ServerTestCase):

    @coro
    async def test_all_runs_as_the_deployed_client_sends_it(self):
        """piccolo3-client's run listing sends exactly this (issue 10.1)."""
        import aiocoap
        await self.put("data_dir/current_run", "second")
        raw = b'[[], {"alpha": false, "reverse": false, "nitems": null, "page": 0}]'
        r = await self.request("PUT", "data_dir/all_runs", raw=raw)
        self.assertEqual(r.code, aiocoap.CHANGED, r.payload)
        self.assertEqual(json.loads(r.payload), ["spectra", "second"])
        r = await self.request("PUT", "data_dir/all_runs", raw=(
            b'[[], {"alpha": true, "reverse": true, "nitems": 1, "page": 1}]'))
        self.assertEqual(json.loads(r.payload), ["second"])
        r = await self.request("PUT", "data_dir/all_runs", raw=(
            b'[[], {"alpha": true, "reverse": false, "nitems": 1, "page": 5}]'))
        self.assertEqual(json.loads(r.payload), [])

    @coro
    async def test_symlinks_never_followed(self):
        """A symlink to /etc/passwd is not served; a symlinked run directory
        is not a run and is never written through (issue 11.6)."""
        import aiocoap
        run = self.run_dir("spectra")
        os.symlink("/etc/passwd", os.path.join(run, "b000000_s000000_light.pico"))
        self.assertEqual(await self.get("data_dir/runs/spectra/spectra_list"), [])
        r = await self.request("PUT", "data_dir/runs/spectra/spectra",
                               ["b000000_s000000_light.pico"])
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        self.assertNotIn(b"root:", r.payload)
        outside = tempfile.mkdtemp(prefix="piccolo-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        os.symlink(outside, os.path.join(self.datadir, "evil"))
        r = await self.request("GET", "data_dir/runs/evil/name")
        self.assertEqual(r.code, aiocoap.NOT_FOUND)
        r = await self.request("PUT", "data_dir/current_run", "evil")
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        self.assertNotIn("evil", await self.put("data_dir/all_runs"))
        # refused when set, as current_run refuses it (not made current and
        # failing later)
        r = await self.request("PUT", "control/record_sequence",
                               {"run": "evil", "nsequence": 1, "auto": -1})
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        self.assertIn(b"not a directory", r.payload)
        self.assertEqual(await self.get("control/status"), "idle")
        self.assertNotEqual(await self.get("data_dir/current_run"), "evil")
        self.assertEqual(os.listdir(outside), [])
        # a file where a run should be: 4.04, never 5.00
        with open(os.path.join(self.datadir, "plain"), "w") as f:
            f.write("x")
        for what in ("name", "current_batch", "spectra_list"):
            r = await self.request("GET", f"data_dir/runs/plain/{what}")
            self.assertEqual(r.code, aiocoap.NOT_FOUND)


LONG = bool(os.environ.get("PICCOLO_LONG"))


class ScaleWireTests(ServerTestCase):
    """A big data directory over the wire: the answers of a listing, and no
    request lists a directory once the index is built (issue 13). 20,000
    files and 200 runs here; PICCOLO_LONG=1: 100,000 files and 5,000 runs."""

    batches, per_batch, runs = (100, 500, 5000) if LONG else (20, 500, 200)

    def populate(self, datadir):
        self.big = FakeRun(datadir, "big", self.batches, self.per_batch)
        for i in range(self.runs):
            os.makedirs(os.path.join(datadir, f"run{i:05d}"))
        # recorded a while ago, big last
        order = sorted(os.listdir(datadir), key=lambda n: (n == "big", n))
        for i, name in enumerate(order + [""]):
            os.utime(os.path.join(datadir, name), (1e9 + i, 1e9 + i))

    @coro
    async def test_listings_from_the_index(self):
        # the index built (in its thread: seconds under load), whatever
        # that takes: a look counted below must not be the build's
        await self.service.datadir._until_built().asFuture(asyncio.get_running_loop())
        calls = []
        real_scandir, real_listdir = os.scandir, os.listdir

        def scandir(path="."):
            calls.append(("scandir", path))
            return real_scandir(path)

        def listdir(path="."):
            calls.append(("listdir", path))
            return real_listdir(path)
        self.patch(os, "scandir", scandir)
        self.patch(os, "listdir", listdir)
        # after a save of ours, the run's names are checked once against
        # what the index expects (a change by hand during the save leaves
        # no trace in the mtime; issue 20): a pass over the names, no
        # listing
        passes = []
        fingerprint = runindex.fingerprint

        def counting(fd, *rest):
            passes.append(("listdir", fd))
            return fingerprint(fd, *rest)
        self.patch(runindex, "fingerprint", counting)
        names = await self.get("data_dir/runs/big/spectra_list")
        self.assertEqual(names, self.big.names)
        self.assertEqual(await self.get("data_dir/runs/big/current_batch"),
                         self.batches - 1)
        raw = b'[[], {"alpha": false, "reverse": false, "nitems": null, "page": 0}]'
        r = await self.request("PUT", "data_dir/all_runs", raw=raw)
        runs = json.loads(r.payload)
        self.assertEqual(len(runs), self.runs + 1)
        self.assertEqual(runs[:2], ["run00000", "run00001"])       # oldest first
        self.assertEqual(runs[-1], "big")
        page = await self.put("data_dir/all_runs",
                              [[], {"alpha": True, "reverse": True, "nitems": 10, "page": 1}])
        self.assertEqual(page, sorted(runs, reverse=True)[10:20])
        self.assertEqual(await self.get("data_dir/runs/run00007/current_batch"), -1)
        r = await self.request("PUT", "data_dir/runs/big/spectra", [self.big.names[5]])
        self.assertEqual(json.loads(json.loads(r.payload)), {"Spectra": []})
        # a batch into the big run continues its numbering, listed at once;
        # its files are written in the data directory's own thread pool
        # (not the reactor's, not a device's: issue 15.6)
        import threading
        from piccolo_twisted.acquisition import pico
        writers = []
        real_write = pico.write_atomic

        def write_atomic(*args, **kwargs):
            writers.append(threading.current_thread().name)
            return real_write(*args, **kwargs)
        self.patch(pico, "write_atomic", write_atomic)
        await self.put("control/record_sequence", {"run": "big", "nsequence": 1, "auto": -1})
        await self.wait_for("control/status", lambda s: s == "idle")
        # the first look only once the save's mtime has settled (RACY_NS):
        # looks within it rightly check the names again, and their count
        # would be the machine's speed. (Not RACY_NS patched away: a
        # change by hand below, in the same clock tick as the save on a
        # fast machine, would then go unseen.)
        await self.settled(self.run_dir("big"))
        self.assertEqual(len(writers), 2)
        for name in writers:
            self.assertTrue(name.startswith("PoolThread-piccolo-files-"), name)
        self.assertEqual(await self.get("data_dir/runs/big/current_batch"), self.batches)
        first = await self.first_block("data_dir/runs/big/spectra_list")
        new = [f"b{self.batches:06d}_s000000_light.pico",
               f"b{self.batches:06d}_s000000_dark.pico"]
        self.assertTrue(first.startswith(json.dumps(new + self.big.names[:5], separators=(",", ":"))[:-1].encode()))
        self.assertEqual(calls, passes)
        self.assertEqual(len(passes), 1)    # the first look after the batch, then trusted
        # copied in and removed by hand (as cp and rm would): seen at once,
        # at the cost of one listing of that run
        run = self.run_dir("big")
        shutil.copy(os.path.join(run, self.big.names[0]),
                    os.path.join(run, "b000999_s000000.pico"))
        os.unlink(os.path.join(run, self.big.names[0]))
        self.assertEqual(await self.get("data_dir/runs/big/current_batch"), 999)
        first = await self.first_block("data_dir/runs/big/spectra_list")
        expected = ["b000999_s000000.pico"] + new + self.big.names[1:6]
        self.assertTrue(first.startswith(json.dumps(expected, separators=(",", ":"))[:-1].encode()))
        os.mkdir(os.path.join(self.datadir, "byhand"))
        self.assertIn("byhand", await self.put("data_dir/all_runs"))
        self.assertTrue(calls)
        self.assertLessEqual({c[0] for c in calls}, {"scandir", "listdir"})
        # listings just after a change are not trusted (a change in the same
        # clock tick would not move the mtime); settled, none again
        await asyncio.sleep(0.1)
        await self.first_block("data_dir/runs/big/spectra_list")
        await self.put("data_dir/all_runs")
        del calls[:]
        for _ in range(3):
            first = await self.first_block("data_dir/runs/big/spectra_list")
            self.assertTrue(first.startswith(json.dumps(expected, separators=(",", ":"))[:-1].encode()))
            await self.get("data_dir/runs/big/current_batch")
            await self.put("data_dir/all_runs")
        self.assertEqual(calls, [])

    async def settled(self, path):
        """Until ``path``'s mtime is old enough for the index to vouch for
        a listing at once (runindex.stable_mtime), as time passing makes it."""
        while runindex.stable_mtime(os.stat(path)) is None:
            await asyncio.sleep(0.005)

    async def first_block(self, path):
        """The first 1 KiB block, as a client that returns the server's
        Echo option (RFC 9175) gets it: until then the server's answers
        are within 3x the request (smaller blocks)."""
        import aiocoap
        from aiocoap.optiontypes import BlockOption
        for _ in range(2):
            msg = aiocoap.Message(code=aiocoap.GET, uri=f"{self.base}/{path}")
            msg.opt.block2 = BlockOption.BlockwiseTuple(0, False, 6)
            msg.opt.echo = getattr(self, "echo", None)
            r = await asyncio.wait_for(
                self.ctx.request(msg, handle_blockwise=False).response, 10)
            self.assertEqual(r.code, aiocoap.CONTENT)
            if r.opt.echo is None:
                return r.payload
            self.echo = r.opt.echo
        raise AssertionError("an Echo value returned did not verify the client")


class BuildAndSaveTests(unittest.TestCase):

    def test_requests_wait_for_the_index(self):
        root = os.path.abspath(self.mktemp())
        FakeRun(root, "r", 1, 3)
        held = []

        def to_thread(f, *args, **kwargs):
            if f is runindex.build:
                d = defer.Deferred()
                held.append(lambda: d.callback(f(*args, **kwargs)))
                return d
            return defer.maybeDeferred(f, *args, **kwargs)
        dd = DataDir(root, to_thread=to_thread)
        dd.prepare()
        listing = dd.run_get("r", "spectra_list")
        batch = dd.prepare_run("r")
        self.assertNoResult(listing)
        self.assertNoResult(batch)
        held[0]()
        self.assertEqual(len(json.loads(self.successResultOf(listing))), 6)
        self.assertEqual(self.successResultOf(batch), 1)

    def test_any_failure_fails_the_save(self):
        root = os.path.abspath(self.mktemp())
        dd = DataDir(root, to_thread=sync_thread)
        dd.prepare()
        bad = [{"Metadata": {}, "Pixels": [float("nan")]}]      # not JSON
        f = self.failureResultOf(dd.save("r", 0, 0, "light", bad),
                                 datadir_module.SaveFailed)
        self.assertIn("b000000_s000000_light.pico", str(f.value))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertFalse(os.path.exists(os.path.join(root, "r")))     # nothing made


class RacyListingTests(unittest.SynchronousTestCase):
    """A listing taken in the same timestamp tick as the directory's last
    change may miss a change made right after it: it is not trusted."""

    def test_fresh_directory_listed_again(self):
        root = os.path.abspath(self.mktemp())
        FakeRun(root, "r", 1, 1)
        mtime, listed, keys, _, _ = runindex.check_run(root, "r", None)
        self.assertIsNone(listed)                   # just changed: list again
        self.assertEqual(len(keys), 2)
        os.utime(os.path.join(root, "r"), ns=(10**18 + 5, 10**18 + 5))
        mtime, listed, keys, _, _ = runindex.check_run(root, "r", None)
        self.assertEqual(listed, 10**18 + 5)
        # the same mtime: no listing at all
        self.assertEqual(runindex.check_run(root, "r", listed)[2], None)
        # whole seconds (FAT, exFAT): trusted only 2.5 s after
        self.patch(runindex.time, "time_ns", lambda: 10**18 + 2 * 10**9)
        os.utime(os.path.join(root, "r"), ns=(10**18, 10**18))
        self.assertIsNone(runindex.stable_mtime(os.stat(os.path.join(root, "r"))))
        self.patch(runindex.time, "time_ns", lambda: 10**18 + 3 * 10**9)
        self.assertEqual(runindex.stable_mtime(os.stat(os.path.join(root, "r"))), 10**18)


class Pool:
    """A file pool whose jobs run when the test says: ``run(i)`` does the
    file-system work of job ``i`` now, ``deliver(i)`` hands its result to
    the reactor side later, as a real pool interleaves a batch's writes
    with requests' looks at the same run."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.jobs.append([f, args, kwargs, d, None])
        return d

    def queued(self, f):
        return [i for i, job in enumerate(self.jobs) if job[0] is f and job[4] is None]

    def run(self, i):
        job = self.jobs[i]
        try:
            job[4] = ("ok", job[0](*job[1], **job[2]))
        except Exception as e:
            job[4] = ("err", e)

    def deliver(self, i):
        kind, value = self.jobs[i][4]
        if kind == "ok":
            self.jobs[i][3].callback(value)
        else:
            self.jobs[i][3].errback(value)

    def drain(self):
        while True:
            waiting = [i for i, job in enumerate(self.jobs) if not job[3].called]
            if not waiting:
                return
            for i in waiting:
                if self.jobs[i][4] is None:
                    self.run(i)
                self.deliver(i)


class BatchWhileListingTests(unittest.TestCase):
    """Requests for a big run while a batch writes into it are answered
    from the index: no listing of the run (at 100,000 files one is ~300 ms,
    and every request of a batch took one; attack on issue 13)."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.big = FakeRun(self.root, "big", 8, 125)        # 2,000 files
        for d in (self.root, os.path.join(self.root, "big")):
            os.utime(d, (1e9, 1e9))
        self.pool = Pool()
        self.dd = DataDir(self.root, to_thread=self.pool)
        self.dd.prepare()
        self.pool.drain()
        self.assertTrue(self.dd._built)
        self.scans = []
        real = runindex.scan_files

        def counting(fd):
            self.scans.append(fd)
            return real(fd)
        self.patch(runindex, "scan_files", counting)

    def test_look_while_a_save_writes(self):
        pool = self.pool
        # a request's look at the run is in the pool when a save comes: the
        # save waits for it, so the look never sees a write half done
        listing = self.dd.run_get("big", "current_batch")
        save = self.dd.save("big", 8, 0, "light", [])
        self.assertEqual(pool.queued(runindex.save), [])
        pool.drain()
        self.assertEqual(self.successResultOf(listing), 7)
        self.assertEqual(self.successResultOf(save), "b000008_s000000_light.pico")
        # a save is writing (its file is on disk, the pool has not answered)
        # when requests come, and a change by hand is made in that moment:
        # the requests' look waits for the save, then compares the run's
        # names with the index (one pass, no listing) and sees the hand
        # change (attack on issue 20: the index was returned as it was
        # during a save, the removed file listed, PUT spectra of it 4.00)
        big = os.path.join(self.root, "big")
        for s in range(1, 9):
            save = self.dd.save("big", 8, s, "light", [])
            [i] = pool.queued(runindex.save)
            pool.run(i)
            removed = None
            if s % 2:                       # a hand change, every other time
                removed = f"b000000_s{s:06d}_dark.pico"
                os.unlink(os.path.join(big, removed))
            requests = [self.dd.run_get("big", "current_batch"),
                        self.dd.run_get("big", "spectra_list")]
            self.assertEqual(pool.queued(runindex.check_run), [])     # after the save
            pool.deliver(i)
            self.assertEqual(self.successResultOf(save), f"b000008_s{s:06d}_light.pico")
            pool.drain()
            self.assertEqual(self.successResultOf(requests[0]), 8)
            names = json.loads(self.successResultOf(requests[1]))
            self.assertNotIn(removed, names)
            self.assertEqual(names, sorted(self.listdir_big(), reverse=True))
            self.assertEqual(len(self.scans), (s + 1) // 2)     # a listing per hand change
        # after the batch: the answers are the directory's, no listing
        batch = self.dd.run_get("big", "current_batch")
        listing = self.dd.run_get("big", "spectra_list")
        pool.drain()
        self.assertEqual(self.successResultOf(batch), 8)
        names = json.loads(self.successResultOf(listing))
        self.assertEqual(names, sorted(self.listdir_big(), reverse=True))
        self.assertEqual(len(self.scans), 4)

    def test_save_goes_before_back_to_back_requests(self):
        """A client that asks again the moment it has its answer keeps a
        look at the run always wanted: a save waiting for the look on the
        disk goes first when it ends, the next look waits for the save
        (the save waited for ever: each answer started the next look
        before the save's turn came)."""
        pool = self.pool
        answers = []

        def ask(_=None):
            if len(answers) < 20:
                self.dd.run_get("big", "current_batch").addCallback(
                    answers.append).addCallback(ask)
        ask()
        [j] = pool.queued(runindex.check_run)           # on the disk
        save = self.dd.save("big", 8, 0, "light", [])
        pool.run(j)
        pool.deliver(j)
        self.assertEqual(answers, [7])
        self.assertEqual(len(pool.queued(runindex.save)), 1)
        self.assertEqual(pool.queued(runindex.check_run), [])   # waits for the save
        pool.drain()
        self.assertEqual(self.successResultOf(save), "b000008_s000000_light.pico")
        self.assertEqual(answers, [7] + [8] * 19)

    def test_request_never_shares_a_look_begun_before_it(self):
        """A request that comes while a look at the run is in flight waits
        for the next one: the look in flight may have passed a change by
        hand made since it began."""
        pool = self.pool
        looks = len(pool.jobs)
        first = self.dd.run_get("big", "spectra_list")
        [j] = pool.queued(runindex.check_run)
        pool.run(j)                                 # nothing changed yet
        os.unlink(os.path.join(self.root, "big", "b000007_s000124_light.pico"))
        os.utime(os.path.join(self.root, "big"), (1.2e9, 1.2e9))
        second = self.dd.run_get("big", "spectra_list")
        third = self.dd.run_get("big", "spectra_list")
        pool.drain()
        self.assertIn("b000007_s000124_light.pico",
                      json.loads(self.successResultOf(first)))
        for later in (second, third):
            self.assertNotIn("b000007_s000124_light.pico",
                             json.loads(self.successResultOf(later)))
        # the two later requests shared one look (one listing)
        self.assertEqual(len(self.scans), 1)
        self.assertEqual(sum(job[0] is runindex.check_run for job in pool.jobs[looks:]), 2)

    def listdir_big(self):
        return [n for n in os.listdir(os.path.join(self.root, "big")) if n.endswith(".pico")]

    def test_final_dark_spliced_in(self):
        # a batch ends with the dark file of its last sequence, which sorts
        # below that sequence's light file: the cached body takes it in
        # without encoding the run's listing again
        encodes = []
        real = runindex.encode_names

        def counting(keys):
            encodes.append(len(keys))
            return real(keys)
        self.patch(runindex, "encode_names", counting)
        first = self.dd.run_get("big", "spectra_list")
        self.pool.drain()
        self.successResultOf(first)
        encodes.clear()
        for s, kind in ((0, "dark"), (0, "light"), (1, "light"), (2, "light"),
                        (2, "dark")):
            d = self.dd.save("big", 8, s, kind, [])
            self.pool.drain()
            self.successResultOf(d)
            if s == 1:
                listing = self.dd.run_get("big", "spectra_list")
                self.pool.drain()
                self.successResultOf(listing)
        listing = self.dd.run_get("big", "spectra_list")
        self.pool.drain()
        names = json.loads(self.successResultOf(listing))
        self.assertEqual(names[:6], ["b000008_s000002_light.pico", "b000008_s000002_dark.pico",
                                     "b000008_s000001_light.pico", "b000008_s000000_light.pico",
                                     "b000008_s000000_dark.pico", "b000007_s000124_light.pico"])
        self.assertEqual(names, sorted(self.listdir_big(), reverse=True))
        self.assertEqual(encodes, [])
        self.assertEqual(self.scans, [])
        # a name far below the top (a hand-made gap filled): encoded afresh
        os.unlink(os.path.join(self.root, "big", "b000001_s000000_dark.pico"))
        os.utime(os.path.join(self.root, "big"), (1.2e9, 1.2e9))
        listing = self.dd.run_get("big", "spectra_list")
        self.pool.drain()
        self.successResultOf(listing)
        d = self.dd.save("big", 1, 0, "dark", [])
        self.pool.drain()
        self.successResultOf(d)
        listing = self.dd.run_get("big", "spectra_list")
        self.pool.drain()
        names = json.loads(self.successResultOf(listing))
        self.assertEqual(names, sorted(self.listdir_big(), reverse=True))
