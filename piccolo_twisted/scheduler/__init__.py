"""The scheduler: persistent measurement jobs, quiet time, power window.

- :mod:`.calendar`: schedule arithmetic, pure functions;
- :mod:`.database` and :mod:`.store`: the durable state (SQLite: jobs,
  settings, the power window's flag, the history; the in-memory mode when
  the file cannot be used);
- :mod:`.jobs`: when each job is due, running it, catch-up, outcomes;
- :mod:`.power`: the power window, a small state machine over the
  instrument's lease;
- :mod:`.scheduler`: the service tying them together, and the resources.
"""

from ..api import EncodedJSON
from ..errors import PiccoloError
from .calendar import (DAY, in_quiet, iso, next_run, normalise_quiet_time,
                       parse_quiet_time, power_window, quiet_window)
from .database import (INSERT_JOB, SCHEMA, SCHEMA_VERSION, Job, Outcome, load_database,
                       read_database, write_batch)
from .scheduler import CATCH_UP, DB_NAME, DEFAULT_SETTINGS, MAX_JOBS, Scheduler

__all__ = ["CATCH_UP", "DAY", "DB_NAME", "DEFAULT_SETTINGS", "EncodedJSON", "INSERT_JOB",
           "Job", "MAX_JOBS", "Outcome", "PiccoloError", "SCHEMA", "SCHEMA_VERSION",
           "Scheduler", "in_quiet", "iso", "load_database", "next_run",
           "normalise_quiet_time", "parse_quiet_time", "power_window", "quiet_window",
           "read_database", "write_batch"]
