"""Who may change anything through the web page, and from which page.

A changing request (PUT, POST) passes two checks, in this order:

1. ``[access] control_from`` (``access.ControlPolicy``): the client's
   address must be allowed to control, as over CoAP;
2. it must come from this server's own page (cross-site request
   forgery): an ``Origin`` header, when the browser sends one, names this
   server (the request's ``Host``), and the ``X-Piccolo-Token`` header
   carries the token of this server process. A page on another site can
   neither read the token nor add the header without a CORS grant, which
   this server never gives.

A refusal is HTTP 403 with the reason as its text.
"""

import hmac
import secrets
from urllib.parse import urlsplit

TOKEN_HEADER = b"x-piccolo-token"


def _netloc(scheme, host):
    """``host[:port]`` lower-cased, without the scheme's default port."""
    host = host.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and host.endswith(default):
        host = host[:-len(default)]
    return host


def same_origin(origin, host):
    """Whether an ``Origin`` header names the server that ``host`` (the
    request's Host header) addresses."""
    if not origin or not host:
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return False
    return _netloc(parts.scheme, parts.netloc) == _netloc("http", host)


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
