"""The master's job store: its layout's version, migrations and retention, on real SQLite files."""

from __future__ import annotations

import sqlite3
import time

import pytest

from mrsyncd.daemon import store
from mrsyncd.daemon.config import ConfigError, parse
from mrsyncd.daemon.store import DONE, FAILED, RUNNING, SCHEMA_VERSION, JobStore, StoreError
from mrsyncd.daemon.tap import build
from mrsyncd.security import certs

#: The store as releases before layout versions wrote it (42ed698): no
#: ``user_version``, and jobs from before runs had keys lack ``run``.
RELEASED_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT NOT NULL, spec TEXT NOT NULL,
    operator TEXT NOT NULL DEFAULT '', submitted REAL NOT NULL, started REAL, finished REAL,
    transfer_id BLOB, key BLOB, slot INTEGER, payload_bytes INTEGER NOT NULL DEFAULT 0,
    sent_bytes INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT ''{run}
);
CREATE TABLE job_nodes (
    job INTEGER NOT NULL REFERENCES jobs(id), node TEXT NOT NULL, state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', needed_bytes INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0, hook TEXT, PRIMARY KEY (job, node)
);
CREATE TABLE job_files (
    job INTEGER NOT NULL REFERENCES jobs(id), node TEXT NOT NULL, path TEXT NOT NULL,
    result TEXT NOT NULL, PRIMARY KEY (job, node, path)
);
INSERT INTO jobs (state, spec, operator, submitted, started, finished, transfer_id, key, slot)
    VALUES ('done', '{{"sources": ["/srv/a"]}}', 'alice', {now}, {now}, {now}, x'0102030405060708', x'aa', 0);
INSERT INTO jobs (state, spec, operator, submitted)
    VALUES ('queued', '{{"sources": ["/srv/b"]}}', 'bob', {now});
INSERT INTO job_nodes (job, node, state, changed) VALUES (1, 'n1', 'done', 3);
INSERT INTO job_nodes (job, node, state, reason) VALUES (1, 'n2', 'failed', 'cannot write: disk full');
INSERT INTO job_files (job, node, path, result) VALUES (1, 'n1', 'a/x', 'ok');
INSERT INTO job_files (job, node, path, result) VALUES (1, 'n1', 'a/w', 'unchanged');
INSERT INTO job_files (job, node, path, result) VALUES (1, 'n2', 'a/x', 'cannot write: disk full');
"""


def released_store(path, with_run=True):
    db = sqlite3.connect(path)
    db.executescript(RELEASED_SCHEMA.format(run=",\n    run BLOB" if with_run else "", now=time.time()))
    db.close()


def user_version(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


#: Jobs of layout 3 beside the released ones: a dry run, and one of 1970 naming a retired node.
LATER_JOBS = """
INSERT INTO jobs (id, state, spec, operator, submitted, started, finished)
    VALUES (3, 'done', '{"sources": ["/srv/c"], "dry_run": true}', 'carol', 1, 1, 1);
INSERT INTO job_nodes (job, node, state) VALUES (3, 'n2', 'done');
INSERT INTO jobs (id, state, spec, operator, submitted, started, finished)
    VALUES (4, 'done', '{"sources": ["/srv/d"]}', 'dave', 0, 0, 86400);
INSERT INTO job_nodes (job, node, state) VALUES (4, 'retired', 'done');
"""


def test_the_nodes_of_recent_jobs_are_expected_with_their_last_job_done(tmp_path):
    path = str(tmp_path / "jobs.sqlite")
    released_store(path)
    db = sqlite3.connect(path)
    db.executescript(LATER_JOBS.replace("1, 1, 1)", f"{time.time()}, {time.time()}, {time.time()})"))
    db.execute("PRAGMA user_version = 3")
    db.close()
    jobs = JobStore(path)
    known = {node.name: node for node in jobs.known_nodes()}
    # n2's only job done was a dry run: that is no last job done; 'retired' was last named in 1970.
    assert sorted(known) == ["n1", "n2"] and known["n2"].last_ok_job is None
    jobs.close()


@pytest.mark.parametrize("with_run", [True, False])
def test_a_store_of_the_released_layout_is_brought_up_to_date_with_its_jobs(tmp_path, with_run):
    path = str(tmp_path / "jobs.sqlite")
    released_store(path, with_run)
    jobs = JobStore(path)
    assert user_version(path) == SCHEMA_VERSION
    done = jobs.get(1)
    assert (done.state, done.operator, done.spec, done.transfer_id) == (
        DONE,
        "alice",
        {"sources": ["/srv/a"]},
        bytes(range(1, 9)),
    )
    assert done.nodes["n1"]["changed"] == 3
    # A row per file and node became one per node, the paths in order.
    assert jobs.files(1) == {
        "n1": {"a/w": "unchanged", "a/x": "ok"},
        "n2": {"a/x": "cannot write: disk full"},
    }
    assert list(jobs.files(1)["n1"]) == ["a/w", "a/x"]
    assert not jobs.db.execute("SELECT name FROM sqlite_master WHERE name = 'job_files'").fetchall()
    # Every node its recent jobs named is expected from now on, with the last job it completed.
    known = {node.name: node for node in jobs.known_nodes()}
    assert sorted(known) == ["n1", "n2"]
    assert (known["n1"].last_ok_job, known["n1"].last_ok_at) == (1, done.finished)
    assert (known["n2"].last_ok_job, known["n2"].last_ok_at) == (None, None)
    assert known["n2"].last_contact == done.finished and known["n2"].tags == ()
    [queued] = jobs.unfinished()
    # The queued job starts as any other, its run kept for a resume.
    jobs.start(queued.id, b"t" * 8, b"k" * 32, 1, b"r" * 16)
    assert jobs.get(queued.id).state == RUNNING
    jobs.close()
    # Opened again, it is as it was left.
    again = JobStore(path)
    assert [j.id for j in again.jobs()] == [2, 1]
    assert [node.name for node in again.known_nodes()] == ["n1", "n2"]
    again.close()


def test_a_node_is_remembered_until_it_is_forgotten(tmp_path):
    path = str(tmp_path / "jobs.sqlite")
    jobs = JobStore(path)
    jobs.remember_node("n1", ("gpu", "rack2"), "10.0.0.1", 100.0)
    jobs.remember_node("n1", ("gpu",), "10.0.0.9", 200.0)
    jobs.node_succeeded("n1", 7, 150.0)
    jobs.close()
    jobs = JobStore(path)
    assert jobs.known_nodes() == [store.KnownNode("n1", ("gpu",), "10.0.0.9", 200.0, 7, 150.0)]
    assert jobs.forget_node("n1") and not jobs.forget_node("n1")
    assert jobs.known_nodes() == []
    jobs.close()


def test_a_store_of_a_newer_layout_is_refused_and_left_as_it_is(tmp_path):
    path = str(tmp_path / "jobs.sqlite")
    released_store(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(
        StoreError,
        match=f"newer mrsyncd \\(store layout {SCHEMA_VERSION + 1}; "
        f"this release reads up to {SCHEMA_VERSION}\\)",
    ):
        JobStore(path)
    assert user_version(path) == SCHEMA_VERSION + 1
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2
    db.close()


def test_a_file_that_is_not_a_store_is_named(tmp_path):
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(b"not a database, but long enough to be read as one's header" * 20)
    with pytest.raises(StoreError, match=f"{path}: not a job store"):
        JobStore(str(path))


def test_the_daemon_refuses_to_start_on_a_newer_store_and_says_which(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    released_store(str(state / "jobs.sqlite"))
    db = sqlite3.connect(str(state / "jobs.sqlite"))
    db.execute("PRAGMA user_version = 99")
    db.close()
    ca = str(tmp_path / "ca")
    certs.create_ca(ca, "test CA", 30)
    certs.issue(ca, "master", "master", str(tmp_path))
    config = parse(
        f'[tls]\nca = "{ca}/{certs.CA_CERT}"\ncertificate = "{tmp_path}/master.crt"\n'
        f'key = "{tmp_path}/master.key"\n[master]\nstate_dir = "{state}"\nsources = ["/srv"]\n',
        "/etc/mrsyncd/mrsyncd.toml",
    )
    with pytest.raises(
        ConfigError, match="state_dir: .*jobs.sqlite was written by a newer mrsyncd"
    ) as caught:
        build(config, reactor=None)
    assert str(caught.value).startswith("/etc/mrsyncd/mrsyncd.toml")


def finished_jobs(jobs, count, finished_at):
    ids = []
    for n in range(count):
        job_id = jobs.add({"n": n}, "op")
        jobs.set_node(job_id, "n1", DONE, "", 10, 1)
        jobs.set_files(job_id, "n1", {f"f{n}": "ok"})
        jobs.db.execute("UPDATE jobs SET state = ?, finished = ? WHERE id = ?", (DONE, finished_at, job_id))
        ids.append(job_id)
    return ids


def rows(jobs, table, column):
    return sorted({row[0] for row in jobs.db.execute(f"SELECT {column} FROM {table}")})


def test_only_the_newest_finished_jobs_are_kept_with_their_rows(tmp_path):
    jobs = JobStore(str(tmp_path / "jobs.sqlite"), keep_jobs=2)
    old = finished_jobs(jobs, 3, time.time())
    running = jobs.add({"running": True}, "op")
    jobs.start(running, b"t" * 8, b"k" * 32, 0, b"r" * 16)
    newest = finished_jobs(jobs, 1, time.time())
    assert jobs.prune() == 2
    assert rows(jobs, "jobs", "id") == [old[2], running, newest[0]]
    assert rows(jobs, "job_nodes", "job") == [old[2], newest[0]]
    assert rows(jobs, "job_results", "job") == [old[2], newest[0]]
    # Finishing a job prunes: the running one, once done, pushes out the oldest kept.
    assert jobs.get(running).key == b"k" * 32
    jobs.finish(running, FAILED, "a test")
    assert jobs.get(running).key is None, "a finished job's key is kept"
    assert rows(jobs, "jobs", "id") == [running, newest[0]]


def test_jobs_that_finished_before_keep_days_go_whatever_their_number(tmp_path):
    jobs = JobStore(str(tmp_path / "jobs.sqlite"), keep_days=30)
    now = time.time()
    stale = finished_jobs(jobs, 2, now - 31 * 86400)
    fresh = finished_jobs(jobs, 1, now - 29 * 86400)
    queued = jobs.add({"queued": True}, "op")
    jobs.db.execute("UPDATE jobs SET submitted = ? WHERE id = ?", (now - 400 * 86400, queued))
    assert jobs.prune(now) == len(stale)
    assert rows(jobs, "jobs", "id") == [fresh[0], queued]


def test_a_store_is_pruned_when_it_is_opened(tmp_path):
    path = str(tmp_path / "jobs.sqlite")
    jobs = JobStore(path)
    finished_jobs(jobs, 5, time.time())
    jobs.close()
    assert len(JobStore(path, keep_jobs=3).jobs()) == 3


def test_the_default_retention_is_documented_in_the_config():
    config = parse('[master]\nsources = ["/srv"]\n', "x.toml")
    assert (config.master.keep_jobs, config.master.keep_days) == (store.KEEP_JOBS, store.KEEP_DAYS)


def test_the_audit_log_is_appended_to_and_never_changed(tmp_path):
    jobs = JobStore(str(tmp_path / "jobs.sqlite"), keep_jobs=1)
    first = jobs.add({"sources": ["/srv/a"]}, "alice")
    jobs.audit(first, store.SUBMITTED, "alice", "ab" * 32, {"sources": ["/srv/a"], "destination": "/d"})
    jobs.finish(first, DONE)
    jobs.audit(first, store.FINISHED_EVENT, "master", "", {"state": DONE})
    second = jobs.add({"sources": ["/srv/b"]}, "bob")
    jobs.audit(second, store.SUBMITTED, "bob", "cd" * 32, {"sources": ["/srv/b"]})
    jobs.finish(second, DONE)  # prunes the first job: not its audit entries
    assert jobs.get(first) is None
    log = jobs.audit_log()
    assert [(e["job"], e["event"], e["who"]) for e in log] == [
        (first, "submitted", "alice"),
        (first, "finished", "master"),
        (second, "submitted", "bob"),
    ]
    assert log[0]["fingerprint"] == "ab" * 32 and log[0]["detail"]["destination"] == "/d"
    assert [e["event"] for e in jobs.audit_log(second)] == ["submitted"]
    for statement in ("UPDATE audit SET who = 'mallory'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            jobs.db.execute(statement)
    jobs.close()
    # Opened again, by a master that upgraded or not, it is all there.
    assert len(JobStore(str(tmp_path / "jobs.sqlite")).audit_log()) == 3


def test_the_digest_cache_writes_its_entries_a_batch_at_a_time_and_the_rest_on_close(tmp_path):
    """A transaction a file cost a scan of 10,000 small files 0.1 s; entries not yet written are found."""
    path = str(tmp_path / "digests.sqlite")
    cache = store.DigestCache(path)
    cache.BATCH = 3
    other = sqlite3.connect(path)

    def written() -> int:
        return other.execute("SELECT COUNT(*) FROM sha256_digests").fetchone()[0]

    try:
        cache.put((1, 1, 1, 1, 1, 1), b"a" * 32)
        cache.put((1, 2, 1, 1, 1, 1), b"b" * 32)
        assert written() == 0
        assert cache.get((1, 2, 1, 1, 1, 1)) == b"b" * 32
        cache.put((1, 3, 1, 1, 1, 1), b"c" * 32)
        assert written() == 3
        cache.put((1, 4, 1, 1, 1, 1), b"d" * 32)
        assert written() == 3
    finally:
        cache.close()
    assert written() == 4
    other.close()
    reopened = store.DigestCache(path)
    try:
        assert reopened.get((1, 4, 1, 1, 1, 1)) == b"d" * 32
    finally:
        reopened.close()


def test_what_a_scan_learns_is_kept_apart_and_written_at_once(tmp_path):
    """A scan's new digests wait for its job's offer: 100,000 files' took a first push 0.29 s to write."""
    path = str(tmp_path / "digests.sqlite")
    known = store.DigestCache(path)
    known.put((1, 1, 1, 1, 1, 1), b"a" * 32)
    known.close()
    cache = store.DigestCache(path, hold=True)
    cache.BATCH = 1
    cache.put((1, 2, 1, 1, 1, 1), b"b" * 32)
    cache.put((1, 3, 0, 1, 1, 1), b"")  # an empty file's: no chunk, and still known
    assert cache.get((1, 1, 1, 1, 1, 1)) == b"a" * 32
    assert cache.get((1, 2, 1, 1, 1, 1)) == b"b" * 32
    assert cache.get((1, 3, 0, 1, 1, 1)) == b""
    learned = cache.take()
    cache.close()
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM sha256_digests").fetchone() == (1,)
    store.remember_digests(path, learned)
    assert other.execute("SELECT COUNT(*) FROM sha256_digests").fetchone() == (3,)
    other.close()
    reopened = store.DigestCache(path)
    try:
        assert reopened.get((1, 2, 1, 1, 1, 1)) == b"b" * 32
        assert reopened.get((1, 3, 0, 1, 1, 1)) == b""
    finally:
        reopened.close()


def test_the_digest_cache_is_not_synced_at_every_file(tmp_path):
    """A cache entry lost to a power cut is computed again: WAL, synchronous NORMAL (1), not FULL (2)."""
    cache = store.DigestCache(str(tmp_path / "digests.sqlite"))
    try:
        assert cache.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert cache.db.execute("PRAGMA synchronous").fetchone() == (1,)
        cache.put((1, 2, 3, 4, 5, 6), b"d" * 32)
        assert cache.get((1, 2, 3, 4, 5, 6)) == b"d" * 32
    finally:
        cache.close()
