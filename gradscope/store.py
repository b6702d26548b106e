"""The results store: one SQLite database per sweep folder, one transaction per finished run.

Tables (schema ``gradscope.store/1``, kept in ``meta``):

- ``runs``: one row per run: ``run_id`` (a hash of its configuration), configuration columns,
  ``status`` (ok | failed), ``error``, training outcome, metadata.
- ``summaries``: (run_id, train_step, probe) -> slope, half_life, horizon, verdict, start, end.
- ``profiles``: (run_id, train_step, probe) -> axis, first_step, log10 as float64 bytes.
- ``curves``: (run_id, step) -> training loss.
- ``sweeps``: one row per invocation that wrote here (command, versions, time).

A run is written with all its rows in one transaction, so a sweep killed at any point leaves
only whole runs behind; a rerun skips them by run_id (a primary key: no duplicates).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from .config import RunConfig
from .errors import ConfigError, StoreError
from .results import RunResult, Snapshot, Training
from .summary import Summary, json_safe

SCHEMA = "gradscope.store/1"
FILENAME = "gradscope.sqlite"
CONFIG_COLUMNS = ("cell", "activation", "init", "gain", "input_init", "forget_bias",
                  "gate_init", "task", "seq_len", "hidden", "batch", "seed", "steps",
                  "optimizer", "lr", "clip", "dtype")

COUNT_COLUMNS = ("seq_len", "hidden", "batch", "seed", "steps", "steps_done", "diverged_at",
                 "train_step", "horizon")  # integers in frame()
REAL_COLUMNS = ("gain", "forget_bias", "lr", "clip", "final_loss", "chance_loss", "accuracy",
                "duration_s", "slope", "half_life", "start", "end")  # floats, NaN for none
_TEXT_COLUMNS = {"cell", "activation", "init", "input_init", "gate_init", "task", "optimizer",
                 "dtype"}
_CONFIG_DDL = ", ".join(f"{c} {'TEXT' if c in _TEXT_COLUMNS else 'REAL'}" for c in CONFIG_COLUMNS)
_TABLES = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    group_key TEXT NOT NULL,
    config TEXT NOT NULL,
    {_CONFIG_DDL},
    status TEXT NOT NULL,
    error TEXT,
    task_info TEXT,
    meta TEXT,
    nonfinite TEXT,
    theory TEXT,
    steps_done INTEGER, diverged_at INTEGER, final_loss REAL, chance_loss REAL,
    accuracy REAL, learned INTEGER,
    duration_s REAL,
    finished_utc TEXT
);
CREATE TABLE IF NOT EXISTS summaries (
    run_id TEXT NOT NULL, train_step INTEGER NOT NULL, probe TEXT NOT NULL,
    slope REAL, half_life REAL, horizon INTEGER, verdict TEXT, start REAL, end_ REAL,
    PRIMARY KEY (run_id, train_step, probe));
CREATE TABLE IF NOT EXISTS profiles (
    run_id TEXT NOT NULL, train_step INTEGER NOT NULL, probe TEXT NOT NULL,
    axis TEXT NOT NULL, first_step INTEGER NOT NULL, log10 BLOB NOT NULL,
    PRIMARY KEY (run_id, train_step, probe));
CREATE TABLE IF NOT EXISTS curves (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, loss REAL,
    PRIMARY KEY (run_id, step));
CREATE TABLE IF NOT EXISTS sweeps (started_utc TEXT, command TEXT, meta TEXT);
"""


def run_id(config: RunConfig) -> str:
    """A stable name for a configuration: the same options give the same id, run after run."""
    options = config.to_dict()
    del options["checkpoint"]  # how the adjoint keeps its states, not what is measured
    canonical = json.dumps(options, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def group_key(config: RunConfig) -> str:
    """The configuration without its seed: runs that differ only by seed share it."""
    return run_id(config.replace(seed=0))


class Store:
    """The database in ``folder``; created on first use, refused if it is not a gradscope store."""

    def __init__(self, folder: Path, *, create: bool = True) -> None:
        self.path = Path(folder) / FILENAME
        if not create and not self.path.exists():
            if (Path(folder) / "result.json").is_file():
                raise ConfigError(f"{folder} holds one run's result.json, not a sweep's "
                                  f"{FILENAME}; set runs side by side with `gradscope compare "
                                  f"{folder} OTHER`, or sweep with `gradscope sweep --out DIR`")
            raise ConfigError(f"{folder} holds no results ({FILENAME} not found); run "
                              "`gradscope sweep --out DIR` first")
        try:
            self.db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            schema = self._schema()
            if schema is None:
                self.db.executescript(_TABLES)
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA,))
            elif schema != SCHEMA:
                raise ConfigError(f"{self.path} is a {schema} store; this gradscope reads "
                                  f"{SCHEMA}")
        except sqlite3.OperationalError as e:
            if "locked" in str(e):
                raise StoreError(f"{self.path} is locked by another process; wait for it or "
                                 "choose another --out") from None
            raise ConfigError(f"{self.path} cannot be used as a results store ({e}); move it "
                              "away or choose another --out") from None
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path} cannot be used as a results store ({e}); move it "
                              "away or choose another --out") from None

    def _schema(self) -> str | None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
        if not tables:
            return None
        if "meta" not in tables:
            raise ConfigError(f"{self.path} is an SQLite file but not a gradscope store; move "
                              "it away or choose another --out")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        return row[0] if row else "unknown"

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writing ------------------------------------------------------------------------------

    def finished_ids(self) -> set[str]:
        """Runs that completed (status ok): a resumed sweep skips these."""
        return {r[0] for r in self.db.execute("SELECT run_id FROM runs WHERE status = 'ok'")}

    def add_sweep(self, started_utc: str, command: str, meta: dict) -> None:
        self.db.execute("INSERT INTO sweeps VALUES (?, ?, ?)",
                        (started_utc, command, json.dumps(meta)))

    def add(self, config: RunConfig, result: RunResult | None, *, error: str | None = None,
            duration_s: float | None = None, finished_utc: str | None = None) -> str:
        """Write one run, all its rows, in one transaction; replaces an earlier failed try."""
        rid = run_id(config)
        cfg = config.to_dict()
        row = {
            "run_id": rid, "group_key": group_key(config), "config": json.dumps(cfg),
            **{c: cfg[c] for c in CONFIG_COLUMNS},
            "status": "ok" if result is not None else "failed", "error": error,
            "duration_s": duration_s, "finished_utc": finished_utc,
        }
        if result is not None:
            t = result.training
            row.update(task_info=json.dumps(result.task), meta=json.dumps(result.meta),
                       nonfinite=json.dumps(result.nonfinite),
                       theory=json.dumps(result.theory),
                       chance_loss=result.task["chance_loss"])
            if t is not None:
                row.update(steps_done=t.steps_done, diverged_at=t.diverged_at,
                           final_loss=t.final_loss, accuracy=t.accuracy, learned=int(t.learned))
        try:
            with self.db:  # BEGIN ... COMMIT, or ROLLBACK on any error
                self.db.execute("BEGIN IMMEDIATE")
                for table in ("runs", "summaries", "profiles", "curves"):
                    self.db.execute(f"DELETE FROM {table} WHERE run_id = ?", (rid,))
                self.db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES "
                                f"({', '.join('?' * len(row))})", tuple(row.values()))
                if result is not None:
                    self._add_snapshots(rid, result)
        except sqlite3.Error as e:
            raise StoreError(f"could not save a run to {self.path} ({e}); the runs saved "
                             "before are kept: fix the cause and rerun the same command to "
                             "resume") from None
        return rid

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the folder for one sweep: a second sweep into the same folder is refused."""
        lock = open(self.path.with_suffix(".lock"), "a+")  # noqa: SIM115 (held until exit)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise StoreError(f"another gradscope sweep is writing to {self.path.parent}; "
                                 "wait for it to finish or choose another --out") from None
            yield
        finally:
            lock.close()

    def _add_snapshots(self, rid: str, result: RunResult) -> None:
        for snap in result.snapshots:
            for probe, values in snap.profiles.items():
                s = snap.summary[probe]
                self.db.execute("INSERT INTO summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (rid, snap.step, probe, *json_safe(
                                    [s.slope, s.half_life, s.horizon, s.verdict, s.start,
                                     s.end])))
                axis = result.axes[probe]
                self.db.execute("INSERT INTO profiles VALUES (?, ?, ?, ?, ?, ?)",
                                (rid, snap.step, probe, axis, 1 if axis == "t" else 0,
                                 np.asarray(values, dtype="<f8").tobytes()))
        if result.training is not None:
            self.db.executemany("INSERT INTO curves VALUES (?, ?, ?)",
                                [(rid, i + 1, v)
                                 for i, v in enumerate(json_safe(result.training.curve))])

    # --- reading ------------------------------------------------------------------------------

    def runs(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM runs ORDER BY rowid", self.db)

    def summaries(self) -> pd.DataFrame:
        frame = pd.read_sql_query("SELECT * FROM summaries", self.db)
        return frame.rename(columns={"end_": "end"})

    def probes(self) -> list[str]:
        """The probes some run measured, by name."""
        return [p for (p,) in self.db.execute(
            "SELECT DISTINCT probe FROM summaries ORDER BY probe")]

    def curves(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM curves ORDER BY run_id, step", self.db)

    def profiles(self, rid: str | None = None
                 ) -> Iterator[tuple[str, int, str, str, int, np.ndarray]]:
        """(run_id, train_step, probe, axis, first_step, log10 array) for every profile, or for
        the run ``rid``."""
        where, args = ("WHERE run_id = ?", (rid,)) if rid is not None else ("", ())
        for r, step, probe, axis, first, blob in self.db.execute(
                f"SELECT * FROM profiles {where} ORDER BY run_id, train_step, probe", args):
            yield r, step, probe, axis, first, np.frombuffer(blob, dtype="<f8")

    def frame(self) -> pd.DataFrame:
        """Tidy: one row per run, measurement (train_step) and probe, with the run's
        configuration, status and training outcome beside the summary. Failed runs appear
        once, with no probe."""
        runs = self.runs().drop(columns=["config", "task_info", "meta", "nonfinite", "theory"])
        frame = runs.merge(self.summaries(), on="run_id", how="left")
        # counts as integers (SQLite keeps the config's as REAL, and a column with NULLs reads
        # as floats): seq_len 20, not 20.0; <NA> where there is none. Numbers as floats even
        # where every value is NULL (an accuracy of a regression task is not an object
        # column of Nones), and learned as true/false (<NA>: not trained)
        return frame.astype({**{c: "Int64" for c in COUNT_COLUMNS},
                             **{c: "float64" for c in REAL_COLUMNS}, "learned": "boolean"})

    def sweeps(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM sweeps", self.db)

    def result(self, rid: str) -> RunResult:
        """Rebuild one finished run's RunResult."""
        columns = ("config", "task_info", "meta", "nonfinite", "theory", "steps_done",
                   "diverged_at", "final_loss", "chance_loss", "accuracy", "learned")
        values = self.db.execute(f"SELECT {', '.join(columns)} FROM runs WHERE run_id = ? "
                                 "AND status = 'ok'", (rid,)).fetchone()
        if values is None:
            raise KeyError(rid)
        row = dict(zip(columns, values, strict=True))
        config, task, meta, nonfinite, theory = (json.loads(row[c]) for c in columns[:5])
        snaps: dict[int, dict] = {}
        axes: dict[str, str] = {}
        for _, step, probe, axis, _, profile in self.profiles(rid):
            axes[probe] = axis
            snaps.setdefault(step, {})[probe] = profile
        sums: dict[int, dict] = {}
        for step, probe, *fields in self.db.execute(
                "SELECT train_step, probe, slope, half_life, horizon, verdict, start, end_ "
                "FROM summaries WHERE run_id = ?", (rid,)):
            sums.setdefault(step, {})[probe] = Summary(*fields)
        snapshots = [Snapshot(step, snaps[step], sums[step], nonfinite if step == 0 else None)
                     for step in sorted(snaps)]
        training = None
        if row["steps_done"] is not None:
            curve = [math.nan if v is None else v for (v,) in self.db.execute(
                "SELECT loss FROM curves WHERE run_id = ? ORDER BY step", (rid,))]
            training = Training(curve=curve, steps_done=row["steps_done"],
                                diverged_at=row["diverged_at"], final_loss=row["final_loss"],
                                chance_loss=row["chance_loss"], accuracy=row["accuracy"],
                                learned=bool(row["learned"]), snapshots=snapshots[1:])
        first = snapshots[0]
        return RunResult(RunConfig.from_dict(config), task, first.profiles, axes, first.summary,
                         nonfinite, meta, training, theory)

