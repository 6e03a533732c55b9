"""The run index against the disk (issue 20): batch numbers past 999,999,
and a change by hand made while a save of ours moves the run's mtime."""

import json
import os

from twisted.internet import defer
from twisted.trial import unittest

from piccolo_twisted import runindex
from piccolo_twisted.acquisition import pico
from piccolo_twisted.datadir import DataDir
from piccolo_twisted.errors import PiccoloError


def sync_thread(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


def touch(path, when=1e9):
    with open(path, "w") as f:
        f.write('{"Spectra": []}')
    if when is not None:
        os.utime(path, (when, when))


class Case(unittest.TestCase):

    def make(self, names, run="r"):
        self.root = os.path.abspath(self.mktemp())
        path = os.path.join(self.root, run)
        os.makedirs(path)
        for n in names:
            touch(os.path.join(path, n))
        for d in (path, self.root):
            os.utime(d, (1e9, 1e9))          # not fresh: listings are trusted
        self.dd = DataDir(self.root, to_thread=sync_thread)
        self.dd.prepare()
        return path

    def get(self, what, run="r"):
        value = self.successResultOf(self.dd.run_get(run, what))
        return json.loads(value) if isinstance(value, bytes) else value


class BigBatchNumberTests(Case):
    """At one batch a minute into one run, batch 1,000,000 comes after 1.9
    years: its files are named with seven digits (``pico.file_name``)."""

    def test_names_past_six_digits(self):
        self.assertEqual(pico.file_name(1000000, 0, "light"), "b1000000_s000000_light.pico")
        for name in ("b1000000_s000000_light.pico", "b000999_s1000000_dark.pico",
                     "b12345678901_s000001.pico"):
            k = runindex.parse(name)
            self.assertIsNotNone(k, name)
            self.assertEqual(runindex.name(k), name)
        # one name per key: a zero-padded seven-digit number is none of ours
        for name in ("b0000001_s000000.pico", "b000001_s0000001.pico", "b00001_s000000.pico"):
            self.assertIsNone(runindex.parse(name), name)
        order = ["b999999_s000001_light.pico", "b1000000_s000000_dark.pico",
                 "b1000000_s000000_light.pico", "b1000001_s000000.pico"]
        self.assertEqual(sorted(order, key=runindex.parse), order)

    def test_listed_and_numbered_past_999999(self):
        self.make(["b999999_s000000_dark.pico", "b999999_s000000_light.pico",
                   "b1000000_s000000_dark.pico", "b1000000_s000000_light.pico"])
        self.assertEqual(self.get("current_batch"), 1000000)
        self.assertEqual(self.get("spectra_list"),
                         ["b1000000_s000000_light.pico", "b1000000_s000000_dark.pico",
                          "b999999_s000000_light.pico", "b999999_s000000_dark.pico"])
        # the next batch is 1,000,001, not "exists already" for ever after
        self.assertEqual(self.successResultOf(self.dd.prepare_run("r")), 1000001)
        self.assertEqual(self.successResultOf(self.dd.save("r", 1000001, 0, "light", [])),
                         "b1000001_s000000_light.pico")
        self.assertEqual(self.get("current_batch"), 1000001)
        text = self.successResultOf(self.dd.run_put("r", "spectra",
                                                    "b1000000_s000000_dark.pico"))
        self.assertEqual(json.loads(json.loads(bytes(text))), {"Spectra": []})

    def test_final_dark_of_a_million_sequences(self):
        # nsequence = 1,000,000: the batch's final dark is sequence 1,000,000
        self.make([])
        self.successResultOf(self.dd.save("r", 0, 999999, "light", []))
        self.successResultOf(self.dd.save("r", 0, 1000000, "dark", []))
        self.successResultOf(self.dd.save("r", 1, 0, "dark", []))
        self.assertEqual(self.get("spectra_list"),
                         ["b000001_s000000_dark.pico", "b000000_s1000000_dark.pico",
                          "b000000_s999999_light.pico"])


class HandChangeDuringSaveTests(Case):
    """A file removed (or added) by hand while a save writes into the run:
    both changes move the mtime in the same moment, so the mtime alone
    cannot tell them apart; the next listing shows the hand change."""

    def save_with_hand_change(self, change):
        real = pico.write_atomic

        def write(fd, name, data, clobber):
            result = real(fd, name, data, clobber)
            change()                           # between save's two fstats
            return result
        self.patch(pico, "write_atomic", write)
        self.successResultOf(self.dd.save("r", 2, 0, "light", []))
        self.patch(pico, "write_atomic", real)

    def test_file_removed_during_a_save(self):
        path = self.make(["b000000_s000000_dark.pico", "b000000_s000000_light.pico",
                          "b000001_s000000_light.pico"])
        self.assertEqual(len(self.get("spectra_list")), 3)
        self.save_with_hand_change(
            lambda: os.unlink(os.path.join(path, "b000000_s000000_dark.pico")))
        names = self.get("spectra_list")
        self.assertEqual(names, ["b000002_s000000_light.pico",
                                 "b000001_s000000_light.pico",
                                 "b000000_s000000_light.pico"])
        self.assertEqual(names, sorted((n for n in os.listdir(path)), reverse=True))
        # and it is not offered for reading as a broken spectrum file
        f = self.failureResultOf(self.dd.run_put("r", "spectra", "b000000_s000000_dark.pico"),
                                 PiccoloError)
        self.assertIn("not in the spectra list", str(f.value))

    def test_file_added_during_a_save(self):
        path = self.make(["b000000_s000000_light.pico"])
        self.assertEqual(self.get("current_batch"), 0)
        self.save_with_hand_change(
            lambda: touch(os.path.join(path, "b000007_s000000_light.pico"), when=None))
        self.assertEqual(self.get("current_batch"), 7)
        self.assertIn("b000007_s000000_light.pico", self.get("spectra_list"))

    def test_own_save_alone_needs_no_listing(self):
        path = self.make(["b000000_s000000_light.pico"])
        self.get("spectra_list")
        scans = []
        real = runindex.scan_files

        def counting(fd):
            scans.append(fd)
            return real(fd)
        self.patch(runindex, "scan_files", counting)
        # the save's mtime stays too fresh to vouch for anything (however
        # long a loaded machine takes between the save and the look)
        self.patch(runindex, "RACY_NS", 10**15)
        self.patch(runindex, "RACY_COARSE_NS", 10**15)
        self.successResultOf(self.dd.save("r", 1, 0, "light", []))
        self.assertEqual(self.get("spectra_list"), ["b000001_s000000_light.pico",
                                                    "b000000_s000000_light.pico"])
        self.assertEqual(scans, [])
        # once the mtime is old enough that a later change would move it,
        # the check is done for good
        entry = self.dd._runs["r"]
        self.assertTrue(entry.unverified)
        self.patch(runindex, "RACY_NS", -1)
        self.patch(runindex, "RACY_COARSE_NS", -1)
        self.get("current_batch")
        self.assertFalse(entry.unverified)
        self.assertEqual(scans, [])
