"""Experiment validation: every error path gives one clear line naming the file and field, exit code 2,
and nothing is launched (no results folder appears)."""
from pathlib import Path

import pytest
import yaml

from lmtune.cli import main
from lmtune.experiment import load_experiment
from lmtune.schema import ExperimentError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))


def experiment(tmp_path: Path, space: dict | str | None = None, **changes) -> Path:
    """A valid experiment file, with `changes` to its top-level keys (None removes a key)."""
    spec = {
        "name": "exp",
        "dataset": "ptb",
        "family": "lstm",
        "fixed": {"model.hidden": 32, "model.layers": 1},
        "search_space": "space.yaml",
        "scheduler": {"max_epochs": 3, "grace_period": 1},
        "trials": 4,
        "storage": str(tmp_path / "results"),
    }
    spec.update(changes)
    spec = {k: v for k, v in spec.items() if v is not None}
    if space is None:
        space = {"params": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    (tmp_path / "space.yaml").write_text(space if isinstance(space, str) else yaml.safe_dump(space, sort_keys=False))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def params(**entries) -> dict:
    return {"params": {k.replace("__", "."): v for k, v in entries.items()}}


def fails(path: Path, capsys, *extra: str) -> str:
    """Runs `tune.py check` and `tune.py run` on it: both exit 2 before anything starts."""
    for command in ("check", "run"):
        assert main([command, str(path), *extra]) == 2
        message = capsys.readouterr().err
    assert not (path.parent / "results").exists(), "nothing may be launched"
    assert message.startswith("error: ")
    return message


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_experiments_are_valid(path):
    exp = load_experiment(path)
    assert exp.name == path.stem
    assert exp.space.names()


def test_shipped_experiments_cover_the_issue():
    names = {p.stem for p in SHIPPED}
    assert {"ptb_mogrify", "ptb_lstm", "ptb_transformer", "wt2_mogrify", "wt2_lstm", "wt2_transformer",
            "ptb_compare", "quickstart"} <= names
    budgets = {p.stem: load_experiment(p).base.model.params_budget for p in SHIPPED}
    assert all(budgets[f"ptb_{f}"] == 24_000_000 and budgets[f"wt2_{f}"] == 35_000_000
               for f in ("mogrify", "lstm", "transformer"))


def test_a_valid_experiment_resolves(tmp_path):
    exp = load_experiment(experiment(tmp_path), ["optim.weight_decay=1e-6", "trials=8"])
    assert exp.spec.trials == 8
    assert exp.base.optim.weight_decay == 1e-6  # `1e-6` is a float, not YAML 1.1's string
    assert exp.base.train.epochs == 3  # = scheduler.max_epochs
    assert exp.base.data.name == "ptb" and exp.base.model.family == "lstm"
    assert exp.folder == tmp_path / "results" / "exp"
    assert exp.space.constants == {"model.family": "lstm"}


@pytest.mark.parametrize("changes, message", [
    ({"trialz": 3}, "exp.yaml: trialz: Extra inputs are not permitted"),
    ({"trials": "many"}, "exp.yaml: trials: Input should be a valid integer"),
    ({"trials": 0}, "exp.yaml: trials: Input should be greater than 0"),
    ({"dataset": "c4"}, "exp.yaml: dataset: Input should be 'ptb', 'wikitext-2' or 'text' (got 'c4')"),
    ({"family": "gpt"}, "exp.yaml: family: Input should be 'mogrifier', 'lstm', 'gru', 'rnn' or 'transformer'"),
    ({"dataset": None}, "exp.yaml: dataset: Field required"),
    ({"metric": "accuracy"}, "exp.yaml: metric: Input should be 'valid_loss', 'valid_ppl' or 'best_valid_ppl'"),
    ({"scheduler": {"max_epochs": 3, "grace_period": 5}},
     "exp.yaml: scheduler: grace_period (5) exceeds max_epochs (3)"),
    ({"scheduler": {"max_epochs": 3, "reduction_factor": 1}},
     "exp.yaml: scheduler.reduction_factor: Input should be greater than 1"),
    ({"scheduler": {"type": "pbt", "max_epochs": 3}}, "exp.yaml: scheduler.type: Input should be 'asha' or 'fifo'"),
    ({"searcher": {"sampler": "cmaes"}}, "exp.yaml: searcher.sampler: Input should be 'tpe', 'gp' or 'random'"),
    ({"resources": {"cpus": 0}}, "exp.yaml: resources.cpus: Input should be greater than or equal to 0.01"),
    ({"resources": {"gpus": 1.5}}, "exp.yaml: resources: gpus above 1 must be a whole number"),
    ({"storage": "s3://bucket/x"}, "exp.yaml: storage: storage must be a filesystem path"),
    ({"name": "../escape"}, "exp.yaml: name: String should match pattern"),
    ({"fixed": {"model.roundz": 3}}, "exp.yaml: fixed.model.roundz: unknown setting (did you mean model.rounds?)"),
    ({"fixed": {"model": {"dropout": {"state": 1.5}}}},
     "exp.yaml: fixed.model.dropout.state: Input should be less than 1"),
    ({"fixed": {"optim.lr": "fast"}}, "exp.yaml: fixed.optim.lr: Input should be a valid number"),
    ({"fixed": {"train.epochs": 9}}, "exp.yaml: fixed.train.epochs: is set by scheduler.max_epochs (3); remove it"),
    ({"fixed": {"train.threads": 4}}, "exp.yaml: fixed.train.threads: is set by resources.cpus"),
    ({"fixed": {"data.name": "wikitext-2"}}, "exp.yaml: fixed.data.name: is set by dataset ('ptb')"),
    ({"family": None}, "exp.yaml: family: required unless the search space chooses model.family"),
    ({"fixed": {"train.progress": True}}, "exp.yaml: fixed.train.progress: is set by the tuner"),
    ({"fixed": {"train.device": "cpu"}}, "exp.yaml: fixed.train.device: is set by resources.gpus"),
    ({"fixed": {"data.name": "ptb"}}, "exp.yaml: fixed.data.name: is set by dataset ('ptb'); remove it"),
    ({"trials": True}, "exp.yaml: trials: Input should be a valid integer (got True)"),
    ({"searcher": {"seed": True}}, "exp.yaml: searcher.seed: Input should be a valid integer"),
    ({"searcher": {"seed": -1}}, "exp.yaml: searcher.seed: Input should be greater than or equal to 0"),
    ({"searcher": {"seed": 2**32}}, "exp.yaml: searcher.seed: Input should be less than or equal to 4294967295"),
    ({"scheduler": {"max_epochs": 3, "reduction_factor": float("inf")}},
     "exp.yaml: scheduler.reduction_factor: Input should be a finite number"),
    ({"resources": {"cpus": float("inf")}}, "exp.yaml: resources.cpus: Input should be a finite number"),
    ({"resources": {"cpus": 1e-9}}, "exp.yaml: resources.cpus: Input should be greater than or equal to 0.01"),
    ({"search_space": "missing.yaml"}, "exp.yaml: search_space: no such file:"),
])
def test_experiment_errors(tmp_path, capsys, changes, message):
    message_seen = fails(experiment(tmp_path, **changes), capsys)
    assert message in message_seen


@pytest.mark.parametrize("space, message", [
    (params(optim__lr={"type": "float", "low": 0.01, "high": 0.001}),
     "space.yaml: params.optim.lr: empty or inverted range: low (0.01) must be below high (0.001)"),
    (params(model__roundz={"type": "int", "low": 1, "high": 3}),
     "space.yaml: params.model.roundz: unknown setting (did you mean model.rounds?)"),
    (params(model__dropout__state={"type": "float", "low": 0.0, "high": 1.5}),
     "space.yaml: params.model.dropout.state: Input should be less than 1 (got 1.5)"),
    (params(model__pos_encode={"choices": ["sinusoidal", "rotary"]}),
     "space.yaml: params.model.pos_encode: Input should be 'none', 'sinusoidal', 'learned' or 'rope' (got 'rotary')"),
    (params(model__hidden={"type": "int", "low": 16, "high": 64}),
     "space.yaml: params.model.hidden: is also in the experiment's fixed settings"),
    (params(train__epochs={"type": "int", "low": 1, "high": 3}),
     "space.yaml: params.train.epochs: is set by scheduler.max_epochs, not searched"),
    (params(model__family={"choices": ["lstm", "gru"]}),
     "space.yaml: params.model.family: the experiment fixes family: lstm"),
    (params(model__rounds={"type": "int", "low": 1, "high": 3, "when": {"model.famly": "mogrifier"}}),
     "space.yaml: params.model.rounds.when.model.famly: unknown setting (did you mean model.family?)"),
    (params(model__rounds={"type": "int", "low": 1, "high": 3, "when": {"model.rank": 8}},
            model__rank={"choices": [8, 16]}),
     "space.yaml: params.model.rounds.when: model.rank must be defined above model.rounds"),
    ({"params": {}}, "space.yaml: params: expected a non-empty mapping"),
    ({"parameters": {}}, "space.yaml: not a search-space file (no `params:`)"),  # its keys never echoed
    ("params: [unclosed", "space.yaml: not valid YAML"),
    ("- a list", "space.yaml: expected a mapping of settings"),
])
def test_search_space_errors(tmp_path, capsys, space, message):
    assert message in fails(experiment(tmp_path, space=space), capsys)


def test_conditions_on_a_value_never_chosen(tmp_path, capsys):
    space = params(model__family={"choices": ["mogrifier", "lstm"]},
                   model__rounds={"type": "int", "low": 1, "high": 3, "when": {"model.family": "transformer"}})
    message = fails(experiment(tmp_path, space=space, family=None), capsys)
    assert "params.model.rounds.when: model.family never takes ['transformer']" in message


def test_settings_invalid_together_are_caught_by_sampling(tmp_path, capsys):
    space = params(model__d_model={"choices": [96, 128]}, model__heads={"choices": [3, 4]})
    message = fails(experiment(tmp_path, space=space, family="transformer"), capsys)
    assert "space.yaml: these settings are invalid together" in message
    assert "must be a multiple of heads" in message


@pytest.mark.parametrize("override, message", [
    ("model.roundz=3", "--set model.roundz: unknown setting (did you mean model.rounds?)"),
    ("model.rounds=-1", "fixed.model.rounds: Input should be greater than or equal to 0 (got -1)"),
    ("trials=x", "(with --set trials=x): trials: Input should be a valid integer"),
    ("bogus=1", "bogus: Extra inputs are not permitted"),
    ("trials", "--set trials: expected key=value"),
    ("scheduler.max_epochs.x=1", "--set scheduler.max_epochs.x=1: scheduler.max_epochs.x: 'max_epochs' is a value"),
    # a billion layers, rounds or heads hung or overflowed building the model (under a budget: solving its width)
    ("model.layers=1000000000", "fixed.model.layers: Input should be less than or equal to 100 (got 1000000000)"),
    ("model.rounds=1000000000", "fixed.model.rounds: Input should be less than or equal to 100 (got 1000000000)"),
    ("model.heads=1000000000", "fixed.model.heads: Input should be less than or equal to 1024 (got 1000000000)"),
    # YAML's limits hold for a --set value as for a file: an alias bomb is refused, not expanded
    ("description=[&a [x, x, x, x]" + ", *a" * 100 + "]", "--set description: not valid YAML: more than 64 aliases"),
])
def test_command_line_overrides_are_validated_the_same_way(tmp_path, capsys, override, message):
    assert message in fails(experiment(tmp_path), capsys, "--set", override)


@pytest.fixture
def ptb(data_root, monkeypatch):
    """`check`, like `run`, reads the corpus: the real PTB (the test is skipped without it)."""
    monkeypatch.setenv("LMCORE_DATA_DIR", str(data_root))


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=1000000", "exp.yaml (with --set data.batch_size=1000000): data.batch_size: 1000000 columns of "
                                "data.bptt 35 (+1) tokens need 36,000,000 training tokens; ptb has 929,589"),
    ("data.eval_batch_size=1000000", "data.eval_batch_size: 1000000 is more than the "),
    ("model.params_budget=1", "model.params_budget: 1 is below the smallest lstm model on this vocabulary"),
])
def test_check_refuses_what_the_run_would_refuse_on_the_corpus(tmp_path, capsys, ptb, override, message):
    message_seen = fails(experiment(tmp_path), capsys, "--set", override)
    assert message in message_seen and len(message_seen.splitlines()) == 1


def test_a_searched_setting_that_cannot_fit_names_the_trial(tmp_path, capsys, ptb):
    space = params(data__batch_size={"type": "int", "low": 10, "high": 10**6, "log": True})
    message = fails(experiment(tmp_path, space=space), capsys)
    assert "exp.yaml: data.batch_size: " in message and "(a trial of the search space: {" in message
    assert "'data.batch_size': " in message.split("a trial of")[1]


def test_both_command_lines_read_none_alike(tmp_path):
    """`--set model.rank=none` means None (full rank) to tune.py as to `python -m lmcore train` (tune.py read the
    string "none" and refused it)."""
    from lmcore.cli import build_parser, flag_settings

    args = build_parser().parse_args(["train", "--run-name", "x", "--set", "model.rank=none"])
    assert flag_settings(args)["model.rank"] is None
    path = experiment(tmp_path, family="mogrifier", fixed={"model.hidden": 32, "model.layers": 1, "model.rank": 8})
    exp = load_experiment(path, ["model.rank=none"])
    assert exp.pinned == {"model.rank": None} and exp.base.model.rank is None
    assert load_experiment(path, ["description=none"]).spec.description == "none"  # not a setting that takes None


def test_a_set_message_shows_a_long_value_cut(tmp_path, capsys):
    message = fails(experiment(tmp_path), capsys, "--set", "trials=" + "9" * 400)
    assert "trials=" + "9" * 70 + "..." in message and "9" * 100 not in message


def test_errors_are_collected_not_stopped_at_the_first(tmp_path):
    with pytest.raises(ExperimentError) as err:
        load_experiment(experiment(tmp_path, trials=0, dataset="c4", bogus=1))
    assert len(str(err.value).splitlines()) == 3


def test_missing_experiment_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_check_prints_the_space(tmp_path, capsys, ptb):
    assert main(["check", str(experiment(tmp_path))]) == 0
    assert "optim.lr: float [0.0001, 0.01] log" in capsys.readouterr().out


def test_missing_data_stops_before_anything_starts(tmp_path, capsys):
    empty = tmp_path / "no_corpus"
    empty.mkdir()
    path = experiment(tmp_path, dataset="text", fixed={"data.dir": str(empty), "model.hidden": 16})
    assert main(["run", str(path)]) == 2
    assert "text: cannot find train.txt" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


# -- --set pins a searched setting (issue 8.2) --------------------------------------------------------


def test_the_readme_example_pins_a_searched_setting(capsys, ptb):
    path = REPO / "experiments" / "ptb_mogrify.yaml"
    exp = load_experiment(path, ["trials=32", "model.dropout.state=0.3"])
    assert exp.spec.trials == 32 and exp.base.model.dropout.state == 0.3
    assert "model.dropout.state" not in exp.space.names()
    assert all(d.get("model.dropout.state") is None for d in exp.space.draw(8))
    assert main(["check", str(path), "--set", "trials=32", "--set", "model.dropout.state=0.3"]) == 0
    out = capsys.readouterr().out
    assert "pinned with --set (fixed for every trial, never searched):\n  model.dropout.state: 0.3" in out


def test_a_condition_on_a_pinned_setting_uses_the_pinned_value():
    path = REPO / "experiments" / "ptb_compare.yaml"
    exp = load_experiment(path, ["model.family=lstm"])
    assert exp.space.names() == [n for n in load_experiment(path).space.names()
                                 if n not in ("model.family", "model.rounds", "model.rank", "model.heads")]
    assert {d["model.family"] for d in exp.space.draw(8)} == {"lstm"}
    assert all("model.dropout.state" in d for d in exp.space.draw(8))  # when: family in [mogrifier, lstm]


def test_start_points_follow_the_pinned_settings():
    """ptb_compare starts from the paper's Mogrifier: pinned to the LSTM that point no longer applies; pinned
    to the Mogrifier it stays, less the pinned family."""
    path = REPO / "experiments" / "ptb_compare.yaml"
    assert load_experiment(path).start_points[0]["model.family"] == "mogrifier"
    assert load_experiment(path, ["model.family=lstm"]).start_points == []
    (point,) = load_experiment(path, ["model.family=mogrifier"]).start_points
    assert "model.family" not in point and any(key.startswith("model.rounds") for key in point)


def test_a_pinned_family_replaces_the_experiments_family():
    exp = load_experiment(REPO / "experiments" / "ptb_mogrify.yaml", ["model.family=lstm", "model.rounds=0"])
    assert exp.base.model.family == "lstm" and exp.spec.family == "lstm"


def test_a_setting_in_both_fixed_and_the_space_says_what_to_do(tmp_path, capsys):
    space = params(model__hidden={"type": "int", "low": 16, "high": 64})
    message = fails(experiment(tmp_path, space=space), capsys)
    assert "remove it from one of them (or pin it from the command line: --set model.hidden=VALUE)" in message


# -- conditions that can never hold, and other malformed spaces (issue 9, fuzz classes) ---------------


@pytest.mark.parametrize("space, message", [
    (params(model__rounds={"type": "int", "low": 1, "high": 3, "when": {"model.tie_weights": False}}),
     "params.model.rounds.when: model.tie_weights is fixed to True, never [False]: the parameter would never be used"),
    (params(model__layers={"type": "int", "low": 1, "high": 3},
            optim__lr={"type": "float", "low": 1e-4, "high": 1e-2, "when": {"model.layers": 7}}),
     "params.optim.lr.when: model.layers never takes [7]"),
    (params(optim__lr={"type": "float", "low": 1e-4, "high": float("inf"), "log": True}),
     "params.optim.lr.high: Input should be a finite number"),
    (params(model__layers={"type": "int", "low": True, "high": 3}), "params.model.layers.low: Input should be a valid"),
    (params(model__layers={"type": ["int"], "low": 1, "high": 3}), "params.model.layers: type must be one of"),
    (params(model__layers={"type": "int", "low": 1, "high": 3, "when": {"model.family": [["lstm"]]}}),
     "params.model.layers.when: Value error, model.family: a condition lists values"),
    (params(model__rank={"choices": list(range(1, 1002))}), "params.model.rank.choices: List should have at most 1000"),
    (params(model__layers={"type": "int", "low": 1, "high": 10**9}),  # was a traceback, or a hang under a budget
     "space.yaml: params.model.layers: Input should be less than or equal to 100 (got 1000000000)"),
])
def test_malformed_spaces(tmp_path, capsys, space, message):
    assert message.replace("Value error, ", "") in fails(experiment(tmp_path, space=space), capsys)


def test_many_unknown_keys_are_refused_fast_in_one_short_message(tmp_path):
    fixed = {f"model.x{i}": 1 for i in range(40_000)}
    with pytest.raises(ExperimentError) as err:
        load_experiment(experiment(tmp_path, fixed=fixed))
    lines = str(err.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "... and 39980 more problems"


# -- extends: a shared base (issue 8, experiment files) -----------------------------------------------


def test_extends_deep_merges_a_base_relative_to_the_file(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text(yaml.safe_dump({
        "fixed": {"model": {"hidden": 32}, "optim.clip": 0.5}, "scheduler": {"max_epochs": 3, "grace_period": 1},
        "searcher": {"seed": 5, "n_startup_trials": 3}, "trials": 4, "search_space": "../space.yaml"}))
    path = experiment(tmp_path, extends="base/common.yaml", scheduler=None, trials=None, search_space=None,
                      searcher={"n_startup_trials": 7}, fixed={"model.hidden": 48, "model.layers": 1})
    exp = load_experiment(path)
    assert exp.name == "exp" and exp.spec.trials == 4
    assert exp.spec.searcher.seed == 5 and exp.spec.searcher.n_startup_trials == 7
    assert exp.base.model.hidden == 48 and exp.base.optim.clip == 0.5 and exp.base.model.layers == 1
    assert exp.space.names() == ["optim.lr"]  # the base's search_space, relative to the base file


@pytest.mark.parametrize("bases, message", [
    ({"a.yaml": {"extends": "exp.yaml"}}, "extends: exp.yaml leads back to"),
    ({"a.yaml": {"extends": "b.yaml"}, "b.yaml": {"extends": "a.yaml"}}, "(a cycle)"),
    ({"a.yaml": {"name": "other"}}, "a.yaml: name: a base file must not set name"),
    ({"a.yaml": {"trials": "x"}}, "exp.yaml: trials: Input should be a valid integer"),
    ({}, "a.yaml: no such file"),
])
def test_bad_extends(tmp_path, capsys, bases, message):
    for name, content in bases.items():
        (tmp_path / name).write_text(yaml.safe_dump(content))
    spec = {k: v for k, v in yaml.safe_load(experiment(tmp_path).read_text()).items() if k != "trials"}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"extends": "a.yaml", **spec}))
    assert message in fails(path, capsys)


def test_shipped_experiments_state_only_what_differs():
    for path in SHIPPED:
        text = path.read_text()
        assert "storage:" not in text and "metric:" not in text and "failure:" not in text, path.name
        if path.stem != "quickstart":  # a base, or the experiment it is a variant of (ptb_2m65_*.yaml)
            assert "extends: base/" in text or "extends: ptb_" in text, path.name


# -- check shows what will run (issue 8.10) -----------------------------------------------------------


def test_check_shows_the_fixed_settings_and_the_solved_widths(capsys, ptb):
    assert main(["check", str(REPO / "experiments" / "ptb_compare.yaml")]) == 0
    out = capsys.readouterr().out
    assert "fixed settings" in out and "  model.params_budget: 24000000" in out and "  data.bptt: 70" in out
    assert "width solved from model.params_budget=24,000,000" in out
    widths = dict(line.strip().split(": ") for line in out.split("width solved")[1].splitlines()[1:])
    assert set(widths) == {"mogrifier", "lstm", "transformer"}
    assert widths["transformer"].startswith("d_model ") and widths["lstm"].startswith("hidden ")
    low, _, high = widths["mogrifier"].split()[1].partition("..")
    assert 300 < int(low) <= int(high or low) < 2000  # 24M parameters with a 10k vocabulary
