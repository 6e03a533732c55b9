"""``/api/<path>``: the components' resources over HTTP, with the answers
they give over CoAP.

The same ``api.Resource`` declarations the CoAP site serves, called the
same way: a PUT body becomes arguments as a CoAP PUT payload does
(``api.parse_arguments``), path segments after a path-parsing resource come
first, and the component's own validation answers. So a record, pause or
abort from the page is checked and refused exactly as over CoAP:

- GET   a resource that reads                 -> 200 JSON (204 when empty)
- PUT   a resource that takes PUT              -> 200 JSON / 204
- POST  a GET that acts (abort, pause, connect, power_on, ...): the act
- 400 with the component's message (CoAP 4.00), 404 (4.04), 405 (4.05),
  403 (``[access] control_from`` or a cross-site request), 413 (a body over
  64 KiB), 500 (a fault, logged; CoAP 5.00).
"""

import inspect

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from ..api import EncodedJSON, error_text, parse_arguments
from ..errors import MethodNotAllowedError, NotFoundError, PiccoloError, UnavailableError

MAX_BODY = 64 * 1024
JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain; charset=utf-8"


def encode(value):
    """A handler's result as JSON bytes (b"" for None)."""
    if value is None:
        return b""
    if isinstance(value, EncodedJSON):
        return bytes(value)
    return EncodedJSON.encode(value)


def _signature(fn):
    if fn is None:
        return None
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class Leaf:
    """One declared resource, as the web serves it."""

    def __init__(self, path, spec):
        self.path = path
        self.spec = spec
        self.get_signature = _signature(spec.get)
        self.put_signature = _signature(spec.put)

    def observables(self):
        """[(path, Observable)] this resource can be watched through:
        itself, or each of its known sub-paths."""
        observe = self.spec.observe
        if observe is None:
            return []
        if callable(observe) and not hasattr(observe, "watch"):
            out = []
            for sub in self.spec.known:
                try:
                    out.append((f"{self.path}/{sub}", observe(sub), (sub,)))
                except Exception:
                    continue
            return out
        return [(self.path, observe, ())]


class Tree:
    """Components -> leaves by path; the lookup both the bridge and the
    event stream use."""

    def __init__(self, components):
        self.root = {}
        self.leaves = []
        for prefix, resources in components.items():
            for path, spec in resources.items():
                full = "/".join(p for p in (prefix, path) if p)
                leaf = Leaf(full, spec)
                node = self.root
                parts = full.split("/")
                for part in parts[:-1]:
                    node = node.setdefault(part, {})
                    if isinstance(node, Leaf):
                        break
                else:
                    node[parts[-1]] = leaf
                    self.leaves.append(leaf)
        self.leaves.sort(key=lambda l: l.path)

    def resolve(self, segments):
        """(leaf, path args) for a list of path segments, or NotFoundError."""
        node = self.root
        for i, part in enumerate(segments):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                break
            if isinstance(child, Leaf):
                rest = tuple(segments[i + 1:])
                if rest and not child.spec.parse_path:
                    break
                return child, rest
            node = child
        raise NotFoundError("no such resource: /" + "/".join(segments))

    def index(self):
        """What the page may ask for: every path with its methods (paths
        of path-parsing resources with known sub-paths listed each)."""
        out = []
        for leaf in self.leaves:
            spec = leaf.spec
            paths = [f"{leaf.path}/{k}" for k in spec.known] or [leaf.path]
            for p in paths:
                out.append({"path": p, "get": spec.get is not None and not spec.get_acts,
                            "put": spec.put is not None, "acts": bool(spec.get_acts),
                            "obs": spec.observe is not None})
        return out


def segments_of(request):
    """The path after /api/ as text segments (UTF-8). twisted.web has
    percent-decoded each segment once already; decoding again would turn
    a run literally named ``%2e%2e`` into ``..``."""
    return [raw.decode("utf-8") for raw in request.postpath if raw != b""]


class Api(resource.Resource):
    """The bridge: ``/api`` (the index) and ``/api/<path>``."""

    isLeaf = True
    log = Logger()

    def __init__(self, tree, guard):
        super().__init__()
        self.tree = tree
        self.guard = guard
        self._index = None

    # -- answers ------------------------------------------------------------

    @staticmethod
    def _send(request, code, body=b"", content_type=JSON_TYPE):
        if request.finished or getattr(request, "_disconnected", False):
            return
        if code == 200 and not body:
            code = 204
        request.setResponseCode(code)
        request.setHeader(b"cache-control", b"no-store")
        if body:
            request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method != b"HEAD" and body:
            request.write(body)
        request.finish()

    def _text(self, request, code, text):
        self._send(request, code, text.encode("utf-8"), TEXT_TYPE)

    def _error(self, request, failure):
        error = failure.value
        if isinstance(error, NotFoundError):
            return self._text(request, 404, error_text(error))
        if isinstance(error, MethodNotAllowedError):
            return self._text(request, 405, error_text(error))
        if isinstance(error, UnavailableError):     # the data directory gone
            return self._text(request, 503, error_text(error))
        if isinstance(error, PiccoloError):
            return self._text(request, 400, error_text(error))
        self.log.failure("unexpected error in a request handler (web)", failure)
        return self._text(request, 500, "internal server error (see the server log)")

    # -- dispatch -----------------------------------------------------------

    def render(self, request):
        try:
            return self._render(request)
        except Exception:
            self._error(request, Failure())
            return server.NOT_DONE_YET

    def _render(self, request):
        method = request.method
        try:
            segments = segments_of(request)
        except UnicodeDecodeError:
            self._text(request, 400, "the path is not UTF-8")
            return server.NOT_DONE_YET
        if not segments:
            if method not in (b"GET", b"HEAD"):
                self._text(request, 405, "GET only")
            else:
                if self._index is None:
                    self._index = EncodedJSON.encode(self.tree.index())
                self._send(request, 200, self._index)
            return server.NOT_DONE_YET
        try:
            leaf, args = self.tree.resolve(segments)
        except NotFoundError as e:
            self._text(request, 404, error_text(e))
            return server.NOT_DONE_YET
        spec = leaf.spec
        if method in (b"GET", b"HEAD"):
            if spec.get is None:
                return self._not_allowed(request, leaf, "GET")
            if spec.get_acts:
                self._text(request, 405, f"/{leaf.path} acts: use POST")
                return server.NOT_DONE_YET
            self._call(request, spec.get, leaf.get_signature, args, {}, read=True)
        elif method == b"POST":
            if spec.get is None or not spec.get_acts:
                return self._not_allowed(request, leaf, "POST")
            if self._refused(request):
                return server.NOT_DONE_YET
            self._call(request, spec.get, leaf.get_signature, args, {})
        elif method == b"PUT":
            if spec.put is None:
                return self._not_allowed(request, leaf, "PUT")
            if spec.changes("PUT") and self._refused(request):
                return server.NOT_DONE_YET
            if getattr(request, "too_large", False):
                self._text(request, 413, f"request body over {MAX_BODY} bytes")
                return server.NOT_DONE_YET
            request.content.seek(0)
            try:
                call_args, kwargs = parse_arguments(request.content.read(MAX_BODY + 1))
            except PiccoloError as e:
                self._text(request, 400, error_text(e))
                return server.NOT_DONE_YET
            self._call(request, spec.put, leaf.put_signature, args + call_args, kwargs)
        else:
            return self._not_allowed(request, leaf, method.decode("latin-1"))
        return server.NOT_DONE_YET

    def _refused(self, request):
        reason = self.guard.refusal(request)
        if reason is None:
            return False
        self._text(request, 403, reason)
        return True

    def _not_allowed(self, request, leaf, method):
        spec = leaf.spec
        allowed = []
        if spec.get is not None:
            allowed.append("POST" if spec.get_acts else "GET")
        if spec.put is not None:
            allowed.append("PUT")
        request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        self._text(request, 405, f"{method} not allowed on /{leaf.path}; use "
                                 f"{' or '.join(allowed)}")
        return server.NOT_DONE_YET

    def _call(self, request, fn, signature, args, kwargs, read=False):
        if signature is not None and (args or kwargs or not read):
            try:
                signature.bind(*args, **kwargs)
            except TypeError as e:
                return self._text(request, 400, error_text(f"bad arguments: {e}"))
        # a client that goes away: the handler still completes (as over
        # CoAP: a record that was started stays started)
        request.notifyFinish().addErrback(lambda _: setattr(request, "_disconnected", True))
        d = defer.maybeDeferred(fn, *args, **kwargs)

        def answer(value):
            try:
                body = encode(value)
            except Exception:
                return self._error(request, Failure())
            self._send(request, 200, body)
        d.addCallbacks(answer, lambda f: self._error(request, f))
        d.addErrback(lambda f: self.log.failure("answering a web request failed", f))
