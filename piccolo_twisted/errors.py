"""The exceptions components raise; the CoAP layer maps them to codes."""


class PiccoloError(Exception):
    """An operation was refused or its input is bad: answered 4.00."""


class BusyError(PiccoloError):
    def __init__(self, message="piccolo system is busy"):
        super().__init__(message)


class NotFoundError(PiccoloError):
    """The named thing does not exist: answered 4.04."""


class MethodNotAllowedError(PiccoloError):
    """The path exists but not for this method: answered 4.05."""


class UnavailableError(PiccoloError):
    """What the request needs is missing for now (the data directory on a
    pulled stick): answered 5.03 with the reason."""
