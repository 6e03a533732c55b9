"""The emulated devices at the USB level, against their protocols (bytes as
Ocean Insight's data sheets describe them, not as the driver uses them),
and the network: listing and opening emulated devices sends nothing
anywhere but loopback, and pyseabreeze's multicast discovery never runs."""

import ipaddress
import socket
import struct
import time

import usb.core
from twisted.trial import unittest

from piccolo_twisted.config import ConfigError, load_server_config
from piccolo_twisted.instrument import usb_emulator
from piccolo_twisted.instrument.usb_emulator import bus, detector, ooi
from piccolo_twisted.instrument.simulator import Optics

_serials = iter(range(1, 100000))


def obp(msg_type, data=b"", flags=0x04, version=0x1100, checksum_type=0,
        footer=0xC2C3C4C5, checksum=None):
    """An OBP request built from the data sheet's layout."""
    header = struct.pack("<HHHHLL6sBB16sL", 0xC0C1, version, flags, 0, msg_type,
                         0, bytes(6), checksum_type, len(data), data, 20)
    if checksum is None:
        checksum = bytes(16)
    return header + struct.pack("<16sL", checksum, footer)


def parse(reply):
    (start, version, flags, error, msg_type, regarding, _, _, imm_len, imm,
     remaining) = struct.unpack_from("<HHHHLL6sBB16sL", reply)
    payload = imm[:imm_len] if imm_len else reply[44:-20]
    footer = struct.unpack_from("<L", reply, len(reply) - 4)[0]
    return dict(start=start, version=version, flags=flags, error=error,
                type=msg_type, payload=payload, remaining=remaining, footer=footer)


class EmulatorCase(unittest.SynchronousTestCase):

    def plug(self, model, time_scale=0.05):
        device = usb_emulator.add_device(model, f"E{next(_serials)}", Optics(),
                                         time_scale=time_scale)
        self.addCleanup(usb_emulator.remove_device, device)
        found = usb.core.find(backend=usb_emulator.BUS, address=device.address)
        found.set_configuration()
        self.addCleanup(usb.util.dispose_resources, found)
        return device, found


class DescriptorTests(EmulatorCase):

    def test_enumeration_and_endpoints(self):
        q, qdev = self.plug("QEPRO")
        u, udev = self.plug("USB2000PLUS")
        self.assertEqual((qdev.idVendor, qdev.idProduct), (0x2457, 0x4004))
        self.assertEqual((udev.idVendor, udev.idProduct), (0x2457, 0x101E))
        eps = {e.bEndpointAddress for e in udev.get_active_configuration()[(0, 0)]}
        self.assertEqual(eps, {0x01, 0x02, 0x81, 0x82, 0x86})
        u.unplug()
        addresses = [d.address for d in usb.core.find(find_all=True,
                                                      backend=usb_emulator.BUS)]
        self.assertNotIn(u.address, addresses)
        self.assertRaises(usb.core.USBError, udev.write, 0x01, b"\x01")
        old = u.address
        u.replug()
        self.assertNotEqual(u.address, old)    # a new device to the host
        self.assertIn(u.address, [d.address for d in usb.core.find(
            find_all=True, backend=usb_emulator.BUS)])


class OBPTests(EmulatorCase):

    def exchange(self, dev, message, size=64):
        dev.write(0x01, message)
        return parse(bytes(dev.read(0x81, size, timeout=200)))

    def test_query_and_ack(self):
        q, dev = self.plug("QEPRO")
        r = self.exchange(dev, obp(0x00000100, flags=0))
        self.assertEqual((r["start"], r["version"], r["footer"]),
                         (0xC0C1, 0x1100, 0xC2C3C4C5))
        self.assertEqual(r["payload"], q.serial.encode())
        self.assertTrue(r["flags"] & 0x01)
        r = self.exchange(dev, obp(0x00110010, struct.pack("<L", 20000)))
        self.assertEqual(r["flags"] & 0x0A, 0x02)               # ACK, no NACK
        r = self.exchange(dev, obp(0x00110000, flags=0))
        self.assertEqual(struct.unpack("<L", r["payload"])[0], 20000)

    def test_errors(self):
        q, dev = self.plug("QEPRO")
        cases = [
            (obp(0x00ABCDEF), 2),                                # unknown type
            (obp(0x00110010, b"\x01"), 5),                       # wrong length
            (obp(0x00110010, struct.pack("<L", 10)), 6),          # below 8 ms
            (obp(0x00000100, version=0x1000), 1),                # protocol
            (obp(0x00000100, checksum_type=1,
                 checksum=b"\xff" * 16), 3),                     # bad MD5
            (obp(0x00000100, checksum_type=7), 8),               # checksum type
            (obp(0x00180101, b"\x09"), 12),                      # no such coefficient
        ]
        for message, code in cases:
            r = self.exchange(dev, message)
            self.assertTrue(r["flags"] & 0x08, f"no NACK for error {code}")
            self.assertEqual(r["error"], code)
        # a correct MD5 is accepted
        m = obp(0x00000100, flags=0, checksum_type=1)
        good = obp(0x00000100, flags=0, checksum_type=1,
                   checksum=__import__("hashlib").md5(m[:-20]).digest())
        self.assertEqual(self.exchange(dev, good)["payload"], q.serial.encode())
        # garbage that is not OBP at all
        r = self.exchange(dev, b"\x00" * 64)
        self.assertEqual(r["error"], 1)

    def spectrum(self, dev):
        dev.write(0x01, obp(0x00100928, flags=0))
        first = bytes(dev.read(0x81, 64, timeout=2000))
        rest = parse(first)["remaining"] - 20
        body = first + bytes(dev.read(0x81, rest, timeout=2000))
        r = parse(body)
        count, ticks, micros = struct.unpack_from("<LQL", r["payload"])
        self.assertEqual(len(r["payload"]), 32 + 4 * 1044)
        return count, ticks, micros

    def test_buffer_depth_and_clearing(self):
        q, dev = self.plug("QEPRO", time_scale=0.01)
        self.exchange(dev, obp(0x00100832, struct.pack("<L", 5)))   # depth 5
        self.exchange(dev, obp(0x00110010, struct.pack("<L", 8000)))
        time.sleep(0.2)                      # dozens of integrations: 5 kept
        n = self.exchange(dev, obp(0x00100900, flags=0))
        self.assertEqual(struct.unpack("<L", n["payload"])[0], 5)
        counts = [self.spectrum(dev)[0] for _ in range(5)]
        self.assertEqual(counts, sorted(counts))
        # full buffer: the oldest were kept, newer ones dropped
        self.assertGreater(q.detector.count - counts[-1], 5)
        self.exchange(dev, obp(0x00100830))                          # clear
        n = self.exchange(dev, obp(0x00100900, flags=0))
        self.assertLessEqual(struct.unpack("<L", n["payload"])[0], 1)
        # metadata carries the time each was integrated at
        self.exchange(dev, obp(0x00100000))                          # abort
        self.exchange(dev, obp(0x00100830))
        self.exchange(dev, obp(0x00110010, struct.pack("<L", 50000)))
        self.exchange(dev, obp(0x00100902))                          # start
        self.assertEqual(self.spectrum(dev)[2], 50000)

    def test_a_read_shorter_than_the_packet_overflows(self):
        """Packet semantics: a read shorter than the packet is an overflow."""
        q, dev = self.plug("QEPRO")
        dev.write(0x01, obp(0x00000100, flags=0))
        self.assertRaises(usb.core.USBError, dev.read, 0x81, 10, 200)


class OOITests(EmulatorCase):

    def test_eeprom_status_register(self):
        u, dev = self.plug("USB2000PLUS")
        dev.write(0x01, b"\x01")
        dev.write(0x01, b"\x05\x00")
        r = bytes(dev.read(0x81, 17, timeout=200))
        self.assertEqual(r[:2], b"\x05\x00")
        self.assertEqual(r[2:].split(b"\0")[0].decode(), u.serial)
        dev.write(0x01, b"\x05\x01")
        r = bytes(dev.read(0x81, 17, timeout=200))
        self.assertAlmostEqual(float(r[2:].split(b"\0")[0]), 339.6, places=3)
        dev.write(0x01, struct.pack("<BI", 0x02, 5000))
        dev.write(0x01, b"\xfe")
        status = struct.unpack("<HLBBBBBBBBBB", bytes(dev.read(0x81, 16, timeout=200)))
        self.assertEqual((status[0], status[1], status[10]), (2048, 5000, 0x80))
        dev.write(0x01, b"\x6b\x04")
        reg, version = struct.unpack("<BH", bytes(dev.read(0x81, 3, timeout=200)))
        self.assertEqual((reg, version >> 12), (0x04, 2))

    def test_unknown_or_malformed_commands_get_no_answer(self):
        u, dev = self.plug("USB2000PLUS")
        for command in (b"\x77", b"\x05", b"\x02\x00\x00", b"\x09\x00"):
            dev.write(0x01, command)
            self.assertRaises(usb.core.USBTimeoutError, dev.read, 0x81, 17, 30)
            self.assertRaises(usb.core.USBTimeoutError, dev.read, 0x82, 4097, 30)

    def test_spectrum_and_integration_time_from_the_next_integration(self):
        """A spectrum request is answered with the integration in progress
        when it arrives; a new integration time applies from the next one.
        The emulator's clock is held while the host sends its two commands,
        so they arrive in the middle of a 200 ms integration whatever the
        load on the host (on the host's clock they once had 40 ms)."""
        clock = HeldClock()
        for module in (bus, detector, ooi):
            self.patch(module, "time", clock)
        u, dev = self.plug("USB2000PLUS", time_scale=0.2)
        dev.write(0x01, struct.pack("<BI", 0x02, 200000))
        time.sleep(0.03)            # the 100 ms (20 ms here) one in progress ends
        dev.write(0x01, b"\x09")
        with u.cond:
            (end, _, _), = u.pending
        # device time stands still from the end of that integration (when
        # it is transmitted) and moves on only half-way through the next
        # before the host's two commands
        clock.hold_at(end)
        dev.read(0x82, 4097, timeout=2000)
        self.assertEqual((clock.held, u.sent[-1].micros), (end, 200000))
        clock.held += u.detector.seconds(200000) / 2
        dev.write(0x01, struct.pack("<BI", 0x02, 1000))
        dev.write(0x01, b"\x09")
        clock.release()
        data = bytes(dev.read(0x82, 4097, timeout=2000))
        self.assertEqual((len(data), data[-1]), (4097, 0x69))
        self.assertEqual(u.sent[-1].micros, 200000)   # begun before the change
        self.assertEqual(u.sent[-1].start, end)
        dev.write(0x01, b"\x09")
        dev.read(0x82, 4097, timeout=2000)
        self.assertEqual(u.sent[-1].micros, 1000)


class HeldClock:
    """``time`` for the emulator's modules: the host's monotonic clock,
    except that it can be made to stop at a device instant (as if the host
    did what it does next in no time at all) and go on from there."""

    def __init__(self):
        self.offset = 0.0
        self.held = None
        self._hold_at = None

    def hold_at(self, when):
        self._hold_at = when

    def release(self):
        self.offset = self.held - time.monotonic()
        self.held = self._hold_at = None

    def monotonic(self):
        if self.held is not None:
            return self.held
        now = time.monotonic() + self.offset
        if self._hold_at is not None and now >= self._hold_at:
            self.held = now = self._hold_at
        return now

    def __getattr__(self, name):
        return getattr(time, name)


class ConfigTests(unittest.SynchronousTestCase):

    def test_seabreeze_section(self):
        s = load_server_config(text="[seabreeze]\nemulate = QEPRO:QEP01234, "
                               "USB2000PLUS:FLMT05678\n")
        self.assertEqual(s.emulate, [("QEPRO", "QEP01234"), ("USB2000PLUS", "FLMT05678")])
        self.assertIsNone(load_server_config().seabreeze_backend)
        self.assertEqual(load_server_config(
            text="[seabreeze]\nbackend = cseabreeze\n").seabreeze_backend, "cseabreeze")
        for bad in ("emulate = QEPRO", "emulate = HR4000:X1", "backend = libusb",
                    "emulate = QEPRO:A, USB2000PLUS:A",
                    "backend = cseabreeze\nemulate = QEPRO:Q1"):
            e = self.assertRaises(ConfigError, load_server_config,
                                  text=f"[seabreeze]\n{bad}\n")
            self.assertIn("seabreeze", str(e))
            self.assertNotIn("\n", str(e))


    def test_simulator_serials_are_not_emulated(self):
        """A ``sim_``/``dummy_`` serial names the simulator in the
        instrument config: emulating one would silently run the simulator
        in its place."""
        for serial in ("sim_QEP00981", "dummy_FLMT1"):
            e = self.assertRaises(ConfigError, load_server_config,
                                  text=f"[seabreeze]\nemulate = QEPRO:{serial}\n")
            self.assertIn(serial, str(e))
            self.assertNotIn("\n", str(e))

    def test_configured_serial_not_emulated_is_one_line(self):
        """Under emulation the emulated bus is the only one seabreeze sees:
        a spectrometer of the instrument config that is not emulated can
        never connect. That is a config error at start, not a server
        retrying every 5 s for ever."""
        import os
        import tempfile
        from piccolo_twisted import tap
        d = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, d, True)
        cfg, inst = os.path.join(d, "rehearse.cfg"), os.path.join(d, "rehearse.config")
        with open(inst, "w") as f:
            f.write("[channels]\n  [[shutter_1]]\n    direction = upwelling\n"
                    "[spectrometers]\n  [[QEP01234]]\n  [[FLMT05678]]\n"
                    "  [[sim_QEP00981]]\n")
        with open(cfg, "w") as f:
            f.write("[seabreeze]\nemulate = QEPRO:QEP01234\n")
        args = ["-c", cfg, "-i", inst, "-o", os.path.join(d, "data")]
        e = self.assertRaises(SystemExit, tap.Options().parseOptions, args)
        err = str(e)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("twistd piccolo: "), err)
        for word in ("FLMT05678", "emulate"):
            self.assertIn(word, err)
        self.assertNotIn("QEP01234 ", err)
        # emulating both (the simulated one needs nothing) starts
        with open(cfg, "w") as f:
            f.write("[seabreeze]\nemulate = QEPRO:QEP01234, USB2000PLUS:FLMT05678\n")
        options = tap.Options()
        options.parseOptions(args)
        self.assertEqual(options.settings.emulate,
                         [("QEPRO", "QEP01234"), ("USB2000PLUS", "FLMT05678")])


class NoTrafficTests(unittest.SynchronousTestCase):
    """Every socket destination while listing and opening emulated devices
    is recorded; none may be outside loopback."""

    def record(self):
        destinations = []
        for name in ("connect", "connect_ex", "sendto", "sendmsg"):
            original = getattr(socket.socket, name)

            def recording(sock, *args, _original=original, _name=name):
                address = args[-1] if _name == "sendto" else args[0] if args else None
                if _name == "sendmsg":
                    address = args[3] if len(args) > 3 else None
                destinations.append(address)
                return _original(sock, *args)
            self.patch(socket.socket, name, recording)
        return destinations

    @staticmethod
    def loopback(address):
        if address is None or isinstance(address, (str, bytes)):
            return True                       # unix sockets
        return ipaddress.ip_address(address[0].split("%")[0]).is_loopback

    def test_listing_and_opening_emulated_devices(self):
        from piccolo_twisted.instrument.seabreeze_driver import SeabreezeDevice, list_devices
        q = usb_emulator.add_device("QEPRO", f"N{next(_serials)}", Optics(), 0.05)
        self.addCleanup(usb_emulator.remove_device, q)
        destinations = self.record()
        self.assertIn(("QEPRO", q.serial), list_devices())
        dev = SeabreezeDevice(q.serial)
        dev.open()
        dev.close()
        self.assertEqual([d for d in destinations if not self.loopback(d)], [])

    def test_the_recorder_sees_pyseabreeze_discovery(self):
        """The check above can fail: pyseabreeze's own discovery, run with
        the recorder in place, is caught sending to 239.239.239.239."""
        usb_emulator.install()
        destinations = self.record()
        self.patch(socket.socket, "setsockopt", lambda *a: None)

        def refuse(sock, data, address):
            destinations.append(address)
            raise OSError("test: not sent")
        self.patch(socket.socket, "sendto", refuse)
        from seabreeze.pyseabreeze.transport import IPv4Transport
        discover = usb_emulator.original_discovery.__get__(None, IPv4Transport)
        self.assertRaises(OSError, list, discover())
        self.assertEqual(destinations, [("239.239.239.239", 57357)])
        self.assertFalse(self.loopback(destinations[0]))
