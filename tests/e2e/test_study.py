"""End to end through `tune.py`'s main on the shared small Ray: a real Tune run (OptunaSearch + ASHA) of 4 tiny
trials, then the tables, the report and compare commands, and the results API. (A driver in its own process is
tested where its kill, resume or processes are the point: test_resume.py, test_ray_lifecycle.py.)"""
import json

import optuna
import pandas as pd
import pytest

from lmtune import load_results
from lmtune.cli import main
from tests.conftest import process_output, tune_in_process, write_tiny_experiment


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory, markov_corpus_dir):
    """(experiment file, experiment folder, stdout) of one finished run."""
    tmp = tmp_path_factory.mktemp("e2e")
    path = write_tiny_experiment(tmp / "tiny.yaml", markov_corpus_dir, tmp / "results")
    code, out, err = tune_in_process(str(path), "--no-dashboard")
    assert code == 0, process_output(out, err)
    return path, tmp / "results" / "tiny", out


def test_run_prints_the_comparison_table(finished):
    _, folder, out = finished
    assert "| experiment | dataset | family | trial_id | params | best_valid_ppl | valid_ppl | test_ppl |" in out
    assert "Experiment folder: " + str(folder) in out
    assert "optuna-dashboard sqlite:///" + str(folder / "optuna.db") in out


def test_tables_are_written(finished):
    _, folder, _ = finished
    for name in ("trials.md", "trials.csv", "trials.parquet", "top_k.md", "top_k.csv", "best_per_family.md",
                 "best_per_family.csv", "history.parquet", "summary.json", "summary.md", "final_eval.json"):
        assert (folder / name).is_file(), name
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 4
    assert set(trials["status"]) <= {"completed", "early-stopped"} and "completed" in set(trials["status"])
    assert (trials.loc[trials["status"] == "completed", "epochs"] == 3).all()
    columns = {"trial_id", "family", "epochs", "best_valid_ppl", "params", "tokens_per_s", "time_s", "optim.lr"}
    assert columns <= set(trials)
    assert trials["params"].gt(0).all() and trials["tokens_per_s"].gt(0).all()
    assert pd.read_parquet(folder / "trials.parquet").shape == trials.shape
    assert (folder / "trials.md").read_text().startswith("| trial_id | family | status |")


def test_the_best_checkpoints_are_evaluated_on_test(finished):
    _, folder, _ = finished
    summary = json.loads((folder / "summary.json").read_text())
    best = summary["best"]
    assert summary["trials"] == summary["trials_configured"] == 4
    assert 1 < best["test_ppl"] < 40 and 1 < best["valid_ppl"] < 40  # the corpus has 40 word types
    assert best["valid_ppl"] == pytest.approx(best["best_valid_ppl"], rel=1e-6)  # same checkpoint, same split
    assert best["config"]["model.family"] == best["family"]
    families = pd.read_csv(folder / "best_per_family.csv")
    assert families["test_ppl"].notna().all()
    assert families["best_valid_ppl"].is_monotonic_increasing


def test_the_optuna_study_is_in_sqlite(finished):
    _, folder, _ = finished
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert all("optim.lr" in t.params for t in study.trials)


def test_results_api(finished):
    _, folder, _ = finished
    results = load_results(folder)
    assert len(results.trials) == 4 and results.summary["experiment"] == "tiny"
    assert {"trial_id", "epoch", "valid_ppl", "tokens_per_s"} <= set(results.history.columns)
    assert len(results.history) >= 4
    assert list(results.top(2)["best_valid_ppl"]) == sorted(results.trials["best_valid_ppl"])[:2]
    assert set(results.best_per_family()["family"]) == set(results.trials["family"])


def test_report_reuses_the_test_evaluation(finished):
    _, folder, _ = finished
    evaluated = (folder / "final_eval.json").read_text()
    code, out, err = tune_in_process("report", str(folder))
    assert code == 0, process_output(out, err)
    assert "Evaluating" not in out  # the test split is not scored again
    assert (folder / "final_eval.json").read_text() == evaluated
    assert "| tiny | text |" in out


def test_compare(finished, tmp_path):
    _, folder, _ = finished
    assert main(["compare", str(folder), "--out", str(tmp_path / "table")]) == 0
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table.columns) == ["experiment", "dataset", "family", "trial_id", "params", "best_valid_ppl",
                                   "valid_ppl", "test_ppl", "trials", "compute_h"]
    assert table["trials"].sum() == 4
    assert (tmp_path / "table.md").read_text().startswith("| experiment |")


def test_the_folder_layout(finished):
    _, folder, _ = finished
    assert (folder / "experiment.yaml").is_file() and (folder / "optuna.db").is_file()
    assert list((folder / "ray").glob("experiment_state-*.json")) and list((folder / "ray").glob("trial_*"))
    assert not list(folder.glob("experiment_state-*.json")) and not (folder / ".lock").exists()


def test_resuming_with_other_settings_is_refused(finished, capsys):
    path, folder, _ = finished
    before = sorted(p.name for p in folder.iterdir())
    assert main(["run", str(path), "--set", "scheduler.max_epochs=4"]) == 2
    assert "differs from the run being resumed" in capsys.readouterr().err
    assert main(["run", str(path), "--set", "trials=3"]) == 2
    assert "a study can grow but not shrink: pass --set trials=4" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_an_existing_folder_is_never_overwritten(tiny_experiment, capsys):
    path = tiny_experiment()
    folder = path.parent / "results" / "tiny"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    for restart in ([], ["--restart"]):
        assert main(["run", str(path), *restart]) == 2
        err = capsys.readouterr().err
        assert "exists and holds no experiment.yaml" in err and "choose another name or storage" in err
        assert "pass --restart" not in err
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
