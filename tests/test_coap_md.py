"""Every command of coap.md, run with libcoap's coap-client against the
server (skipped when coap-client is not installed)."""

import os
import re
import shutil
import subprocess

from twisted.internet import threads
from twisted.trial import unittest

from .helpers import ServerTestCase

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def client_binary():
    for name in ("coap-client", "coap-client-notls", "coap-client-gnutls",
                 "coap-client-openssl"):
        path = shutil.which(name)
        if path:
            return path
    return None


def examples():
    """(command, expected output) pairs from coap.md."""
    with open(os.path.join(HERE, "coap.md")) as f:
        lines = f.read().splitlines()
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    $ coap-client"):
            cmd = line[6:]
            expected = []
            i += 1
            while i < len(lines) and lines[i].startswith("    ") and not lines[i].startswith("    $"):
                expected.append(lines[i][4:])
                i += 1
            out.append((cmd, "\n".join(expected)))
        else:
            i += 1
    return out


class CoapMdTests(ServerTestCase):

    def test_coap_md_commands(self):
        binary = client_binary()
        if binary is None:
            raise unittest.SkipTest("coap-client (Debian libcoap3-bin) is not installed")
        cases = examples()
        self.assertGreaterEqual(len(cases), 10)

        def run_all():
            results = []
            for cmd, expected in cases:
                cmd = cmd.replace("coap://[::1]/", f"coap://[::1]:{self.port}/")
                argv = ["bash", "-c", cmd.replace("coap-client", binary, 1)]
                p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, timeout=30)
                results.append((cmd, expected, p.stdout.strip(), p.returncode))
            return results

        def check(results):
            for cmd, expected, got, rc in results:
                self.assertEqual(rc, 0, cmd)
                if "…" in expected:
                    pattern = ".*".join(re.escape(part) for part in expected.split("…"))
                    self.assertTrue(re.fullmatch(pattern, got, re.S), (cmd, got[:300]))
                else:
                    self.assertEqual(got, expected, cmd)
        return threads.deferToThread(run_all).addCallback(check)
