"""lmcore/config.py itself: the one `--set` parser of both command lines, dotted names, overrides, the number types
and the error messages (did you mean, the cap on lines)."""
import pytest
from pydantic import ValidationError

from lmcore.config import (
    MAX_LINES,
    Config,
    error_lines,
    error_message,
    flatten,
    make_config,
    parse_override,
    set_dotted,
    unknown_setting,
)


@pytest.mark.parametrize("text, expected", [
    ("model.rounds=3", ("model.rounds", 3)),
    (" optim.lr = 1e-3", ("optim.lr", 0.001)),  # YAML 1.2's float, not 1.1's string
    ("model.tie_weights=false", ("model.tie_weights", False)),
    ("model.rank=none", ("model.rank", None)),  # a field that accepts None
    ("model.rank=Null", ("model.rank", None)),
    ("model.rounds=none", ("model.rounds", "none")),  # one that does not: validation refuses the string
    ("model.hidden=[1, 2]", ("model.hidden", "[1, 2]")),  # not a scalar: left as text for validation to refuse
    ("data.dir=a=b", ("data.dir", "a=b")),  # split at the first =
])
def test_parse_override_reads_values_as_yaml(text, expected):
    assert parse_override(text) == expected


def test_experiment_keys_are_read_as_yaml_and_lmcore_ones_as_settings():
    assert parse_override("trials=8", experiment_keys=True) == ("trials", 8)
    assert parse_override("search_space={params: {}}", experiment_keys=True) == ("search_space", {"params": {}})
    assert parse_override("description=none", experiment_keys=True) == ("description", "none")
    assert parse_override("model.rank=none", experiment_keys=True) == ("model.rank", None)
    with pytest.raises(ValueError, match=r"^model.roundz: unknown setting \(did you mean model.rounds\?\)$"):
        parse_override("model.roundz=3", experiment_keys=True)
    with pytest.raises(ValueError, match="^trials: unknown setting"):
        parse_override("trials=8")  # the single-run command line knows lmcore's settings only


@pytest.mark.parametrize("text, message", [
    ("model.rounds", "model.rounds: expected key=value"),
    ("=3", "=3: expected key=value"),
    ("x" * 200, "x" * 77 + "...: expected key=value"),  # never echoed whole
    ("model.rounds=" + "9" * (2**20 + 1), "model.rounds: a value of 1,048,577 characters is too long"),
    ("model.rank=[&a [x, x]" + ", *a" * 100 + "]", "model.rank: not valid YAML: more than 64 aliases"),
    ("model.rank=" + "[" * 100 + "]" * 100, "model.rank: not valid YAML: nested deeper than 32 levels"),
])
def test_parse_override_refuses_naming_the_key(text, message):
    with pytest.raises(ValueError) as err:
        parse_override(text, experiment_keys=True)
    assert str(err.value).startswith(message)


def test_flatten_and_set_dotted_are_inverse():
    tree = {"model": {"rounds": 3, "dropout": {"state": 0.5}}, "optim": {"lr": 0.1}}
    flat = flatten(tree)
    assert flat == {"model.rounds": 3, "model.dropout.state": 0.5, "optim.lr": 0.1}
    rebuilt: dict = {}
    for name, value in flat.items():
        set_dotted(rebuilt, name, value)
    assert rebuilt == tree
    with pytest.raises(ValueError, match="'rounds' is a value, not a section"):
        set_dotted(rebuilt, "model.rounds.x", 1)


def test_make_config_applies_overrides_over_a_base_it_leaves_alone():
    base = {"model": {"rounds": 2, "dropout": {"state": 0.1}}}
    config = make_config(base, {"model.dropout.state": 0.4, "optim.lr": 0.01})
    assert (config.model.rounds, config.model.dropout.state, config.optim.lr) == (2, 0.4, 0.01)
    assert base == {"model": {"rounds": 2, "dropout": {"state": 0.1}}}
    assert config.updated({"model.rounds": 4}).model.rounds == 4 and config.model.rounds == 2
    assert make_config().flat() == Config().flat()


@pytest.mark.parametrize("value", [True, "3", 3.0, 2.5])
def test_a_whole_number_must_be_written_as_one(value):
    with pytest.raises(ValidationError, match="model.rounds"):
        make_config({}, {"model.rounds": value})


@pytest.mark.parametrize("name, most", [("model.layers", 100), ("model.rounds", 100), ("model.heads", 1024)])
def test_what_is_built_module_by_module_is_bounded(name, most):
    """A billion of them hung (or overflowed) building the model; the most allowed is refused no more."""
    assert make_config({}, {name: most}).flat()[name] == most
    with pytest.raises(ValidationError, match=f"{name}\n  Input should be less than or equal to {most}"):
        make_config({}, {name: 10**9})


def test_did_you_mean_and_the_cap_on_lines():
    assert unknown_setting("f.yaml: fixed.model.roundz", "model.roundz") == \
        "f.yaml: fixed.model.roundz: unknown setting (did you mean model.rounds?)"
    assert unknown_setting("x", "zzzzzz") == "x: unknown setting"
    assert unknown_setting("x", "trails", ["trials", "name"]) == "x: unknown setting (did you mean trials?)"
    lines = [f"line {i}" for i in range(MAX_LINES + 5)]
    message = error_message(lines + lines).splitlines()  # each line once
    assert message == lines[:MAX_LINES] + ["... and 5 more problems"]
    assert error_message(["a", "a", "b"]) == "a\nb"


def test_error_lines_name_the_field_and_never_echo_a_big_or_unknown_value():
    with pytest.raises(ValidationError) as err:
        make_config({"model": {"rounds": -1, "colour": "secret", "rank": [1] * 1000}})
    lines = error_lines(err.value, "run.yaml")
    assert "run.yaml: model.rounds: Input should be greater than or equal to 0 (got -1)" in lines
    assert "run.yaml: model.colour: Extra inputs are not permitted" in lines
    assert all("secret" not in line and "[1, 1" not in line for line in lines)


def test_take_overrides_takes_every_set_out_of_the_command_line():
    from lmcore.config import take_overrides

    argv = ["check", "x.yaml", "--set", "a=1", "--set=b=2", "--num-cpus", "2", "--", "--set", "c=3"]
    assert take_overrides(argv) == (["check", "x.yaml", "--num-cpus", "2", "--", "--set", "c=3"], ["a=1", "b=2"])
    assert take_overrides(["check", "--set"]) == (["check", "--set"], [])  # left for argparse to report
