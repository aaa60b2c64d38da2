"""The single-run command line: both spellings, the run folder, bad input, evaluate."""
import json
import re

import pytest
import yaml

from lmcore import cli
from lmcore.cli import main, translate_legacy_argv

TINY = ["--dataset", "text", "--hidden-size", "16", "--depth", "1", "--train.epochs", "2",
        "--data.batch_size", "8", "--data.bptt", "10", "--set", "optim.lr=0.01"]


def test_legacy_spelling_is_translated():
    argv = ["-mode", "train", "-run_name", "X", "-model_type", "Mogrify", "-hidden_size", "5", "-gpu", "-1"]
    assert translate_legacy_argv(argv) == ["train", "--run-name", "X", "--model-type", "Mogrify",
                                           "--hidden-size", "5", "--gpu", "-1"]


def test_train_writes_the_run_folder_and_evaluate_reads_it(markov_corpus_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["-mode", "train", "-run_name", "m", "-model_type", "Mogrify", "--runs-dir", str(runs),
            "--data.dir", str(markov_corpus_dir), "--model.rounds", "2", *TINY]
    assert main(argv) == 0
    run = runs / "m"
    assert {"config.yaml", "train.log", "metrics.jsonl", "last.pt", "best.pt", "final.json"} <= {
        p.name for p in run.iterdir()}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    final = json.loads((run / "final.json").read_text())
    assert final["test"]["tokens"] > 0 and final["valid"]["ppl"] < 20
    capsys.readouterr()
    assert main(["evaluate", "--run-name", "m", "--runs-dir", str(runs), "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "test" in out
    # batch size 1 scores the same tokens as the default batch size, so the perplexity agrees closely
    valid_line = next(line for line in out.splitlines() if line.startswith("valid"))
    assert float(valid_line.split()[2]) == pytest.approx(final["valid"]["ppl"], rel=0.05)


def test_existing_run_is_never_overwritten_silently(markov_corpus_dir, tmp_path, capsys):
    argv = ["train", "--run-name", "r", "--runs-dir", str(tmp_path), "--data.dir", str(markov_corpus_dir),
            "--model-type", "RNN", "--rnn-type", "GRU", *TINY]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume continues to more epochs from last.pt
    more = [a if a != "2" else "3" for a in argv]  # train.epochs 2 -> 3
    assert main(more + ["--resume"]) == 0
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("bad, message", [
    (["--model.rounds", "many"], "model.rounds"),
    (["--set", "model.colour=red"], "model.colour"),
    (["--set", "model.dropout.state=1.5"], "model.dropout.state"),
    (["--model.family", "cnn"], "model.family"),
])
def test_bad_settings_give_one_clear_error(bad, message, tmp_path, capsys):
    assert main(["train", "--run-name", "x", "--runs-dir", str(tmp_path), *bad]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_config_file_accepts_sections_and_dotted_names(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model:\n  rounds: 2\noptim.lr: oops\n")
    assert main(["train", "--run-name", "x", "--runs-dir", str(tmp_path), "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "c.yaml" in err and "optim.lr" in err


# --- issue 8: resume, validation before anything is written, exit codes, help, logs -----------------------


def train_argv(runs, corpus, name="r", *extra):
    return ["train", "--run-name", name, "--runs-dir", str(runs), "--data.dir", str(corpus), "--model-type", "RNN",
            "--rnn-type", "LSTM", *TINY, "--train.steps_per_epoch", "5", *extra]


def test_resume_takes_the_runs_own_config_and_refuses_model_changes(markov_corpus_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(train_argv(runs, markov_corpus_dir, "r", "--train.epochs", "1")) == 0
    config = runs / "r" / "config.yaml"
    # Only the run name and the new setting: the rest comes from the run itself.
    assert main(["train", "--run-name", "r", "--runs-dir", str(runs), "--resume", "--train.epochs", "2"]) == 0
    saved = yaml.safe_load(config.read_text())
    assert saved["model"]["hidden"] == 16 and saved["model"]["family"] == "lstm" and saved["train"]["epochs"] == 2
    assert [json.loads(line)["epoch"] for line in (runs / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    before = config.read_bytes()
    capsys.readouterr()
    for change in (["--model.hidden", "32"], ["--dataset", "ptb"], ["--set", "data.batch_size=4"]):
        assert main(["train", "--run-name", "r", "--runs-dir", str(runs), "--resume", *change]) == 2
        err = capsys.readouterr().err
        name = {"--model.hidden": "model.hidden", "--dataset": "data.name", "--set": "data.batch_size"}[change[0]]
        assert name in err and "Traceback" not in err
        assert config.read_bytes() == before  # never rewritten


@pytest.mark.parametrize("bad, field", [
    (["--train.device", "cuda:99"], "train.device"),  # no such GPU here, with or without CUDA
    (["--gpu", "99"], "train.device"),
    (["--train.device", "gpu0"], "train.device"),
    (["--data.dir", "/nonexistent/lmcore-data"], "train.txt"),
    (["--data.batch_size", "100000000"], "data.batch_size"),
    (["--model.family", "transformer", "--model.pos_encode", "learned", "--model.max_len", "4"], "max_len"),
    (["--model.params_budget", "1"], "model.params_budget"),
    (["--test-batch-size", "-1"], "--test-batch-size"),
    (["--train.epochs", "true"], "train.epochs"),
    (["--train.seed", str(2**70)], "train.seed"),
])
def test_bad_input_is_refused_before_anything_is_written(bad, field, markov_corpus_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(train_argv(runs, markov_corpus_dir, "r", *bad)) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert not runs.exists()  # so the corrected command is not refused as "already exists"


def test_a_run_that_fails_before_its_first_epoch_leaves_nothing(markov_corpus_dir, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert main(train_argv(runs, markov_corpus_dir, "old", "--train.epochs", "1")) == 0
    old = {p.name: p.read_bytes() for p in (runs / "old").iterdir()}

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory before the first epoch ended")

    monkeypatch.setattr(cli, "train", fails)
    with pytest.raises(RuntimeError):  # an unexpected error: exit 1 with its traceback
        main(train_argv(runs, markov_corpus_dir, "new"))
    with pytest.raises(RuntimeError):
        main(train_argv(runs, markov_corpus_dir, "old", "--overwrite"))
    assert sorted(p.name for p in runs.iterdir()) == ["old"]  # the new one removed, nothing set aside left
    assert {p.name: p.read_bytes() for p in (runs / "old").iterdir()} == old  # the overwritten one intact

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", interrupted)
    assert main(train_argv(runs, markov_corpus_dir, "new")) == 130
    assert "nothing was kept" in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == ["old"]
    monkeypatch.undo()
    assert main(train_argv(runs, markov_corpus_dir, "old", "--overwrite", "--train.epochs", "1")) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["old"]
    assert (runs / "old" / "last.pt").read_bytes() != old["last.pt"]


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/tmp", ".hidden", "a b", "x" * 200])
def test_run_names_are_validated(name, tmp_path, capsys):
    sentinel = tmp_path / "runs" / "keep"
    sentinel.mkdir(parents=True)
    (sentinel / "config.yaml").write_text("{}\n")
    (sentinel / "train.log").write_text("\n")
    assert main(["train", "--run-name", name, "--runs-dir", str(tmp_path / "runs"), "--overwrite"]) == 2
    assert "--run-name" in capsys.readouterr().err
    assert sentinel.is_dir() and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["keep"]


def test_overwrite_only_replaces_a_run_folder(markov_corpus_dir, tmp_path, capsys):
    mine = tmp_path / "runs" / "thesis"
    mine.mkdir(parents=True)
    (mine / "chapter1.tex").write_text("precious")
    assert main(train_argv(tmp_path / "runs", markov_corpus_dir, "thesis", "--overwrite")) == 2
    assert "not an lmcore run folder" in capsys.readouterr().err
    assert (mine / "chapter1.tex").read_text() == "precious"


def test_a_diverged_run_exits_3(markov_corpus_dir, tmp_path):
    argv = train_argv(tmp_path / "runs", markov_corpus_dir, "d", "--optim.name", "sgd", "--set", "optim.lr=1e30",
                      "--optim.clip", "0", "--train.log_interval", "1")
    assert main(argv) == 3
    assert json.loads((tmp_path / "runs" / "d" / "metrics.jsonl").read_text().splitlines()[-1])["diverged"]


def test_help_shows_each_settings_description_and_default(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "model.dropout settings" in out and "train settings" in out
    assert "--model.rounds V mogrifier rounds; 0 is exactly an LSTM (default: 5)" in out
    assert "--optim.name V adam | sgd (default: adam)" in out


def test_log_has_timestamps_progress_totals_and_the_final_result(markov_corpus_dir, tmp_path):
    assert main(train_argv(tmp_path / "runs", markov_corpus_dir, "r", "--train.log_interval", "2")) == 0
    lines = (tmp_path / "runs" / "r" / "train.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines)
    text = "\n".join(lines)
    assert "| epoch 1/2 | step 2/5 |" in text and "epoch ETA" in text and "| end of epoch 2/2 |" in text
    assert "evaluating" in text and re.search(r":\d\d test +[0-9.]+ +[0-9.]+ +[0-9,]+$", text)
    final = json.loads((tmp_path / "runs" / "r" / "final.json").read_text())
    assert f"{final['test']['ppl']:.2f}" in text
