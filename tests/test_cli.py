"""The single-run command line: both spellings, the run folder, bad input, evaluate."""
import json

import pytest

from lmcore.cli import main, translate_seed_argv

TINY = ["--dataset", "text", "--hidden-size", "16", "--depth", "1", "--train.epochs", "2",
        "--data.batch_size", "8", "--data.bptt", "10", "--set", "optim.lr=0.01"]


def test_seed_spelling_is_translated():
    argv = ["-mode", "train", "-run_name", "X", "-model_type", "Mogrify", "-hidden_size", "5", "-gpu", "-1"]
    assert translate_seed_argv(argv) == ["train", "--run-name", "X", "--model-type", "Mogrify",
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
