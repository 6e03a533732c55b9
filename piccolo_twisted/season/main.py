"""The command line: ``piccolo3-season --days N --seed S [--faults LIST]``."""

import argparse
import random
import sys
import time

from .invariants import help_text
from .world import FAULTS


def parse(argv):
    faults = "\n".join(f"  {k}: {v}" for k, v in FAULTS.items())
    p = argparse.ArgumentParser(
        prog="piccolo3-season",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the real Piccolo server components through simulated "
                    "days with a seeded world of jobs, client requests and faults, "
                    "checking invariants throughout. The last line is "
                    "'<days> days, <batches> batches, <faults> faults, "
                    "<violations> violations'; the exit status is 0 exactly when "
                    "there are no violations. A violation is printed with its seed "
                    "and simulated time: the same arguments replay it.",
        epilog=f"fault kinds (--faults, comma-separated; default all; 'none' for "
               f"none):\n{faults}\n\n{help_text()}")
    p.add_argument("--days", type=float, default=365.0,
                   help="simulated days (default 365)")
    p.add_argument("--seed", type=int, default=None,
                   help="the world's seed (default: a random one, printed)")
    p.add_argument("--faults", default="all",
                   help="fault kinds to inject (default all)")
    p.add_argument("--keep-going", action="store_true",
                   help="go on after the first violation and count them all")
    p.add_argument("--verbose", action="store_true",
                   help="print the server's log and the world's events with "
                        "simulated times")
    p.add_argument("--cooler", action="store_true",
                   help="one spectrometer with a thermo-electric cooler (QE Pro-like): "
                        "the server reads its temperature every 10 s, which triples "
                        "the season's time")
    p.add_argument("--dir", default=None,
                   help="keep the data directory here (default: a temporary "
                        "directory, removed at the end)")
    args = p.parse_args(argv)
    if args.faults in ("all", ""):
        args.faults = list(FAULTS)
    elif args.faults == "none":
        args.faults = []
    else:
        args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
        unknown = [f for f in args.faults if f not in FAULTS]
        if unknown:
            p.error(f"unknown fault kind {unknown[0]!r}; known: {', '.join(FAULTS)}")
    if args.days <= 0:
        p.error("--days must be positive")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10 ** 9)
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    import os
    os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")
    from twisted.logger import globalLogBeginner
    # the server's log goes to the season (printed with --verbose), not to
    # a buffer of its own
    globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)
    from .run import Season
    started = time.monotonic()
    season = Season(args.days, args.seed, args.faults, root=args.dir,
                    verbose=args.verbose, out=sys.stdout, keep_going=args.keep_going,
                    tec=args.cooler)
    try:
        season.run()
    finally:
        season.cleanup()
    print(f"({time.monotonic() - started:.1f} s)")
    print(season.summary())
    return 1 if season.violations else 0


if __name__ == "__main__":
    sys.exit(main())
