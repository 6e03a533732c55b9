"""The command line's errors (no dependencies: every module of the command
line can raise them, with or without aiocoap installed)."""


class CliError(Exception):
    """A one-line error for the person at the terminal; ``code`` is the exit status."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class Unreachable(CliError):
    """No answer, or the network says nobody is there."""


class Refused(CliError):
    """The server answered with an error code (4.xx, 5.xx)."""


class NotFound(Refused):
    """4.04: no such resource (e.g. an unknown run)."""
