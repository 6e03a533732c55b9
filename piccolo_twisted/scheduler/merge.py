"""What the scheduler kept in memory, and a database that opened again:
the one set of jobs, and what to write. Pure functions of their arguments.

The file may be the one memory came from (a data directory pulled and
plugged back in), a fresh one, or another one (another stick). Jobs are
matched by ``Job.identity`` (number and what they were created with),
never by number alone:

- a job memory has is memory's, with its number (clients were told it);
- a job of the file that memory has let go (deleted, done) goes;
- any other job of the file is another job and is kept, with a new
  number if one of memory's jobs has its own.

Nothing is there twice: an outcome the file already has is not written
again, and a batch the file says was interrupted counts only for the
file's own jobs (memory knows better about the ones it has or let go).
"""

from twisted.logger import Logger

from .database import INSERT_HISTORY, INSERT_JOB

log = Logger(namespace="piccolo_twisted.scheduler.store.Store")


def merge_jobs(mine, gone, theirs, next_id):
    """``mine``: memory's jobs (id -> Job); ``gone``: identities let go;
    ``theirs``: the file's jobs; ``next_id``: the lowest number free in
    both. Returns ``(jobs, statements, foreign, next_id)``: the merged
    jobs (id -> Job), the statements that make the file hold them,
    ``{file's id: id now}`` for the file's own jobs kept, and the next
    free number."""
    known = {job.identity for job in mine.values()}
    merged = dict(mine)
    statements, foreign = [], {}
    for job in sorted(theirs.values(), key=lambda j: j.id):
        if job.identity in known:
            continue
        statements.append(("DELETE FROM jobs WHERE id = ?", (job.id,)))
        if job.identity in gone:
            continue
        old = job.id
        if old in merged:
            job.id, next_id = next_id, next_id + 1
            log.info("job {old} of the database renumbered {new}: this server's "
                     "job {old} is another one", old=old, new=job.id)
        foreign[old] = job.id
        merged[job.id] = job
    # highest first, so that no number is taken twice on the way
    for old, new in sorted(foreign.items(), reverse=True):
        if old != new:
            statements.append(("UPDATE history SET job = ? WHERE job = ?", (new, old)))
    statements.extend((INSERT_JOB, job.row()) for job in merged.values())
    return merged, statements, foreign, next_id


def interrupted_rows(rows, foreign, known):
    """The file's running rows (batches a process died in) worth
    recording: those of the file's own jobs, renumbered, not ``known``."""
    return [(foreign[j], s, k, r) for j, s, k, r in rows
            if j in foreign and (foreign[j], s) not in known]


def new_outcomes(unwritten, stored):
    """Statements for the outcomes of ``unwritten`` the file's history
    (``stored``) does not have."""
    have = {o.row() for o in stored}
    return [(INSERT_HISTORY, o.row()) for o in unwritten if o.row() not in have]
