"""Search-space YAML -> Optuna define-by-run: kinds, fixed values, conditions, alternatives, parse errors."""
import optuna
import pytest
import yaml

from lmtune.space import (
    CategoricalSpec,
    FixedSpec,
    FloatSpec,
    IntSpec,
    SearchSpace,
    SpaceError,
    parse_params,
    trial_settings,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

COMPARE = yaml.safe_load("""
model.family: {type: categorical, choices: [mogrifier, lstm, transformer]}
model.rounds: {type: int, low: 1, high: 6, when: {model.family: mogrifier}}
model.rank: {choices: [null, 32], when: {model.family: mogrifier}}
model.layers:
  - {type: int, low: 1, high: 3, when: {model.family: [mogrifier, lstm]}}
  - {type: int, low: 4, high: 6, when: {model.family: transformer}}
optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
model.dropout.state: {type: float, low: 0.0, high: 0.5, step: 0.1}
model.tie_weights: true
model.heads: {value: 4, when: {model.family: transformer}}
""")


def sample(space: SearchSpace, n: int, sampler=None) -> list[dict]:
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(space(trial))
        study.tell(trial, 1.0)
    return configs


def test_kinds_and_fixed_values_are_parsed():
    params = {p.key: p for p in parse_params(COMPARE, "compare.yaml")}
    assert isinstance(params["model.family"].spec, CategoricalSpec)
    assert isinstance(params["model.rounds"].spec, IntSpec)
    assert params["optim.lr"].spec == FloatSpec(type="float", low=1e-4, high=1e-2, log=True)
    assert isinstance(params["model.rank"].spec, CategoricalSpec)  # `choices` alone means categorical
    assert params["model.tie_weights"].spec == FixedSpec(value=True)  # a bare value is fixed
    assert params["model.heads"].when == {"model.family": ("transformer",)}
    # Alternatives get their own Optuna names, so each keeps its own distribution.
    assert "model.layers|mogrifier,lstm" in params and "model.layers|transformer" in params


def test_conditions_decide_which_parameters_exist():
    space = SearchSpace(parse_params(COMPARE, "compare.yaml"))
    configs = [trial_settings(c) for c in sample(space, 40)]
    assert {c["model.family"] for c in configs} == {"mogrifier", "lstm", "transformer"}
    for c in configs:
        mogrifier, transformer = c["model.family"] == "mogrifier", c["model.family"] == "transformer"
        assert ("model.rounds" in c) == mogrifier and ("model.rank" in c) == mogrifier
        assert ("model.heads" in c) == transformer
        assert (4 <= c["model.layers"] <= 6) if transformer else (1 <= c["model.layers"] <= 3)
        assert 1e-4 <= c["optim.lr"] <= 1e-2
        assert round(c["model.dropout.state"] * 10, 6).is_integer()  # step 0.1
        assert c["model.tie_weights"] is True
        assert not any("|" in k for k in c)  # Optuna's alias names are not settings


def test_conditions_may_refer_to_fixed_settings_and_constants_are_added():
    params = parse_params({"model.rounds": {"type": "int", "low": 1, "high": 3, "when": {"model.family": "mogrifier"}},
                           "optim.lr": {"type": "float", "low": 0.001, "high": 0.01}}, "s.yaml")
    lstm = SearchSpace(params, context={"model.family": "lstm"}, constants={"model.family": "lstm"})
    mog = SearchSpace(params, context={"model.family": "mogrifier"}, constants={"model.family": "mogrifier"})
    assert all(set(c) == {"model.family", "optim.lr"} for c in sample(lstm, 5))
    assert all(set(c) == {"model.family", "optim.lr", "model.rounds"} for c in sample(mog, 5))
    assert mog.always_present() == ["model.family", "model.rounds", "optim.lr"]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # `group` is "experimental"
def test_grouped_tpe_samples_the_conditional_space():
    space = SearchSpace(parse_params(COMPARE, "compare.yaml"))
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=5, multivariate=True, group=True)
    configs = sample(space, 15, sampler)  # past the startup trials: TPE models the groups
    assert len(configs) == 15 and all("optim.lr" in c for c in configs)


def test_describe_lists_every_parameter():
    text = SearchSpace(parse_params(COMPARE, "compare.yaml")).describe()
    assert "optim.lr: float [0.0001, 0.01] log" in text
    assert "model.rounds: int [1, 6]  (when model.family in ['mogrifier'])" in text


@pytest.mark.parametrize("entry, message", [
    ({"type": "float", "low": 0.5, "high": 0.1},
     "params.x: empty or inverted range: low (0.5) must be below high (0.1)"),
    ({"type": "int", "low": 3, "high": 3}, "empty or inverted range"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "log: true needs low > 0"),
    ({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "step cannot be combined with log"),
    ({"type": "categorical", "choices": []}, "params.x.choices: List should have at least 1 item"),
    ({"type": "categorical", "choices": [1, 1]}, "choices repeat a value"),
    ({"type": "categorical", "choices": [[1, 2]]}, "choices must be null, booleans, numbers or strings"),
    ({"type": "uniform", "low": 0, "high": 1},
     "params.x: type must be one of float, int, categorical, fixed (got 'uniform')"),
    ({"type": "int", "low": 1.5, "high": 3}, "params.x.low: Input should be a valid integer"),
    ({"type": "float", "low": 0, "high": 1, "scale": "log"}, "params.x.scale: Extra inputs are not permitted"),
    ({"type": "float", "high": 1}, "params.x.low: Field required"),
    ([{"type": "int", "low": 1, "high": 2}, {"type": "int", "low": 3, "high": 4}],
     "each of several alternatives needs a `when`"),
    ([{"type": "int", "low": 1, "high": 2, "when": {"f": ["a", "b"]}},
      {"type": "int", "low": 3, "high": 4, "when": {"f": "b"}}], "alternatives 0 and 1 can both apply"),
    ([{"type": "int", "low": 2, "high": 1, "when": {"f": "a"}}], "params.x[0]: empty or inverted range"),
])
def test_parse_errors_name_the_file_and_the_field(entry, message):
    with pytest.raises(SpaceError) as err:
        parse_params({"x": entry}, "spaces/s.yaml")
    assert str(err.value).startswith("spaces/s.yaml: ")
    assert message in str(err.value)


def test_empty_params_is_an_error():
    with pytest.raises(SpaceError, match="s.yaml: params: expected a non-empty mapping"):
        parse_params({}, "s.yaml")


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpaceError) as err:
        parse_params({"a": {"type": "int", "low": 2, "high": 1}, "b": {"type": "nope"}}, "s.yaml")
    assert len(err.value.lines) == 2


def test_which_values_a_parameter_may_take():
    """What a `when` (may_take) and a start_from point (why_outside) ask of a parameter."""
    ints, floats = IntSpec(type="int", low=1, high=3), FloatSpec(type="float", low=0.1, high=2.0)
    choices, fixed = CategoricalSpec(choices=["lstm", None]), FixedSpec(value=4)
    assert ints.may_take((3, 7)) and not ints.may_take((7, True, "2")) and floats.may_take((0.2,))
    assert choices.may_take((None,)) and not choices.may_take(("gru",))
    assert fixed.may_take((4,)) and not fixed.may_take((5,))
    assert ints.why_outside(2) is None and floats.why_outside(1) is None and choices.why_outside("lstm") is None
    assert ints.why_outside(2.0) == "2.0 is not an int" and ints.why_outside(True) == "True is not an int"
    assert floats.why_outside("x") == "'x' is not a number" and ints.why_outside(9) == "9 is outside [1, 3]"
    assert choices.why_outside("gru") == "'gru' is not one of ['lstm', None]"


def test_around_narrows_each_range_about_a_point():
    space = SearchSpace(parse_params(COMPARE, "compare.yaml"))
    point = {"model.family": "lstm", "model.rounds": 6, "optim.lr": 1e-3, "model.dropout.state": 0.0,
             "model.layers": 2}
    narrow = {p.key: p.spec for p in space.around(point, 0.25).params}
    assert (narrow["optim.lr"].low, narrow["optim.lr"].high) == pytest.approx((1e-3 / 10**0.5, 1e-3 * 10**0.5))
    assert narrow["optim.lr"].log
    assert (narrow["model.rounds"].low, narrow["model.rounds"].high) == (4, 6)  # 6 - 1.25, clipped at the top
    assert (narrow["model.dropout.state"].low, narrow["model.dropout.state"].high) == (0.0, 0.125)
    assert narrow["model.family"].choices == ["mogrifier", "lstm", "transformer"]  # choices stay
    # the alternative of model.layers that holds 2 narrows; the transformer's [4, 6], which does not, stays
    assert [(s.low, s.high) for k, s in narrow.items() if k.startswith("model.layers")] == [(1, 3), (4, 6)]
    for config in sample(space.around(point, 0.25), 30):
        assert 1e-3 / 10**0.5 <= config["optim.lr"] <= 1e-3 * 10**0.5


def test_around_start_needs_a_start_point(tiny_experiment):
    from lmtune.experiment import load_experiment
    from lmtune.schema import ExperimentError

    path = tiny_experiment("narrow", searcher={"around_start": 0.2})
    with pytest.raises(ExperimentError, match="searcher.around_start: needs a start_from point"):
        load_experiment(path)
