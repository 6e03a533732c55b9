"""The emulated USB bus: a pyusb backend (``usb.backend.IBackend``).

Devices appear in enumeration with their descriptors (vendor, product,
one configuration, one interface, bulk endpoints); bulk transfers go to the
device's protocol model. Transfers are packet-based like USB: a device
queues whole messages on an IN endpoint, split into packets of the
endpoint's ``wMaxPacketSize``; a read takes packets until it has the size
asked for or a short packet ends the transfer, and a packet larger than
what is left of the buffer is an overflow (as libusb reports it).

Errors are raised as libusb reports them through pyusb: a vanished device
is ``USBError`` errno ENODEV (LIBUSB_ERROR_NO_DEVICE), a read nobody answers
is ``USBTimeoutError`` after its timeout, an injected transfer error is
LIBUSB_ERROR_IO.
"""

import errno
import itertools
import threading
import time
from collections import deque
from types import SimpleNamespace

import usb.backend
import usb.core

LIBUSB_ERROR_IO = -1
LIBUSB_ERROR_NO_DEVICE = -4
LIBUSB_ERROR_TIMEOUT = -7
LIBUSB_ERROR_OVERFLOW = -8

#: addresses are never reused, on any bus of this process: a re-plugged
#: device is a new device to pyusb and to pyseabreeze's instance registry
_addresses = itertools.count(2)

#: how often a blocked read looks at whether its device has gone
POLL = 0.02


def no_device():
    return usb.core.USBError("No such device (it may have been disconnected)",
                             LIBUSB_ERROR_NO_DEVICE, errno.ENODEV)


def io_error():
    return usb.core.USBError("Input/Output Error", LIBUSB_ERROR_IO, errno.EIO)


def timeout_error():
    return usb.core.USBTimeoutError("Operation timed out", LIBUSB_ERROR_TIMEOUT,
                                    errno.ETIMEDOUT)


class Endpoint:
    """One bulk endpoint and, for IN endpoints, its queue of packets."""

    def __init__(self, address, max_packet):
        self.address = address
        self.max_packet = max_packet
        self.packets = deque()

    @property
    def is_in(self):
        return bool(self.address & 0x80)

    def queue(self, data):
        """Queue one message as packets: full ones, the last one short
        unless the message is a multiple of the packet size (no
        zero-length packet: a read of more than that waits for more)."""
        data = bytes(data)
        size = self.max_packet
        for i in range(0, len(data), size):
            self.packets.append(data[i:i + size])

    def descriptor(self):
        return SimpleNamespace(bLength=7, bDescriptorType=5,
                               bEndpointAddress=self.address, bmAttributes=2,
                               wMaxPacketSize=self.max_packet, bInterval=0,
                               bRefresh=0, bSynchAddress=0, extra_descriptors=[])


class EmulatedDevice:
    """What every emulated device shares: descriptors, endpoints, plugging,
    faults. Subclasses implement ``handle_write(ep, data)`` and produce
    replies with ``reply(ep, data)`` or ``reply_at(ep, when, producer)``."""

    vendor_id = 0x2457
    product_id = None
    bcd_device = 0x0200
    endpoints = ()               # (address, wMaxPacketSize)

    def __init__(self, serial):
        self.serial = serial
        self.cond = threading.Condition()
        self.eps = {a: Endpoint(a, size) for a, size in self.endpoints}
        self.bus = None
        self.address = next(_addresses)
        self.plugged = True
        self.generation = 0           # bumped by every unplug
        self.pending = []             # (ready monotonic, ep, producer)
        # fault switches (set from any thread)
        self.fail_in_reads = None     # the n-th IN transfer from now fails
        self.stall_next_read = False  # the next IN transfer is never answered
        #: seconds every IN transfer takes to reach the host after the
        #: device has its data (a loaded host, a hub): the host learns late
        self.answer_delay = 0.0
        self.transfers = 0            # bulk transfers seen (for tests)
        self.sent = deque(maxlen=64)  # exposures transmitted (ground truth)
        self.last_counts = None       # raw counts of the last one transmitted

    @property
    def fail_next_read(self):
        return self.fail_in_reads == 1

    @fail_next_read.setter
    def fail_next_read(self, value):
        """The next IN transfer breaks off mid-read (LIBUSB_ERROR_IO)."""
        self.fail_in_reads = 1 if value else None

    # -- plugging ---------------------------------------------------------

    def unplug(self):
        """The device vanishes: transfers in flight fail, enumeration no
        longer lists it."""
        with self.cond:
            self.plugged = False
            self.generation += 1
            self._reset_io()
            self.cond.notify_all()

    def replug(self):
        """The device comes back, powered up afresh, at a new address."""
        with self.cond:
            self.address = next(_addresses)
            self.plugged = True
            self.power_up()
            self.cond.notify_all()

    def power_up(self):
        """Device state at power-on (subclasses extend)."""

    def _reset_io(self):
        self.pending = []
        for ep in self.eps.values():
            ep.packets.clear()

    # -- descriptors ------------------------------------------------------

    def device_descriptor(self):
        return SimpleNamespace(
            bLength=18, bDescriptorType=1, bcdUSB=0x0200, bDeviceClass=0xFF,
            bDeviceSubClass=0, bDeviceProtocol=0, bMaxPacketSize0=64,
            idVendor=self.vendor_id, idProduct=self.product_id,
            bcdDevice=self.bcd_device, iManufacturer=0, iProduct=0,
            iSerialNumber=0, bNumConfigurations=1, address=self.address,
            bus=self.bus.number if self.bus else 1, port_number=None,
            port_numbers=None, speed=3)

    def config_descriptor(self):
        return SimpleNamespace(
            bLength=9, bDescriptorType=2,
            wTotalLength=9 + 9 + 7 * len(self.eps), bNumInterfaces=1,
            bConfigurationValue=1, iConfiguration=0, bmAttributes=0x80,
            bMaxPower=250, extra_descriptors=[])

    def interface_descriptor(self):
        return SimpleNamespace(
            bLength=9, bDescriptorType=4, bInterfaceNumber=0,
            bAlternateSetting=0, bNumEndpoints=len(self.eps),
            bInterfaceClass=0xFF, bInterfaceSubClass=0, bInterfaceProtocol=0,
            iInterface=0, extra_descriptors=[])

    # -- transfers (called by the backend, holding nothing) ----------------

    def reply(self, ep, data):
        """Queue a reply now (caller holds ``cond``)."""
        self.eps[ep].queue(data)
        self.cond.notify_all()

    def reply_at(self, ep, when, producer):
        """Queue ``producer()``'s bytes at monotonic time ``when``; a
        producer may return None to be asked again later (it then sets a
        new time with ``self.retry_at``)."""
        self.pending.append([when, ep, producer])
        self.cond.notify_all()

    def _run_pending(self, now):
        keep = []
        for item in self.pending:
            when, ep, producer = item
            if when <= now:
                result = producer()
                if result is None:           # not ready: it re-armed itself
                    item[0] = self.retry_when(now)
                    keep.append(item)
                else:
                    self.eps[ep].queue(result)
            else:
                keep.append(item)
        self.pending = keep

    def retry_when(self, now):
        return now + POLL

    def write(self, generation, ep, data):
        with self.cond:
            self._check(generation)
            if ep not in self.eps or self.eps[ep].is_in:
                raise usb.core.USBError("Pipe error", -9, errno.EPIPE)
            self.transfers += 1
            self.handle_write(ep, bytes(data))
            return len(data)

    def read(self, generation, ep, buff, timeout_ms):
        """A bulk IN transfer into ``buff`` (an array); returns the count."""
        deadline = None if not timeout_ms else time.monotonic() + timeout_ms / 1000.0
        size = len(buff) * buff.itemsize
        out = bytearray()
        with self.cond:
            self._check(generation)
            if ep not in self.eps or not self.eps[ep].is_in:
                raise usb.core.USBError("Pipe error", -9, errno.EPIPE)
            self.transfers += 1
            endpoint = self.eps[ep]
            if self.stall_next_read:
                self.stall_next_read = False
                endpoint.packets.clear()
                self.pending = [p for p in self.pending if p[1] != ep]
            done = False
            while True:
                self._check(generation)
                self._run_pending(time.monotonic())
                while endpoint.packets and len(out) < size:
                    packet = endpoint.packets.popleft()
                    if len(out) + len(packet) > size:
                        raise usb.core.USBError("Overflow", LIBUSB_ERROR_OVERFLOW,
                                                errno.EOVERFLOW)
                    out += packet
                    if len(packet) < endpoint.max_packet:
                        done = True             # a short packet ends it
                        break
                if done or len(out) >= size:
                    break
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise timeout_error()
                wake = [p[0] for p in self.pending] + [now + POLL]
                if deadline is not None:
                    wake.append(deadline)
                self.cond.wait(max(0.0, min(wake) - now))
            if self.fail_in_reads is not None:
                self.fail_in_reads -= 1
                if self.fail_in_reads <= 0:
                    # the transfer breaks off: what was in flight is lost
                    self.fail_in_reads = None
                    self._reset_io()
                    raise io_error()
        if self.answer_delay:
            time.sleep(self.answer_delay)
        buff[:len(out)] = type(buff)(buff.typecode, out)
        return len(out)

    def _check(self, generation):
        if not self.plugged or generation != self.generation:
            raise no_device()

    def reset(self, generation):
        with self.cond:
            self._check(generation)
            self._reset_io()

    def handle_write(self, ep, data):
        raise NotImplementedError


class Handle:
    def __init__(self, device):
        self.device = device
        self.generation = device.generation
        self.configuration = 0


class EmulatedBus(usb.backend.IBackend):
    """A pyusb backend whose bus holds emulated devices."""

    _numbers = itertools.count(1)

    def __init__(self):
        self.number = next(self._numbers)
        self.devices = []
        self.lock = threading.Lock()

    def attach(self, device):
        device.bus = self
        with self.lock:
            self.devices.append(device)
        return device

    def device(self, serial):
        for d in self.devices:
            if d.serial == serial:
                return d
        raise KeyError(serial)

    # -- IBackend ---------------------------------------------------------

    def enumerate_devices(self):
        with self.lock:
            devices = list(self.devices)
        return iter([d for d in devices if d.plugged])

    def get_parent(self, dev):
        return None

    def get_device_descriptor(self, dev):
        return dev.device_descriptor()

    def get_configuration_descriptor(self, dev, config):
        if config != 0:
            raise IndexError("no such configuration")
        return dev.config_descriptor()

    def get_interface_descriptor(self, dev, intf, alt, config):
        if config != 0 or intf != 0 or alt != 0:
            raise IndexError("no such interface")
        return dev.interface_descriptor()

    def get_endpoint_descriptor(self, dev, ep, intf, alt, config):
        if config != 0 or intf != 0 or alt != 0:
            raise IndexError("no such interface")
        eps = list(dev.eps.values())
        if ep >= len(eps):
            raise IndexError("no such endpoint")
        return eps[ep].descriptor()

    def open_device(self, dev):
        if not dev.plugged:
            raise no_device()
        return Handle(dev)

    def close_device(self, dev_handle):
        pass

    def _live(self, h):
        h.device._check(h.generation)

    def set_configuration(self, dev_handle, config_value):
        self._live(dev_handle)
        if config_value not in (0, 1):
            raise usb.core.USBError("Entity not found", -5, errno.ENOENT)
        dev_handle.configuration = config_value

    def get_configuration(self, dev_handle):
        self._live(dev_handle)
        return dev_handle.configuration

    def set_interface_altsetting(self, dev_handle, intf, altsetting):
        self._live(dev_handle)

    def claim_interface(self, dev_handle, intf):
        self._live(dev_handle)

    def release_interface(self, dev_handle, intf):
        pass

    def bulk_write(self, dev_handle, ep, intf, data, timeout):
        return dev_handle.device.write(dev_handle.generation, ep, data)

    def bulk_read(self, dev_handle, ep, intf, buff, timeout):
        return dev_handle.device.read(dev_handle.generation, ep, buff, timeout)

    def clear_halt(self, dev_handle, ep):
        self._live(dev_handle)

    def reset_device(self, dev_handle):
        dev_handle.device.reset(dev_handle.generation)

    def is_kernel_driver_active(self, dev_handle, intf):
        return False

    def detach_kernel_driver(self, dev_handle, intf):
        pass

    def attach_kernel_driver(self, dev_handle, intf):
        pass
