"""``piccolo3-season``: the unattended instrument over simulated months.

The real server components (scheduler with its SQLite file, control, the
simulated instrument with its fault injection, the data directory on a
temporary directory, the power switches) run on a simulated clock through
a seeded world of jobs, settings, client requests and faults, while named
invariants are checked throughout. Any failing seed replays exactly.
"""
