"""SSH manhole (twisted.conch): a live Python prompt inside the server.

Off unless a port is configured. Listens on 127.0.0.1 unless an interface
is named. Public-key authentication only, keys from an authorized_keys
file, login name ``admin``; password logins are not offered. The host key
is generated on first use in the state directory (statedir.py: never under
the data directory, which is copied off the Pi) with mode 0600.
Imported only when the manhole is on: conch costs ~10 MiB.

Idle connections cannot exhaust the server's descriptors: a connection
that has not logged in within LOGIN_TIMEOUT seconds is closed (conch's own
login timeout is 10 h, and it has none before the key exchange), and at
most MAX_PENDING connections (MAX_PENDING_PER_HOST per host: an IPv4
address or an IPv6 /64, ``hosts.host_of``) may be in that state at once.
Nor can a few hosts keep the administrator out by holding all of them: when
all are taken, a connection from a host holding fewer than the host holding
the most ends one of that host's (the one that has sent the least, the
oldest of those: an idle connection before one half-way through its key
exchange). A host at its own share is refused.
"""

import os
import warnings

from twisted.application import strports
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.logger import Logger
from twisted.protocols import policies

from .hosts import host_of
from .statedir import HOST_KEY  # noqa: F401 (the key file's name)

# conch checks every key against cryptography's DSA classes, and since
# cryptography 51 touching them warns: four lines of noise, no DSA in use
warnings.filterwarnings("ignore", message="DSA is deprecated",
                        module=r"twisted\.conch\.ssh\.keys")

log = Logger()
LOGIN = b"admin"
LOGIN_TIMEOUT = 30.0           # seconds to log in, from the TCP connection
MAX_PENDING = 32               # connections not (yet) logged in, all hosts
MAX_PENDING_PER_HOST = 4       # ... from one host address


class ManholeConfigError(SystemExit):
    pass


KEY_TYPES = (b"ssh-", b"ecdsa-", b"sk-")


def _split_options(line):
    """(options field, rest) of an authorized_keys line that starts with
    options: the field ends at the first blank outside double quotes."""
    quoted = False
    for i, c in enumerate(line):
        if c == ord('"'):
            quoted = not quoted
        elif c in b" \t" and not quoted:
            return line[:i], line[i:].strip()
    return line, b""


def _option_names(field):
    """Names of the comma-separated options (``from="a,b"`` is one)."""
    names, quoted, start = [], False, 0
    for i, c in enumerate(field + b","):
        if c == ord('"'):
            quoted = not quoted
        elif c == ord(",") and not quoted:
            names.append(field[start:i].split(b"=", 1)[0].decode("ascii", "replace"))
            start = i + 1
    return [n for n in names if n]


def load_authorized_keys(path):
    """Public keys of an authorized_keys file (sshd(8) format).

    A line that cannot be read as a key is skipped with a warning. A key
    with options (``from=``, ``no-pty``, ``command=``, ...) is refused with a
    warning naming them: the manhole cannot enforce any of them, and
    accepting the key would silently grant more than the line says. No
    usable key at all is a one-line configuration error.
    """
    if not path:
        raise ManholeConfigError("twistd piccolo: the manhole needs an authorized_keys "
                                 "file: [manhole] keys = FILE in the server config, "
                                 "or --manhole-keys FILE")
    found = []
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ManholeConfigError(f"twistd piccolo: {path}: cannot read manhole keys: "
                                 f"{e.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        if not line.startswith(KEY_TYPES):
            field, rest = _split_options(line)
            if rest.startswith(KEY_TYPES):
                log.warn("manhole: {path} line {n}: key refused: its options "
                         "({options}) cannot be enforced by the manhole",
                         path=path, n=number,
                         options=", ".join(_option_names(field)))
            else:
                log.warn("manhole: {path} line {n}: not a public key, skipped",
                         path=path, n=number)
            continue
        parts = line.split()
        try:
            if len(parts) < 2:
                raise keys.BadKeyError("no key data")
            key = keys.Key.fromString(b" ".join(parts[:2]))
            if not key.isPublic() or key.sshType() != parts[0]:
                raise keys.BadKeyError("key type does not match its data")
        except Exception as e:      # BadKeyError, or a decoder's own error
            log.warn("manhole: {path} line {n}: unreadable {kind} key, skipped "
                     "({error})", path=path, n=number,
                     kind=parts[0].decode("ascii", "replace"), error=e)
            continue
        found.append(key)
    if not found:
        raise ManholeConfigError(f"twistd piccolo: {path}: no usable public key "
                                 "for the manhole")
    return found


def host_key(path, note=None):
    """The server's SSH host key, generated once (0600) at ``path`` (in a
    directory made 0700 when missing; statedir.py says where).

    Whatever is in the way (a directory, an unreadable or garbled file) is
    moved aside with an error in the log, and a fresh key made: only a
    place where no key can be written stops the start, with one line."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    except OSError as e:
        raise ManholeConfigError(f"twistd piccolo: cannot make the directory of the "
                                 f"manhole host key {path}: {e.strerror or e}") from None
    if os.path.lexists(path):
        try:
            return keys.Key.fromFile(path)
        except Exception as e:      # OSError, BadKeyError, a decoder's own error
            from .datadir import set_aside
            aside = set_aside(path)
            log.error("manhole: host key {path} unusable ({error}); moved aside to "
                      "{aside}, a new key is made", path=path, error=e, aside=aside)
            if note is not None:
                note(f"manhole host key {path} unusable ({e}); moved aside to {aside}, "
                     "a new key is made")
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise ManholeConfigError(f"twistd piccolo: cannot write the manhole host key "
                                 f"{path}: {e.strerror or e}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("openssh"))
    log.info("manhole: generated SSH host key {path}", path=path)
    return key


from twisted.conch.ssh import userauth  # noqa: E402


class _UserAuth(userauth.SSHUserAuthServer):
    loginTimeout = LOGIN_TIMEOUT     # conch's default is 10 h


def make_portal(namespace, authorized):
    realm = manhole_ssh.TerminalRealm()
    realm.chainedProtocolFactory = lambda: insults.ServerProtocol(
        manhole.ColoredManhole, namespace)
    checker = SSHPublicKeyChecker(InMemorySSHKeyDB({LOGIN: authorized}))
    return portal.Portal(realm, [checker])


def make_factory(namespace, authorized, key):
    factory = manhole_ssh.ConchFactory(make_portal(namespace, authorized))
    factory.services = dict(factory.services)
    factory.services[b"ssh-userauth"] = _UserAuth
    factory.publicKeys = {key.sshType(): key.public()}
    factory.privateKeys = {key.sshType(): key}
    return factory


class _LoginGuard(policies.ProtocolWrapper):
    """Closes the connection unless it has logged in within LOGIN_TIMEOUT."""

    timer = None
    received = 0                    # bytes from the client so far
    since = 0.0

    def connectionMade(self):
        self.since = self.factory.clock.seconds()
        self.timer = self.factory.clock.callLater(LOGIN_TIMEOUT, self.expire)
        super().connectionMade()

    def dataReceived(self, data):
        self.received += len(data)
        super().dataReceived(data)

    def close(self):
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def logged_in(self):
        wrapped = self.wrappedProtocol
        return (getattr(wrapped, "avatar", None) is not None
                or type(getattr(wrapped, "service", None)).__name__ == "SSHConnection")

    def expire(self):
        self.timer = None
        self.factory.settled(self)
        if not self.logged_in():
            log.info("manhole: {peer} did not log in within {t:.0f} s; closed",
                     peer=self.getPeer(), t=LOGIN_TIMEOUT)
            self.close()

    def connectionLost(self, reason):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.factory.settled(self)
        super().connectionLost(reason)


class LoginGuardFactory(policies.WrappingFactory):
    """Wraps the SSH factory: a login timeout, and a cap on connections
    that have not logged in yet, per host address and in all."""

    protocol = _LoginGuard

    def __init__(self, wrapped, clock=None, cap=MAX_PENDING, per_host=MAX_PENDING_PER_HOST):
        super().__init__(wrapped)
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.cap = cap
        self.per_host = per_host
        self.pending = {}           # guard -> host, connections in their login time
        self.per_host_count = {}

    def buildProtocol(self, addr):
        address = getattr(addr, "host", None)
        host = host_of(address) if isinstance(address, str) else address
        held = self.per_host_count.get(host, 0)
        if held >= self.per_host:
            log.info("manhole: connection from {host} refused: {n} not logged in yet",
                     host=address, n=held)
            return None
        if len(self.pending) >= self.cap:
            victim = self._victim(held)
            if victim is None:
                log.info("manhole: connection from {host} refused: {n} connections "
                         "not logged in yet", host=address, n=len(self.pending))
                return None
            log.info("manhole: {peer} closed, not logged in, for {host} (fair share "
                     "of the {cap} connections)", peer=victim.getPeer(), host=address,
                     cap=self.cap)
            self.settled(victim)
            victim.close()
        guard = super().buildProtocol(addr)
        if guard is None:
            return None
        self.pending[guard] = host
        self.per_host_count[host] = self.per_host_count.get(host, 0) + 1
        return guard

    def _victim(self, held):
        """A connection to end for a host holding ``held``: of the hosts
        holding the most (more than ``held``), the one that has sent the
        least, the oldest first; None when no host holds more."""
        most = max(self.per_host_count.values(), default=0)
        if most <= held:
            return None
        hosts = {h for h, n in self.per_host_count.items() if n == most}
        return min((g for g, h in self.pending.items() if h in hosts),
                   key=lambda g: (g.received, g.since), default=None)

    def settled(self, guard):
        """``guard``'s login time is over (logged in, closed or expired)."""
        if guard not in self.pending:
            return
        host = self.pending.pop(guard)
        left = self.per_host_count.get(host, 1) - 1
        if left > 0:
            self.per_host_count[host] = left
        else:
            self.per_host_count.pop(host, None)


def manhole_service(piccolo):
    settings = piccolo.settings
    authorized = load_authorized_keys(settings.manhole_keys)
    from .statedir import host_key_path
    note = getattr(getattr(piccolo, "datadir", None), "note_fault", None)
    key = host_key(host_key_path(settings), note=note)
    factory = make_factory(piccolo.namespace(), authorized, key)
    interface = settings.manhole_interface or "127.0.0.1"
    endpoint = f"tcp:{settings.manhole_port}:interface={interface.replace(':', chr(92) + ':')}"
    shown = f"[{interface}]" if ":" in interface else interface     # IPv6 as in URLs
    log.info("manhole: SSH on {interface}:{port}, user admin, keys from {keys}",
             interface=shown, port=settings.manhole_port, keys=settings.manhole_keys)
    return strports.service(endpoint, LoginGuardFactory(factory))
