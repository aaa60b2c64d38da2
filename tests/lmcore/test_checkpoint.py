"""Checkpoints: loaded with weights_only=True, so a crafted file runs nothing; a damaged one is one message
naming it, in `lmcore evaluate`, `lmcore train --resume`, `lmcore.evaluate_checkpoint` and a tuning trial."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import lmcore
from lmcore.checkpoint import CheckpointError
from lmcore.cli import main


class Crafted:
    """Unpickling this would create a file: the stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def finished_run(markov_corpus_dir, tmp_path_factory):
    """runs/r/ of a tiny finished run (config.yaml, last.pt, best.pt, metrics.jsonl ...)."""
    runs = tmp_path_factory.mktemp("runs")
    argv = ["train", "--run-name", "r", "--runs-dir", str(runs), "--dataset", "text", "--data.dir",
            str(markov_corpus_dir), "--model.family", "lstm", "--model.hidden", "16", "--model.layers", "1",
            "--data.batch_size", "8", "--data.bptt", "10", "--train.epochs", "1", "--train.steps_per_epoch", "5"]
    assert main(argv) == 0
    return runs / "r"


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of the finished run."""
    return shutil.copytree(finished_run, tmp_path / "runs" / "r")


def damage(path, how):
    good = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": good[: len(good) // 3], "random": os.urandom(len(good)),
                      "text": b"model: lstm\nthis is not a checkpoint\n"}[how])


def load_in(entry, run, path):
    """Use the planted file `path` through one of the three entry points; returns (exit code, message)."""
    if entry == "api":
        with pytest.raises(CheckpointError) as error:
            lmcore.evaluate_checkpoint(path)
        return 2, str(error.value)
    if entry == "evaluate":
        return main(["evaluate", "--checkpoint", str(path)]), None
    return main(["train", "--run-name", "r", "--runs-dir", str(run.parent), "--resume"]), None


@pytest.mark.parametrize("entry, name", [("evaluate", "best.pt"), ("resume", "last.pt"), ("api", "best.pt")])
def test_a_crafted_checkpoint_runs_nothing(entry, name, run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"format": "lmcore-checkpoint-1", "model": Crafted(marker)}, run / name)
    config_before = (run / "config.yaml").read_bytes()
    code, message = load_in(entry, run, run / name)
    message = message or capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert str(run / name) in message and "refused" in message and "Traceback" not in message
    assert (run / "config.yaml").read_bytes() == config_before  # --resume rewrote nothing


@pytest.mark.parametrize("how", ["empty", "truncated", "random", "text"])
@pytest.mark.parametrize("entry, name", [("evaluate", "best.pt"), ("resume", "last.pt"), ("api", "best.pt")])
def test_a_damaged_checkpoint_is_one_message_naming_it(entry, name, how, run, capsys):
    damage(run / name, how)
    code, message = load_in(entry, run, run / name)
    message = message or capsys.readouterr().err
    assert code == 2
    assert str(run / name) in message and "Traceback" not in message
    assert len(message.strip().splitlines()) == 1


def test_our_checkpoints_load_as_weights_only_and_resume(run, capsys):
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["format"] == "lmcore-checkpoint-1" and payload["loop"]["epoch"] == 1
    assert main(["train", "--run-name", "r", "--runs-dir", str(run.parent), "--resume", "--train.epochs", "2"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_trial_with_an_unreadable_checkpoint_starts_from_scratch(run, tmp_path, caplog):
    trainable = pytest.importorskip("lmtune.trainable")
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    shutil.copy(run / "last.pt", folder / trainable.CHECKPOINT_FILE)
    (folder / trainable.METRICS_FILE).write_text(json.dumps({"epoch": 1, "valid_ppl": 30.0}))
    assert trainable._last_good(folder)["epoch"] == 1
    marker = tmp_path / "pwned"
    for planted in (b"", b"garbage", Crafted(marker)):
        if isinstance(planted, bytes):
            (folder / trainable.CHECKPOINT_FILE).write_bytes(planted)
        else:
            torch.save(planted, folder / trainable.CHECKPOINT_FILE)
        caplog.clear()
        assert trainable._last_good(folder) is None
        assert "starts again from scratch" in caplog.text
    assert not marker.exists()


def test_evaluate_refuses_a_batch_larger_than_the_split(run, capsys):
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--batch-size", str(10**9)]) == 2
    err = capsys.readouterr().err
    assert "batch size" in err and "valid split" in err and "Traceback" not in err
