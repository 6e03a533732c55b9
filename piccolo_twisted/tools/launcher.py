"""``piccolo3-server``: the legacy launcher, now a front for twistd.

It accepts the legacy options, reads ``[daemon]`` and ``[logging]`` of the
server config, and runs twistd with the equivalent arguments: foreground
unless daemon mode is asked for. twistd does the daemonising, the pid file
and the log file.
"""

import argparse
import os
import sys

from .. import __version__
from ..config import ConfigError, load_server_config


def build_argv(args, settings):
    """twistd's argv for the legacy options and the server config."""
    daemon = args.daemonize or settings.daemon
    argv = ["twistd"]
    logfile = args.log_file or (settings.daemon_logfile if daemon else settings.logfile)
    if daemon:
        argv += ["--pidfile", args.pid_file or settings.pid_file]
    else:
        argv += ["--nodaemon", "--pidfile", args.pid_file or ""]
    if daemon and args.daemon_log_file:
        logfile = args.daemon_log_file
    if logfile:
        argv += ["--logger", "piccolo_twisted.logs.rotating_observer"]
    argv.append("piccolo")
    if args.server_configuration:
        argv += ["--config", args.server_configuration]
    if args.debug:
        argv.append("--debug")
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.mount:
        argv.append("--mount")
    return argv, logfile


def parser():
    p = argparse.ArgumentParser(prog="piccolo3-server",
                                description="Run the Piccolo server (through twistd).")
    p.add_argument("-s", "--server-configuration", metavar="CFG",
                   help="server configuration file")
    p.add_argument("-d", "--debug", action="store_true", help="log at debug level")
    p.add_argument("-l", "--log-file", help="log file")
    p.add_argument("-D", "--daemonize", action="store_true", help="run as a daemon")
    p.add_argument("-p", "--pid-file", help="pid file (daemon mode)")
    p.add_argument("-L", "--daemon-log-file", help="log file in daemon mode")
    p.add_argument("-o", "--data-dir", help="data directory")
    p.add_argument("-m", "--mount", action="store_true", help="mount the data device")
    p.add_argument("-v", "--version", action="version", version=__version__)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        settings = (load_server_config(args.server_configuration)
                    if args.server_configuration else load_server_config())
    except ConfigError as e:
        sys.exit(f"piccolo3-server: {e}")
    twistd_argv, logfile = build_argv(args, settings)
    if logfile:
        os.environ["PICCOLO_LOGFILE"] = os.path.abspath(logfile)
    sys.argv = twistd_argv
    from twisted.scripts.twistd import run
    run()


if __name__ == "__main__":
    main()
