"""`tune.py runs` / lmtune.single_runs: single lmcore runs as a table, and the mean ± sd over seeds of each config."""
import json
import statistics
from pathlib import Path

import pytest
import yaml

from lmcore.config import make_config
from lmcore.exitcodes import ExitCode
from lmtune.cli import main
from lmtune.single_runs import load_runs, seed_groups


def make_run(folder: Path, valid: float, test: float | None, epochs: int = 3, **settings) -> Path:
    """A run folder as `python -m lmcore train` leaves it (without checkpoints): test None = still running."""
    folder.mkdir(parents=True)
    config = make_config({}, {"model.family": "lstm", **settings})
    (folder / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    rows = [{"epoch": e, "valid_ppl": valid + 10 * (epochs - e), "best_valid_ppl": valid + 10 * (epochs - e),
             "elapsed_s": 600.0 * e, "params": 1234, "diverged": False} for e in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if test is not None:
        final = {"valid": {"ppl": valid - 0.5, "loss": 4.0, "tokens": 10}, "test": {"ppl": test, "loss": 4.0,
                                                                                     "tokens": 10}}
        (folder / "final.json").write_text(json.dumps({**final, "status": "completed"}))
    return folder


def test_seeds_of_one_config_are_grouped_and_others_are_not(tmp_path):
    seeds = [make_run(tmp_path / f"lstm_seed{s}", valid=100 + s, test=95 + 2 * s, **{"train.seed": s})
             for s in (1, 2, 3)]
    other_threads = make_run(tmp_path / "lstm_seed4", valid=104, test=103, **{"train.seed": 4, "train.threads": 1})
    other_lr = make_run(tmp_path / "lstm_lr", valid=150, test=140, **{"optim.lr": 3.0})
    running = make_run(tmp_path / "lstm_seed5", valid=120, test=None, epochs=2, **{"train.seed": 5})

    runs = load_runs([*seeds, other_threads, other_lr, running])
    assert list(runs["run"]) == ["lstm_seed1", "lstm_seed2", "lstm_seed3", "lstm_seed4", "lstm_lr", "lstm_seed5"]
    assert runs.set_index("run").loc["lstm_seed5", ["status", "epochs", "valid_ppl"]].tolist() == ["unfinished", 2, 120]
    assert runs.set_index("run").loc["lstm_seed2", ["valid_ppl", "test_ppl", "compute_h"]].tolist() == [101.5, 99, 0.5]

    groups = seed_groups(runs)
    assert list(groups["runs"]) == [4, 1]  # the unfinished run is in no group; threads do not split one
    same = groups.iloc[0]
    tests, valids = [97, 99, 101, 103], [100.5, 101.5, 102.5, 103.5]
    assert same["seeds"] == "1 2 3 4"
    assert same["test_ppl_mean"] == pytest.approx(statistics.mean(tests))
    assert same["test_ppl_sd"] == pytest.approx(statistics.stdev(tests))
    assert same["valid_ppl_sd"] == pytest.approx(statistics.stdev(valids))
    assert groups.iloc[1]["test_ppl_mean"] == 140 and groups.iloc[1]["test_ppl_sd"] != groups.iloc[1]["test_ppl_sd"]


def test_a_run_given_twice_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "r1", valid=110, test=105)
    assert main(["runs", "r1", str(tmp_path / "r1")]) == ExitCode.BAD_INPUT
    assert f"{tmp_path / 'r1'}: given twice (also as r1)" in capsys.readouterr().err


def test_unfinished_runs_only_are_listed_without_means(tmp_path, capsys):
    assert main(["runs", str(make_run(tmp_path / "r1", valid=110, test=None))]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "| r1 | lstm | 1111 |" in out and "(no finished run" in out


def test_the_command_prints_both_tables(tmp_path, capsys):
    folders = [str(make_run(tmp_path / f"r{s}", valid=110 + s, test=105 + s, **{"train.seed": s})) for s in (1, 2)]
    assert main(["runs", *folders]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "| r1 | lstm | 1 |" in out and "| r2 | lstm | 2 |" in out
    assert "| lstm | 2 | 1 2 | 111.00 | 0.71 | 106.50 | 0.71 | 0.50 |" in out


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "final.json").write_text("{not json"), "final.json: not valid JSON"),
    (lambda run: (run / "final.json").write_text('{"valid": {"ppl": "low"}, "test": {"ppl": 1}}'),
     "final.json: field valid.ppl: expected a number (got 'low')"),
    (lambda run: (run / "metrics.jsonl").write_text('{"epoch": 1}\n'),
     "metrics.jsonl: line 1: field best_valid_ppl: expected a number (got None)"),
    (lambda run: (run / "metrics.jsonl").write_text(""), "metrics.jsonl: no epoch recorded yet"),
    (lambda run: (run / "config.yaml").write_text("model: {family: gpt}\n"), "model.family"),
    (lambda run: (run / "config.yaml").write_text("!!python/object/apply:os.system ['touch pwned']\n"),
     "config.yaml"),
    (lambda run: (run / "metrics.jsonl").unlink(), "not a run folder of `python -m lmcore train`"),
])
def test_a_damaged_run_folder_is_named_with_its_field(tmp_path, capsys, monkeypatch, damage, message):
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "run", valid=110, test=105)
    damage(run)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["runs", str(run)]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 3, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written (no `pwned` either)
