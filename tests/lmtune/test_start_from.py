"""An experiment's `start_from`: known configurations the study tries first, validated like the space."""
from pathlib import Path

import pytest
import yaml

from lmcore.config import flatten, make_config
from lmtune.cli import main
from lmtune.experiment import load_experiment
from lmtune.schema import ExperimentError
from lmtune.search import make_study

ROOT = Path(__file__).resolve().parents[2]
PAPER = {"model.family": "mogrifier", "model.rounds": 3, "optim.lr": 2e-3}


def test_start_points_are_the_first_suggestions(tiny_experiment, tmp_path):
    exp = load_experiment(tiny_experiment(start_from=[PAPER, {"model.family": "lstm"}]))
    assert exp.start_points == [PAPER, {"model.family": "lstm"}]
    searcher = make_study(exp, tmp_path)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert {k: first[k] for k in PAPER} == PAPER
    assert second["model.family"] == "lstm" and 1e-3 <= second["optim.lr"] <= 1e-2  # the rest is sampled


def test_alternatives_get_optunas_names(tiny_experiment):
    space = {"params": {
        "model.family": {"choices": ["mogrifier", "lstm"]},
        "model.dropout.output": [{"type": "float", "low": 0, "high": 0.2, "when": {"model.family": "mogrifier"}},
                                 {"type": "float", "low": 0, "high": 0.5, "when": {"model.family": "lstm"}}],
    }}
    point = {"model.family": "lstm", "model.dropout.output": 0.4}
    exp = load_experiment(tiny_experiment(search_space=space, start_from=[point]))
    assert exp.start_points == [{"model.family": "lstm", "model.dropout.output|lstm": 0.4}]


@pytest.mark.parametrize("point,message", [
    ({"model.rouns": 3}, "start_from[0].model.rouns: unknown setting (did you mean model.rounds?)"),
    ({"model.hidden": 32}, "start_from[0].model.hidden: not searched by this experiment's space"),
    ({"model.family": "mogrifier", "model.rounds": 9}, "start_from[0].model.rounds: 9 is outside [1, 3]"),
    ({"model.family": "gru"}, "start_from[0].model.family: 'gru' is not one of ['mogrifier', 'lstm']"),
    ({"optim.lr": "fast"}, "start_from[0].optim.lr: 'fast' is not a number"),
    ({"model.family": "lstm", "model.rounds": 2}, "start_from[0].model.rounds: does not exist with this point"),
])
def test_bad_start_points_are_named(tiny_experiment, point, message):
    with pytest.raises(ExperimentError) as err:
        load_experiment(tiny_experiment(start_from=[point]))
    assert message in str(err.value)
    assert "tiny.yaml" in str(err.value)


@pytest.mark.parametrize("dataset", ["ptb", "wt2"])
def test_the_paper_scale_mogrifier_studies_start_from_the_papers_tuned_config(dataset):
    """experiments/{ptb,wt2}_mogrify.yaml try configs/*_mogrifier_paper.yaml's searched settings first."""
    exp = load_experiment(ROOT / "experiments" / f"{dataset}_mogrify.yaml")
    paper = make_config({}, flatten(yaml.safe_load((ROOT / "configs" / f"{dataset}_mogrifier_paper.yaml").read_text())))
    (point,) = exp.start_points
    assert set(point) == set(exp.space.names()) - {"model.family"}  # every searched setting
    for name, value in point.items():
        assert value == pytest.approx(paper.flat()[name], rel=1e-2), name
    assert exp.base.model.softmax_mixtures == paper.model.softmax_mixtures


def test_a_pin_leaves_out_the_points_of_another_family_and_overrides_a_plain_setting(tiny_experiment, capsys):
    path = tiny_experiment(start_from=[PAPER, {"model.family": "lstm"}])
    assert load_experiment(path, ["model.family=lstm"]).start_points == []  # nothing left to start from
    assert load_experiment(path, ["optim.lr=5e-3"]).start_points == [
        {"model.family": "mogrifier", "model.rounds": 3}, {"model.family": "lstm"}]
    assert main(["check", str(path), "--set", "optim.lr=5e-3"]) == 0  # `check` lists them
    out = capsys.readouterr().out
    assert "start_from[0] (tried first" in out and "  model.rounds: 3" in out and "start_from[1]" in out


# deepmind/lamb's tuned LSTM baselines (lamb/experiment/mogrifier/config/): ..._tune_ptb_24m_lstm_d2_arms/
# trial_833 and ..._tune_wikitext-2_35m_lstm_mos2_d2_arms/trial_763, as lamb states them
LAMB_LSTM = {
    "ptb": {"learning_rate": 0.0030369099569192135, "l2_penalty": 0.00024908138497223704,
            "input_dropout": 0.6275626425150355, "output_dropout": 0.6901712653612706,
            "inter_layer_dropout": 0.3069926535017156, "state_dropout": 0.3692225400980858},
    "wt2": {"learning_rate": 0.003183909546336849, "l2_penalty": 0.00023063627783021125,
            "input_dropout": 0.6090979517941943, "output_dropout": 0.34845530389157287,
            "inter_layer_dropout": 0.09075401405970591, "state_dropout": 0.2714030562283111},
}


@pytest.mark.parametrize("dataset", ["ptb", "wt2"])
def test_the_paper_scale_lstm_studies_start_from_the_papers_tuned_lstm(dataset):
    lamb = LAMB_LSTM[dataset]
    (point,) = load_experiment(ROOT / "experiments" / f"{dataset}_lstm.yaml").start_points
    assert point == pytest.approx({
        "model.layers": 2, "optim.lr": lamb["learning_rate"],
        "optim.weight_decay": lamb["l2_penalty"] / 70,  # per token, as configs/*_mogrifier_paper.yaml explain
        "model.dropout.input": lamb["input_dropout"], "model.dropout.output": lamb["output_dropout"],
        "model.dropout.inter": lamb["inter_layer_dropout"], "model.dropout.state": lamb["state_dropout"],
        "model.dropout.embedding": 0.0}, rel=5e-3)
