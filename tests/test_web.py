"""The web page's server, over real HTTP on loopback: the page and its
assets (offline, under 250 KB), the /api bridge answering as CoAP does,
who may control and cross-site requests, the event stream, downloads.

The client is the standard library's http.client in a thread (what a
script or a browser sends, header by header), from the source address a
test chooses.
"""

import asyncio
import http.client
import io
import json
import os
import re
import socket
import threading
import time
import zipfile

from twisted.internet import threads
from twisted.trial import unittest

from .helpers import ServerTestCase, as_deferred


def in_thread(fn, *args, **kwargs):
    return threads.deferToThread(fn, *args, **kwargs).asFuture(asyncio.get_event_loop())


class Answer:
    def __init__(self, response, body):
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.getheaders()}
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8")

    def json(self):
        return json.loads(self.body) if self.body else None


def http_request(base, method, path, body=None, headers=None, source=None, timeout=10):
    """One HTTP/1.1 request (blocking): an Answer."""
    m = re.match(r"http://\[?([^\]]+?)\]?:(\d+)$", base)
    host, port = m.group(1), int(m.group(2))
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        if isinstance(body, (dict, list, int, float, str)) and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Answer(response, response.read())
    finally:
        conn.close()


class WebTestCase(ServerTestCase):
    web_address = "::1"

    async def web(self, method, path, body=None, headers=None, source=None, token=True,
                  **kw):
        headers = dict(headers or {})
        if token and method not in ("GET", "HEAD"):
            headers.setdefault("X-Piccolo-Token", self.service.web.guard.token)
        return await in_thread(http_request, self.http, method, path, body, headers,
                               source, **kw)


class PageTests(WebTestCase):

    def test_page_and_assets_offline_and_small(self):
        async def check():
            page = await self.web("GET", "/")
            self.assertEqual(page.status, 200)
            self.assertEqual(page.headers["content-type"], "text/html; charset=utf-8")
            self.assertEqual(page.headers["x-frame-options"], "DENY")
            self.assertIn("frame-ancestors 'none'", page.headers["content-security-policy"])
            self.assertIn("script-src 'self'", page.headers["content-security-policy"])
            self.assertEqual(page.headers["cache-control"], "no-store")
            self.assertIn(f'content="{self.service.web.guard.token}"', page.text)
            assets = re.findall(r'(?:src|href)="(/[^"#]*)"', page.text)
            self.assertEqual(sorted(set(assets)), ["/static/app.css", "/static/app.js",
                                                   "/static/favicon.svg"])
            total = len(page.body)
            for path in sorted(set(assets)):
                a = await self.web("GET", path)
                self.assertEqual(a.status, 200, path)
                total += len(a.body)
                # nothing from outside: no absolute URL, no font, no CDN, no import
                # (the SVG namespace is a name, not something fetched)
                text = a.text.replace('xmlns="http://www.w3.org/2000/svg"', "")
                self.assertIsNone(re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), path)
                self.assertNotIn("@import", text)
                self.assertNotIn("@font-face", text)
                self.assertNotIn("url(", text)
                again = await self.web("GET", path, headers={"If-None-Match": a.headers["etag"]})
                self.assertEqual(again.status, 304)
            self.assertIsNone(re.search(r"https?://", page.text))
            self.assertLessEqual(total, 250 * 1024)
            for path in ("/nope", "/static/nope.js", "/static/../service.py", "/api/../token"):
                self.assertEqual((await self.web("GET", path)).status, 404, path)
        return as_deferred(check())


class ApiTests(WebTestCase):

    def test_reads_answer_as_coap(self):
        async def check():
            for path in ("control/status", "control/numSequences", "spectrometer/spectrometers",
                         "spectrometer/channels", "spectrometer/S_sim_QEP00981/current_time/upwelling",
                         "data_dir/current_run", "control/progress", "control/scheduler/jobs"):
                a = await self.web("GET", f"/api/{path}")
                self.assertEqual(a.status, 200, path)
                self.assertEqual(a.headers["content-type"], "application/json")
                self.assertEqual(a.json(), await self.get(path), path)
            index = (await self.web("GET", "/api")).json()
            paths = {r["path"]: r for r in index}
            self.assertTrue(paths["control/status"]["obs"])
            self.assertTrue(paths["control/abort"]["acts"])
            self.assertIn("spectrometer/S_sim_FLMT01234/last_spectrum/downwelling", paths)
            a = await self.web("GET", "/api/no/such/thing")
            self.assertEqual((a.status, a.text), (404, "no such resource: /no/such/thing"))
            a = await self.web("GET", "/api/control/record_sequence")
            self.assertEqual((a.status, a.text),
                             (405, "GET not allowed on /control/record_sequence; use PUT"))
            # the same words over CoAP (docs/API.md's 4.05)
            for path in ("control/record_sequence", "control/record_dark"):
                r = await self.request("GET", path)
                a = await self.web("GET", f"/api/{path}")
                self.assertEqual(str(r.code), "4.05 Method Not Allowed")
                self.assertEqual(r.payload.decode(), a.text)
            r = await self.request("PUT", "control/status", 1)
            self.assertEqual(r.payload.decode(), "PUT not allowed on /control/status; use GET")
            a = await self.web("GET", "/api/control/abort")
            self.assertEqual((a.status, a.text), (405, "/control/abort acts: use POST"))
            a = await self.web("PUT", "/api/control/status", 1)
            self.assertEqual(a.status, 405)
            a = await self.web("DELETE", "/api/control/numSequences")
            self.assertEqual(a.status, 405)
            # a run name with a space and an accent, percent-encoded in the path
            await self.put("data_dir/current_run", "été 1")
            a = await self.web("GET", "/api/data_dir/runs/%C3%A9t%C3%A9%201/name")
            self.assertEqual((a.status, a.json()), (200, "été 1"))
        return as_deferred(check())

    def test_record_pause_resume_abort_as_coap(self):
        async def check():
            import aiocoap
            # bad input: the message CoAP gives, nothing changes
            for payload in ({"nsequence": "x"}, {"nsequence": 0}, {"run": "../x"},
                            {"delay": -1}, {"bogus": 1}, [[], {"target": 95}]):
                a = await self.web("PUT", "/api/control/record_sequence", payload)
                r = await self.request("PUT", "control/record_sequence", payload)
                self.assertEqual(str(r.code), "4.00 Bad Request", payload)
                self.assertEqual((a.status, a.text), (400, r.payload.decode()), payload)
            a = await self.web("PUT", "/api/control/record_sequence", b"{not json")
            self.assertEqual(a.status, 400)
            self.assertTrue(a.text.startswith("payload is not valid JSON"), a.text)
            self.assertEqual(await self.get("control/status"), "idle")
            # nothing to pause or abort while idle: as over CoAP
            for action in ("pause", "abort"):
                a = await self.web("POST", f"/api/control/{action}")
                r = await self.request("GET", f"control/{action}")
                self.assertEqual((a.status, a.text), (400, r.payload.decode()))
            # record from the page
            a = await self.web("PUT", "/api/control/record_sequence",
                               {"run": "webrun", "nsequence": "30", "delay": 0.2, "auto": -1})
            self.assertEqual((a.status, a.body), (204, b""))
            self.assertEqual(await self.get("data_dir/current_run"), "webrun")
            self.assertEqual(await self.get("control/numSequences"), 30)
            # busy: the same refusal both ways
            a = await self.web("PUT", "/api/control/record_sequence", {})
            r = await self.request("PUT", "control/record_sequence", {})
            self.assertEqual((a.status, a.text), (400, "piccolo system is busy"))
            self.assertEqual(r.payload.decode(), "piccolo system is busy")
            self.assertEqual((await self.web("PUT", "/api/control/record_dark", {})).text,
                             "piccolo system is busy")
            # pause, resume, abort from the page
            self.assertEqual((await self.web("POST", "/api/control/pause")).status, 204)
            await self.wait_for("control/status", lambda s: s == "paused")
            self.assertEqual((await self.web("POST", "/api/control/pause")).status, 204)
            await self.wait_for("control/status", lambda s: s not in ("paused", "idle"))
            self.assertEqual((await self.web("POST", "/api/control/abort")).status, 204)
            await self.wait_for("control/status", lambda s: s == "idle")
            # integration times: validated by the spectrometer, as over CoAP
            a = await self.web("PUT", "/api/spectrometer/S_sim_FLMT01234/current_time/upwelling", "250")
            self.assertEqual(a.status, 204)
            self.assertEqual(await self.get("spectrometer/S_sim_FLMT01234/current_time/upwelling"), 250)
            a = await self.web("PUT", "/api/spectrometer/S_sim_FLMT01234/current_time/upwelling", 10 ** 9)
            r = await self.request("PUT", "spectrometer/S_sim_FLMT01234/current_time/upwelling", 10 ** 9)
            self.assertEqual((a.status, a.text), (400, r.payload.decode()))
            a = await self.web("PUT", "/api/spectrometer/S_sim_FLMT01234/current_time/sideways", 5)
            self.assertEqual(a.status, 404)
            # autointegration from the page
            self.assertEqual((await self.web("PUT", "/api/control/auto", {"target": 60})).status, 204)
            await self.wait_for("control/status", lambda s: s == "idle")
            self.assertEqual(await self.get("spectrometer/S_sim_QEP00981/autointegration/upwelling"), "s")
            del aiocoap
        return as_deferred(check())

    def test_body_over_64_kib(self):
        async def check():
            a = await self.web("PUT", "/api/control/numSequences", b"1" + b" " * 70000)
            self.assertEqual(a.status, 413)
            self.assertEqual(await self.get("control/numSequences"), 1)
        return as_deferred(check())


class CrossSiteTests(WebTestCase):

    def test_changes_need_the_token_and_this_origin(self):
        async def check():
            token = self.service.web.guard.token
            host = self.http.split("//", 1)[1]
            refused = [
                {},                                                    # a script without the token
                {"X-Piccolo-Token": "guess"},
                {"X-Piccolo-Token": token, "Origin": "http://evil.example"},
                {"X-Piccolo-Token": token, "Origin": "null"},
                {"X-Piccolo-Token": token, "Origin": f"http://{host}.evil.example"},
                {"X-Piccolo-Token": token, "Origin": f"https://evil.example/{host}"},
            ]
            for headers in refused:
                a = await self.web("PUT", "/api/control/numSequences", 9, headers=headers,
                                   token=False)
                self.assertEqual(a.status, 403, headers)
                a = await self.web("POST", "/api/spectrometer/disconnect", headers=headers,
                                   token=False)
                self.assertEqual(a.status, 403, headers)
            self.assertEqual(await self.get("control/numSequences"), 1)
            self.assertEqual(await self.get("spectrometer/S_sim_QEP00981/status"), 6)
            # a form posted from another site (no custom header possible)
            a = await self.web("POST", "/api/control/abort", b"x=1", token=False,
                               headers={"Origin": "http://evil.example",
                                        "Content-Type": "application/x-www-form-urlencoded"})
            self.assertEqual(a.status, 403)
            self.assertIn("cross-site", a.text)
            # the page's own requests
            a = await self.web("PUT", "/api/control/numSequences", 9,
                               headers={"Origin": f"http://{host}"})
            self.assertEqual(a.status, 204, a.text)
            self.assertEqual(await self.get("control/numSequences"), 9)
            # the token for scripts
            self.assertEqual((await self.web("GET", "/token")).text, token)
            # reads need nothing
            self.assertEqual((await self.web("GET", "/api/control/numSequences")).json(), 9)
            a = await self.web("PUT", "/api/data_dir/all_runs", {}, token=False,
                               headers={"Origin": "http://evil.example"})
            self.assertEqual(a.status, 200)
        return as_deferred(check())


class HostTests(WebTestCase):
    """DNS rebinding: a page of another name, re-pointed at the
    instrument's address, sends that name as Host. The page on 127.0.0.1;
    the recommended control_from (the victim's browser is inside it)."""

    address = web_address = "127.0.0.1"
    server_text = ("[web]\nhosts = piccolo.example.org, 10.9.8.7\n"
                   "[access]\ncontrol_from = 127.0.0.0/8, 192.168.4.0/24\n")

    def test_other_names_are_refused_everything(self):
        async def check():
            port = self.service.web.listening_port
            token = self.service.web.guard.token
            await self.put("control/record_sequence", {"run": "rebind", "nsequence": 400,
                                                       "delay": 0.2, "auto": -1})
            await self.wait_for("control/status", lambda s: s != "idle")
            for name in ("evil.example", f"evil.example:{port}", "EVIL.example.:80",
                         f"127.0.0.1.evil.example:{port}", f"localhost.evil.example:{port}",
                         f"10.1.2.3:{port}", f"[::1]:{port}", "piccolo.example.org.evil",
                         "evil.example:1:2", "[::1"):
                for source in ("127.0.0.1", "127.0.0.7"):
                    headers = {"Host": name}
                    for path in ("/", "/token", "/api/control/status", "/events", "/whoami",
                                 "/static/app.js", "/files/rebind/b000000_s000000_dark.pico",
                                 "/zip/rebind"):
                        a = await self.web("GET", path, headers=headers, source=source)
                        self.assertEqual(a.status, 421, (name, path))
                        self.assertNotIn(token.encode(), a.body)
                    # the attacker has the token (leaked somehow) and sends
                    # the Origin its page has: still refused
                    for method, path in (("POST", "/api/control/abort"),
                                         ("PUT", "/api/control/numSequences")):
                        a = await self.web(method, path, 7, source=source, headers={
                            "Host": name, "Origin": f"http://{name}",
                            "X-Piccolo-Token": token})
                        self.assertEqual(a.status, 421, (name, path))
            a = await self.web("GET", "/token", headers={"Host": f"evil.example:{port}"})
            self.assertIn("DNS rebinding", a.text)
            self.assertIn("[web] hosts", a.text)
            self.assertNotEqual(await self.get("control/status"), "idle")
            self.assertNotEqual(await self.get("control/numSequences"), 7)
            # this server's own names: the address reached, localhost, the
            # machine's host name, and the names configured
            hostname = socket.gethostname().lower()
            for name in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST.",
                         f"{hostname}:{port}", f"{hostname.split('.')[0]}.local:{port}",
                         f"piccolo.example.org:{port}", "10.9.8.7:8080"):
                a = await self.web("GET", "/token", headers={"Host": name})
                self.assertEqual((a.status, a.text), (200, token), name)
            # Origin must be this server over http: https is another origin
            for origin in (f"https://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}",
                           f"http://localhost:{port}", f"http://user@127.0.0.1:{port}"):
                a = await self.web("PUT", "/api/control/numSequences", 7,
                                   headers={"Origin": origin, "Host": f"127.0.0.1:{port}"})
                self.assertEqual(a.status, 403, origin)
                self.assertIn("cross-site", a.text)
            a = await self.web("POST", "/api/control/abort",
                               headers={"Origin": f"http://127.0.0.1:{port}"})
            self.assertEqual(a.status, 204, a.text)
            await self.wait_for("control/status", lambda s: s == "idle")
        return as_deferred(check())


class AccessTests(WebTestCase):
    """The page on 127.0.0.1; control only from 127.0.0.1."""

    web_address = "127.0.0.1"
    server_text = "[access]\ncontrol_from = 127.0.0.1\n"

    def test_control_from(self):
        async def check():
            for source in ("127.0.0.2", "127.3.4.5"):
                a = await self.web("PUT", "/api/control/record_sequence", {"nsequence": 1},
                                   source=source)
                self.assertEqual((a.status, a.text),
                                 (403, f"[access] control_from refuses {source}"))
                self.assertEqual((await self.web("POST", "/api/control/abort", source=source)).status, 403)
                me = (await self.web("GET", "/whoami", source=source)).json()
                self.assertEqual(me, {"address": source, "control": False, "reason": a.text})
                # reads stay open
                self.assertEqual((await self.web("GET", "/api/control/status", source=source)).json(), "idle")
                self.assertEqual((await self.web("GET", "/", source=source)).status, 200)
            self.assertEqual(await self.get("control/status"), "idle")
            me = (await self.web("GET", "/whoami", source="127.0.0.1")).json()
            self.assertEqual(me, {"address": "127.0.0.1", "control": True, "reason": None})
            a = await self.web("PUT", "/api/control/numSequences", 4, source="127.0.0.1")
            self.assertEqual(a.status, 204)
        return as_deferred(check())


def read_events(base, until, timeout=20.0, source=None):
    """Read /events until ``until(events)`` is true: [(path, value)]."""
    m = re.match(r"http://\[?([^\]]+?)\]?:(\d+)$", base)
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout,
                                      source_address=(source, 0) if source else None)
    events = []
    try:
        conn.request("GET", "/events")
        response = conn.getresponse()
        assert response.status == 200, response.status
        assert response.getheader("Content-Type") == "text/event-stream"
        data = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = response.fp.readline()
            if not line:
                break
            line = line.decode("utf-8").rstrip("\n")
            if line.startswith("data: "):
                data.append(line[6:])
            elif line == "" and data:
                events.append((data[0], json.loads(data[1])))
                data = []
                if until(events):
                    return events
        raise AssertionError(f"not seen in {len(events)} events: "
                             f"{[p for p, _ in events][-20:]}")
    finally:
        conn.close()


class EventTests(WebTestCase):

    def test_state_then_changes_then_spectra(self):
        async def check():
            # the current state at once
            events = await in_thread(read_events, self.http,
                                     lambda ev: "control/status" in dict(ev)
                                     and "sysinfo/health" in dict(ev))
            state = dict(events)
            self.assertEqual(state["control/status"], "idle")
            self.assertEqual(state["spectrometer/S_sim_QEP00981/status"], 6)
            self.assertIsNone(state["spectrometer/S_sim_QEP00981/last_spectrum/upwelling"]["kind"])
            self.assertIn("disk_free", state["sysinfo/health"])
            # a batch: its status changes and every channel's spectra arrive.
            # It starts once the stream has its first event, so is in the
            # hub (a sleep let it start first on a loaded machine); it waits
            # twice the flush interval between its sequences, so a flush
            # shows it busy (a fast machine's batch was over before the
            # first flush, which showed only the end: "idle" again); and the
            # stream is read to the "idle" after its busy statuses
            from piccolo_twisted.web import events as ev_module
            streaming = threading.Event()

            def ended(ev):
                streaming.set()
                statuses = [v for p, v in ev if p == "control/status"]
                busy = [i for i, v in enumerate(statuses) if v != "idle"]
                return len({p for p, v in ev if "/last_dark/" in p
                            and v["kind"] == "dark" and v["sequence"] == 1}) == 4 \
                    and len({p for p, v in ev if "/last_spectrum/" in p
                             and v["kind"] == "light" and v["sequence"] == 1}) == 4 \
                    and bool(busy) and "idle" in statuses[busy[0]:]
            reader = asyncio.ensure_future(in_thread(read_events, self.http, ended))
            while not streaming.is_set() and not reader.done():
                await asyncio.sleep(0.01)
            await self.put("control/record_sequence", {"run": "ev", "nsequence": 2, "auto": -1,
                                                       "delay": 2 * ev_module.MIN_INTERVAL})
            events = await reader
            statuses = [v for p, v in events if p == "control/status"]
            self.assertIn("idle", statuses[1:])
            self.assertTrue(any(s.endswith(" light") or s.endswith(" dark") or s == "waiting"
                                for s in statuses), statuses)
            spectra = [v for p, v in events if "/last_spectrum/" in p and v["kind"]]
            darks = [v for p, v in events if "/last_dark/" in p and v["kind"]]
            self.assertEqual({v["kind"] for v in spectra}, {"light"})
            self.assertEqual({v["kind"] for v in darks}, {"dark"})
            kinds = {(v["spectrometer"], v["channel"], v["kind"]) for v in spectra + darks}
            for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
                for c in ("upwelling", "downwelling"):
                    self.assertIn((s, c, "dark"), kinds)
                    self.assertIn((s, c, "light"), kinds)
            # (changes are coalesced: the sequences shown are those current
            # at each flush)
            progress = [v for p, v in events if p == "control/progress" and v["kind"]]
            self.assertTrue(progress)
            for v in progress:
                self.assertEqual((v["kind"], v["run"], v["batch"], v["nsequence"]),
                                 ("batch", "ev", 0, 2))
            self.assertEqual(dict(events)["control/progress"]["kind"], None)
            last = [v for v in spectra if v["spectrometer"] == "S_sim_FLMT01234"][-1]
            self.assertEqual((len(last["pixels"]), len(last["wavelengths"]), last["pixel_count"]),
                             (1024, 1024, 2048))
            # a page opened after the batch (which ended with a dark set) is
            # shown the light spectra, and the darks beside them
            shown = {f"spectrometer/{s}/{what}/{c}"
                     for s in ("S_sim_QEP00981", "S_sim_FLMT01234")
                     for c in ("upwelling", "downwelling")
                     for what in ("last_spectrum", "last_dark")}
            events = await in_thread(read_events, self.http,
                                     lambda ev: shown <= set(dict(ev)))
            state = dict(events)
            for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
                for c in ("upwelling", "downwelling"):
                    light = state[f"spectrometer/{s}/last_spectrum/{c}"]
                    dark = state[f"spectrometer/{s}/last_dark/{c}"]
                    self.assertEqual((light["kind"], light["sequence"]), ("light", 1))
                    self.assertEqual((dark["kind"], dark["sequence"]), ("dark", 1))
                    self.assertGreater(light["peak"], dark["peak"])
        return as_deferred(check())

    def test_stream_limits_and_stop(self):
        async def check():
            from piccolo_twisted.web import events as ev
            socks = []
            try:
                for i in range(ev.OPEN_BURST):
                    s = socket.create_connection(("::1", self.service.web.listening_port))
                    s.sendall(b"GET /events HTTP/1.1\r\nHost: [::1]\r\n\r\n")
                    socks.append(s)
                for _ in range(200):
                    if len(self.service.web.hub.streams) == ev.OPEN_BURST:
                        break
                    await asyncio.sleep(0.02)
                # a host opening stream after stream is told to wait
                a = await self.web("GET", "/events")
                self.assertEqual(a.status, 503)
                self.assertIn("too many live pages opened from ::1", a.text)
                self.assertEqual(a.headers["retry-after"], "2")
                # stopping the server ends every stream
                await self.service.web.stopService().asFuture(asyncio.get_event_loop())
                for s in socks:
                    s.settimeout(5)
                    data = b""
                    while True:
                        chunk = await in_thread(s.recv, 65536)
                        if not chunk:
                            break
                        data += chunk
                    self.assertIn(b"text/event-stream", data)
                self.assertEqual(self.service.web.hub.streams, [])
            finally:
                for s in socks:
                    s.close()
        return as_deferred(check())


def open_stream(port, source):
    """A raw /events stream from ``source`` (the first bytes read): a
    socket, or None when the server refused or closed it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = s.recv(200)
    return s, head


class StreamShareTests(WebTestCase):
    """The live streams shared out per host: four addresses holding eight
    streams each (every place) keep neither a fifth address nor the
    instrument's own operator out."""

    web_address = "127.0.0.1"

    def test_hosts_holding_every_stream_keep_nobody_out(self):
        async def check():
            from piccolo_twisted.web import events as ev
            port = self.service.web.listening_port
            hub = self.service.web.hub
            held = []
            try:
                for a in range(1, 5):
                    for _ in range(ev.MAX_STREAMS_PER_HOST):
                        s, head = await in_thread(open_stream, port, f"127.0.2.{a}")
                        held.append(s)
                        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
                self.assertEqual(len(hub.streams), ev.MAX_STREAMS)
                # the operator and a fifth address: the live state, at once
                for source in ("127.0.0.1", "127.0.2.5"):
                    events = await in_thread(read_events, self.http,
                                             lambda e: "control/status" in dict(e),
                                             source=source)
                    self.assertEqual(dict(events)["control/status"], "idle")
                mine = await in_thread(open_stream, port, "127.0.0.1")
                held.append(mine[0])
                self.assertTrue(mine[1].startswith(b"HTTP/1.1 200"))
                # the streams taken were the biggest holders' oldest: they
                # were ended (a browser reconnects), and none but the four
                self.assertEqual(len(hub.streams), ev.MAX_STREAMS)
                self.assertLessEqual(max(hub.shares.holding(f"127.0.2.{a}")
                                         for a in range(1, 5)), ev.MAX_STREAMS_PER_HOST)
                self.assertEqual(hub.shares.holding("127.0.0.1"), 1)
                # the four try again: refused for the pace of their openings,
                # and the operator's stream stays
                for a in range(1, 5):
                    s, head = await in_thread(open_stream, port, f"127.0.2.{a}")
                    held.append(s)
                    self.assertTrue(head.startswith(b"HTTP/1.1 503"), head)
                self.assertEqual(hub.shares.holding("127.0.0.1"), 1)
            finally:
                for s in held:
                    s.close()
        return as_deferred(check())


class DownloadTests(WebTestCase):

    def populate(self, datadir):
        run = os.path.join(datadir, "old")
        os.mkdir(run)
        for i, name in enumerate(("b000000_s000000_dark.pico", "b000000_s000000_light.pico",
                                  "b000001_s000000_light.pico")):
            with open(os.path.join(run, name), "w") as f:
                f.write(json.dumps({"Spectra": [{"Metadata": {"i": i}, "Pixels": [i] * 3000}]}))
            # a Pi without a clock: files dated 1970 (before any zip date)
            os.utime(os.path.join(run, name), (i * 100, i * 100))
        os.symlink("/etc/passwd", os.path.join(run, "b000002_s000000_light.pico"))
        with open(os.path.join(run, "notes.txt"), "w") as f:
            f.write("not a spectrum")
        outside = os.path.join(os.path.dirname(datadir), "outside")
        os.mkdir(outside)
        with open(os.path.join(outside, "b000000_s000000_light.pico"), "w") as f:
            f.write("secret")
        os.symlink(outside, os.path.join(datadir, "linked"))

    def test_one_file(self):
        async def check():
            path = os.path.join(self.datadir, "old", "b000000_s000000_light.pico")
            with open(path, "rb") as f:
                want = f.read()
            a = await self.web("GET", "/files/old/b000000_s000000_light.pico")
            self.assertEqual((a.status, a.body), (200, want))
            self.assertEqual(a.headers["content-type"], "application/json")
            self.assertNotIn("content-disposition", a.headers)
            a = await self.web("GET", "/files/old/b000000_s000000_light.pico?download=1")
            self.assertEqual(a.headers["content-disposition"],
                             "attachment; filename=\"b000000_s000000_light.pico\"; "
                             "filename*=UTF-8''b000000_s000000_light.pico")
            a = await self.web("HEAD", "/files/old/b000000_s000000_light.pico")
            self.assertEqual((a.status, a.headers["content-length"]), (200, str(len(want))))
            for path in ("/files/old/b000002_s000000_light.pico",    # a symlink
                         "/files/old/notes.txt", "/files/old/..%2Fold%2Fnotes.txt",
                         "/files/linked/b000000_s000000_light.pico",  # a symlinked run
                         "/files/..%2Foutside/b000000_s000000_light.pico",
                         "/files/.piccolo/scheduler.sqlite", "/files/nosuch/b000000_s000000_light.pico",
                         "/files/old", "/files/old/b000000_s000000_light.pico/x"):
                a = await self.web("GET", path)
                self.assertEqual(a.status, 404, path)
                self.assertNotIn(b"secret", a.body)
                self.assertNotIn(b"root:", a.body)
            self.assertEqual(self.service.web.downloads_active(), 0)
        return as_deferred(check())

    def test_run_as_zip(self):
        async def check():
            await self.put("control/record_sequence", {"run": "fresh", "nsequence": 2, "auto": -1})
            await self.wait_for("control/status", lambda s: s == "idle")
            for run in ("old", "fresh"):
                a = await self.web("GET", f"/zip/{run}")
                self.assertEqual(a.status, 200)
                self.assertEqual(a.headers["content-type"], "application/zip")
                self.assertEqual(a.headers["transfer-encoding"], "chunked")   # streamed
                self.assertIn(f'filename="{run}.zip"', a.headers["content-disposition"])
                z = zipfile.ZipFile(io.BytesIO(a.body))
                self.assertIsNone(z.testzip())
                on_disk = sorted(n for n in os.listdir(os.path.join(self.datadir, run))
                                 if n.endswith(".pico") and not os.path.islink(
                                     os.path.join(self.datadir, run, n)))
                names = z.namelist()
                self.assertEqual(sorted(names), [f"{run}/{n}" for n in on_disk])
                for n in on_disk:
                    with open(os.path.join(self.datadir, run, n), "rb") as f:
                        self.assertEqual(z.read(f"{run}/{n}"), f.read())
                if run == "old":
                    # recorded order, oldest first; 1970 dates clamped to 1980
                    self.assertEqual(names, ["old/b000000_s000000_dark.pico",
                                             "old/b000000_s000000_light.pico",
                                             "old/b000001_s000000_light.pico"])
                    self.assertEqual(z.getinfo(names[0]).date_time, (1980, 1, 1, 0, 0, 0))
            for path in ("/zip/nosuch", "/zip/linked", "/zip/..", "/zip/.piccolo", "/zip/old/x"):
                a = await self.web("GET", path)
                self.assertEqual(a.status, 404, path)
            # downloads take a thread for a moment at a time, never a slot for good
            self.assertEqual(self.service.web.downloads_active(), 0)
        return as_deferred(check())

    def test_runs_named_like_urls(self):
        """A run named "a.zip" beside a run "a", and a run literally named
        "%2e%2e": each reached by its own name, decoded once."""
        async def check():
            from urllib.parse import quote
            for run in ("a", "a.zip", "%2e%2e", "50% done"):
                os.mkdir(os.path.join(self.datadir, run))
                with open(os.path.join(self.datadir, run, "b000000_s000000_light.pico"), "w") as f:
                    f.write(json.dumps({"Spectra": [], "run": run}))
            for run in ("a", "a.zip", "%2e%2e", "50% done"):
                q = quote(run, safe="")
                a = await self.web("GET", f"/api/data_dir/runs/{q}/spectra_list")
                self.assertEqual((a.status, a.json()), (200, ["b000000_s000000_light.pico"]), run)
                a = await self.web("GET", f"/files/{q}/b000000_s000000_light.pico")
                self.assertEqual((a.status, a.json()["run"]), (200, run))
                a = await self.web("GET", f"/zip/{q}")
                self.assertEqual(a.status, 200, run)
                self.assertIn(f"filename*=UTF-8''{q}.zip", a.headers["content-disposition"])
                z = zipfile.ZipFile(io.BytesIO(a.body))
                self.assertEqual(z.namelist(), [f"{run}/b000000_s000000_light.pico"])
            # decoded once: "%252e%252e" is the run "%2e%2e", never ".."
            a = await self.web("GET", "/api/data_dir/runs/%252e%252e/name")
            self.assertEqual(a.json(), "%2e%2e")
            self.assertEqual((await self.web("GET", "/zip/a.zip.zip")).status, 404)
        return as_deferred(check())

    def test_slow_reader_is_paused_not_buffered(self):
        """A client that stops reading a large zip: the server stops
        making it (the stream is paused), instead of compressing the whole
        run into memory."""
        async def check():
            run = os.path.join(self.datadir, "big")
            os.mkdir(run)
            payload = os.urandom(600 * 1024)            # incompressible
            for i in range(40):
                with open(os.path.join(run, f"b000000_s{i:06d}_light.pico"), "wb") as f:
                    f.write(payload)
            # both ends' kernel buffers pinned (the test is not about them):
            # autotuned, they grew with the machine's speed and sysctls, the
            # stream pausing and resuming until then, so what was "full"
            # and how much had gone were the machine's
            from piccolo_twisted.web import server as web_server
            made = web_server.Channel.connectionMade

            def pinned(channel):
                channel.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
                made(channel)
            self.patch(web_server.Channel, "connectionMade", pinned)
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)   # before the handshake
            s.connect(("::1", self.service.web.listening_port))
            try:
                s.sendall(b"GET /zip/big HTTP/1.1\r\nHost: [::1]\r\n\r\n")
                web = self.service.web
                for _ in range(1000):           # the transport's buffer fills
                    streams = list(web.download_streams())
                    if streams and streams[0].paused:
                        break
                    await asyncio.sleep(0.02)
                self.assertEqual(len(streams), 1)
                self.assertTrue(streams[0].paused)
                # the kernel's buffers take a little more after each pause
                # until they are full; then nothing more is made
                sent, still = streams[0].sent, 0
                for _ in range(400):
                    await asyncio.sleep(0.05)
                    if streams[0].sent == sent and streams[0].paused and not streams[0].stepping:
                        still += 1
                        if still == 10:
                            break
                    else:
                        sent, still = streams[0].sent, 0
                self.assertEqual(still, 10)
                await asyncio.sleep(0.5)
                self.assertEqual(streams[0].sent, sent)     # and it stays paused
                # far from the 24 MB of the run: the kernel's buffers and one step
                self.assertLess(streams[0].sent, 12 * 1024 * 1024)
            finally:
                s.close()
            for _ in range(200):
                if self.service.web.downloads_active() == 0:
                    break
                await asyncio.sleep(0.02)
            self.assertEqual(self.service.web.downloads_active(), 0)
        return as_deferred(check())


class PortTests(unittest.TestCase):

    def test_web_port_in_use_is_one_line(self):
        from piccolo_twisted.service import PiccoloService
        from piccolo_twisted.config import load_instrument_config, bundled_instrument_config
        from piccolo_twisted.config import load_server_config
        taken = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        taken.bind(("::1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        settings = load_server_config()
        settings.address, settings.port = "::1", 0
        settings.datadir = self.mktemp()
        settings.web_port = taken.getsockname()[1]
        service = PiccoloService(settings, load_instrument_config(bundled_instrument_config()),
                                 configure_logging=False)
        e = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertIn(f"cannot listen on [::1]:{settings.web_port} (web page", str(e))
        self.assertIn("0 turns it off", str(e))
        self.assertEqual(len(str(e).splitlines()), 1)
        port = getattr(service.coap, "_port", None)
        return port.stopListening() if port is not None else None


class HostConfigTests(unittest.SynchronousTestCase):

    def test_web_hosts(self):
        from piccolo_twisted.config import ConfigError, load_server_config
        s = load_server_config(text="[web]\nhosts = piccolo.example.org, 192.168.4.1, [fd00::1]\n")
        self.assertEqual(s.web_hosts, ("piccolo.example.org", "192.168.4.1", "[fd00::1]"))
        self.assertEqual(load_server_config().web_hosts, ())
        e = self.assertRaises(ConfigError, load_server_config,
                              text="[web]\nhosts = piccolo.example.org, evil/x\n")
        self.assertEqual(str(e), "<string>: [web/hosts] 'evil/x' is not a host name or an "
                                 "address (e.g. piccolo.example.org, 192.168.4.1)")

    def test_split_host_and_origin(self):
        from piccolo_twisted.web.guard import same_origin, split_host
        self.assertEqual(split_host("[::1]:8080"), ("::1", 8080))
        self.assertEqual(split_host("[fe80::1%25eth0]"), ("fe80::1", None))
        self.assertEqual(split_host("Piccolo.Local.:80"), ("piccolo.local", 80))
        for bad in ("", "[::1", "a:b", "a:1:2", "[::1]x", "a:123456"):
            self.assertIsNone(split_host(bad), bad)
        self.assertTrue(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"))
        self.assertTrue(same_origin("http://piccolo.local", "piccolo.local:80"))
        for origin in ("https://127.0.0.1:8080", "http://127.0.0.1", "null",
                       "http://127.0.0.1:8080/x", "http://a@127.0.0.1:8080"):
            self.assertFalse(same_origin(origin, "127.0.0.1:8080"), origin)
