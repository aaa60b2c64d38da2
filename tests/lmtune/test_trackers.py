"""Experiment trackers: `loggers: [mlflow, wandb]` passes Ray Tune's logger callbacks through, to the search's trials
and the seed reruns (tested offline: MLflow's local SQLite store, W&B's offline mode); a tracker that is not installed
is refused before anything runs."""
import importlib.util

import pytest

from lmtune.cli import main
from tests.conftest import process_output, tune_in_process


def test_an_unknown_tracker_is_refused(tiny_experiment, capsys):
    path = tiny_experiment(loggers=["comet"])
    assert main(["check", str(path)]) == 2
    assert f"{path}: loggers.0: Input should be 'mlflow' or 'wandb'" in capsys.readouterr().err


def test_a_tracker_that_is_not_installed_is_refused(tiny_experiment, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    path = tiny_experiment(loggers=["wandb"])
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: loggers: wandb not installed: pip install wandb" in err
    assert not (path.parent / "results" / "tiny").exists()  # nothing launched, nothing written


def test_trials_are_logged_to_mlflow_and_wandb_offline(ray_session, tiny_experiment, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    path = tiny_experiment(
        "tracked", loggers=["mlflow", "wandb"], trials=2, fixed={"model.family": "lstm"},
        search_space={"params": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}},
        scheduler={"type": "fifo", "max_epochs": 2}, report={"seeds": 2},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's local store (it refuses file:// stores since 3.x)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # W&B's offline mode: conftest sets it for every test
    code, out, err = tune_in_process(str(path), "--no-dashboard")
    assert code == 0, process_output(out, err)

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tracked"])
    assert len(runs) == 4 and runs["metrics.valid_ppl"].notna().all()  # the 2 trials and the best's 2 seed reruns
    assert runs["params.optim.lr"].notna().sum() == 2 and runs["params.rerun/seed"].notna().sum() == 2
    offline = list((path.parent / "results" / "tracked" / "wandb").glob("offline-run-*"))
    assert len(offline) == 4  # one W&B run per trial and per rerun, in the experiment folder
