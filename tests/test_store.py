"""The results store: whole runs or nothing, resumable, refusing files it does not own."""

import sqlite3

import numpy as np
import pytest

import gradscope
from gradscope.config import RunConfig
from gradscope.errors import ConfigError
from gradscope.runner import execute
from gradscope.store import Store, run_id

TINY = RunConfig(hidden=3, batch=2, seq_len=8, steps=3, profile_every=2, task="recall",
                 cell="lstm")


def test_a_run_round_trips_through_the_store(tmp_path):
    result = execute(TINY)
    with Store(tmp_path) as store:
        rid = store.add(TINY, result, duration_s=1.0)
        assert rid == run_id(TINY) and store.finished_ids() == {rid}
        back = store.result(rid)
    assert back.config == result.config and back.summary == result.summary
    assert back.training.curve == result.training.curve
    assert [s.step for s in back.snapshots] == [0, 2, 3]
    for a, b in zip(back.snapshots, result.snapshots, strict=True):
        for probe in a.profiles:
            np.testing.assert_array_equal(a.profiles[probe], b.profiles[probe])


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    result = execute(TINY)
    with Store(tmp_path) as store:
        def boom(*args):
            raise OSError("disk full")

        monkeypatch.setattr(store, "_add_snapshots", boom)
        with pytest.raises(OSError):
            store.add(TINY, result)
        for table in ("runs", "summaries", "profiles", "curves"):
            assert store.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0


def test_a_failed_run_is_retried_and_replaced_not_duplicated(tmp_path):
    with Store(tmp_path) as store:
        store.add(TINY, None, error="RuntimeError: boom")
        assert store.finished_ids() == set()
        store.add(TINY, execute(TINY))
        runs = store.runs()
        assert len(runs) == 1 and runs.status.tolist() == ["ok"]


def test_same_options_same_id_other_seed_other_id():
    assert run_id(TINY) == run_id(RunConfig(**TINY.to_dict()))
    assert run_id(TINY) != run_id(TINY.replace(seed=1))


def test_a_corrupt_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "gradscope.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot be used as a results store"):
        Store(tmp_path)
    assert path.read_bytes() == b"this is not a database" * 100


def test_a_foreign_sqlite_file_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / "gradscope.sqlite")
    db.execute("CREATE TABLE mine (x)")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="not a gradscope store"):
        Store(tmp_path)


def test_reading_a_folder_without_a_store(tmp_path):
    with pytest.raises(ConfigError, match="holds no results"):
        gradscope.load(tmp_path)
    assert not (tmp_path / "gradscope.sqlite").exists()


def test_reading_a_run_folder_as_a_sweep_points_to_compare(tmp_path):
    (tmp_path / "result.json").write_text("{}")
    for read in (gradscope.load, gradscope.write_report):
        with pytest.raises(ConfigError, match="one run's result.json, not a sweep's .*"
                                              "gradscope compare"):
            read(tmp_path)
    assert not (tmp_path / "gradscope.sqlite").exists()
