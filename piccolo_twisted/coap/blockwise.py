"""Blockwise transfers (RFC 7959): the bodies of Block2 transfers in
progress, and Block1 uploads being reassembled.

A body is either bytes (a JSON answer, usually an ``EncodedJSON`` the
component keeps and re-encodes only when it changes) or a lazy body that
reads its blocks by offset (a spectrum file: ``read(offset, length)``
returning a Deferred). Either way a block costs a fixed amount of work,
whatever the body's size: a slice, or one bounded read. The ETag (CRC-32
of the whole body) is computed once per body object, not per block.

:class:`Transfers` keeps bodies between a transfer's block requests so
its later blocks are of the body it started with. Bounded in bytes and
entries, in all and per host address; to make room the oldest transfers of
the biggest holder go first (completed ones before those in progress), so
one host pinning many transfers cannot push out another's.
"""

import collections
import hashlib
import struct
import zlib

from .limits import Shares, host_of

MAX_SZX = 6                    # 1024-byte blocks
BLOCK_LIFETIME = 60.0          # seconds a transfer may idle
BLOCK_CACHE_BYTES = 8 << 20    # distinct bodies kept, all hosts
BLOCK_BYTES_PER_HOST = 2 << 20
BLOCK_ENTRIES = 4096
BLOCK_ENTRIES_PER_HOST = 256
BLOCK_ENTRY = 400              # estimated bytes of one entry besides its body
UPLOADS_MAX = 64               # Block1 reassemblies in progress
UPLOADS_PER_HOST = 8


def etag_of(body):
    """CRC-32 of a body, 4 bytes; computed once per body object (an
    ``EncodedJSON`` keeps it, a lazy body knows its own)."""
    etag = getattr(body, "etag", None)
    if etag is not None:
        return etag
    etag = struct.pack("!I", zlib.crc32(body))
    try:
        body.etag = etag
    except AttributeError:          # plain bytes: small bodies only
        pass
    return etag


def is_lazy(body):
    return hasattr(body, "read")


def body_size(body):
    return body.size if is_lazy(body) else len(body)


def request_key(remote, path, method, payload, query):
    """What identifies a transfer: peer, path, method, and a digest of what
    was asked for (payload and query)."""
    digest = hashlib.blake2b(payload, digest_size=16)
    for q in query:
        digest.update(b"\xff" + q)
    return (remote, path, method, digest.digest())


class Transfer:
    """A Block2 body kept for its transfer's later blocks."""

    __slots__ = ("key", "host", "body", "content_format", "code", "etag", "size",
                 "used", "done", "cost", "charge", "shared", "waiters", "token")

    def __init__(self, key, body, content_format, code, now, token=None):
        self.key = key
        self.host = host_of(key[0][0])
        self.token = token
        self.body = body
        self.content_format = content_format
        self.code = code
        self.etag = etag_of(body)
        self.size = body_size(body)
        self.used = now
        self.done = False            # its last block was sent
        self.cost = BLOCK_ENTRY + (getattr(body, "cost", 0) if is_lazy(body)
                                   else len(body))
        self.charge = self.cost      # what it counts against its host's share
        self.shared = None           # key into Transfers.bodies
        self.waiters = []            # callables run when it ends

    # the positional view older code and tests used: body, cf, etag, code
    def __getitem__(self, i):
        return (self.body, self.content_format, self.etag, self.code)[i]


class Transfers:
    """Block2 bodies in transfer, by request key; see the module doc."""

    def __init__(self, clock, max_bytes=BLOCK_CACHE_BYTES, lifetime=BLOCK_LIFETIME,
                 bytes_per_host=BLOCK_BYTES_PER_HOST, max_entries=BLOCK_ENTRIES,
                 entries_per_host=BLOCK_ENTRIES_PER_HOST):
        self.clock = clock
        self.max_bytes = max_bytes
        self.lifetime = lifetime
        self.entries = collections.OrderedDict()   # key -> Transfer, least recent first
        self.latest = {}                           # (remote, path, method) -> key
        self.latest_token = {}                     # (remote, path, method, token) -> key
        self.count = Shares(max_entries, entries_per_host)
        self.held = Shares(1 << 62, bytes_per_host)  # bytes each host holds
        self.bodies = {}                           # (len, etag) -> [body, refs]
        self.host_refs = {}                        # (host, (len, etag)) -> refs
        self.bytes = 0                             # distinct bodies + entries

    request_key = staticmethod(request_key)

    def get(self, key, follow_up_without_payload=False, token=None):
        """The transfer for ``key`` (a later block was asked for); or, for
        a follow-up without payload, the peer's latest one on that path and
        method with that token (two transfers of one endpoint on one path
        are told apart by their tokens, as libcoap keeps them), else its
        latest one there (aiocoap takes a new token for every block)."""
        transfer = self.entries.get(key)
        if transfer is None and follow_up_without_payload:
            latest = self.latest_token.get(key[:3] + (token,))
            if latest is None:
                latest = self.latest.get(key[:3])
            if latest is not None:
                transfer = self.entries.get(latest)
        if transfer is None:
            return None
        transfer.used = self.clock.seconds()
        self.entries.move_to_end(transfer.key)
        return transfer

    def put(self, key, body, content_format, code, token=None):
        """Keep ``body`` for ``key`` (its block 0 is being sent, in answer
        to a request with ``token``). Returns the Transfer, kept or not (a
        body over the host's share is not: its later blocks are rendered
        again)."""
        self.remove(key)
        transfer = Transfer(key, body, content_format, code, self.clock.seconds(), token)
        host = transfer.host
        if not is_lazy(body):
            transfer.shared = (len(body), transfer.etag)
            shared = self.bodies.get(transfer.shared)
            if shared is not None and shared[0] == body:
                transfer.body = shared[0]
            elif shared is not None:
                transfer.shared = None          # a CRC collision: not shared
        charge = self._charge(transfer)
        if charge > self.held.share:
            return transfer
        while self.entries and not (self.held.host_fits(host, charge)
                                    and self.count.host_fits(host)):
            self._evict_from(host)
            charge = self._charge(transfer)
        while self.entries and (self.bytes + transfer.cost > self.max_bytes
                                or self.count.total + 1 > self.count.cap):
            biggest, _ = self.held.largest()
            self._evict_from(biggest)
            charge = self._charge(transfer)
        shared = self.bodies.get(transfer.shared) if transfer.shared else None
        if transfer.shared is not None and shared is None:
            self.bodies[transfer.shared] = [body, 0]
            shared = self.bodies[transfer.shared]
        if shared is not None:
            # identical bodies (one file fetched by 200 clients) are kept
            # once, and count once against each host holding them
            shared[1] += 1
            self.bytes += BLOCK_ENTRY if shared[1] > 1 else transfer.cost
            ref = (host, transfer.shared)
            self.host_refs[ref] = self.host_refs.get(ref, 0) + 1
        else:
            self.bytes += transfer.cost
        self.entries[key] = transfer
        self.latest[key[:3]] = key
        if token is not None:
            self.latest_token[key[:3] + (token,)] = key
        self.count.take(host)
        self.held.take(host, charge)
        transfer.charge = charge
        return transfer

    def _charge(self, transfer):
        """What keeping ``transfer`` counts against its host's share."""
        if transfer.shared is not None and self.host_refs.get((transfer.host,
                                                               transfer.shared)):
            return BLOCK_ENTRY
        return transfer.cost

    def _evict_from(self, host):
        """Drop ``host``'s least recently used transfer, a completed one
        first."""
        victim = None
        for transfer in self.entries.values():
            if transfer.host == host:
                if transfer.done:
                    victim = transfer
                    break
                if victim is None:
                    victim = transfer
        if victim is None:                  # (cannot happen: host holds some)
            victim = next(iter(self.entries.values()))
        self.remove(victim.key)

    def finished(self, transfer):
        """Its last block was sent: it stays for a repeated last block, and
        goes first when room is needed."""
        transfer.done = True
        self._wake(transfer)

    def remove(self, key):
        transfer = self.entries.pop(key, None)
        if transfer is None:
            return
        if self.latest.get(key[:3]) == key:
            del self.latest[key[:3]]
        if transfer.token is not None:
            by_token = key[:3] + (transfer.token,)
            if self.latest_token.get(by_token) == key:
                del self.latest_token[by_token]
        host = transfer.host
        self.count.release(host)
        self.held.release(host, transfer.charge)
        shared = self.bodies.get(transfer.shared) if transfer.shared else None
        if shared is not None:
            ref = (host, transfer.shared)
            left = self.host_refs[ref] - 1
            if left:
                self.host_refs[ref] = left
                if transfer.charge != BLOCK_ENTRY:
                    # the body's cost passes to this host's next holder
                    self._move_charge(host, transfer)
            else:
                del self.host_refs[ref]
            shared[1] -= 1
            self.bytes -= BLOCK_ENTRY
            if not shared[1]:
                del self.bodies[transfer.shared]
                self.bytes -= transfer.cost - BLOCK_ENTRY
        else:
            self.bytes -= transfer.cost
        self._wake(transfer)

    def _move_charge(self, host, gone):
        for transfer in self.entries.values():
            if transfer.host == host and transfer.shared == gone.shared:
                self.held.take(host, gone.charge - transfer.charge)
                transfer.charge = gone.charge
                return

    def _wake(self, transfer):
        waiters, transfer.waiters = transfer.waiters, []
        for wake in waiters:
            wake()

    def in_progress(self, key, idle):
        """The transfer kept for ``key`` while it has not sent its last
        block and was active less than ``idle`` seconds ago, else None."""
        transfer = self.entries.get(key)
        if (transfer is not None and not transfer.done
                and self.clock.seconds() - transfer.used < idle):
            return transfer
        return None

    def sweep(self):
        now = self.clock.seconds()
        for key in [k for k, t in self.entries.items() if now - t.used > self.lifetime]:
            self.remove(key)

    def clear(self):
        for key in list(self.entries):
            self.remove(key)

    def __len__(self):
        return len(self.entries)


# the name the first version used
BlockCache = Transfers


class Upload:
    """A Block1 request body being reassembled."""

    __slots__ = ("data", "used", "last")

    def __init__(self, now):
        self.data = bytearray()
        self.used = now
        self.last = None            # number of the last block added


class Uploads:
    """Block1 reassemblies by (remote, path): UPLOADS_PER_HOST per host
    (a host's next one replaces its own oldest), UPLOADS_MAX in all (then
    a new one is refused: an upload under way is never dropped for another
    host's)."""

    def __init__(self, clock, cap=UPLOADS_MAX, share=UPLOADS_PER_HOST,
                 lifetime=BLOCK_LIFETIME):
        self.clock = clock
        self.lifetime = lifetime
        self.entries = collections.OrderedDict()    # (remote, path) -> Upload
        self.count = Shares(cap, share)

    def start(self, key):
        """A fresh Upload for ``key``, or None when there is no room."""
        host = host_of(key[0][0])
        self.remove(key)
        if not self.count.host_fits(host):
            oldest = next(k for k in self.entries if host_of(k[0][0]) == host)
            self.remove(oldest)
        if not self.count.fits(host):
            return None
        upload = self.entries[key] = Upload(self.clock.seconds())
        self.count.take(host)
        return upload

    def get(self, key):
        return self.entries.get(key)

    def remove(self, key):
        if self.entries.pop(key, None) is not None:
            self.count.release(host_of(key[0][0]))

    def sweep(self):
        now = self.clock.seconds()
        for key in [k for k, u in self.entries.items() if now - u.used > self.lifetime]:
            self.remove(key)

    def __len__(self):
        return len(self.entries)
