"""What counts as one host when a resource is shared out fairly.

An IPv4 address is a host (an IPv4-mapped IPv6 address, as a dual-stack
socket reports IPv4 peers, is its IPv4 address). An IPv6 address is its
/64: one machine's addresses usually differ only in their last 64 bits
(privacy extensions hand out new ones all day), and whoever holds a /64
can send from 2^64 of them, so keying shares by the full address would
give one machine unlimited shares. Used by the CoAP layer's shares and the
manhole's connection limits.
"""

import socket

_cache = {}


def host_of(address):
    """The host ``address`` (a string as Twisted reports it) belongs to."""
    host = _cache.get(address)
    if host is not None:
        return host
    if ":" not in address:
        host = address
    elif address.startswith("::ffff:") and "." in address:
        host = address[7:]
    else:
        try:
            packed = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0])
            host = socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"
        except (OSError, ValueError):
            host = address
    if len(_cache) >= 65536:
        _cache.clear()
    _cache[address] = host
    return host
