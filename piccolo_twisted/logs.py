"""Logging set-up: level filtering and stdlib logging routed into twisted.logger."""

import logging

from twisted.logger import (FilteringLogObserver, LogLevel,
                            LogLevelFilterPredicate, globalLogPublisher,
                            STDLibLogObserver)
from twisted.logger import Logger

_installed = {}


class _ToTwisted(logging.Handler):
    """A stdlib handler that re-emits records as twisted.logger events."""

    LEVELS = {logging.DEBUG: LogLevel.debug, logging.INFO: LogLevel.info,
              logging.WARNING: LogLevel.warn, logging.ERROR: LogLevel.error,
              logging.CRITICAL: LogLevel.critical}

    def emit(self, record):
        level = self.LEVELS.get(record.levelno, LogLevel.info)
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        Logger(namespace=record.name).emit(level, "{text}", text=text)


def route_stdlib_logging(debug=False):
    """Send seabreeze's, gpiozero's, ... stdlib log records to twisted.logger."""
    root = logging.getLogger()
    if any(isinstance(h, _ToTwisted) for h in root.handlers):
        return
    root.addHandler(_ToTwisted())
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def set_level(debug):
    """Filter every installed observer to info (or debug) and above.

    twistd installs its observers after makeService, so this runs from
    startService; observers are wrapped once.
    """
    predicate = _installed.get("predicate")
    if predicate is None:
        predicate = LogLevelFilterPredicate(LogLevel.info)
        observers = list(getattr(globalLogPublisher, "_observers", []))
        for observer in observers:
            if isinstance(observer, (FilteringLogObserver, STDLibLogObserver)):
                continue
            globalLogPublisher.removeObserver(observer)
            globalLogPublisher.addObserver(FilteringLogObserver(observer, [predicate]))
        _installed["predicate"] = predicate
    predicate.setLogLevelForNamespace(None, LogLevel.debug if debug else LogLevel.info)


def rotating_file_observer(path, rotate=1000000, keep=10):
    """A text observer writing ``path``, rotated at ``rotate`` bytes."""
    import os
    from twisted.logger import textFileLogObserver
    from twisted.python import logfile
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    f = logfile.LogFile.fromFullPath(path, rotateLength=rotate, maxRotatedFiles=keep)
    return textFileLogObserver(f)


def add_log_file(path, debug=False):
    """Also log to ``path`` (the server config's ``[logging] logfile``)."""
    observer = rotating_file_observer(path)
    level = LogLevel.debug if debug else LogLevel.info
    globalLogPublisher.addObserver(
        FilteringLogObserver(observer, [LogLevelFilterPredicate(level)]))
    return observer


def rotating_observer():
    """A log observer factory for ``twistd --logger piccolo_twisted.logs.rotating_observer``.

    Writes ``$PICCOLO_LOGFILE`` (default /var/log/piccolo/piccolo.log),
    rotated at ``$PICCOLO_LOG_ROTATE`` bytes (default 1 MB), keeping
    ``$PICCOLO_LOG_KEEP`` old files (default 10): bounded on a Pi that runs
    for months. Plain ``twistd -l FILE`` also rotates at 1 MB but keeps
    every old file.
    """
    import os
    return rotating_file_observer(
        os.environ.get("PICCOLO_LOGFILE", "/var/log/piccolo/piccolo.log"),
        rotate=int(os.environ.get("PICCOLO_LOG_ROTATE", 1000000)),
        keep=int(os.environ.get("PICCOLO_LOG_KEEP", 10)))


def log_start_failure(text, environ=None):
    """A start-up error (a config problem) also goes to the log file of a
    server run as the unit runs it (``$PICCOLO_LOGFILE``, the rotating
    observer's file): twistd prints it to stderr before any log observer
    starts, so ``tail`` of the log never showed why the server was not
    running. Best effort: a log that cannot be written changes nothing."""
    import os
    import time
    from twisted.logger import LogLevel
    environ = os.environ if environ is None else environ
    if not environ.get("PICCOLO_LOGFILE"):
        return
    try:
        observer = rotating_file_observer(environ["PICCOLO_LOGFILE"])
        observer({"log_format": "{text}", "text": text, "log_level": LogLevel.critical,
                  "log_namespace": "piccolo", "log_system": "-",
                  "log_time": time.time()})
    except (OSError, ValueError):
        pass
