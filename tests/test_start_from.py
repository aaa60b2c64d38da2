"""An experiment's `start_from`: known configurations the study tries first, validated like the space."""
from pathlib import Path

import pytest
import yaml

from lmcore.config import flatten, make_config
from lmtune.schema import ExperimentError, load_experiment
from lmtune.search import make_study

ROOT = Path(__file__).resolve().parent.parent
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
