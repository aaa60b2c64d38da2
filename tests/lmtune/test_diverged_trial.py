"""In-process runs on the shared small Ray: a diverging (NaN) trial is recorded as such and the search goes on."""
import math

import optuna
import pandas as pd

from lmtune import load_experiment, run_experiment
from lmtune.cli import main
from lmtune.report import report


def test_a_diverging_trial_is_recorded_and_the_search_continues(ray_session, tiny_experiment):
    # Adam at lr 1e6 blows the loss up in the first epoch; lmcore reports diverged=True, valid_ppl=inf.
    path = tiny_experiment(
        "nan",
        search_space={"params": {"optim.lr": {"choices": [0.005, 1.0e6]}}},
        fixed={"model.family": "lstm"},
        searcher={"sampler": "random", "seed": 0},  # draws 1e6, 0.005, 1e6, ... (seeded)
        scheduler={"type": "fifo", "max_epochs": 2},
        trials=4,
    )
    exp = load_experiment(path)
    assert run_experiment(exp) is True  # the experiment itself does not fail
    summary = report(exp.folder)

    trials = pd.read_csv(exp.folder / "trials.csv")
    assert len(trials) == 4
    diverged = trials[trials["optim.lr"] == 1e6]
    assert len(diverged) >= 1 and (diverged["status"] == "diverged").all()
    assert (diverged["epochs"] == 1).all()
    healthy = trials[trials["optim.lr"] != 1e6]
    assert len(healthy) >= 1 and (healthy["status"] == "completed").all() and (healthy["epochs"] == 2).all()
    assert summary["best"]["trial_id"] in set(healthy["trial_id"])  # a diverged trial is never "best"
    assert math.isfinite(summary["best"]["test_ppl"])
    assert summary["status"]["diverged"] == len(diverged)

    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{exp.folder / 'optuna.db'}")
    values = sorted(t.value for t in study.trials)
    assert len(values) == 4 and math.isinf(values[-1])  # told to Optuna as the worst possible value



def test_a_study_whose_every_trial_diverges_exits_3(ray_session, tiny_experiment, capsys):
    path = tiny_experiment(
        "all_nan",
        search_space={"params": {"optim.lr": {"choices": [1.0e6, 2.0e6]}}},
        fixed={"model.family": "lstm"},
        scheduler={"type": "fifo", "max_epochs": 2},
        trials=2,
    )
    assert main(["run", str(path)]) == 3
    err = capsys.readouterr().err
    assert "all_nan: no usable trial (2 diverged)" in err
    assert not (path.parent / "results" / "all_nan" / ".lock").exists()  # released
