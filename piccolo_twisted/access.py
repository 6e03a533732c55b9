"""Who may control the instrument: ``[access] control_from``.

One policy for every face of the server (CoAP and the web page): a
request that changes anything is allowed when its source address is in
one of the configured networks, and refused with a reason otherwise.
Reads stay open to everyone. The default is everyone, as the legacy
server had it.

``ControlPolicy.refusal(host)`` is the one question the faces ask: None
when ``host`` may control, else the reason to send back (CoAP 4.03, HTTP
403).
"""

import ipaddress
from typing import Optional

EVERYONE = "any"
#: words that stand for networks in ``control_from``
NAMED = {
    "localhost": ("127.0.0.0/8", "::1/128"),
}


class AccessError(ValueError):
    """A ``control_from`` entry that is not an address, a network or a
    known word (the message names it)."""


def parse_networks(entries):
    """``control_from`` entries -> a tuple of ip_network, or None for
    everyone. Entries are addresses (``192.168.4.7``, ``::1``), networks
    (``192.168.4.0/24``, ``fd00::/8``), ``localhost`` or ``any``."""
    if isinstance(entries, str):
        entries = [e for e in entries.replace(",", " ").split()]
    entries = [str(e).strip() for e in entries]
    entries = [e for e in entries if e]
    if not entries:
        raise AccessError(f"no address given: use {EVERYONE!r} for everyone, or "
                          "addresses and networks such as 127.0.0.1, 192.168.4.0/24")
    networks = []
    for entry in entries:
        word = entry.lower()
        if word in (EVERYONE, "all", "everyone", "*"):
            if len(entries) > 1:
                raise AccessError(f"{entry!r} (everyone) cannot be combined with "
                                  "other entries")
            return None
        if word in NAMED:
            networks.extend(ipaddress.ip_network(n) for n in NAMED[word])
            continue
        try:
            # strict=False: 192.168.4.7/24 means its network, as people write it
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise AccessError(f"{entry!r} is not an address or a network "
                              "(e.g. 127.0.0.1, 192.168.4.0/24, fd00::/8)") from None
        networks.extend(_as_peers_appear(network))
    return tuple(networks)


_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _as_peers_appear(network):
    """A network as the clients it means are seen: an IPv4 client of a
    dual-stack socket is matched by its IPv4 address (``client_address``),
    so IPv4-mapped entries (``::ffff:127.0.0.1``, ``::ffff:0:0/96``) are
    the IPv4 networks they map, and an IPv6 network holding the whole
    mapped range (``::/0``) holds every IPv4 address too."""
    if network.version != 6:
        return [network]
    if network.subnet_of(_MAPPED):
        v4 = ipaddress.ip_address(int(network.network_address) & 0xFFFFFFFF)
        return [ipaddress.ip_network(f"{v4}/{network.prefixlen - 96}")]
    if network.supernet_of(_MAPPED):
        return [network, ipaddress.ip_network("0.0.0.0/0")]
    return [network]


def client_address(host):
    """The address a request came from, as an ip_address: an IPv4 peer on
    a dual-stack socket (``::ffff:192.0.2.1``) is its IPv4 address; a
    link-local scope (``fe80::1%eth0``) is dropped. None if unreadable."""
    if not isinstance(host, str):
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ControlPolicy:
    """``[access] control_from`` as a question: may this host control?"""

    def __init__(self, networks=None):
        #: None: everyone; else a tuple of ip_network
        self.networks = networks

    @classmethod
    def from_entries(cls, entries):
        return cls(parse_networks(entries))

    @property
    def everyone(self):
        return self.networks is None

    def describe(self):
        if self.networks is None:
            return "everyone"
        return ", ".join(str(n) for n in self.networks)

    def allows(self, host):
        return self.refusal(host) is None

    def refusal(self, host) -> Optional[str]:
        """None when ``host`` (an address string as the transport gives
        it) may change anything; otherwise the reason, one line."""
        if self.networks is None:
            return None
        address = client_address(host)
        if address is None:
            return f"control is not allowed from {host!r}: not an IP address"
        if any(address in network for network in self.networks):
            return None
        # short, the setting first: an answer over CoAP to a host not yet
        # verified is at most 3x its request (docs/API.md). 30 bytes and
        # the address: whole for any IPv4 address in an answer to the
        # smallest changing request (17 bytes: PUT /control/auto without
        # token or payload); a longer IPv6 address is left out whole
        return f"[access] control_from refuses {address}"


#: the default policy: everyone may control
EVERYONE_POLICY = ControlPolicy(None)
