"""Which requests the web page answers, and which may change anything.

Every request first names this server (``Hosts``): its ``Host`` header is
one of the server's own names -- an IP literal of the address the
connection reached, ``localhost``, this machine's host name (and
``<name>.local``), or a name listed in ``[web] hosts``. Anything else is
answered 421 with the reason. This is what stops DNS rebinding: a page of
``evil.example`` whose name the attacker re-points at the instrument's
address sends ``Host: evil.example`` and is refused, its reads, ``/token``
and changes alike, so a browser inside the instrument's network cannot be
used to reach it from a page outside.

A changing request (PUT, POST) then passes two more checks, in this order:

1. ``[access] control_from`` (``access.ControlPolicy``): the client's
   address must be allowed to control, as over CoAP;
2. it must come from this server's own page (cross-site request
   forgery): an ``Origin`` header, when the browser sends one, is
   ``http://`` + the request's ``Host`` (this server speaks plain HTTP, so
   an ``https://`` origin is another site), and the ``X-Piccolo-Token``
   header carries the token of this server process. A page on another
   site can neither read the token nor add the header without a CORS
   grant, which this server never gives.

A refusal of a change is HTTP 403 with the reason as its text.
"""

import hmac
import secrets
import socket
from urllib.parse import urlsplit

from ..access import client_address

TOKEN_HEADER = b"x-piccolo-token"


def split_host(value):
    """A ``Host`` header (or an origin's netloc) -> (name, port): the name
    lower-cased without a trailing dot, an IPv6 literal without its
    brackets and zone; port None when absent. None when unreadable."""
    value = value.strip().lower()
    if not value:
        return None
    port = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
        name = name.split("%", 1)[0]
    else:
        name, sep, port = value.partition(":")
        if not sep:
            port = None
        if ":" in (port or ""):
            return None
    if port is not None:
        if not port.isdigit() or len(port) > 5:
            return None
        port = int(port)
    return name.rstrip("."), port


def machine_names(hostname=None):
    """This machine's own names: its host name and ``<name>.local``."""
    if hostname is None:
        try:
            hostname = socket.gethostname()
        except OSError:
            hostname = ""
    names = set()
    name = hostname.strip().lower().rstrip(".")
    if name:
        names.add(name)
        short = name.split(".", 1)[0]
        names.update((short, short + ".local"))
    return names


class Hosts:
    """The names this server answers to (DNS rebinding)."""

    def __init__(self, configured=(), hostname=None):
        self.names = {"localhost"} | machine_names(hostname)
        self.addresses = set()
        for entry in configured:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            address = client_address(entry.strip("[]"))
            if address is not None:
                self.addresses.add(address)
            else:
                self.names.add(entry)

    def describe(self):
        return ", ".join(sorted(self.names) + sorted(str(a) for a in self.addresses))

    def refusal(self, request):
        """None when ``request``'s Host header names this server, else the
        reason. A request without a Host header (HTTP/1.0 scripts) comes
        from no browser, so from no rebound page: it is answered."""
        header = request.getHeader(b"host")
        if header is None:
            return None
        parsed = split_host(header.decode("latin-1"))
        if parsed is None:
            return "the Host header is not a host name or address"
        name, _ = parsed
        if name in self.names:
            return None
        address = client_address(name)
        if address is not None:
            if address in self.addresses or address == self._local(request):
                return None
            return (f"this server is not {name}: open the page at the address the "
                    f"connection reached, or add it to [web] hosts")
        return (f"this server does not answer to the name {name[:100]!r} (a defence "
                f"against DNS rebinding): open it by its address or its host name, "
                f"or add the name to [web] hosts")

    @staticmethod
    def _local(request):
        try:
            return client_address(getattr(request.getHost(), "host", None))
        except Exception:
            return None


def same_origin(origin, host):
    """Whether an ``Origin`` header names the server that ``host`` (the
    request's Host header) addresses: the same name and port, over plain
    HTTP (the only scheme this server speaks)."""
    if not origin or not host:
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme != "http" or not parts.netloc:
        return False
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return False
    if "@" in parts.netloc:
        return False
    mine, theirs = split_host(host), split_host(parts.netloc)
    if mine is None or theirs is None:
        return False
    return (mine[0], mine[1] or 80) == (theirs[0], theirs[1] or 80)


def client_host(request):
    address = request.getClientAddress()
    return getattr(address, "host", None)


class Guard:
    """The checks a changing web request passes."""

    def __init__(self, access=None, token=None):
        self.access = access
        self.token = token or secrets.token_urlsafe(24)

    def refusal(self, request):
        """None when ``request`` may change anything, else the reason."""
        if self.access is not None:
            reason = self.access.refusal(client_host(request))
            if reason is not None:
                return reason
        origin = request.getHeader(b"origin")
        if origin is not None:
            host = request.getHeader(b"host")
            if not same_origin(origin.decode("latin-1"),
                               host.decode("latin-1") if host else None):
                return ("cross-site request refused: it comes from a page of "
                        f"{origin.decode('latin-1')[:100]}, not of this server")
        token = request.getHeader(TOKEN_HEADER)
        if token is None or not hmac.compare_digest(token, self.token.encode("ascii")):
            return ("missing or stale X-Piccolo-Token header: reload the page "
                    "(scripts: take the token from GET /token)")
        return None

