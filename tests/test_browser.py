"""The web page in a real browser: Debian's chromium, headless, driven by
Selenium through Debian's chromedriver (/usr/bin/chromedriver; Selenium
Manager is never asked, so nothing is downloaded).

What a person sees is checked: the status, a live plot that changes while
a batch records, a control that works, an abort clicked in the page
stopping the batch, a control refused by ``[access] control_from``, a file
plotted, the page on a 375x667 phone screen. Screenshots go to
$PICCOLO_SCREENSHOTS (default: a directory beside the test's data).

Skipped where chromium, chromedriver or selenium are absent; ``.ci/run``
installs them (apt: chromium chromium-driver; pip: selenium, the test
extra).
"""

import asyncio
import hashlib
import os
import shutil
import tempfile

from twisted.internet import threads
from twisted.trial import unittest

from .helpers import as_deferred
from .test_web import WebTestCase

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-proxy-server", "--disable-dev-shm-usage")
LAPTOP, PHONE = (1280, 900), (375, 667)


def missing():
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def in_thread(fn, *args, **kwargs):
    return threads.deferToThread(fn, *args, **kwargs).asFuture(asyncio.get_event_loop())


def start_browser(size, profile, flags=()):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def no_downloads(*args, **kwargs):
        raise AssertionError("Selenium Manager was asked for a driver")
    selenium_manager.SeleniumManager.binary_paths = no_downloads
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + tuple(flags):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if size == PHONE:
        # a phone's viewport (a headless window is at least 500 px wide)
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": {
            "width": size[0], "height": size[1], "pixelRatio": 2.0, "touch": True}})
    else:
        options.add_argument(f"--window-size={size[0]},{size[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    return driver


class BrowserCase(WebTestCase):
    """The server with its web page on [::1]:<ephemeral>, and chromium."""

    timeout = 120
    size = LAPTOP
    browser_flags = ()

    def setUp(self):
        why = missing()
        if why:
            raise unittest.SkipTest(why)
        os.environ.setdefault("SE_OFFLINE", "true")
        self.shots = os.environ.get("PICCOLO_SCREENSHOTS") or os.path.abspath("screenshots")
        os.makedirs(self.shots, exist_ok=True)
        d = super().setUp()
        profile = tempfile.mkdtemp(prefix="piccolo-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)

        async def browser():
            self.driver = await in_thread(start_browser, self.size, profile,
                                          self.browser_flags)
        return d.addCallback(lambda _: as_deferred(browser()))

    def tearDown(self):
        async def quit():
            driver = getattr(self, "driver", None)
            if driver is not None:
                await in_thread(driver.quit)
        return as_deferred(quit()).addBoth(lambda _: super(BrowserCase, self).tearDown())

    # -- the page as a person sees it ----------------------------------------

    async def open(self, path="/", base=None):
        await in_thread(self.driver.get, (base or self.http) + path)
        await self.until("document.readyState === 'complete' && "
                         "document.getElementById('link').textContent === 'live' && "
                         "document.querySelectorAll('#plots canvas').length > 0")

    async def js(self, script, *args):
        return await in_thread(self.driver.execute_script, script, *args)

    async def until(self, condition, timeout=30.0, what=None):
        """Wait for a JavaScript expression to be true in the page."""
        loop = asyncio.get_event_loop()
        deadline = loop.time() + timeout
        while True:
            if await self.js(f"return !!({condition});"):
                return
            if loop.time() > deadline:
                await self.shot("failed-" + self.id().rsplit(".", 1)[-1])
                raise AssertionError(f"{what or condition} never became true")
            await asyncio.sleep(0.1)

    async def text(self, element_id):
        return await self.js(f"return document.getElementById('{element_id}').textContent;")

    async def click(self, element_id):
        from selenium.webdriver.common.by import By
        element = await in_thread(self.driver.find_element, By.ID, element_id)
        await in_thread(element.click)

    async def type_into(self, element_id, text, change=True):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        element = await in_thread(self.driver.find_element, By.ID, element_id)
        await in_thread(element.click)
        await self.js("arguments[0].select();", element)      # what was there goes
        await in_thread(element.send_keys, text + (Keys.TAB if change else ""))

    async def canvas_hash(self, selector):
        data = await self.js(f"return document.querySelector({selector!r}).toDataURL();")
        return hashlib.sha256(data.encode()).hexdigest()

    async def shot(self, name, full=False):
        """A screenshot of the viewport, or with ``full`` of the whole page."""
        import base64
        path = os.path.join(self.shots, f"{name}.png")
        shot = await in_thread(self.driver.execute_cdp_cmd, "Page.captureScreenshot",
                               {"format": "png", "captureBeyondViewport": bool(full)})
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        return path

    async def console_errors(self, expected=()):
        """Errors the page met (script errors, failed loads), but the
        refusals a test provoked on purpose (``expected`` substrings)."""
        logs = await in_thread(self.driver.get_log, "browser")
        return [e for e in logs if e.get("level") == "SEVERE"
                and not any(x in e.get("message", "") for x in expected)]


class LivePageTests(BrowserCase):

    def test_live_plot_changes_during_a_batch_and_abort_stops_it(self):
        async def check():
            await self.open()
            await self.until("document.getElementById('status').textContent === 'idle'")
            await self.until("document.getElementById('progress-text').textContent === "
                             "'current run spectra'")
            self.assertTrue((await self.text("host")).startswith("Piccolo "))
            for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
                self.assertEqual(await self.js(
                    f"return document.querySelector('canvas[data-spectrometer={s}]').dataset.updates;"), "0")
                self.assertIn("nothing recorded", await self.text(f"live-{s}"))
            self.assertEqual(await self.js("return document.getElementById('b-abort').disabled;"), True)
            await self.shot("01-idle")
            # record from the page
            await self.type_into("f-run", "browser", change=False)
            await self.type_into("f-nsequence", "200", change=False)
            await self.type_into("f-delay", "0.3", change=False)
            await self.type_into("f-auto", "-1", change=False)
            await self.click("b-record")
            # the batch has only begun: "started", not "done"
            await self.until("document.getElementById('answer').textContent === 'record: started'")
            await self.until("document.getElementById('status').textContent !== 'idle'")
            self.assertEqual(await self.get("data_dir/current_run"), "browser")
            # the live plots fill and then change as the batch records
            qep = "canvas[data-spectrometer=S_sim_QEP00981]"
            flame = "canvas[data-spectrometer=S_sim_FLMT01234]"
            await self.until(f"Number(document.querySelector('{qep}').dataset.updates) >= 2 && "
                             f"Number(document.querySelector('{flame}').dataset.updates) >= 2")
            first = await self.canvas_hash(qep)
            updates = int(await self.js(f"return document.querySelector('{qep}').dataset.updates;"))
            stamp = await self.js(f"return document.querySelector('{qep}').dataset.last;")
            await self.until(f"Number(document.querySelector('{qep}').dataset.updates) > {updates + 2}"
                             f" && document.querySelector('{qep}').dataset.last !== {stamp!r}")
            await asyncio.sleep(0.3)
            self.assertNotEqual(await self.canvas_hash(qep), first)
            legend = await self.text("live-S_sim_QEP00981")
            self.assertIn("upwelling", legend)
            self.assertIn("light", legend)
            self.assertIn("dark", legend)
            self.assertRegex(await self.text("progress-text"), r"run browser, batch 0, sequence \d+ of 200")
            self.assertEqual(await self.js("return document.getElementById('b-record').disabled;"), True)
            await self.shot("02-recording")
            await self.shot("02-recording-full", full=True)
            # abort in the page: the batch stops
            await self.click("b-abort")
            await self.until("document.getElementById('status').textContent === 'idle'", timeout=10)
            self.assertEqual(await self.text("answer"), "abort: done")
            self.assertEqual(await self.get("control/status"), "idle")
            light = [n for n in os.listdir(self.run_dir("browser")) if n.endswith("_light.pico")]
            self.assertLess(len(light), 200)
            # and stays stopped
            await asyncio.sleep(1.0)
            self.assertEqual(await self.get("control/status"), "idle")
            self.assertEqual(len([n for n in os.listdir(self.run_dir("browser"))
                                  if n.endswith("_light.pico")]), len(light))
            self.assertEqual(await self.js("return document.getElementById('b-record').disabled;"), False)
            # every plot has round wavelengths to read, three at least
            for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
                self.assertGreaterEqual(int(await self.js(
                    f"return document.querySelector('canvas[data-spectrometer={s}]').dataset.xticks;")), 3)
            await self.shot("03-aborted")
            self.assertEqual(await self.console_errors(), [])
        return as_deferred(check())

    def test_files_plotted_and_downloaded(self):
        async def check():
            await self.put("control/record_sequence", {"run": "plotme", "nsequence": 2, "auto": -1})
            await self.wait_for("control/status", lambda s: s == "idle")
            await self.open()
            await self.until("document.getElementById('run-select').value === 'plotme'")
            await self.until("document.querySelectorAll('#file-list li').length === 4")
            self.assertEqual(await self.text("files-count"), "4 files")
            names = await self.js("return [...document.querySelectorAll('#file-list li')]"
                                  ".map(li => li.dataset.name);")
            self.assertEqual(names, sorted(os.listdir(self.run_dir("plotme")), reverse=True))
            await self.js("document.querySelector('#file-list li[data-name=\"b000000_s000000_light.pico\"] button').click();")
            await self.until("document.querySelectorAll('#file-plots canvas').length === 2")
            self.assertEqual(await self.js("return [...document.querySelectorAll('#file-plots figcaption')]"
                                           ".map(c => c.textContent);"),
                             # in the file's order: spectrometers sorted, as legacy (issue 21)
                             ["S_sim_FLMT01234", "S_sim_QEP00981"])
            series = await self.js("return [...document.querySelectorAll('#file-plots canvas')]"
                                   ".map(c => c.dataset.series);")
            self.assertEqual(series, ["2", "2"])     # two channels per spectrometer
            self.assertEqual(await self.text("file-name"), "plotme / b000000_s000000_light.pico")
            href = await self.js("return document.getElementById('file-download').href;")
            self.assertTrue(href.endswith("/files/plotme/b000000_s000000_light.pico?download=1"), href)
            self.assertTrue((await self.js("return document.getElementById('zip-link').href;"))
                            .endswith("/zip/plotme"))
            # the page's own links answer (fetched by the page, same origin)
            status = await in_thread(self.driver.execute_async_script,
                                     "const done = arguments[0];"
                                     "fetch(document.getElementById('zip-link').href)"
                                     ".then(r => r.arrayBuffer().then(b => done([r.status, b.byteLength])));")
            self.assertEqual(status[0], 200)
            self.assertGreater(status[1], 1000)
            await self.js("document.getElementById('files').scrollIntoView();")
            await self.shot("04-file-plot")
            # a page that does not exist
            await in_thread(self.driver.get, self.http + "/nope")
            self.assertEqual(await self.js("return document.body.textContent;"), "no such page")
        return as_deferred(check())


class PhoneTests(BrowserCase):

    size = PHONE

    def test_usable_on_a_phone(self):
        async def check():
            await self.open()
            await self.until("document.getElementById('status').textContent === 'idle'")
            # no sideways scrolling of the page; sections stacked
            self.assertEqual(await self.js("return window.innerWidth;"), PHONE[0])
            width = await self.js("return document.documentElement.scrollWidth;")
            self.assertLessEqual(width, PHONE[0])
            columns = await self.js("return getComputedStyle(document.querySelector('main'))"
                                    ".gridTemplateColumns.split(' ').length;")
            self.assertEqual(columns, 1)
            await self.shot("05-phone-idle")
            # a control that works: an integration time typed in
            await self.js("document.getElementById('spectrometers').scrollIntoView();")
            await self.type_into("t-S_sim_QEP00981-upwelling", "250")
            await self.until("document.getElementById('answer').textContent === "
                             "'S_sim_QEP00981 upwelling integration time: done'")
            self.assertEqual(await self.get("spectrometer/S_sim_QEP00981/current_time/upwelling"), 250)
            # a bad one: the server's own refusal is shown
            await self.type_into("t-S_sim_QEP00981-upwelling", "abc")
            await self.until("document.getElementById('answer').textContent.includes('refused (400)')")
            self.assertEqual(await self.text("answer"), "S_sim_QEP00981 upwelling integration time "
                                                        "refused (400): integration time must be an "
                                                        "integer, not 'abc'")
            self.assertEqual(await self.get("spectrometer/S_sim_QEP00981/current_time/upwelling"), 250)
            # the field shows what the server holds again, marked, the reason its title
            field = "document.getElementById('t-S_sim_QEP00981-upwelling')"
            await self.until(f"{field}.value === '250'")
            self.assertTrue(await self.js(f"return {field}.classList.contains('refused');"))
            self.assertIn("not 'abc'", await self.js(f"return {field}.title;"))
            # a page older than the server (restarted: a new token) still
            # controls: it takes the new token once and asks again
            self.service.web.guard.token = "after-a-restart"
            await self.type_into("t-S_sim_QEP00981-upwelling", "260")
            await self.until("document.getElementById('answer').textContent === "
                             "'S_sim_QEP00981 upwelling integration time: done'")
            self.assertEqual(await self.get("spectrometer/S_sim_QEP00981/current_time/upwelling"), 260)
            # the field follows the server's value when it changes elsewhere
            await self.put("spectrometer/S_sim_QEP00981/current_time/upwelling", 321)
            await self.js("document.activeElement.blur();")
            await self.until("document.getElementById('t-S_sim_QEP00981-upwelling').value === '321'")
            # record and watch it on the phone
            await self.put("control/record_sequence", {"run": "phone", "nsequence": 30,
                                                       "delay": 0.2, "auto": -1})
            await self.until("Number(document.querySelector('canvas[data-spectrometer=S_sim_FLMT01234]')"
                             ".dataset.updates) >= 4")
            await self.js("window.scrollTo(0, 0);")
            await asyncio.sleep(0.4)
            await self.shot("06-phone-recording")
            await self.shot("07-phone-full", full=True)
            await self.get("control/abort")
            await self.until("document.getElementById('status').textContent === 'idle'")
            self.assertEqual(await self.console_errors(
                expected=["current_time/upwelling - Failed to load resource: the server "
                          "responded with a status of 400",
                          "current_time/upwelling - Failed to load resource: the server "
                          "responded with a status of 403"]), [])
        return as_deferred(check())


class PhoneLayoutTests(BrowserCase):

    size = PHONE

    def test_everything_within_reach_on_a_phone(self):
        async def check():
            from datetime import datetime, timedelta, timezone
            later = (datetime.now(timezone.utc) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
            await self.put("control/record_sequence", {"run": "a run with a long name for later",
                                                       "nsequence": 20, "auto": 0, "delay": 1,
                                                       "at_time": later, "interval": 3600})
            await self.put("control/record_sequence", {"run": "phoneplot", "nsequence": 2,
                                                       "auto": -1})
            await self.wait_for("control/status", lambda s: s == "idle")
            await self.open()
            await self.until("document.querySelectorAll('#plots .legend tbody tr').length === 8")
            width = PHONE[0]
            # the header alone stays on screen (slim); every section's link
            # fits the width, none off to the side
            self.assertLessEqual(await self.js("return document.querySelector('.top').offsetHeight;"),
                                 0.1 * PHONE[1])
            self.assertEqual(await self.js("return getComputedStyle(document.querySelector('.tabs')).position;"),
                             "static")
            rights = await self.js("return [...document.querySelectorAll('.tabs a')]"
                                   ".map(a => a.getBoundingClientRect().right);")
            self.assertEqual(len(rights), 6)
            self.assertLessEqual(max(rights), width)
            # each spectrum's time is shown, and the legend fits the phone
            times = await self.js("return [...document.querySelectorAll('#plots td.when')]"
                                  ".filter(td => td.offsetParent !== null).map(td => td.textContent);")
            self.assertEqual(len(times), 8)
            for t in times:
                self.assertRegex(t, r"^\d\d:\d\d:\d\d$")
            self.assertEqual(await self.js(
                "return [...document.querySelectorAll('#plots .table-wrap')]"
                ".filter(w => w.scrollWidth > w.clientWidth).length;"), 0)
            for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
                self.assertGreaterEqual(int(await self.js(
                    f"return document.querySelector('canvas[data-spectrometer={s}]').dataset.xticks;")), 3)
            await self.js("document.getElementById('live').scrollIntoView();")
            await self.shot("11-phone-legend")
            # the job's buttons in reach, no sideways scrolling
            await self.until("document.querySelectorAll('#jobs tbody tr').length === 1")
            await self.js("document.getElementById('schedule').scrollIntoView();")
            buttons = await self.js("return [...document.querySelectorAll('#jobs button')]"
                                    ".map(b => b.getBoundingClientRect().right);")
            self.assertEqual(len(buttons), 2)
            self.assertLessEqual(max(buttons), width)
            self.assertEqual(await self.js("const w = document.querySelector('#schedule .table-wrap');"
                                           "return w.scrollWidth <= w.clientWidth;"), True)
            await self.shot("12-phone-jobs")
            # a file tapped: its plot comes into view
            await self.until("document.getElementById('run-select').value === 'phoneplot'")
            await self.until("document.querySelectorAll('#file-list li').length === 4")
            await self.js("document.getElementById('files').scrollIntoView();")
            await self.js("document.querySelector('#file-list li[data-name=\"b000000_s000001_light.pico\"]"
                          " button').click();")
            await self.until("document.querySelectorAll('#file-plots canvas').length === 2")
            await asyncio.sleep(0.3)
            top = await self.js("return document.querySelector('.file-plot-box').getBoundingClientRect().top;")
            self.assertGreaterEqual(top, 0)
            self.assertLess(top, PHONE[1] / 2)
            ticks = await self.js("return [...document.querySelectorAll('#file-plots canvas')]"
                                  ".map(c => Number(c.dataset.xticks));")
            self.assertTrue(all(t >= 3 for t in ticks), ticks)
            await self.shot("13-phone-file-plot")
        return as_deferred(check())


class StreamRefusedTests(BrowserCase):
    """The page opened while every live-stream place is taken, one by each
    of 32 other addresses (a fair share each, so the newcomer is refused,
    503): the page retries by itself, later each time, and is live again
    once a place is free -- without a reload."""

    address = web_address = "127.0.0.1"

    def test_the_page_recovers_after_a_refusal(self):
        async def check():
            from piccolo_twisted.web import events as ev
            from .test_web import open_stream
            port = self.service.web.listening_port
            held = []
            try:
                for i in range(ev.MAX_STREAMS):
                    sock, head = await in_thread(open_stream, port, f"127.0.8.{i + 1}")
                    held.append(sock)
                    self.assertTrue(head.startswith(b"HTTP/1.1 200"), head)
                await in_thread(self.driver.get, self.http + "/")
                await self.until("Number(document.getElementById('link').dataset.retries || 0) >= 2",
                                 what="the page retried twice")
                self.assertRegex(await self.text("link"), r"^reconnecting in \d+ s…$")
                await self.shot("14-stream-refused")
                held.pop().close()          # one place free again
                await self.until("document.getElementById('link').textContent === 'live'",
                                 timeout=40, what="live again without a reload")
                await self.until("document.getElementById('status').textContent === 'idle'")
                await self.put("control/numSequences", 17)
                await self.until("document.getElementById('f-nsequence').value === '17'")
                self.assertEqual(await self.console_errors(expected=["/events - Failed to load "
                                                                     "resource: the server responded "
                                                                     "with a status of 503"]), [])
            finally:
                for sock in held:
                    sock.close()
        return as_deferred(check())


class ReadOnlyTests(BrowserCase):
    """Control only from 127.0.0.1 (the tests' CoAP client); the browser
    comes from ::1."""

    address = "127.0.0.1"
    server_text = "[access]\ncontrol_from = 127.0.0.1\n"

    def test_refused_by_control_from(self):
        async def check():
            await self.open()
            await self.until("!document.getElementById('readonly').hidden")
            notice = await self.text("readonly")
            self.assertEqual(notice, "Read only from this device: [access] control_from "
                                     "refuses ::1")
            # every control is off, saying why
            await self.until("document.getElementById('b-record').disabled")
            states = await self.js(
                "return [...document.querySelectorAll('#control button, #control input, #specs input')]"
                ".map(n => [n.id, n.disabled, n.title]);")
            self.assertGreater(len(states), 10)
            for node_id, disabled, title in states:
                self.assertTrue(disabled, node_id)
                self.assertEqual(title, "read only: [access] control_from refuses ::1", node_id)
            # and what the page would send is refused all the same
            answer = await in_thread(self.driver.execute_async_script, """
                const done = arguments[arguments.length - 1];
                api("PUT", "control/record_sequence", {}).then(r => done([r.status, r.text]));""")
            self.assertEqual(answer, [403, "[access] control_from refuses ::1"])
            self.assertEqual(await self.get("control/status"), "idle")
            # what it may still do: watch a batch someone else started
            await self.put("control/record_sequence", {"run": "other", "nsequence": 2, "auto": -1})
            await self.until("Number(document.querySelector('canvas[data-spectrometer=S_sim_QEP00981]')"
                             ".dataset.updates) >= 1")
            self.assertTrue(await self.js("return document.getElementById('b-abort').disabled;"))
            await self.js("document.getElementById('control').scrollIntoView();")
            await self.shot("08-read-only")
        return as_deferred(check())


class RebindingTests(BrowserCase):
    """DNS rebinding as a browser lives it: chromium resolves evil.example
    (the attacker's name) and piccolo.test (a name in [web] hosts) to the
    instrument's address, 127.0.0.1."""

    address = web_address = "127.0.0.1"
    server_text = "[web]\nhosts = piccolo.test\n"
    browser_flags = ("--host-resolver-rules=MAP evil.example 127.0.0.1, "
                     "MAP piccolo.test 127.0.0.1",)

    def test_a_rebound_page_gets_nothing(self):
        async def check():
            port = self.service.web.listening_port
            token = self.service.web.guard.token
            await self.put("control/record_sequence", {"run": "rebound", "nsequence": 400,
                                                       "delay": 0.2, "auto": -1})
            await self.wait_for("control/status", lambda s: s != "idle")
            # the attacker's page, its name now pointing at the instrument
            await in_thread(self.driver.get, f"http://evil.example:{port}/")
            self.assertIn("DNS rebinding", await self.js("return document.body.textContent;"))
            # its script: read the token, then abort with it (and with the
            # real token, as if it had leaked)
            answers = await in_thread(self.driver.execute_async_script, """
                const done = arguments[arguments.length - 1];
                (async () => {
                  const t = await fetch('/token', {cache: 'no-store'});
                  const stolen = await t.text();
                  const out = [t.status, stolen.length];
                  for (const tok of [stolen, arguments[0]]) {
                    const r = await fetch('/api/control/abort',
                                          {method: 'POST', headers: {'X-Piccolo-Token': tok}});
                    out.push(r.status);
                  }
                  const s = await fetch('/api/control/status');
                  out.push(s.status);
                  return out;
                })().then(done, e => done(String(e)));""", token)
            self.assertEqual(answers[0], 421)
            self.assertEqual(answers[2:], [421, 421, 421])
            await asyncio.sleep(0.5)
            self.assertNotEqual(await self.get("control/status"), "idle")
            await self.shot("10-rebinding-refused")
            # the instrument under a name it was given: the page works
            await self.open(base=f"http://piccolo.test:{port}")
            await self.until("document.getElementById('status').textContent !== 'idle'")
            await self.click("b-abort")
            await self.until("document.getElementById('status').textContent === 'idle'",
                             timeout=10)
            self.assertEqual(await self.get("control/status"), "idle")
        return as_deferred(check())
