"""SSH manhole (twisted.conch): a live Python prompt inside the server.

Off unless a port is configured. Listens on 127.0.0.1 unless an interface
is named. Public-key authentication only, keys from an authorized_keys
file, login name ``admin``; password logins are not offered. The host key
is generated on first use in the data directory with mode 0600.
Imported only when the manhole is on: conch costs ~10 MiB.
"""

import os

from twisted.application import strports
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.logger import Logger

log = Logger()
LOGIN = b"admin"
HOST_KEY = "manhole_host_key"


class ManholeConfigError(SystemExit):
    pass


def load_authorized_keys(path):
    """Public keys of an authorized_keys file; options and comments ignored."""
    if not path:
        raise ManholeConfigError("piccolo: the manhole needs --manhole-keys FILE "
                                 "(an authorized_keys file)")
    found = []
    try:
        with open(path, "rb") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith(b"#"):
                    continue
                # a line may start with options: find the key type field
                parts = line.split()
                for i, part in enumerate(parts):
                    if part.startswith((b"ssh-", b"ecdsa-", b"sk-")) and i + 1 < len(parts):
                        try:
                            found.append(keys.Key.fromString(b" ".join(parts[i:i + 2])))
                        except keys.BadKeyError:
                            log.warn("manhole: unreadable key in {path}", path=path)
                        break
    except OSError as e:
        raise ManholeConfigError(f"piccolo: cannot read manhole keys {path}: "
                                 f"{e.strerror}") from None
    if not found:
        raise ManholeConfigError(f"piccolo: no public key in {path}")
    return found


def host_key(directory):
    """The server's SSH host key, generated once (0600) in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, HOST_KEY)
    if os.path.exists(path):
        return keys.Key.fromFile(path)
    from cryptography.hazmat.primitives.asymmetric import ed25519
    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("openssh"))
    log.info("manhole: generated SSH host key {path}", path=path)
    return key


def make_portal(namespace, authorized):
    realm = manhole_ssh.TerminalRealm()
    realm.chainedProtocolFactory = lambda: insults.ServerProtocol(
        manhole.ColoredManhole, namespace)
    checker = SSHPublicKeyChecker(InMemorySSHKeyDB({LOGIN: authorized}))
    return portal.Portal(realm, [checker])


def make_factory(namespace, authorized, key):
    factory = manhole_ssh.ConchFactory(make_portal(namespace, authorized))
    factory.publicKeys = {key.sshType(): key.public()}
    factory.privateKeys = {key.sshType(): key}
    return factory


def manhole_service(piccolo):
    settings = piccolo.settings
    authorized = load_authorized_keys(settings.manhole_keys)
    from .datadir import prepare_state
    key = host_key(prepare_state(settings.datadir))
    factory = make_factory(piccolo.namespace(), authorized, key)
    interface = settings.manhole_interface or "127.0.0.1"
    endpoint = f"tcp:{settings.manhole_port}:interface={interface.replace(':', chr(92) + ':')}"
    log.info("manhole: SSH on {interface}:{port}, user admin, keys from {keys}",
             interface=interface, port=settings.manhole_port, keys=settings.manhole_keys)
    return strports.service(endpoint, factory)
