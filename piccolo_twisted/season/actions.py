"""What happens in the world: client requests and faults, each a seeded
stream of events, and the season's regular checks.

Client requests go through the same handlers the CoAP site calls
(``service.components``), with the arguments a client's JSON payload
becomes; whatever they answer is taken as a client would take it.
"""

from datetime import datetime, timezone

from .world import DAY, log_uniform

HOUR = 3600.0
MINUTE = 60.0
INTERVALS = [1800, 3600, 2 * 3600, 3 * 3600, 4 * 3600, 6 * 3600, 8 * 3600,
             12 * 3600, 86400, 2700, 5400]
#: the world keeps the scheduled load of repeating record jobs below this
MAX_BATCHES_PER_DAY = 10


def at_iso(ts):
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def schedule(season):
    w = season.world
    t0 = season.t
    # clients
    w.stream("add-job", 1.2, lambda: add_record_job(season), t0)
    w.stream("add-power-job", 0.08, lambda: add_power_job(season), t0)
    w.stream("job-admin", 0.8, lambda: job_admin(season), t0)
    w.stream("settings", 0.6, lambda: change_setting(season), t0)
    w.stream("manual", 1.0, lambda: manual_batch(season), t0)
    w.stream("dark", 0.3, lambda: season.request("control", "record_dark", run="manual"), t0)
    w.stream("auto", 0.3, lambda: season.request("control", "auto"), t0)
    w.stream("pause-abort", 2.0, lambda: pause_or_abort(season), t0)
    w.stream("shutter", 0.5, lambda: shutter(season), t0)
    w.stream("power-now", 0.1, lambda: power_now(season), t0)
    # the moments where the order of check, commit and act matters most:
    # the power window's edges, a clock gone back past the server's start
    w.stream("edge", 1.5, lambda: aim_at_window_edge(season), t0)
    # faults
    f = season.faults
    if "crash" in f:
        w.stream("crash", 0.5, lambda: crash(season), t0)
    if "clock" in f:
        w.stream("clock", 0.35, lambda: clock_jump(season), t0)
    if "unplug" in f:
        w.stream("unplug", 0.35, lambda: unplug(season), t0)
    if "power" in f:
        w.stream("power", 0.3, lambda: power_fault(season), t0)
    if "disk-full" in f:
        w.stream("disk-full", 0.2, lambda: disk_full(season), t0)
    if "slow-commit" in f:
        w.stream("slow-commit", 0.3, lambda: slow_commit(season), t0)
    # checks
    every(season, "check-slots", HOUR, season.check_slots)
    every(season, "check-power", 5 * MINUTE, season.check_power)
    every(season, "check-health", DAY / 3, season.check_health)


def every(season, name, period, action):
    def fire():
        action()
        season.world.at(season.world.now + period, fire)
    season.world.at(season.t + period, fire)


# -- jobs ---------------------------------------------------------------------

def live_load(season):
    """Scheduled batches a day of the live repeating record jobs."""
    return sum(DAY / j.interval for j in season.ledger.jobs
               if j.kind == "record" and j.interval and j.state in ("active", "pending"))


def add_record_job(season):
    rng = season.world.rng("add-job")
    wall = season.wall()
    if wall is None:
        return
    season.job_seq += 1
    run = f"job{season.job_seq}"
    start = float(int(wall + log_uniform(rng, 5 * MINUTE, 2 * DAY)))
    interval = None
    if rng.random() < 0.65:
        interval = float(rng.choice(INTERVALS))
        while live_load(season) + DAY / interval > MAX_BATCHES_PER_DAY and interval < DAY:
            interval *= 2
        if live_load(season) + DAY / interval > MAX_BATCHES_PER_DAY:
            interval = None
    end = None
    if interval and rng.random() < 0.6:
        end = start + interval * rng.randint(1, 60) + rng.choice([0, interval / 2])
    args = dict(run=run, nsequence=rng.choice([1, 1, 1, 1, 2, 3]),
                auto=rng.choice([-1, -1, -1, 0, 1]), delay=float(rng.choice([0, 0, 5, 30])),
                at_time=at_iso(start))
    if interval:
        args["interval"] = interval
    if end is not None:
        args["end_time"] = at_iso(end)
    job = season.ledger.new_job("record", run, start, interval, end, wall)
    _job_request(season, job, "control", "record_sequence", kwargs=args)


def add_power_job(season):
    rng = season.world.rng("add-power-job")
    wall = season.wall()
    if wall is None:
        return
    kind = rng.choice(["power_on", "power_off"])
    start = float(int(wall + log_uniform(rng, HOUR, 3 * DAY)))
    job = season.ledger.new_job(kind, None, start, DAY, None, wall)
    season.power_jobs.append(job)
    _job_request(season, job, "control", kind, kwargs={"at_time": at_iso(start)})
    # the operator deletes it again after a few days (while it is live,
    # the power check stands aside: the operator's wish is the state)
    season.world.at(season.t + rng.uniform(1, 5) * DAY, _delete_power_job, season, job)


def _delete_power_job(season, job):
    if job.state in ("active", "suspended") and job.id is not None:
        def done(_):
            job.state = "deleted"
            season.user_power(job.kind == "power_on")
        season.request("control/scheduler", "delete", job.id,
                       change={"job": job, "on_ack": done})
    elif job.state in ("active", "suspended", "pending"):
        season.world.at(season.t + HOUR, _delete_power_job, season, job)


def _job_request(season, job, component, path, kwargs):
    ledger = season.ledger

    def stored(_):
        job.state = "active"
        for row in season.listing():
            if job.run is not None and row[1][0] == "record" and row[1][1][0] == job.run:
                ledger.learn_id(job, row[0])
            elif job.run is None and row[1][0] == job.kind and abs(
                    datetime.fromisoformat(row[2]).timestamp() - job.start) < 1e-3:
                ledger.learn_id(job, row[0])

    def refused(error):
        job.state = "deleted"
    if season.request(component, path, change={"job": job, "on_ack": stored,
                                               "on_refuse": refused}, **kwargs) is None:
        job.state = "deleted"


def job_admin(season):
    rng = season.world.rng("job-admin")
    live = [j for j in season.ledger.jobs if j.state in ("active", "suspended")
            and j.id is not None and not j.uncertain]
    if rng.random() < 0.1 or not live:
        # an unknown id, as a client with a stale listing sends
        season.request("control/scheduler", rng.choice(["delete", "suspend", "unsuspend"]),
                       10 ** 6 + rng.randrange(1000))
        return
    job = rng.choice(live)
    r = rng.random()
    if job.state == "suspended" and r < 0.7:
        verb, state = "unsuspend", "active"
    elif r < 0.6:
        verb, state = "suspend", "suspended"
    else:
        verb, state = "delete", "deleted"

    def done(_):
        if state == "suspended" and job.state == "active":
            season.ledger.suspended(job)
        elif state == "active" and job.state == "suspended":
            season.ledger.resumed(job, season.wall())
        elif state == "deleted":
            job.state = "deleted"
    if verb == "unsuspend":
        job.resume_wall = season.wall()
    season.request("control/scheduler", verb, job.id,
                   change={"job": job, "on_ack": done})


# -- settings -----------------------------------------------------------------

def change_setting(season):
    rng = season.world.rng("settings")
    r = rng.random()
    if r < 0.3:
        key, value = "quietTimeEnabled", rng.random() < 0.7
    elif r < 0.5:
        key, value = "powerOffEnabled", rng.random() < 0.7
    elif r < 0.65:
        key, value = "powerDelay", rng.choice([0, 60, 300, 600, 1800])
    else:
        key = rng.choice(["quietStart", "quietEnd"])
        hour = rng.choice([19, 20, 21, 22, 23]) if key == "quietStart" else rng.choice(
            [2, 3, 4, 5, 6])
        offset = rng.choice(["+0000", "+0000", "+0100", "-0330", ""])
        value = f"{hour:02d}:{rng.choice([0, 15, 30, 45]):02d}:00{offset}"
    ledger = season.ledger
    old = ledger.settings.get(key)
    if old is None and season.inc is not None:
        old = season.inc.resource("control/scheduler", key).get()

    def stored(_):
        normal = value if not isinstance(value, str) or len(value) > 8 else value + "+0000"
        ledger.settings[key] = normal
        season.power_disturbed()
    season.request("control/scheduler", key, value,
                   change={"setting": key, "value": value if not isinstance(value, str)
                           or len(value) > 8 else value + "+0000",
                           "old": old, "on_ack": stored})


# -- the operator at the instrument ------------------------------------------

def manual_batch(season):
    rng = season.world.rng("manual")
    season.request("control", "record_sequence", run="manual",
                   nsequence=rng.choice([1, 1, 2]), auto=rng.choice([-1, -1, 0]))


def pause_or_abort(season):
    inc = season.inc
    if inc is None or not inc.started or not inc.control.busy:
        return
    rng = season.world.rng("pause-abort")
    if rng.random() < 0.5:
        season.request("control", "abort", method="get")
    else:
        season.request("control", "pause", method="get")
        season.world.at(season.t + log_uniform(rng, 1, 600), _resume, season, inc,
                        getattr(inc.control, "outcome", None))


def _resume(season, inc, procedure):
    # a second pause resumes: sent while the same procedure runs
    if inc is season.inc and inc.control.busy and getattr(
            inc.control, "outcome", None) is procedure:
        season.request("control", "pause", method="get")


def shutter(season):
    rng = season.world.rng("shutter")
    channel = rng.choice(["upwelling", "downwelling"])
    season.request("shutter", f"{channel}/open_shutter")
    season.world.at(season.t + rng.uniform(1, 30), season.request, "shutter",
                    f"{channel}/close_shutter")


def power_now(season):
    rng = season.world.rng("power-now")
    on = rng.random() < 0.5

    season.request("control", "power_on" if on else "power_off",
                   change={"on_ack": lambda _: season.user_power(on)})
    if not on:
        # the operator switches them back on later
        season.world.at(season.t + log_uniform(rng, 60, 6 * HOUR),
                        lambda: season.request("control", "power_on", change={
                            "on_ack": lambda _: season.user_power(True)}))


# -- faults -------------------------------------------------------------------

def crash(season):
    rng = season.world.rng("crash-mode")
    if season.inc is None:
        return
    r = rng.random()
    if r < 0.35:
        season.crash()
    elif r < 0.55:
        season.armed = "batch"          # the next batch dies in its first minute
    elif r < 0.7:
        season.armed = "write"          # the next spectrum file's write() is torn
    else:
        # mid-commit: between a write's start and its answer
        inc = season.inc
        db = inc.db

        def hook(start, run_at):
            db.on_call = None
            when = rng.uniform(season.t, run_at + 0.001)
            season.world.at(when, _crash_if, season, inc)
        db.on_call = hook


def _crash_if(season, inc):
    if season.inc is inc:
        season.crash()


def clock_jump(season):
    inc = season.inc
    if inc is None:
        return
    rng = season.world.rng("clock")
    size = log_uniform(rng, 1.0, 6 * HOUR) if rng.random() < 0.9 else rng.uniform(1, 2) * DAY
    jump = size if rng.random() < 0.5 else -size
    season.counts["clock"] += 1
    season.note(f"wall clock jumps {jump:+.0f} s")
    inc.wall.offset += jump
    season.clock_moved()
    if rng.random() < 0.7:
        # NTP puts it right again, after a while
        season.world.at(season.t + log_uniform(rng, 60, DAY), season.ntp_sync)


def unplug(season):
    rng = season.world.rng("unplug")
    serial = rng.choice(list(season.cable_in))
    if not season.cable_in[serial]:
        return
    inc = season.inc

    def pull():
        if not season.cable_in[serial]:
            return
        season.counts["unplug"] += 1
        season.note(f"{serial} unplugged")
        season.cable_in[serial] = False
        if season.inc is not None:
            season.inc.gpio.apply(serial)
        season.world.at(season.t + log_uniform(rng, 10, 6 * HOUR), plug)

    def plug():
        season.note(f"{serial} plugged in again")
        season.cable_in[serial] = True
        if season.inc is not None:
            season.inc.gpio.apply(serial)
    if rng.random() < 0.4 and inc is not None:
        # mid-batch: when the next batch is a few seconds in
        _when_busy(season, pull, rng)
    else:
        pull()


def _when_busy(season, action, rng, tries=2000):
    inc = season.inc
    if inc is None:
        return
    if inc.control.busy:
        season.world.at(season.t + rng.uniform(0.05, 5), action)
    elif tries:
        season.world.at(season.t + 30 * MINUTE, _when_busy, season, action, rng, tries - 1)


def power_fault(season):
    rng = season.world.rng("power")
    season.counts["power"] += 1
    if rng.random() < 0.5:
        season.note("power switches fail")
        _switches_fail(season, log_uniform(rng, MINUTE, 3 * HOUR))
    else:
        # slow devices: an abort leaves a read running, and a power change
        # meanwhile answers "busy"
        delay = rng.uniform(20, 120)
        duration = log_uniform(rng, 10 * MINUTE, 3 * HOUR)
        season.note(f"spectrometers read {delay:.0f} s slowly")
        season.read_delay = delay
        season.slow_reads_until = season.t + duration + 2 * delay
        if season.inc is not None:
            for device in season.inc.bus.devices.values():
                device.read_delay = delay

        def heal():
            season.read_delay = 0.0
            if season.inc is not None:
                for device in season.inc.bus.devices.values():
                    device.read_delay = 0.0
        season.world.at(season.t + duration, heal)


def disk_full(season):
    rng = season.world.rng("disk-full")
    if season.disk.full:
        return
    season.counts["disk-full"] += 1
    season.note("disk full")
    season.disk.full = True
    season.stall_changed()

    def heal():
        season.disk.full = False
        season.stall_changed()
        season.note("disk has space again")
    season.world.at(season.t + log_uniform(rng, MINUTE, 12 * HOUR), heal)


def slow_commit(season):
    rng = season.world.rng("slow-commit")
    if season.slow_commit:
        return
    season.counts["slow-commit"] += 1
    season.note("SQLite commits slow")
    _commits_slow(season, log_uniform(rng, MINUTE, 6 * HOUR))


def _for_a_while(season, flag, duration, healed):
    """``season.<flag>`` true for ``duration`` simulated seconds, then
    ``healed()``."""
    setattr(season, flag, True)

    def heal():
        setattr(season, flag, False)
        healed()
    season.world.at(season.t + duration, heal)


def _switches_fail(season, duration):
    def healed():
        season.power_disturbed()
        season.note("power switches work again")
    _for_a_while(season, "switch_fault", duration, healed)


def _commits_slow(season, duration):
    _for_a_while(season, "slow_commit", duration,
                 lambda: season.note("SQLite commits fast again"))


# -- aimed at the seams ----------------------------------------------------------

def next_window_edge(season, inc):
    """(wall time, "open" or "close") of the power window's next edge
    after now, or None (no window)."""
    from .checks import quiet_window
    get = lambda key: inc.resource("control/scheduler", key).get()   # noqa: E731
    if not (get("quietTimeEnabled") and get("powerOffEnabled")):
        return None
    wall = inc.wall()
    delay = get("powerDelay")
    start, end = quiet_window(wall, get("quietStart"), get("quietEnd"))
    if end - start <= 2 * delay:
        return None
    opens, closes = start + delay, end - delay
    if opens > wall:
        return opens, "open"
    if closes > wall:
        return closes, "close"
    return None


def aim_at_window_edge(season):
    """At the power window's next edge (as the server's wall clock will
    read it): client batches asked for just before, at and during the
    window's commit; now and then a job due at that very second; a commit
    made slow across the edge; the power switches failing as the window
    opens or closes. Whatever order the server puts these in, a batch must never
    lose its spectrometers, and a failed switch-off must be retried."""
    inc = season.inc
    if inc is None or not inc.started:
        return
    edge = next_window_edge(season, inc)
    if edge is None:
        return
    wall_edge = edge[0]
    dt = wall_edge - inc.wall()
    if dt > DAY:
        return
    rng = season.world.rng("edge")
    true_edge = season.t + dt
    w = season.world
    if rng.random() < 0.5:
        for offset in (rng.uniform(-1.0, 0.0), rng.uniform(0.0, 0.03),
                       rng.uniform(0.03, 2.0), rng.uniform(2.0, 60.0)):
            w.at(true_edge + offset, _edge_batch, season, inc)
    w.at(true_edge - 1.0, _aim_commits, season, true_edge + 2 * HOUR)
    if rng.random() < 0.3 and live_load(season) < MAX_BATCHES_PER_DAY:
        w.at(season.t, _edge_job, season, wall_edge + rng.choice([0, 0, 1, 2]))
    if "slow-commit" in season.faults and rng.random() < 0.5:
        w.at(true_edge - rng.uniform(0.0, 2.0), _slow_for, season,
             rng.uniform(10.0, 180.0))
    # at either edge: a switch-off that fails as the window opens, and a
    # switch-on that fails as it closes, must each be retried
    if "power" in season.faults and rng.random() < 0.5:
        w.at(true_edge - rng.uniform(0.0, 2.0), _switches_fail_for, season,
             log_uniform(rng, MINUTE, 20 * MINUTE))


def _aim_commits(season, until):
    """The commits that start until ``until`` (the window's own among
    them) get a client batch asked for as they answer."""
    season.aim_commits = (season.t, until, 6)


def _edge_batch(season, inc):
    if season.inc is inc and inc.started:
        rng = season.world.rng("edge-batch")
        # a batch with a pause between its sequences: the spectrometers are
        # idle in it, and only the lease keeps a power change out
        season.request("control", "record_sequence", run="manual",
                       nsequence=rng.choice([1, 2, 2, 3]), auto=-1,
                       delay=float(rng.choice([0, 5, 30, 120])))


def _edge_job(season, at):
    wall = season.wall()
    if wall is None or at <= wall:
        return
    season.job_seq += 1
    run = f"job{season.job_seq}"
    job = season.ledger.new_job("record", run, float(at), None, None, wall)
    _job_request(season, job, "control", "record_sequence",
                 kwargs=dict(run=run, nsequence=1, auto=-1, delay=0.0, at_time=at_iso(at)))


def _slow_for(season, duration):
    if season.slow_commit:
        return
    season.counts["slow-commit"] += 1
    season.note(f"SQLite commits slow across the power window's edge ({duration:.0f} s)")
    _commits_slow(season, duration)


def _switches_fail_for(season, duration):
    if season.switch_fault:
        return
    season.counts["power"] += 1
    season.note(f"power switches fail at the window's edge ({duration:.0f} s)")
    _switches_fail(season, duration)


def clock_back_after_boot(season, inc):
    """Soon after a start, the wall clock goes back past the moment the
    server started (a wrong NTP server, a manual PUT /sysinfo/clock), and
    files are saved before it is put right: health must count them."""
    if season.inc is not inc:
        return
    rng = season.world.rng("clock-back")
    size = (inc.clock.seconds() - inc.booted_at) + log_uniform(rng, MINUTE, 6 * HOUR)
    season.counts["clock"] += 1
    season.note(f"wall clock jumps {-size:+.0f} s (back past the start)")
    inc.wall.offset -= size
    season.clock_moved()
    w = season.world
    w.at(season.t + rng.uniform(10, 120), _edge_batch, season, inc)
    w.at(season.t + rng.uniform(120, 600), _edge_batch, season, inc)
    w.at(season.t + rng.uniform(15, 30) * MINUTE, season.check_health)
    w.at(season.t + rng.uniform(40, 90) * MINUTE, season.check_health)
    w.at(season.t + log_uniform(rng, 2 * HOUR, 8 * HOUR), season.ntp_sync)
