"""Two search workers on one study in a real PostgreSQL server: `optimize --auto --storage postgresql://...` and
`onnxforge search-worker` in separate processes share the trials, none run twice, and the lead picks the winner."""

import subprocess
import sys
import time

import optuna
from test_cli import ONNXFORGE, OPTIMIZE, run_cli, succeeded
from test_search import PASSES, _mlp

from onnxforge.search.study import open_storage


def test_two_workers_share_one_postgresql_study(tmp_path, postgres_url):
    model, best = _mlp(tmp_path / "mlp.onnx"), tmp_path / "best.onnx"
    # quant's own timed choice (measure) is no part of sharing a study: each trial is timed by the search.
    lead = subprocess.Popen(
        [sys.executable, *OPTIMIZE[1:], str(model), "--auto", "--passes", f"{PASSES}:measure=false", "--trials", "6",
         "--storage", postgres_url, "--study", "shared", "--min-speedup", "0", "-o", str(best),
         "--report", str(tmp_path / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    storage = open_storage(postgres_url)
    deadline = time.monotonic() + 120
    while "shared" not in optuna.get_all_study_names(storage):
        assert lead.poll() is None and time.monotonic() < deadline, "the lead never created its study"
        time.sleep(0.2)
    worker = succeeded(run_cli(ONNXFORGE, "search-worker", "--storage", postgres_url, "--study", "shared"))
    stdout, stderr = lead.communicate(timeout=300)
    assert lead.returncode == 0, stderr
    assert "search-worker: joined study 'shared'" in worker.stderr
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) >= 6
    assert len({t.number for t in trials}) == len(trials)  # each trial taken by one worker
    workers = {t.user_attrs["worker"] for t in finished}
    assert len(workers) == 2, workers
    built = [t.user_attrs["candidate"] for t in finished if "same_as" not in t.user_attrs]
    repeated = [t for t in finished if "same_as" in t.user_attrs]
    assert all(t.user_attrs["same_as"] < t.number for t in repeated)  # a repeat reuses a trial judged before it
    assert len(built) + len(repeated) == len(finished)
    assert "search: " in stdout and best.is_file()
