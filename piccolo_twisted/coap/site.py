"""Components' declared resources -> a txThings resource tree, and the rules
of API.md for payloads and errors.

- PUT payloads are JSON, turned into call arguments (``[[args], {kw}]``,
  a list, an object, or one value); path arguments come first.
- Results are JSON (content-format 50), 2.05 for GET and 2.04 for PUT.
- ``PiccoloError`` -> 4.00 with its message (``NotFoundError`` 4.04,
  ``MethodNotAllowedError`` 4.05, ``UnavailableError`` 5.03); anything else -> 5.00, traceback logged,
  never sent (#3, #4).
- ``/.well-known/core`` is our own link-format resource (#1).
"""

import inspect

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..api import EncodedJSON, error_text, parse_arguments
from ..errors import MethodNotAllowedError, NotFoundError, PiccoloError, UnavailableError
from . import _tx, _txresource

JSON = 50
LINK_FORMAT = 40
TEXT = 0


def message(error):
    """An error's text for the wire (bytes): one readable line, never a
    huge echo of the bad input (which would need a blockwise transfer)."""
    return error_text(error).encode("utf-8")


def encode_json(value):
    if value is None:
        return b""
    if isinstance(value, EncodedJSON) or hasattr(value, "read"):
        return value                # encoded already, or read by offset (jsontext)
    return EncodedJSON.encode(value)


class Leaf(_txresource.CoAPResource):
    """A resource declared by a component (an ``api.Resource``)."""

    def __init__(self, spec, path):
        super().__init__()
        self.spec = spec
        self.path = path
        self.visible = True
        self.observable = spec.observe is not None
        self.isLeaf = spec.parse_path
        self.get_signature = _signature(spec.get)
        self.put_signature = _signature(spec.put)

    def observable_for(self, args):
        observe = self.spec.observe
        if observe is None:
            return None
        if callable(observe) and not hasattr(observe, "watch"):
            return observe(*args)
        return observe


class Node(_txresource.CoAPResource):
    """An inner node of the tree; children are keyed by bytes (#2)."""

    def __init__(self):
        super().__init__()

    def put_child(self, name, child):
        self.putChild(name.encode("utf-8"), child)


def _signature(fn):
    if fn is None:
        return None
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class WellKnownCore:
    """Marker spec for /.well-known/core."""


class Site:
    """The resource tree and the request semantics of API.md."""

    log = Logger()

    def __init__(self, components):
        """``components``: mapping prefix -> {path: api.Resource}."""
        self.root = Node()
        self.leaves = []
        for prefix, resources in components.items():
            for path, spec in resources.items():
                full = "/".join(p for p in (prefix, path) if p)
                self._add(full, Leaf(spec, full))
        self._core = None
        self._resolved = {}
        self._add(".well-known/core", WellKnownCore)

    def _add(self, path, leaf):
        node = self.root
        parts = path.split("/")
        for part in parts[:-1]:
            key = part.encode("utf-8")
            child = node.children.get(key)
            if child is None:
                child = Node()
                node.put_child(part, child)
            node = child
        node.children[parts[-1].encode("utf-8")] = leaf
        if isinstance(leaf, Leaf):
            self.leaves.append(leaf)

    def link_format(self):
        if self._core is None:
            links = []
            for leaf in sorted(self.leaves, key=lambda l: l.path):
                paths = [leaf.path + "/" + k for k in leaf.spec.known] or [leaf.path]
                for path in paths:
                    links.append(f"</{path}>" + (";obs" if leaf.observable else ""))
            self._core = ",".join(links).encode("utf-8")
        return self._core

    RESOLVED_MAX = 4096

    def resolve(self, path):
        """Return (leaf, path args) for a path tuple, or raise NotFoundError
        (remembered: a request asks three times, and most ask the same
        few paths)."""
        found = self._resolved.get(path)
        if found is None:
            try:
                found = self._resolve(path)
            except NotFoundError as e:
                found = e
            if len(self._resolved) >= self.RESOLVED_MAX:
                self._resolved.clear()
            self._resolved[path] = found
        if isinstance(found, NotFoundError):
            raise NotFoundError(str(found))
        return found

    def _resolve(self, path):
        node = self.root
        for i, part in enumerate(path):
            child = node.children.get(part.encode("utf-8"))
            if child is None:
                raise NotFoundError("no such resource: /" + "/".join(path))
            if child is WellKnownCore or isinstance(child, Leaf):
                rest = path[i + 1:]
                if rest and (child is WellKnownCore or not child.spec.parse_path):
                    raise NotFoundError("no such resource: /" + "/".join(path))
                return child, tuple(rest)
            node = child
        raise NotFoundError("no such resource: /" + "/".join(path))

    def _leaf(self, path):
        try:
            return self.resolve(path)[0]
        except NotFoundError:
            return None

    def safe_get(self, path):
        """True when a GET of ``path`` has no effect, so a duplicate may
        simply be answered again (RFC 7252 4.5) instead of from a cache."""
        leaf = self._leaf(path)
        return leaf is None or leaf is WellKnownCore or not leaf.spec.get_acts

    def safe(self, code, path):
        """True when running a duplicate again does no harm: a GET that
        does not act, a PUT that only reads (a file, a listing) or that
        sets a value (``idempotent``: the same state and answer again).
        Such a request needs no entry in the dedup cache. Unknown paths
        are answered 4.04 and other methods 4.05, whatever happens: safe
        too."""
        leaf = self._leaf(path)
        if leaf is None or leaf is WellKnownCore:
            return True                 # 4.04 (or 4.05), whatever the method
        spec = leaf.spec
        if code == _tx.GET:
            return not (spec.get_acts and spec.get is not None)
        if code == _tx.PUT:
            return spec.put is None or spec.put_reads or spec.idempotent
        return True                     # 4.05: only GET and PUT do anything

    def acts(self, path):
        """True when a GET of ``path`` changes something (abort, pause,
        connect, power_on, ...)."""
        leaf = self._leaf(path)
        return leaf is not None and leaf is not WellKnownCore and leaf.spec.get_acts

    def urgent(self, path):
        """True for requests served even when the server is full: the
        state and settings (observable resources: /control/status,
        numSequences, ...) and what stops things (abort, pause)."""
        leaf = self._leaf(path)
        return (leaf is not None and leaf is not WellKnownCore
                and (leaf.spec.urgent or leaf.observable))

    def may_change(self, code, path):
        """Whether a request may change anything (what ``[access]
        control_from`` guards): a PUT or POST, except the PUTs that only
        read, and a GET that acts. Unknown paths change nothing."""
        try:
            leaf, _ = self.resolve(path)
        except NotFoundError:
            return False
        if leaf is WellKnownCore:
            return False
        if code == _tx.GET:
            return leaf.spec.changes("GET")
        if code == _tx.PUT:
            return leaf.spec.changes("PUT")
        return True

    # -- the entry point used by the protocol -----------------------------

    def handle(self, code, path, payload, observing=False):
        """Handle one request.

        Returns ``(code, body, content_format, observe_handle)`` or a Deferred
        firing with it; ``observe_handle`` is ``(leaf, args, observable)``
        when the resource can be observed, else None.
        """
        try:
            leaf, args = self.resolve(path)
        except NotFoundError as e:
            return _tx.NOT_FOUND, message(e), TEXT, None
        if leaf is WellKnownCore:
            if code != _tx.GET:
                return _tx.METHOD_NOT_ALLOWED, b"GET only", TEXT, None
            return _tx.CONTENT, self.link_format(), LINK_FORMAT, None
        handle = None
        if code == _tx.GET:
            if leaf.spec.get is None:
                # the same words as a PUT on a read-only resource (and the web's)
                return self._not_allowed(leaf, code) + (None,)
            if observing and leaf.observable:
                try:
                    observable = leaf.observable_for(args)
                except Exception as e:
                    return self._error(Failure(e), code) + (None,)
                handle = (leaf, args, observable)
            result = self._call(leaf.spec.get, leaf.get_signature, args, {}, code)
        elif code == _tx.PUT:
            if leaf.spec.put is None:
                return self._not_allowed(leaf, code) + (None,)
            try:
                call_args, kwargs = parse_arguments(payload)
            except PiccoloError as e:
                return _tx.BAD_REQUEST, message(e), TEXT, None
            result = self._call(leaf.spec.put, leaf.put_signature,
                                args + call_args, kwargs, code)
        else:
            return self._not_allowed(leaf, code) + (None,)
        if isinstance(result, defer.Deferred):
            return result.addCallback(lambda r: r + (handle,))
        return result + (handle,)

    def render_target(self, leaf, args):
        """Render an observed resource for a notification."""
        return self._call(leaf.spec.get, leaf.get_signature, args, {}, _tx.GET)

    # -- helpers ----------------------------------------------------------

    def _not_allowed(self, leaf, code):
        methods = [m for m, f in (("GET", leaf.spec.get), ("PUT", leaf.spec.put)) if f]
        method = _tx.requests.get(code, f"code {code}")
        return (_tx.METHOD_NOT_ALLOWED,
                f"{method} not allowed on /{leaf.path}; use {' or '.join(methods)}".encode(),
                TEXT)

    def _call(self, fn, signature, args, kwargs, code):
        if fn is None:
            return _tx.METHOD_NOT_ALLOWED, b"method not allowed", TEXT
        if signature is not None and (args or kwargs or code != _tx.GET):
            try:
                signature.bind(*args, **kwargs)
            except TypeError as e:
                return _tx.BAD_REQUEST, message(f"bad arguments: {e}"), TEXT
        try:
            result = fn(*args, **kwargs)
        except Exception:
            return self._error(Failure(), code)
        if isinstance(result, defer.Deferred):
            return result.addCallbacks(self._success, self._error,
                                       callbackArgs=(code,), errbackArgs=(code,))
        return self._success(result, code)

    def _success(self, value, code):
        try:
            body = encode_json(value)
        except Exception:
            return self._error(Failure(), code)
        ok = _tx.CONTENT if code == _tx.GET else _tx.CHANGED
        return ok, body, (JSON if body else None)

    def _error(self, failure, code):
        error = failure.value
        if isinstance(error, NotFoundError):
            return _tx.NOT_FOUND, message(error), TEXT
        if isinstance(error, MethodNotAllowedError):
            return _tx.METHOD_NOT_ALLOWED, message(error), TEXT
        if isinstance(error, UnavailableError):
            return _tx.SERVICE_UNAVAILABLE, message(error), TEXT
        if isinstance(error, PiccoloError):
            return _tx.BAD_REQUEST, message(error), TEXT
        self.log.failure("unexpected error in a request handler", failure)
        return _tx.INTERNAL_SERVER_ERROR, b"internal server error (see the server log)", TEXT
