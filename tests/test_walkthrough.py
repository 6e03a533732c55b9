"""The README's "First measurement", every command copied out of the
README and run as written against the embedded default started by the
README's first command (issue 21: the README's commands are tested). Two
changes only: the server listens on a free port instead of 5683 (the
commands' ``coap://[::1]/`` gets it), and ``PICCOLO_TIME_SCALE`` makes the
simulated integrations quick."""

import os
import re
import shlex
import subprocess
import sys

from twisted.trial import unittest

from . import readme
from .readme import Server, venv_bin
from .test_coap_md import client_binary


def fenced(body, language):
    """The fenced code blocks of ``body`` in ``language``."""
    return [m.group(1) for m in re.finditer(r"```" + language + r"\n(.*?)```", body, re.S)]


class FirstMeasurementTests(unittest.TestCase):

    def test_walkthrough(self):
        binary = client_binary()
        if binary is None:
            raise unittest.SkipTest("coap-client is not installed (libcoap3-bin)")
        top = readme.commands(readme.blocks(readme.text().split("\n## ")[0])[0])[0]
        start = top.split(" && ")[-1]
        self.assertEqual(start, ".venv/bin/twistd -n --pidfile= piccolo")
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        argv = shlex.split(start)
        argv[0] = venv_bin("twistd")
        server = Server(argv + ["--port", "0", "--address", "::1"],
                        os.path.join(work, "twistd.out"), cwd=work,
                        env={"PICCOLO_TIME_SCALE": "0.05"})
        self.addCleanup(server.stop)
        base = f"coap://[::1]:{server.port}/"

        body = readme.section("First measurement")
        parts = [p for b in readme.blocks(body) for p in readme.paragraphs(b)]
        outputs = {}
        ran = []
        for i, part in enumerate(parts):
            for command in readme.commands(part):
                if not command.startswith(("coap-client-notls ", "ls ")):
                    continue
                argv = shlex.split(command.replace("coap://[::1]/", base))
                if argv[0] == "coap-client-notls":
                    argv[0] = binary
                p = subprocess.run(argv, cwd=work, capture_output=True, text=True,
                                   timeout=60)
                self.assertEqual(p.returncode, 0, f"{command}: {p.stderr}")
                outputs[command] = p.stdout
                ran.append(command)
        self.assertEqual(len(ran), 10, ran)             # 9 coap-client, 1 ls

        def shown_after(command):
            """The output the README shows after ``command``."""
            for i, part in enumerate(parts):
                if command in readme.commands(part):
                    return parts[i + 1].strip()
        # observing /control/status: the values the README shows, in order
        auto = [c for c in ran if "-s 5" in c][0]
        self.assertEqual(outputs[auto].strip(), shown_after(auto))
        watch = [c for c in ran if "-s 15" in c][0]
        # the batch began before the observation: the values shown, from
        # wherever it had got to, ending "idle"
        seen = re.findall(r'"([^"]*)"', outputs[watch])
        shown = re.findall(r'"([^"]*)"', shown_after(watch))
        self.assertLessEqual(set(seen), set(shown), outputs[watch])
        self.assertEqual(seen[-1], "idle", outputs[watch])
        self.assertIn("upwelling light", seen)
        listing = [c for c in ran if c.endswith("spectra_list")][0]
        self.assertEqual(outputs[listing].strip(), shown_after(listing))
        ls = [c for c in ran if c.startswith("ls ")][0]
        self.assertEqual(sorted(outputs[ls].split()),
                         sorted(re.findall(r'"([^"]+)"', shown_after(listing))))

        # step 8: read_pico.py as the README gives it, in the same directory
        [script] = fenced(body, "python")
        with open(os.path.join(work, "read_pico.py"), "w") as f:
            f.write(script)
        p = subprocess.run([sys.executable, "read_pico.py"], cwd=work,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = p.stdout.splitlines()
        self.assertEqual(len(lines), 4, p.stdout)      # 2 spectrometers x 2 channels
        pattern = re.compile(r"sim_(QEP00981|FLMT01234) (up|down)welling light: "
                             r"\d+\.\d ms, peak \d+ counts at \d+\.\d nm, \d+ pixels saturated$")
        for line in lines:
            self.assertRegex(line, pattern)
