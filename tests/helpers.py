"""Test helpers: a live server on a loopback port, and aiocoap as client.

Wire tests need the asyncio reactor (aiocoap runs on asyncio): pytest gets
it from setup.cfg (``--reactor=asyncio``), trial from ``--reactor=asyncio``.
Without it the wire tests skip and say why.
"""

import asyncio
import json
import os
import shutil
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from piccolo_twisted.config import (bundled_instrument_config, load_instrument_config,
                                    load_server_config)

TIME_SCALE = 0.05      # simulated integrations run 20x faster in tests


def asyncio_reactor():
    from twisted.internet import asyncioreactor
    return isinstance(reactor, asyncioreactor.AsyncioSelectorReactor)


def as_deferred(coro):
    return defer.Deferred.fromFuture(asyncio.ensure_future(coro))


def make_service(datadir, instrument_text=None, port=0, address="::1",
                 time_scale=TIME_SCALE, clock=None, server_text=None, web_port=0):
    from piccolo_twisted.service import PiccoloService
    settings = load_server_config(text=server_text) if server_text else load_server_config()
    settings.address = address
    settings.port = port
    settings.datadir = datadir
    # the web page only where a test asks for it (an ephemeral port then:
    # web_port=None); never the default 8080 that parallel tests share
    settings.web_port = web_port
    if instrument_text is None:
        instrument = load_instrument_config(bundled_instrument_config())
    else:
        instrument = load_instrument_config(text=instrument_text)
    service = PiccoloService(settings, instrument, clock=clock,
                             configure_logging=False, time_scale=time_scale)
    # tests never set the machine's clock or mount anything for real
    service.sysinfo._run = fake_command
    service.datadir._run = fake_command
    return service


def make_ssh_key(path):
    """A private ed25519 key written to ``path`` (0600, as ssh keeps one)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.conch.ssh import keys
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(key.toString("openssh"))
    os.chmod(path, 0o600)
    return key


def fake_command(argv):
    """Stands in for sudo date/mount: succeeds, or fails like sudo would."""
    return defer.succeed((b"", b"", 0))


class ServerTestCase(unittest.TestCase):
    """Starts the whole server on [::1]:<ephemeral> with a temporary data
    directory for each test, and an aiocoap client context."""

    instrument_text = None
    server_text = None
    time_scale = TIME_SCALE
    address = "::1"             # CoAP
    web_address = None          # the web page's address: None, no web page
    timeout = 60

    def setUp(self):
        if not asyncio_reactor():
            raise unittest.SkipTest("wire tests need --reactor=asyncio (aiocoap)")
        # the data directory inside a private parent: a test can check that
        # nothing appeared beside it without other processes' files in /tmp
        parent = tempfile.mkdtemp(prefix="piccolo-test-")
        self.addCleanup(shutil.rmtree, parent, True)
        self.datadir = os.path.join(parent, "data")
        os.mkdir(self.datadir)
        self.populate(self.datadir)
        self.service = make_service(self.datadir, self.instrument_text,
                                    time_scale=self.time_scale,
                                    server_text=self.server_text,
                                    address=self.address)
        if self.web_address is not None:
            # the web page on an ephemeral port
            self.service.add_web(0, address=self.web_address)
        self.service.privilegedStartService()
        self.service.startService()
        self.port = self.service.coap._port.getHost().port
        host = f"[{self.address}]" if ":" in self.address else self.address
        self.base = f"coap://{host}:{self.port}"
        if self.service.web is not None:
            wport = self.service.web.listening_port
            whost = f"[{self.web_address}]" if ":" in self.web_address else self.web_address
            self.http = f"http://{whost}:{wport}"
        return as_deferred(self._client()).addCallback(lambda _: self.wait_connected())

    async def _client(self):
        import aiocoap
        self.ctx = await aiocoap.Context.create_client_context()

    def populate(self, datadir):
        """Put data in the data directory before the server starts."""

    def wait_connected(self, timeout=10.0):
        from piccolo_twisted.instrument.spectrometer import CONNECTED

        async def wait():
            for _ in range(int(timeout / 0.02)):
                if all(s.status.value in CONNECTED
                       for s in self.service.instrument.spectrometers):
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("spectrometers did not connect")
        return as_deferred(wait())

    def tearDown(self):
        async def close():
            await self.ctx.shutdown()
        d = as_deferred(close())
        d.addCallback(lambda _: self.service.stopService())
        return d

    # -- requests ---------------------------------------------------------

    async def request(self, method, path, payload=None, raw=None, timeout=10, **opts):
        import aiocoap
        code = getattr(aiocoap, method)
        if raw is None:
            raw = b"" if payload is None else json.dumps(payload).encode()
        msg = aiocoap.Message(code=code, uri=f"{self.base}/{path}", payload=raw, **opts)
        return await asyncio.wait_for(self.ctx.request(msg).response, timeout)

    async def get(self, path, **kw):
        r = await self.request("GET", path, **kw)
        if not r.code.is_successful():
            raise AssertionError(f"GET {path}: {r.code} {r.payload!r}")
        return json.loads(r.payload) if r.payload else None

    async def put(self, path, payload=None, **kw):
        r = await self.request("PUT", path, payload, **kw)
        if not r.code.is_successful():
            raise AssertionError(f"PUT {path}: {r.code} {r.payload!r}")
        return json.loads(r.payload) if r.payload else None

    async def wait_for(self, path, predicate, timeout=20.0, interval=0.05):
        value = None
        for _ in range(int(timeout / interval)):
            value = await self.get(path)
            if predicate(value):
                return value
            await asyncio.sleep(interval)
        raise AssertionError(f"{path} stayed {value!r}")

    def run_dir(self, run):
        return os.path.join(self.datadir, run)

    def load_run(self, run):
        """Every file of ``run``'s directory, parsed: {name: json}."""
        files = {}
        for name in sorted(os.listdir(self.run_dir(run))):
            with open(os.path.join(self.run_dir(run), name)) as f:
                files[name] = json.load(f)
        return files

    def disk_full_at(self, marker):
        """From now on writing a .pico file whose name holds ``marker``
        fails as a full disk (ENOSPC); every other file is written."""
        import errno
        from piccolo_twisted.acquisition import pico
        real = pico.write_atomic

        def full(directory, name, data, clobber=False, fsync=None):
            if marker in name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(directory, name, data, clobber)
        self.patch(pico, "write_atomic", full)

    async def observe_changes(self, path, n, action, timeout=5):
        """Observe ``path``, run ``action()``, return the next ``n`` values."""
        import aiocoap
        msg = aiocoap.Message(code=aiocoap.GET, uri=f"{self.base}/{path}", observe=0)
        req = self.ctx.request(msg)
        first = await asyncio.wait_for(req.response, timeout)
        self.assertIsNotNone(first.opt.observe)
        seen = []

        async def collect():
            async for note in req.observation:
                seen.append(json.loads(note.payload))
                if len(seen) == n:
                    return
        task = asyncio.ensure_future(collect())
        await action()
        await asyncio.wait_for(task, timeout)
        req.observation.cancel()
        return json.loads(first.payload), seen
