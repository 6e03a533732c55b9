"""``piccolo3 [--server URL] COMMAND ...``: argument parsing and exit codes."""

import argparse
import asyncio
import os
import sys

from .errors import CliError
from .terminal import emit, shown

try:
    from .client import DEFAULT_SERVER, TIMEOUT
except ImportError as e:            # the server's own install, without the [cli] extra
    MISSING = e.name or str(e)
    DEFAULT_SERVER, TIMEOUT = "coap://localhost", 3.0
else:
    MISSING = None

# exit codes
OK, ERROR, USAGE, FAULT, ABORTED = 0, 1, 2, 3, 4


def _seconds(text):
    """--timeout: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="piccolo3",
        description="Operate a Piccolo spectrometer over CoAP.",
        epilog="Exit status: 0 done, 1 error, 2 usage or a malformed answer from "
               "the server, 3 the batch stopped on a fault, 4 the batch was aborted.")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("status", help="one screen: control, spectrometers, shutters, jobs")
    p.add_argument("--watch", action="store_true", help="follow changes (Ctrl-C ends)")
    p.add_argument("--updates", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("record", help="record a batch and follow it")
    p.add_argument("--run", required=True, help="run name")
    p.add_argument("-n", "--nsequence", type=int, required=True, help="number of sequences")
    p.add_argument("--auto", type=int, help="autointegrate: -1 never, 0 once, n every n-th")
    p.add_argument("--delay", type=float, help="seconds between sequences")
    p.add_argument("--target", type=int, help="autointegration target, percent of saturation")

    p = sub.add_parser("fetch", help="copy spectrum files to this computer")
    p.add_argument("run", nargs="?", help="run name")
    p.add_argument("dir", help="destination: files go to DIR/<run>/")
    p.add_argument("--all", action="store_true", help="every run")
    p.add_argument("-j", "--jobs", type=int, default=4, help="transfers in flight (default 4)")

    p = sub.add_parser("plot", help="plot .pico files (counts against wavelength)")
    p.add_argument("files", nargs="+", metavar="FILE.pico")
    p.add_argument("--dark", action="store_true",
                   help="subtract the matching dark spectrum (same batch, spectrometer, "
                        "channel and integration time; from the files given or beside them)")
    p.add_argument("--per-ms", action="store_true",
                   help="counts per millisecond of integration (spectra of different times)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", metavar="OUT.png")
    out.add_argument("--show", action="store_true", help="open a window")

    sub.add_parser("jobs", help="the schedule in words")
    sub.add_parser("health", help="disk, devices, clock, faults")
    from . import operate
    # the commands of set and schedule take them after their own words too
    operate.add_parsers(sub, nested=lambda p: _global_options(p, argparse.SUPPRESS))
    for command in sub.choices.values():
        # after the command too (``piccolo3 status --server URL``); absent
        # there, the value given before it (or the default) stays
        _global_options(command, argparse.SUPPRESS)
    return parser


def _global_options(parser, default=None):
    """``--server`` and ``--timeout``, accepted before and after the command."""
    server = os.environ.get("PICCOLO_SERVER", DEFAULT_SERVER)
    parser.add_argument("--server", default=server if default is None else default,
                        help=f"coap://host[:port] (default $PICCOLO_SERVER or {server})")
    parser.add_argument("--timeout", type=_seconds,
                        default=TIMEOUT if default is None else default,
                        help=f"seconds to wait for an answer (default {TIMEOUT})")


async def run(argv, out=None, err=None, interactive=False):
    """Run one command; returns the exit status. ``interactive``: Ctrl-C
    during ``record`` asks whether to abort (needs the main thread)."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else USAGE
    if MISSING is not None:
        return _missing(MISSING, err)
    try:
        if args.command == "plot":
            from .plot import plot
            return plot(args.files, args.output, args.show, out, dark=args.dark,
                        per_ms=args.per_ms)
        if args.command == "fetch" and (args.all == bool(args.run)):
            raise CliError("fetch: give RUN DIR, or --all DIR", USAGE)
        from .client import Client
        from . import commands
        async with Client(args.server, args.timeout) as client:
            if args.command == "status":
                return await commands.status(client, out, args.watch, args.updates)
            if args.command == "record":
                return await commands.record(client, args, out, err, interactive)
            if args.command == "fetch":
                from .fetch import fetch
                return await fetch(client, args.run, args.dir, args.jobs, err)
            if args.command == "jobs":
                return await commands.jobs(client, out)
            if args.command == "health":
                return await commands.health(client, out)
            from . import operate
            if args.command in operate.COMMANDS:
                return await operate.run(client, args, out)
    except CliError as e:
        # one line, whatever the server put in its message
        emit(err, f"piccolo3: {shown(e)}")
        return e.code
    except ImportError as e:          # tqdm or matplotlib missing (lazily imported)
        return _missing(e.name or str(e), err)
    raise AssertionError(args.command)


def _missing(name, err):
    """One line saying how to install what is missing, as the README does
    (the packages are not on PyPI: they install from a copy of the
    repository, with this installation's own pip)."""
    pip = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "pip")
    if __package__.startswith("piccolo_twisted"):
        # the server's install, without the [cli] extra
        sudo = "" if os.access(sys.prefix, os.W_OK) else "sudo "
        how = f"in a copy of piccolo-twisted, {sudo}{pip} install '.[cli]'"
    else:
        how = f"in a copy of piccolo-twisted, {pip} install ./client"
    print(f"piccolo3: needs the command line's libraries ({name} is missing): "
          f"{how}", file=err)
    return ERROR


def main(argv=None):
    try:
        return asyncio.run(run(argv, interactive=True))
    except KeyboardInterrupt:
        print("piccolo3: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return ERROR


if __name__ == "__main__":
    raise SystemExit(main())
