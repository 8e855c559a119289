"""The PostgreSQL server of the fixture postgres_url: it stores and returns rows, and Optuna's RDBStorage (what
`optimize --auto --storage postgresql://...` uses) keeps a study on it that a second storage object loads."""

from __future__ import annotations

import optuna
import psycopg


def test_server_stores_and_returns_a_row(postgres_url):
    with psycopg.connect(postgres_url) as connection:
        connection.execute("CREATE TABLE fixture_check (id integer PRIMARY KEY, name text)")
        connection.execute("INSERT INTO fixture_check VALUES (%s, %s)", (1, "onnxforge"))
        rows = connection.execute("SELECT id, name FROM fixture_check").fetchall()

    assert rows == [(1, "onnxforge")]


def test_optuna_study_on_the_server_is_seen_by_a_second_storage(postgres_url):
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    study = optuna.create_study(storage=optuna.storages.RDBStorage(url), study_name="fixture-check")
    study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=3)

    loaded = optuna.load_study(study_name="fixture-check", storage=optuna.storages.RDBStorage(url))

    assert len(loaded.trials) == 3
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in loaded.trials)
