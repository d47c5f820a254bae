"""
The master's job store: SQLite, so that jobs outlive the master process.

A job's row holds what it asks for and, once started, the transfer id it
runs under, the salt of its latest run (`datagram.run_key`) and, until the
job ends, its key.  A master killed mid-job restarts the job under the same
id and key, so the nodes' part files of that transfer are found and verified
instead of sent again; the run, and so the datagram key, is new.  Writes are
few (state changes, and final results as one compressed row per node), so
they are made on the reactor thread; WAL keeps them cheap.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
#: A node's state in a job it was meant for but was not connected when the
#: job started: nothing was sent to it, and a later push catches it up.
MISSED = "missed"

#: The job store's layout, in SQLite's ``user_version``: 0 is a store from
#: before it had one (whose jobs may lack the ``run`` column).  A store of
#: an older layout is brought up to this one when opened (`_MIGRATIONS`);
#: one of a newer layout is refused, since an older release would misread it.
SCHEMA_VERSION = 4
#: Finished jobs kept by default (`JobStore.prune`): the newest this many ...
KEEP_JOBS = 1000
#: ... and none finished longer ago than this many days.
KEEP_DAYS = 90.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    operator TEXT NOT NULL DEFAULT '',
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    transfer_id BLOB,
    key BLOB,
    slot INTEGER,
    payload_bytes INTEGER NOT NULL DEFAULT 0,
    sent_bytes INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    run BLOB
);
CREATE TABLE IF NOT EXISTS job_nodes (
    job INTEGER NOT NULL REFERENCES jobs(id),
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    needed_bytes INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0,
    hook TEXT,
    PRIMARY KEY (job, node)
);
CREATE TABLE IF NOT EXISTS job_results (
    job INTEGER NOT NULL REFERENCES jobs(id),
    node TEXT NOT NULL,
    results BLOB NOT NULL,
    PRIMARY KEY (job, node)
);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    tags TEXT NOT NULL DEFAULT '[]',
    address TEXT NOT NULL DEFAULT '',
    last_contact REAL NOT NULL DEFAULT 0,
    last_ok_job INTEGER,
    last_ok_at REAL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    job INTEGER NOT NULL,
    event TEXT NOT NULL,
    who TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

#: The audit log is appended to, never changed: SQLite refuses any update
#: or deletion of its rows (a trigger each, whose bodies hold semicolons,
#: so they are not in `_SCHEMA`, which is run a statement at a time).
_AUDIT_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS audit_no_{verb.lower()} BEFORE {verb} ON audit"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
    for verb in ("UPDATE", "DELETE")
]

#: What the audit log records of a job (`JobStore.audit`) ...
SUBMITTED, STARTED, FINISHED_EVENT, CANCEL_ASKED = "submitted", "started", "finished", "cancel"
#: ... and of the fleet, under job 0.
FORGOT_NODE = "forget-node"


class DigestCache:
    """
    Chunk digests of the master's source files, so that pushing a large
    tree again reads only what changed since.  A file is known by device,
    inode, size, mtime and ctime (ctime changes on every write, even one that
    puts the mtime back) and the chunk size.  Used from the scanning thread,
    which opens its own connection.
    """

    #: Entries written in one transaction: one for each file of a first push
    #: of 10,000 small files took 0.1 s of its scan.  Those not yet written
    #: are lost with the process, and computed again next time.
    BATCH = 512

    def __init__(self, path: str, hold: bool = False) -> None:
        """
        ``hold``: entries put are not written until `flush` or `close`,
        and `take` hands them over instead: a scan's new digests wait for
        its job's offer, as 100,000 files' took a first push 0.29 s to
        write (10,000: 0.03 s), and the job then writes them (`put_all`).
        """
        self._pending: dict[tuple[int, ...], bytes] = {}
        self.hold = hold
        self.db = sqlite3.connect(path, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A cache: an entry lost to a power cut is computed again, so no
        # fsync at each file's entry (on ext4, 196 µs a file against 17:
        # 1.8 s of a first push of 10,000 files went on syncing the cache).
        self.db.execute("PRAGMA synchronous=NORMAL")
        # "digests" held BLAKE2b chunk digests (before SHA-256): never reuse them.
        self.db.execute("DROP TABLE IF EXISTS digests")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS sha256_digests (dev INTEGER, ino INTEGER, size INTEGER,"
            " mtime_ns INTEGER, ctime_ns INTEGER, chunk_size INTEGER, digests BLOB, used REAL,"
            " PRIMARY KEY (dev, ino, size, mtime_ns, ctime_ns, chunk_size))"
        )

    def get(self, key: tuple[int, ...]) -> bytes | None:
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        row = self.db.execute(
            "SELECT digests FROM sha256_digests WHERE dev = ? AND ino = ? AND size = ? AND mtime_ns = ?"
            " AND ctime_ns = ? AND chunk_size = ?",
            key,
        ).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: tuple[int, ...], digests: bytes) -> None:
        self._pending[key] = digests
        if not self.hold and len(self._pending) >= self.BATCH:
            self.flush()

    def take(self) -> dict[tuple[int, ...], bytes]:
        """The entries put and not yet written, which are then no longer this cache's to write."""
        taken, self._pending = self._pending, {}
        return taken

    def put_all(self, entries: Mapping[tuple[int, ...], bytes]) -> None:
        """Write many entries at once (those a scan's cache held, once its job is offered)."""
        self._pending.update(entries)
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        now = time.time()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO sha256_digests VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*key, digests, now) for key, digests in self._pending.items()],
            )
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self.db.close()


def remember_digests(path: str, learned: Mapping[tuple[int, ...], bytes]) -> None:
    """Write what a scan's cache held (`DigestCache.take`) to the cache at ``path``: blocking, in a thread."""
    cache = DigestCache(path)
    try:
        cache.put_all(learned)
    finally:
        cache.close()


@dataclass
class Job:
    id: int
    state: str
    spec: dict[str, Any]
    operator: str
    submitted: float
    started: float | None = None
    finished: float | None = None
    transfer_id: bytes | None = None
    key: bytes | None = None
    slot: int | None = None
    payload_bytes: int = 0
    sent_bytes: int = 0
    message: str = ""
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What `mrsync jobs` and `mrsync status` show."""
        return {
            "id": self.id,
            "state": self.state,
            "spec": self.spec,
            "operator": self.operator,
            "submitted": self.submitted,
            "started": self.started,
            "finished": self.finished,
            "payload_bytes": self.payload_bytes,
            "sent_bytes": self.sent_bytes,
            "message": self.message,
            "nodes": self.nodes,
        }


@dataclass(frozen=True)
class KnownNode:
    """A node the master expects, as the store remembers it across restarts."""

    name: str
    tags: tuple[str, ...] = ()
    address: str = ""
    last_contact: float = 0.0
    last_ok_job: int | None = None
    last_ok_at: float | None = None


class StoreError(Exception):
    """The job store cannot be used (a newer release's, or not a store at all)."""


def _add_run_column(db: sqlite3.Connection) -> None:
    """0 to 1: jobs from before each run had a key of its own lack ``run``."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "run" not in columns:
        db.execute("ALTER TABLE jobs ADD COLUMN run BLOB")


def _pack_results(results: dict[str, str]) -> bytes:
    return zlib.compress(json.dumps(results, separators=(",", ":")).encode(), 1)


def _results_per_node(db: sqlite3.Connection) -> None:
    """
    1 to 2: a job's file results were a row per file and node, 80,000 rows
    for a tree of 10,000 files to 8 nodes, written on the reactor thread
    at the end of every job (0.4 s of an unchanged push); now one
    compressed row per node.
    """
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'job_files'").fetchone():
        return
    found: dict[tuple[int, str], dict[str, str]] = {}
    for job, node, path, result in db.execute("SELECT job, node, path, result FROM job_files"):
        found.setdefault((job, node), {})[path] = result
    db.executemany(
        "INSERT OR REPLACE INTO job_results (job, node, results) VALUES (?, ?, ?)",
        [(job, node, _pack_results(results)) for (job, node), results in found.items()],
    )
    db.execute("DROP TABLE job_files")


def _audit_table(db: sqlite3.Connection) -> None:
    """2 to 3: the audit log (made by `_SCHEMA` and `_AUDIT_TRIGGERS`); jobs before it have no entries."""


#: A store brought to layout 4 expects the nodes its jobs named within this
#: many days: older names are likely retired nodes, which every job to
#: ``all`` would then report missed until an operator forgot them.
KNOWN_FROM_JOBS_DAYS = 7.0


def _known_nodes(db: sqlite3.Connection) -> None:
    """
    3 to 4: the nodes a master expects (``nodes``).  Before it, a master
    knew only the nodes connected since it started; the nodes its recent
    jobs name are expected from now on, each with the last job it completed
    (not a dry run).  Their tags and addresses come with their next
    registration.
    """
    done = "n.state = 'done' AND COALESCE(json_extract(j.spec, '$.dry_run'), 0) = 0"
    db.execute(
        "INSERT OR IGNORE INTO nodes (name, last_contact, last_ok_job, last_ok_at)"
        f" SELECT n.node, MAX(j.finished), MAX(CASE WHEN {done} THEN j.id END),"
        f" MAX(CASE WHEN {done} THEN j.finished END)"
        " FROM job_nodes n JOIN jobs j ON j.id = n.job WHERE j.finished IS NOT NULL GROUP BY n.node"
        " HAVING MAX(j.finished) >= ?",
        (time.time() - KNOWN_FROM_JOBS_DAYS * 86400,),
    )


#: ``_MIGRATIONS[n]`` brings a store of layout ``n`` to ``n + 1``.
_MIGRATIONS = [_add_run_column, _results_per_node, _audit_table, _known_nodes]


class JobStore:
    """
    Jobs, their nodes' outcomes and their files' results.  Finished jobs
    are kept while they are among the newest ``keep_jobs`` and finished
    within ``keep_days`` (`prune`); their rows go after.  A job's key goes
    as soon as it finishes.
    """

    def __init__(self, path: str, keep_jobs: int = KEEP_JOBS, keep_days: float = KEEP_DAYS) -> None:
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.keep_jobs = keep_jobs
        self.keep_days = keep_days
        self.db = sqlite3.connect(path, isolation_level=None)
        try:
            self._open(path)
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(f"{path}: not a job store ({e})") from None
        except StoreError:
            self.db.close()
            raise
        self.prune()

    def _open(self, path: str) -> None:
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} was written by a newer mrsyncd (store layout {version}; this release "
                f"reads up to {SCHEMA_VERSION}): upgrade mrsyncd, or move the file away to start "
                "with no job history"
            )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            # One statement at a time: executescript would commit first.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
            for trigger in _AUDIT_TRIGGERS:
                self.db.execute(trigger)
            for migrate in _MIGRATIONS[version:]:
                migrate(self.db)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def prune(self, now: float | None = None) -> int:
        """
        Forget finished jobs past the newest ``keep_jobs`` or finished more
        than ``keep_days`` ago, with their nodes' and files' rows; returns
        how many.  Queued and running jobs are never forgotten.
        """
        cutoff = (time.time() if now is None else now) - self.keep_days * 86400
        placeholders = ", ".join("?" * len(FINISHED))
        doomed = [
            job_id
            for (job_id,) in self.db.execute(
                f"SELECT id FROM jobs WHERE state IN ({placeholders}) AND (finished < ? OR id NOT IN"
                f" (SELECT id FROM jobs WHERE state IN ({placeholders}) ORDER BY id DESC LIMIT ?))",
                (*FINISHED, cutoff, *FINISHED, self.keep_jobs),
            )
        ]
        if doomed:
            self.db.execute("BEGIN")
            for table, column in (("job_results", "job"), ("job_nodes", "job"), ("jobs", "id")):
                self.db.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(j,) for j in doomed])
            self.db.execute("COMMIT")
        return len(doomed)

    def close(self) -> None:
        self.db.close()

    def add(self, spec: dict[str, Any], operator: str) -> int:
        cursor = self.db.execute(
            "INSERT INTO jobs (state, spec, operator, submitted) VALUES (?, ?, ?, ?)",
            (QUEUED, json.dumps(spec, sort_keys=True), operator, time.time()),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def get(self, job_id: int) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def _job(self, row: tuple[Any, ...]) -> Job:
        job = Job(
            id=row[0],
            state=row[1],
            spec=json.loads(row[2]),
            operator=row[3],
            submitted=row[4],
            started=row[5],
            finished=row[6],
            transfer_id=row[7],
            key=row[8],
            slot=row[9],
            payload_bytes=row[10],
            sent_bytes=row[11],
            message=row[12],
        )
        for node, state, reason, needed, changed, hook in self.db.execute(
            "SELECT node, state, reason, needed_bytes, changed, hook"
            " FROM job_nodes WHERE job = ? ORDER BY node",
            (job.id,),
        ):
            job.nodes[node] = {
                "state": state,
                "reason": reason,
                "needed_bytes": needed,
                "changed": changed,
                "hook": None if hook is None else json.loads(hook),
            }
        return job

    def jobs(self, limit: int = 50) -> list[Job]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [self._job(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        """Jobs in the store, by state (every state named, 0 or not)."""
        counts = dict.fromkeys((QUEUED, RUNNING, *FINISHED), 0)
        counts.update(self.db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        return counts

    def unfinished(self) -> list[Job]:
        rows = self.db.execute(
            "SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY id", (QUEUED, RUNNING)
        ).fetchall()
        return [self._job(row) for row in rows]

    def start(self, job_id: int, transfer_id: bytes, key: bytes, slot: int, run: bytes) -> None:
        self.db.execute(
            "UPDATE jobs SET state = ?, started = COALESCE(started, ?), transfer_id = ?, key = ?, slot = ?,"
            " run = ? WHERE id = ?",
            (RUNNING, time.time(), transfer_id, key, slot, run, job_id),
        )

    def progress(self, job_id: int, payload_bytes: int, sent_bytes: int) -> None:
        self.db.execute(
            "UPDATE jobs SET payload_bytes = ?, sent_bytes = ? WHERE id = ?",
            (payload_bytes, sent_bytes, job_id),
        )

    def set_node(
        self,
        job_id: int,
        node: str,
        state: str,
        reason: str = "",
        needed_bytes: int = 0,
        changed: int = 0,
        hook: dict[str, Any] | None = None,
    ) -> None:
        self.db.execute(
            "INSERT INTO job_nodes (job, node, state, reason, needed_bytes, changed, hook)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job, node) DO UPDATE SET state = excluded.state,"
            " reason = excluded.reason, needed_bytes = excluded.needed_bytes, changed = excluded.changed,"
            " hook = excluded.hook",
            (job_id, node, state, reason, needed_bytes, changed, None if hook is None else json.dumps(hook)),
        )

    def audit(self, job_id: int, event: str, who: str, fingerprint: str, detail: dict[str, Any]) -> None:
        """Append to the audit log: ``who`` (a certificate's name and SHA-256 fingerprint) did ``event``."""
        self.db.execute(
            "INSERT INTO audit (at, job, event, who, fingerprint, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), job_id, event, who, fingerprint, json.dumps(detail, sort_keys=True)),
        )

    def audit_log(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """The audit log, oldest first; of one job, or of all."""
        where, args = ("WHERE job = ?", (job_id,)) if job_id is not None else ("", ())
        columns = ("at", "job", "event", "who", "fingerprint", "detail")
        rows = self.db.execute(f"SELECT {', '.join(columns)} FROM audit {where} ORDER BY seq", args)
        return [{**dict(zip(columns, row, strict=True)), "detail": json.loads(row[5])} for row in rows]

    def known_nodes(self) -> list[KnownNode]:
        """Every node that has registered and not been forgotten, by name."""
        return [
            KnownNode(name, tuple(json.loads(tags)), address, last_contact, last_ok_job, last_ok_at)
            for name, tags, address, last_contact, last_ok_job, last_ok_at in self.db.execute(
                "SELECT name, tags, address, last_contact, last_ok_job, last_ok_at FROM nodes ORDER BY name"
            )
        ]

    def remember_node(self, name: str, tags: tuple[str, ...], address: str, contact: float) -> None:
        """A node registered, or was last heard from at ``contact``."""
        self.db.execute(
            "INSERT INTO nodes (name, tags, address, last_contact) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET tags = excluded.tags, address = excluded.address,"
            " last_contact = excluded.last_contact",
            (name, json.dumps(list(tags)), address, contact),
        )

    def node_succeeded(self, name: str, job_id: int, at: float) -> None:
        self.db.execute("UPDATE nodes SET last_ok_job = ?, last_ok_at = ? WHERE name = ?", (job_id, at, name))

    def forget_node(self, name: str) -> bool:
        """No longer expect ``name`` in ``all`` or a tag's jobs; False if it was not known."""
        return self.db.execute("DELETE FROM nodes WHERE name = ?", (name,)).rowcount > 0

    def set_files(self, job_id: int, node: str, results: dict[str, str]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO job_results (job, node, results) VALUES (?, ?, ?)",
            (job_id, node, _pack_results(results)),
        )

    def files(self, job_id: int) -> dict[str, dict[str, str]]:
        """Each node's result for each path, paths in order."""
        return {
            node: dict(sorted(json.loads(zlib.decompress(packed)).items()))
            for node, packed in self.db.execute(
                "SELECT node, results FROM job_results WHERE job = ? ORDER BY node", (job_id,)
            )
        }

    def finish(self, job_id: int, state: str, message: str = "") -> None:
        """A finished job runs no more, so its key goes at once: the store outlives its datagrams."""
        assert state in FINISHED
        self.db.execute(
            "UPDATE jobs SET state = ?, finished = ?, message = ?, key = NULL WHERE id = ?",
            (state, time.time(), message, job_id),
        )
        self.prune()
