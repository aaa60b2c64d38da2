"""`tune.py export-best`: the best trial's config as a YAML file that `python -m lmcore train --config` reruns."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from lmtune import load_results
from lmtune.cli import main
from tests.conftest import REPO_ROOT


def test_the_exported_config_reruns_the_best_trial(reported_experiment, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    assert main(["export-best", str(reported_experiment), "--out", str(out)]) == 0
    assert "python -m lmcore train --run-name tiny_" in capsys.readouterr().out
    results = load_results(reported_experiment)
    best = results.top(1).iloc[0]
    exported = yaml.safe_load(out.read_text())
    assert exported["model"]["family"] == best["family"] and exported["optim"]["lr"] == best["optim.lr"]

    run = subprocess.run(
        [sys.executable, "-m", "lmcore", "train", "--run-name", "rerun", "--runs-dir", str(tmp_path / "runs"),
         "--config", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    epochs = [json.loads(line) for line in (tmp_path / "runs" / "rerun" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 3  # the experiment's max_epochs
    # The same config and seed on the same data: the trial's result again (threads may change the last digits).
    assert min(e["valid_ppl"] for e in epochs) == pytest.approx(best["best_valid_ppl"], rel=0.02)


def test_export_by_family(reported_experiment, tmp_path):
    out = tmp_path / "gru.yaml"
    assert main(["export-best", str(reported_experiment), "--family", "gru", "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["model"]["family"] == "gru"


def test_export_refuses_to_overwrite(reported_experiment, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    out.write_text("mine")
    assert main(["export-best", str(reported_experiment), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["export-best", str(reported_experiment), "--out", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["data"]["name"] == "text"


def test_export_of_a_family_without_trials_is_refused(reported_experiment, tmp_path, capsys):
    out = tmp_path / "t.yaml"
    assert main(["export-best", str(reported_experiment), "--family", "transformer", "--out", str(out)]) == 2
    assert "no finished trial of family transformer" in capsys.readouterr().err and not out.exists()
