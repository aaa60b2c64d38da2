"""Through `tune.py`'s main, on the shared small Ray: a study seeded with `start_from`, reported with
`report.dynamic` (dynamic_test_ppl)."""
import json

import pandas as pd
import pytest

from lmtune import load_results
from lmtune.report import compare
from tests.conftest import process_output, tune_in_process, write_tiny_experiment

START = {"model.family": "lstm", "optim.lr": 5e-3}


def test_seeded_study_with_a_dynamic_evaluation_column(ray_session, tmp_path, markov_corpus_dir):
    path = write_tiny_experiment(
        tmp_path / "seeded.yaml", markov_corpus_dir, tmp_path / "results", trials=2,
        scheduler={"type": "fifo", "max_epochs": 1}, start_from=[START], report={"top_k": 2, "dynamic": True},
        fixed={"eval.dynamic_stat_windows": 5, "eval.dynamic_stat_batch_size": 8, "eval.dynamic_batch_size": 4,
               "eval.dynamic_bptt": 8})
    code, out, err = tune_in_process(str(path), "--no-dashboard")
    assert code == 0, process_output(out, err)
    folder = tmp_path / "results" / "seeded"
    trials = pd.read_csv(folder / "trials.csv")
    assert ((trials["family"] == "lstm") & (trials["optim.lr"] == START["optim.lr"])).any()
    families = pd.read_csv(folder / "best_per_family.csv")
    assert "dynamic_test_ppl" in families and families["dynamic_test_ppl"].between(1, 100).all()
    cached = json.loads((folder / "final_eval.json").read_text())
    assert all({"dynamic_valid_ppl", "dynamic_lr", "dynamic_decay"} <= set(e) for e in cached.values())
    # the column stays in the tables read back and in `tune.py compare`'s
    expected = pytest.approx(families["dynamic_test_ppl"].tolist())  # read back from CSV: to the last bits
    assert load_results(folder).family_table()["dynamic_test_ppl"].tolist() == expected
    assert compare([folder])["dynamic_test_ppl"].tolist() == expected
