"""The shipped single-run configs (configs/*.yaml): valid, at their parameter budget, and runnable."""
from pathlib import Path

import pytest
import yaml

from lmcore.cli import main
from lmcore.config import flatten, make_config
from lmcore.models import count_parameters, solve_budget

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
VOCAB = {"ptb": 10_000, "wikitext-2": 33_278}


def test_there_are_configs():
    assert {p.stem for p in CONFIGS} >= {"ptb_mogrifier_paper", "wt2_mogrifier_paper", "small_transformer"}


@pytest.mark.parametrize("name,rounds,rank,mixtures", [("ptb", 5, 84, 1), ("wt2", 6, 48, 2)])
def test_the_paper_configs_are_the_authors_tuned_ones(name, rounds, rank, mixtures):
    """deepmind/lamb's tuned Mogrifiers: rounds, rank and softmax mixtures; Adam with beta1 0, batch 64, BPTT 70."""
    config = load(CONFIGS[0].parent / f"{name}_mogrifier_paper.yaml")
    m = config.model
    assert (m.family, m.layers, m.rounds, m.rank, m.softmax_mixtures) == ("mogrifier", 2, rounds, rank, mixtures)
    assert (config.optim.name, config.optim.beta1, config.data.batch_size, config.data.bptt) == ("adam", 0, 64, 70)


def load(path: Path):
    return make_config({}, flatten(yaml.safe_load(path.read_text())))


def parameters(path: Path) -> int:
    config = load(path)
    return count_parameters(solve_budget(config.model, VOCAB[config.data.name]), VOCAB[config.data.name])


BUDGETED = [p for p in CONFIGS if load(p).model.params_budget]


@pytest.mark.parametrize("path", BUDGETED, ids=lambda p: p.stem)
def test_config_is_valid_and_meets_its_budget(path):
    budget = load(path).model.params_budget
    assert abs(parameters(path) - budget) < 0.01 * budget


def test_the_2m65_configs_are_the_size_of_the_lstm_reference():
    """docs/results.md section 1: the Mogrifier and the Transformer at the reference LSTM's count (+-2%)."""
    reference = parameters(CONFIGS[0].with_name("ptb_2m65_lstm.yaml"))
    assert reference == 2_653_200  # pytorch/examples' 2-layer, 200-unit tied LSTM on PTB
    for family in ("mogrifier", "transformer"):
        assert abs(parameters(CONFIGS[0].with_name(f"ptb_2m65_{family}.yaml")) - reference) < 0.02 * reference


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_trains_on_the_command_line(path, markov_corpus_dir, tmp_path):
    """`python -m lmcore train --config configs/X.yaml`, shrunk to a tiny model and a few steps."""
    tiny = ["model.params_budget=null", "model.hidden=16", "model.d_model=16", "model.embedding=8", "model.rank=4",
            "model.embedding_ratio=null",
            "data.name=text", f"data.dir={markov_corpus_dir}", "data.batch_size=4", "data.bptt=8", "train.epochs=2",
            "train.steps_per_epoch=3", "train.device=cpu"]
    argv = ["train", "--run-name", "x", "--runs-dir", str(tmp_path), "--config", str(path)]
    assert main([*argv, *(a for s in tiny for a in ("--set", s))]) == 0
    assert (tmp_path / "x" / "final.json").is_file()


@pytest.mark.parametrize("changes", [["model.softmax_mixtures=2"], ["optim.average=ema", "optim.ema_decay=0.9"],
                                     ["optim.average=asgd", "optim.asgd_nonmono=1"],
                                     ["model.memory=0", "model.pos_encode=sinusoidal"]], ids=str)
def test_documented_variations_train(changes, markov_corpus_dir, tmp_path):
    """The measurements' variations of docs/paper_tools.md, on a tiny setting."""
    family = "transformer" if "model.memory=0" in changes else "lstm"
    path = CONFIGS[0].with_name(f"small_{family}.yaml")
    tiny = ["model.params_budget=null", "model.hidden=16", "model.d_model=16", "data.name=text",
            f"data.dir={markov_corpus_dir}", "data.batch_size=4", "data.bptt=8", "train.epochs=2",
            "train.steps_per_epoch=3", "train.device=cpu", *changes]
    argv = ["train", "--run-name", "x", "--runs-dir", str(tmp_path), "--config", str(path)]
    assert main([*argv, *(a for s in tiny for a in ("--set", s))]) == 0
    assert (tmp_path / "x" / "final.json").is_file()
