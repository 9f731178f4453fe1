"""The pool's durable state: jobs and events in SQLite (WAL), so that `kill -9` of the daemon loses nothing.

Every change is one transaction; the daemon rebuilds its ledger from the jobs table on start. The state holds
each job's environment (secrets, often): the folder is 0700 and every file in it 0600, whatever the umask.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 4

JOB_STATES = ("queued", "running", "preempted", "succeeded", "failed", "cancelled", "stopped", "lost", "rejected")
ACTIVE_STATES = ("queued", "running", "preempted")
"""Jobs not ended yet: ``preempted`` ones were stopped to seat higher-class work and wait to start again."""
WAITING_STATES = ("queued", "preempted")
"""Jobs the Hi Scheduler holds as pending work (a daemon restart submits them again)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    name TEXT NOT NULL,
    command TEXT NOT NULL,
    cwd TEXT NOT NULL,
    env TEXT NOT NULL,
    device_count INTEGER NOT NULL,
    share_milli INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    model TEXT NOT NULL,
    priority INTEGER NOT NULL,
    priority_class TEXT NOT NULL DEFAULT 'normal',
    queue TEXT NOT NULL DEFAULT 'default',
    opportunistic INTEGER NOT NULL DEFAULT 0,
    moving_from TEXT,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    pid INTEGER,
    pid_start_ticks INTEGER,
    slices TEXT,
    submitted_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    job_id TEXT,
    kind TEXT NOT NULL,
    message TEXT NOT NULL
);
"""


def make_private_tree(*folders: Path) -> None:
    """Create ``folders`` as 0700 and make what is already in them private: folders 0700, files 0600.

    Fixes state left by older versions or created under a loose umask; never follows symbolic links."""
    for folder in folders:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        for root, dirs, files in os.walk(folder):
            for name in dirs:
                _chmod_private(Path(root) / name, 0o700)
            for name in files:
                _chmod_private(Path(root) / name, 0o600)


def _chmod_private(path: Path, mode: int) -> None:
    try:
        info = path.lstat()
        if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & ~mode:
            os.chmod(path, mode)
    except FileNotFoundError:
        pass  # gone meanwhile (a job's temporary file)


def _private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it is missing; make it 0600 if it exists."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


@dataclass
class JobRecord:
    id: str
    name: str
    command: list[str]
    cwd: str
    env: dict[str, str]
    device_count: int
    share_milli: int
    memory_mib: int
    model: str
    priority: int
    priority_class: str = "normal"
    """``high`` (never preempted), ``normal`` (preemptible after a minimum runtime) or ``low``."""
    queue: str = "default"
    opportunistic: bool = False
    """Runs (or ran, or is being stopped) as a time-sharing guest on share granted to others (``flexai.hi.timeshare``):
    paused while their owners are busy, stopped and queued again when they need the memory."""
    moving_from: list[dict[str, object]] | None = None
    """Set while the job moves (defragmentation): the slices it leaves, where the process recorded by ``pid`` (if
    any) still runs; ``slices`` are where it belongs and starts again once that process has stopped."""
    state: str = "queued"
    reason: str = ""
    exit_code: int | None = None
    pid: int | None = None
    pid_start_ticks: int | None = None
    slices: list[dict[str, object]] | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    seq: int = 0

    def public(self) -> dict[str, object]:
        """What the API shows (the job's environment stays private)."""
        data = asdict(self)
        data.pop("env")
        data.pop("pid_start_ticks")
        return data


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    job_id: str | None
    kind: str
    message: str


class Store:
    def __init__(self, path: Path, keep_events: int = 100_000) -> None:
        self.keep_events = keep_events
        """Newest events kept; older ones are dropped so a long-lived pool's state does not grow forever."""
        self._events_since_trim = 0
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        # SQLite gives its -wal and -shm files the database file's mode: create that one 0600 first.
        _private_file(path)
        for suffix in ("-wal", "-shm", "-journal"):
            _chmod_private(Path(f"{path}{suffix}"), 0o600)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self.tx():
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) in (1, 2, 3):
                # Version 1 had no priority classes and no queues: every job is normal, in the default queue.
                # Version 2 had no time-sharing: no job ran as a guest. Version 3 had no moves: none was moving.
                columns = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
                for column, declaration in (
                    ("priority_class", "TEXT NOT NULL DEFAULT 'normal'"),
                    ("queue", "TEXT NOT NULL DEFAULT 'default'"),
                    ("opportunistic", "INTEGER NOT NULL DEFAULT 0"),
                    ("moving_from", "TEXT"),
                ):
                    if column not in columns:
                        self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
                self._db.execute("UPDATE meta SET value = ? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            elif int(row["value"]) != SCHEMA_VERSION:
                raise RuntimeError(
                    f"state {path} has schema version {row['value']}, this flexai reads {SCHEMA_VERSION}"
                )

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ jobs
    def insert_job(self, job: JobRecord, event: str) -> JobRecord:
        with self.tx() as db:
            cur = db.execute(
                "INSERT INTO jobs (id, name, command, cwd, env, device_count, share_milli, memory_mib, model, priority,"
                " priority_class, queue, state, reason, submitted_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.id,
                    job.name,
                    json.dumps(job.command),
                    job.cwd,
                    json.dumps(job.env),
                    job.device_count,
                    job.share_milli,
                    job.memory_mib,
                    job.model,
                    job.priority,
                    job.priority_class,
                    job.queue,
                    job.state,
                    job.reason,
                    job.submitted_at,
                ),
            )
            job.seq = int(cur.lastrowid or 0)
            self._event(db, job.id, "submitted", event)
        return job

    def update_job(self, job_id: str, event_kind: str | None = None, event: str = "", **fields: object) -> None:
        if not fields:
            return
        encoded = {
            k: json.dumps(v) if k in ("slices", "command", "env", "moving_from") and v is not None else v
            for k, v in fields.items()
        }
        assignments = ", ".join(f"{k} = ?" for k in encoded)
        with self.tx() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*encoded.values(), job_id))
            if event_kind:
                self._event(db, job_id, event_kind, event)

    def job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE id = ? OR name = ? ORDER BY seq DESC", (job_id, job_id)
            ).fetchone()
        return self._job(row) if row else None

    def jobs(self, states: tuple[str, ...] | None = None) -> list[JobRecord]:
        with self._lock:
            if states:
                marks = ",".join("?" for _ in states)
                rows = self._db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq", states).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        return [self._job(r) for r in rows]

    def job_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    def recent_jobs(self, limit: int) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [self._job(r) for r in reversed(rows)]

    @staticmethod
    def _job(row: sqlite3.Row) -> JobRecord:
        data = dict(row)
        data["command"] = json.loads(data["command"])
        data["env"] = json.loads(data["env"])
        data["slices"] = json.loads(data["slices"]) if data["slices"] else None
        data["moving_from"] = json.loads(data["moving_from"]) if data["moving_from"] else None
        data["opportunistic"] = bool(data["opportunistic"])
        return JobRecord(**data)

    # ------------------------------------------------------------------ events
    def event(self, job_id: str | None, kind: str, message: str) -> None:
        with self.tx() as db:
            self._event(db, job_id, kind, message)

    def _event(self, db: sqlite3.Connection, job_id: str | None, kind: str, message: str) -> None:
        db.execute(
            "INSERT INTO events (ts, job_id, kind, message) VALUES (?,?,?,?)", (time.time(), job_id, kind, message)
        )
        self._events_since_trim += 1
        if self._events_since_trim >= max(1, self.keep_events // 10):
            self._events_since_trim = 0
            db.execute("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (self.keep_events,))

    def events(self, after_id: int | None = None, limit: int = 1000, since_ts: float | None = None) -> list[Event]:
        """Events in the order they happened.

        With ``after_id``: the oldest ``limit`` events after that id (to page forward or follow). Without: the
        newest ``limit`` events, those at or after ``since_ts`` (seconds since the epoch) when it is given."""
        with self._lock:
            if after_id is not None:
                rows = self._db.execute(
                    "SELECT * FROM events WHERE id > ? AND ts >= ? ORDER BY id LIMIT ?",
                    (after_id, since_ts or 0.0, limit),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM events WHERE ts >= ? ORDER BY id DESC LIMIT ?", (since_ts or 0.0, limit)
                ).fetchall()
                rows.reverse()
        return [Event(**dict(r)) for r in rows]

    # ------------------------------------------------------------------ meta
    def put_meta(self, key: str, value: object) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str) -> object | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else None
