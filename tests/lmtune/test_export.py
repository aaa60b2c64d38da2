"""`tune.py export-best`: the best trial's config as a YAML file that `python -m lmcore train --config` reruns."""
import json
import os
import subprocess
import sys

import pytest
import yaml

import lmcore
from lmcore.config import field_names, make_config
from lmcore.models import count_parameters, solve_budget
from lmcore.models.families import ONLY_FOR
from lmtune import load_results
from lmtune.cli import main
from lmtune.results import built_config, config_yaml
from tests.conftest import REPO_ROOT

TRANSFORMER_ONLY = {"d_model", "heads", "ff", "pos_encode", "max_len", "memory"}


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


def test_summary_and_export_show_the_same_configuration(reported_experiment, tmp_path):
    out = tmp_path / "best.yaml"
    assert main(["export-best", str(reported_experiment), "--out", str(out)]) == 0
    summary = (reported_experiment / "summary.md").read_text()
    shown = summary.split("## Best configuration\n\n```yaml\n", 1)[1].split("```", 1)[0]
    assert out.read_text().endswith(shown)  # after export-best's own two lines: which trial, how to rerun it
    best = load_results(reported_experiment).top(1).iloc[0]
    assert shown.startswith(f"# the model built: {best['family']}, model.hidden 16, {int(best['params']):,} parameters\n")
    model = yaml.safe_load(shown)["model"]
    assert not TRANSFORMER_ONLY & set(model) and "rounds" not in model  # an LSTM's or GRU's settings only


def test_a_budget_mogrifier_shows_the_width_it_built_and_only_its_settings(markov_corpus_dir, tmp_path):
    """summary.md showed `model.hidden: 650` (the default, not the solved width) and the Transformer's settings."""
    config = make_config({}, {
        "data.name": "text", "data.dir": str(markov_corpus_dir), "data.batch_size": 8, "data.eval_batch_size": 8,
        "data.bptt": 16, "model.family": "mogrifier", "model.layers": 1, "model.rounds": 2,
        "model.params_budget": 20_000, "train.epochs": 1, "train.steps_per_epoch": 2, "train.device": "cpu",
        "train.progress": False, "train.threads": 1,
    })
    reported = []

    def report(metrics, save_checkpoint):
        reported.append(metrics)
        save_checkpoint(tmp_path / "model.pt")

    lmcore.train(config, report=report)
    vocab = len(lmcore.load_corpus("text", str(markov_corpus_dir)).vocab)
    solved = solve_budget(config.model, vocab)
    built, params = built_config(tmp_path / "model.pt")
    assert built.model.hidden == solved.hidden != config.model.hidden
    assert params == count_parameters(solved, vocab) == reported[-1]["params"]

    text = config_yaml(built, params)
    assert text.startswith(f"# the model built: mogrifier, model.hidden {solved.hidden} (solved from "
                           f"model.params_budget 20,000), {params:,} parameters\n")
    exported = yaml.safe_load(text)
    assert exported["model"]["hidden"] == solved.hidden and exported["model"]["rounds"] == 2
    assert not TRANSFORMER_ONLY & set(exported["model"]) and "threads" not in exported["train"]
    rerun = []
    lmcore.train(make_config(exported), report=lambda metrics, save: rerun.append(metrics))  # what --config reads
    assert rerun[-1]["params"] == params


def test_a_transformer_shows_its_own_settings():
    config = make_config({}, {"model.family": "transformer", "model.d_model": 64, "model.heads": 2})
    text = config_yaml(config, 1234)
    assert text.startswith("# the model built: transformer, model.d_model 64, 1,234 parameters\n")
    model = yaml.safe_load(text)["model"]
    assert TRANSFORMER_ONLY <= set(model) and not {"hidden", "rounds", "rank"} & set(model)
    assert "state" not in model["dropout"] and "inter" in model["dropout"]


def test_the_family_table_names_real_settings():
    assert set(ONLY_FOR) <= set(field_names())
