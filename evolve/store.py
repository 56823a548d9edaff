"""The run store: `runs/<run-id>/run.db`, SQLite in WAL mode, written only by the run's driver.

Every finished piece of work is committed when it finishes: each consumed job result, each
individual, each estimate, each generation's survivors and front. A run killed at any instant
(even SIGKILL) loses at most the jobs in flight. The `answers` table is the run's journal: one row
per consumed job result (a candidate's answers to the items it was asked, with its size, or the
reason it failed), in the order the driver consumed them. Resuming replays the deterministic loop
with those results served again in that order (`fitness.journal`), so nothing finished is evaluated
again, nothing is counted twice, and an asynchronous run retraces its own decisions.

One driver at a time: `begin()` takes an exclusive lock on `driver.lock` (released by the
operating system when the driver exits, however it exits, so a killed driver frees the run), and
a second driver is refused with the holder's pid, host and start. It then migrates an older store
to `SCHEMA_VERSION` and records the evoforge and dependency versions and the config's hash, saying
what changed since the run's previous driver.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import time
from dataclasses import astuple
from pathlib import Path

from fitness.journal import Recorded
from fitness.size import Size

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (candidate TEXT NOT NULL, items TEXT NOT NULL,
                                    answers TEXT NOT NULL, at REAL NOT NULL,
                                    recipe TEXT NOT NULL, size TEXT, error TEXT,
                                    stage TEXT);
CREATE TABLE IF NOT EXISTS individuals (id TEXT PRIMARY KEY, generation INTEGER NOT NULL,
                                        recipe TEXT NOT NULL, parents TEXT NOT NULL,
                                        operator TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evaluations (id TEXT PRIMARY KEY, generation INTEGER NOT NULL,
                                        stage TEXT NOT NULL, objectives TEXT NOT NULL,
                                        items INTEGER NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS generations (generation INTEGER PRIMARY KEY, population TEXT NOT NULL,
                                        front TEXT NOT NULL, hypervolume REAL NOT NULL,
                                        at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reports (id TEXT PRIMARY KEY, split TEXT NOT NULL,
                                    objectives TEXT NOT NULL, items INTEGER);
CREATE TABLE IF NOT EXISTS events (at REAL NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS replies (prompt TEXT PRIMARY KEY, reply TEXT NOT NULL, at REAL NOT NULL);
"""


SCHEMA_VERSION = 3  # 2: the answers table is the journal (recipe key, size, error per row);
# 3: each journal row names the fitness stage that asked, each report the items it took


class StoreError(OSError):
    """The run store cannot be created or written (permissions, full disk)."""


class RunLocked(StoreError):
    """Another driver is writing this run."""


def _add_columns(db: sqlite3.Connection, table: str, columns: tuple[str, ...]) -> None:
    """Add the columns ("name TYPE") the table lacks (a store may hold tables of two schemas
    when an older driver's tables met a newer one's)."""
    present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for column in columns:
        if column.split()[0] not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


def _journal_columns(db: sqlite3.Connection) -> None:
    """Schema 1 -> 2: answer rows gain the journal's columns. Rows written before have no recipe
    key, so a resume does not reuse them (it cannot tell whose answers they are)."""
    _add_columns(db, "answers", ("recipe TEXT", "size TEXT", "error TEXT"))


def _cost_columns(db: sqlite3.Connection) -> None:
    """Schema 2 -> 3: the run's cost by stage. Rows written before count as 'unrecorded'."""
    _add_columns(db, "answers", ("stage TEXT",))
    _add_columns(db, "reports", ("items INTEGER",))


MIGRATIONS = {1: _journal_columns, 2: _cost_columns}  # version -> the step to version + 1


class RunStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.folder / "run.db")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            fresh = not self.db.execute("SELECT name FROM sqlite_master WHERE name = 'meta'"
                                        ).fetchone()
            self.db.executescript(SCHEMA)
            if fresh:
                self.set_meta("schema", SCHEMA_VERSION)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(f"cannot create the run store in {self.folder}: {error}. Choose a "
                             "writable --run-dir with free space") from None
        self._lock = None

    @classmethod
    def reader(cls, folder: Path) -> RunStore:
        """The run opened read-only (the dashboard): SQLite `mode=ro` with `query_only`, so
        nothing done through it can write the run, and a running driver is never disturbed (WAL
        lets readers and the one writer go on side by side)."""
        store = cls.__new__(cls)
        store.folder = Path(folder)
        path = store.folder / "run.db"
        if not path.is_file():
            raise StoreError(f"no run store at {path}")
        try:
            store.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                                       check_same_thread=False)
            store.db.execute("PRAGMA query_only = ON")
        except sqlite3.Error as error:
            raise StoreError(f"cannot read the run store {path}: {error}") from None
        store._lock = None
        return store

    def begin(self, environment: dict[str, str], config_hash: str) -> list[str]:
        """Become the run's only writer (see the module docstring); returns what changed since
        the run's previous driver (versions, the config), one line each."""
        handle = open(self.folder / "driver.lock", "a+")  # noqa: SIM115 (held while driving)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLocked(f"{self.folder} is being written by {holder}; wait for it to finish "
                            "or stop it first (a killed driver frees the run)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle
        changes = self._migrate()
        before = self.meta("environment")
        if before is not None:
            changes += [f"{name} {before.get(name, 'absent')} -> {version}"
                        for name, version in environment.items()
                        if before.get(name) != version]
        if self.meta("config_hash") not in (None, config_hash):
            changes.append("config.yaml changed since the run began")
        self.set_meta("environment", environment)
        self.set_meta("config_hash", config_hash)
        return changes

    def _migrate(self) -> list[str]:
        version = self.meta("schema", 1)
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.folder} was written by a newer evoforge (run store schema "
                             f"{version}, this one reads {SCHEMA_VERSION}); upgrade evoforge")
        steps = []
        while version < SCHEMA_VERSION:
            try:
                with self.db:
                    MIGRATIONS[version](self.db)
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)",
                                    (json.dumps(version + 1),))
            except sqlite3.Error as error:
                raise StoreError(f"cannot migrate {self.folder / 'run.db'} from schema "
                                 f"{version}: {error}") from None
            steps.append(f"run store schema {version} -> {version + 1}")
            version += 1
        return steps

    def _write(self, sql: str, args: tuple = ()) -> None:
        try:
            with self.db:
                self.db.execute(sql, args)
        except sqlite3.Error as error:
            raise StoreError(f"cannot write the run store {self.folder / 'run.db'}: {error}. "
                             "Free disk space or fix permissions, then `evoforge resume`") from None

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the lock
            self._lock = None

    # -- writes -----------------------------------------------------------------------------

    def set_meta(self, key: str, value) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def add_result(self, result: Recorded) -> None:
        """Journal one consumed job result (see the module docstring)."""
        size = None if result.size is None else json.dumps(astuple(result.size))
        self._write("INSERT INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (result.candidate, json.dumps(result.items), json.dumps(result.values),
                     time.time(), result.recipe, size, result.error, result.stage))

    def add_individual(self, identifier: str, generation: int, recipe: dict, parents: list[str],
                       operator: str) -> None:
        self._write("INSERT OR REPLACE INTO individuals VALUES (?, ?, ?, ?, ?)",
                    (identifier, generation, json.dumps(recipe, sort_keys=True),
                     json.dumps(parents), operator))

    def add_evaluation(self, identifier: str, generation: int, stage: str, objectives: dict,
                       items: int, error: str | None) -> None:
        self._write("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?)",
                    (identifier, generation, stage, json.dumps(objectives), items, error))

    def add_generation(self, generation: int, population: list[str], front: list[str],
                       hypervolume: float) -> None:
        self._write("INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?)",
                    (generation, json.dumps(population), json.dumps(front), hypervolume,
                     time.time()))

    def add_report(self, identifier: str, split: str, objectives: dict, items: int) -> None:
        self._write("INSERT OR REPLACE INTO reports VALUES (?, ?, ?, ?)",
                    (identifier, split, json.dumps(objectives), items))

    def event(self, kind: str, detail: str = "") -> None:
        self._write("INSERT INTO events VALUES (?, ?, ?)", (time.time(), kind, detail))

    def add_reply(self, prompt: str, reply: str) -> None:
        """An LLM's reply to a prompt (by its hash): a resumed run is answered the same."""
        self._write("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", (prompt, reply, time.time()))

    # -- reads ------------------------------------------------------------------------------

    def meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def reply(self, prompt: str) -> str | None:
        row = self.db.execute("SELECT reply FROM replies WHERE prompt = ?", (prompt,)).fetchone()
        return row[0] if row else None

    def results(self) -> list[Recorded]:
        """The journal: every consumed job result, in the order the driver consumed it (rows
        from before the journal, schema 1, carry no recipe key and are left out)."""
        return [Recorded(candidate, recipe, tuple(json.loads(items)), tuple(json.loads(values)),
                         None if size is None else Size(*json.loads(size)), error, stage or "")
                for candidate, items, values, recipe, size, error, stage in self.db.execute(
                    "SELECT candidate, items, answers, recipe, size, error, stage FROM answers "
                    "WHERE recipe IS NOT NULL ORDER BY rowid")]

    def items_asked(self) -> dict[str, int]:
        """Items asked per fitness stage over the whole run (failed jobs included: their items
        were asked), and 'test' for the held-out reports of the final front."""
        asked = {stage or "unrecorded": int(total) for stage, total in self.db.execute(
            "SELECT stage, SUM(json_array_length(items)) FROM answers GROUP BY stage "
            "ORDER BY MIN(rowid)")}
        test = self.db.execute("SELECT SUM(items) FROM reports").fetchone()[0]
        return asked | ({"test": int(test)} if test else {})

    def candidates_asked(self) -> int:
        """Distinct candidates the run asked anything (calibration, children, failures)."""
        return self.db.execute("SELECT COUNT(DISTINCT candidate) FROM answers").fetchone()[0]

    def individual(self, identifier: str) -> dict | None:
        row = self.db.execute("SELECT generation, recipe, parents, operator FROM individuals "
                              "WHERE id = ?", (identifier,)).fetchone()
        if row is None:
            return None
        return {"id": identifier, "generation": row[0], "recipe": json.loads(row[1]),
                "parents": json.loads(row[2]), "operator": row[3]}

    def evaluation(self, identifier: str) -> dict | None:
        row = self.db.execute("SELECT stage, objectives, items, error FROM evaluations "
                              "WHERE id = ?", (identifier,)).fetchone()
        return None if row is None else {"stage": row[0], "objectives": json.loads(row[1]),
                                         "items": row[2], "error": row[3]}

    def generations(self) -> list[dict]:
        return [{"generation": g, "population": json.loads(p), "front": json.loads(f),
                 "hypervolume": hv, "at": at} for g, p, f, hv, at in self.db.execute(
                "SELECT generation, population, front, hypervolume, at FROM generations "
                "ORDER BY generation")]

    def report(self, identifier: str, split: str = "test") -> dict | None:
        row = self.db.execute("SELECT objectives FROM reports WHERE id = ? AND split = ?",
                              (identifier, split)).fetchone()
        return json.loads(row[0]) if row else None

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
