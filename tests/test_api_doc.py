"""docs/API.md documents every resource the server lists.

The server is started, ``/.well-known/core`` is read over CoAP (aiocoap),
concrete spectrometer and channel names are generalised to ``<spec>`` and
``<channel>`` as the reference writes them, and every path must appear as
the first cell of a resource-table row in docs/API.md, with **obs** where
the server marks ``;obs``. A resource the reference documents without GET
must refuse a GET with 4.05.
"""

import json
import os
import re

from twisted.trial import unittest

from .helpers import ServerTestCase, as_deferred

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_MD = os.path.join(HERE, "docs", "API.md")

ROW = re.compile(r"^\|\s*`(/[^`]*)`\s*\|([^|]*)\|")


def documented(text):
    """{path: {"methods": set, "obs": bool}} from the resource tables: rows
    whose first cell is a code span starting with ``/`` and whose second
    cell names methods."""
    table = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if not m:
            continue
        path, methods = m.group(1), m.group(2)
        found = set(re.findall(r"\b(GET|PUT)\b", methods))
        if not found:
            continue        # e.g. the defaults table: settings, not methods
        entry = table.setdefault(path, {"methods": set(), "obs": False})
        entry["methods"] |= found
        entry["obs"] = entry["obs"] or "obs" in methods
    return table


DEFAULT_ROW = re.compile(r"^\|\s*`(/[^`<]*)`\s*\|[^`|]*`([^`]*)`")


def defaults(text):
    """{path: value} from the Defaults table: rows whose setting is a
    concrete path and whose default starts with a JSON literal."""
    section = text.split("## Defaults", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        m = DEFAULT_ROW.match(line)
        if m:
            try:
                out[m.group(1)] = json.loads(m.group(2))
            except ValueError:
                pass        # a description, not a literal
    return out


EXAMPLE_CMD = re.compile(
    r"^    \$ coap-client-notls -m (get|put)(?: -e '([^']*)')? coap://\[::1\]/(\S+)$")


def worked_example(text):
    """[(method, payload, path, expected output)] from the scheduler's
    worked example, as coap-client prints it ("" when it prints nothing)."""
    section = text.split("### Worked example", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = EXAMPLE_CMD.match(line)
        if m:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            expected = nxt[4:] if nxt.startswith("    ") and not nxt.startswith("    $") else ""
            out.append((m.group(1).upper(), m.group(2), m.group(3), expected))
    return out


def parse_core(payload):
    """[(path, observable)] from a CoRE link-format document."""
    links = []
    for link in payload.split(","):
        m = re.match(r"<([^>]*)>(.*)", link.strip())
        if m:
            params = m.group(2).split(";")
            links.append((m.group(1), "obs" in params))
    return links


def generalise(path, specs, channels):
    parts = path.split("/")
    out = []
    for i, part in enumerate(parts):
        if part in specs and i > 0 and parts[i - 1] == "spectrometer":
            out.append("<spec>")
        elif part in channels:
            out.append("<channel>")
        else:
            out.append(part)
    return "/".join(out)


def lookup(table, path):
    """The table entry documenting ``path``: the path itself, or for a
    path-parsing resource (``/data_dir/runs``) its ``/<...>`` sub-paths."""
    if path in table:
        return table[path]
    subs = [e for p, e in table.items() if p.startswith(path + "/<")]
    if subs:
        return {"methods": set().union(*(e["methods"] for e in subs)),
                "obs": any(e["obs"] for e in subs)}
    return None


def problems(table, links):
    """What the reference gets wrong about the listed resources."""
    out = []
    for path, obs in links:
        entry = lookup(table, path)
        if entry is None:
            out.append(f"{path} is not documented")
        elif obs and not entry["obs"]:
            out.append(f"{path} is observable but not marked obs")
        elif entry["obs"] and not obs and path in table:
            out.append(f"{path} is marked obs but the server does not list it so")
    return out


class CheckerTests(unittest.TestCase):
    """The checker itself: it must find what is missing or wrong."""

    def test_missing_path_is_reported(self):
        with open(API_MD, encoding="utf-8") as f:
            text = f.read()
        table = documented(text)
        self.assertIn("/control/status", table)
        without = "\n".join(l for l in text.splitlines()
                            if not l.startswith("| `/control/status`"))
        self.assertEqual(problems(documented(without), [("/control/status", True)]),
                         ["/control/status is not documented"])

    def test_obs_mismatch_is_reported(self):
        table = documented("| `/a/b` | GET | | x |\n| `/a/c` | GET **obs** | | y |\n")
        self.assertEqual(problems(table, [("/a/b", True), ("/a/c", False)]),
                         ["/a/b is observable but not marked obs",
                          "/a/c is marked obs but the server does not list it so"])

    def test_defaults_table(self):
        table = defaults("x\n## Defaults\n| `/a` | **`-1`** (never) | `1` | |\n"
                         "| `/b` | `0.0` s | | |\n| `/c/<x>` | `5` | | |\n"
                         "| `/d` | the newest run | | |\n## Next\n| `/e` | `1` | |\n")
        self.assertEqual(table, {"/a": -1, "/b": 0.0})

    def test_generalise(self):
        self.assertEqual(
            generalise("/spectrometer/S_x/current_time/up", {"S_x"}, {"up"}),
            "/spectrometer/<spec>/current_time/<channel>")
        self.assertEqual(generalise("/shutter/up/status", {"S_x"}, {"up"}),
                         "/shutter/<channel>/status")


class ApiDocTests(ServerTestCase):

    def test_every_listed_path_is_documented(self):
        async def check():
            with open(API_MD, encoding="utf-8") as f:
                table = documented(f.read())
            self.assertGreaterEqual(len(table), 40)
            r = await self.request("GET", ".well-known/core")
            self.assertEqual(str(r.code), "2.05 Content")
            self.assertEqual(r.opt.content_format, 40)
            specs = set(await self.get("spectrometer/spectrometers"))
            channels = set(await self.get("spectrometer/channels")) | set(
                await self.get("shutter/shutters"))
            self.assertTrue(specs and channels)
            links = parse_core(r.payload.decode("utf-8"))
            self.assertGreaterEqual(len(links), 40)
            general = {}
            for path, obs in links:
                g = generalise(path, specs, channels)
                general[g] = general.get(g, False) or obs
            self.assertEqual(problems(table, sorted(general.items())), [])
            # a resource documented without GET must refuse GET (4.05):
            # the methods column is checked against the server, not trusted
            concrete = {}
            for path, _ in links:
                concrete.setdefault(generalise(path, specs, channels), path)
            for g, path in sorted(concrete.items()):
                entry = lookup(table, g)
                if "GET" not in entry["methods"] and g in table:
                    r = await self.request("GET", path.lstrip("/"))
                    self.assertEqual(str(r.code), "4.05 Method Not Allowed",
                                     (path, r.code, r.payload))
        return as_deferred(check())

    def test_defaults_are_the_servers(self):
        """Every literal default in the Defaults table is what a freshly
        started server answers (same JSON value and type)."""
        async def check():
            with open(API_MD, encoding="utf-8") as f:
                table = defaults(f.read())
            self.assertIn("/control/autointegration", table)
            self.assertIn("/control/scheduler/powerDelay", table)
            self.assertGreaterEqual(len(table), 10)
            for path, value in sorted(table.items()):
                got = await self.get(path.lstrip("/"))
                self.assertEqual((path, got, type(got)), (path, value, type(value)))
        return as_deferred(check())

    def test_scheduler_worked_example(self):
        """The worked example's requests, sent as written, get the answers
        the reference shows (as coap-client prints them)."""
        async def check():
            with open(API_MD, encoding="utf-8") as f:
                steps = worked_example(f.read())
            self.assertGreaterEqual(len(steps), 6)
            for method, payload, path, expected in steps:
                raw = payload.encode() if payload is not None else b""
                r = await self.request(method, path, raw=raw)
                if r.code.is_successful():
                    got = r.payload.decode()
                else:
                    got = f"{r.code.dotted} {r.payload.decode()}"
                self.assertEqual(got, expected, (method, path, payload))
        return as_deferred(check())
