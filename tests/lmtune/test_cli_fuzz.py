"""Malformed experiments, search spaces and --set values, generated: each is refused with exit code 2 and one
clear message naming the file or the field, no traceback, nothing written, nothing launched, quickly."""
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtune import driver
from lmtune.cli import main
from tests.conftest import REPO_ROOT, scaled

SECRET = "TOPSECRET-4f2a"  # planted in a file that an experiment points at; must never be printed
# `check`, like `run`, reads the corpus to refuse what cannot fit it: those cases need the real PTB, where there is one.
DATA = next((Path(d) for d in (os.environ.get("LMCORE_DATA_DIR"), REPO_ROOT.parent / "shared" / "data")
             if d and (Path(d) / "ptb").is_dir()), None)

VALID = {
    "name": "fz",
    "dataset": "ptb",
    "family": "lstm",
    "fixed": {"model.hidden": 32, "model.layers": 1},
    "search_space": {"params": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}},
    "scheduler": {"max_epochs": 3, "grace_period": 1},
    "trials": 4,
}
INF, NAN = math.inf, math.nan

# (dotted key of the experiment, a value that must be refused there)
BAD_SETTINGS = [
    *[("trials", v) for v in (True, 0, -1, 1.5, "x", None, [], {}, 10**7, INF)],
    *[("searcher.seed", v) for v in (True, -1, 2**32, 1.5, "x", [1])],
    *[("searcher.n_startup_trials", v) for v in (True, -1, "x")],
    *[("searcher.sampler", v) for v in ("cmaes", 3, ["tpe"])],
    *[("scheduler.max_epochs", v) for v in (0, True, NAN, "x")],
    *[("scheduler.reduction_factor", v) for v in (INF, 1, 0, True, NAN, 1e9)],
    *[("scheduler.grace_period", v) for v in (0, 100)],
    *[("resources.cpus", v) for v in (INF, 1e-9, 0, -1, True, 1e9, NAN)],
    *[("resources.gpus", v) for v in (-1, INF, 1.5, True)],
    *[("checkpoints.keep", v) for v in (0, True)],
    *[("max_concurrent", v) for v in (0, True, -3)],
    *[("dataset", v) for v in ("c4", 3, None, [])],
    *[("family", v) for v in ("gpt", 3, [])],
    *[("metric", v) for v in ("accuracy", None)],
    *[("name", v) for v in ("../x", "", "a/b", 3)],
    *[("storage", v) for v in ("s3://bucket", 3, [])],
    *[("fixed", v) for v in ([1], "x", {"model.roundz": 1}, {"train.progress": True}, {"train.epochs": 3},
                             {"data.name": "ptb"}, {"train.threads": 1}, {"train.device": "cpu"},
                             {"model.hidden": [1]}, {"model.hidden": {"a": 1}}, {"model.family": "gru"},
                             *[{"data.batch_size": 10**6}, {"data.eval_batch_size": 10**7},
                               {"model.params_budget": 1}] * bool(DATA))],
    *[("search_space", v) for v in (3, [], "missing.yaml", "secret.txt", "secret.yaml", "/bin/ls", {"params": {}},
                                    {"x": 1})],
    ("bogus", 1),
    *[("extends", v) for v in (3, "missing.yaml", "fz.yaml", "")],
]
# (a search-space entry, its name) that must be refused
BAD_PARAMS = [
    ("optim.lr", {"type": ["float"], "low": 1e-4, "high": 1e-2}),
    ("optim.lr", {"type": {"a": 1}, "low": 1e-4, "high": 1e-2}),
    ("optim.lr", {"type": "gaussian"}),
    ("optim.lr", {"low": 1e-4, "high": 1e-2}),
    ("optim.lr", {"type": "float", "low": 1e-4, "high": INF, "log": True}),
    ("optim.lr", {"type": "float", "low": NAN, "high": 1e-2}),
    ("optim.lr", {"type": "float", "low": 1e-2, "high": 1e-4}),
    ("optim.lr", {"type": "float", "low": 0.0, "high": 1e-2, "log": True}),
    ("optim.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "step": 0}),
    ("optim.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "step": INF}),
    ("model.layers", {"type": "int", "low": True, "high": 3}),
    ("model.layers", {"type": "int", "low": 1, "high": 3.5}),
    ("model.layers", {"type": "int", "low": 0, "high": 3}),
    ("model.layers", {"type": "int", "low": 1, "high": 10**9}),
    ("model.layers", {"type": "int", "low": 1, "high": 3, "when": {"model.family": [["lstm"]]}}),
    ("model.layers", {"type": "int", "low": 1, "high": 3, "when": {"model.family": {"a": 1}}}),
    ("model.layers", {"type": "int", "low": 1, "high": 3, "when": {"model.famly": "lstm"}}),
    ("model.layers", {"type": "int", "low": 1, "high": 3, "when": {"model.tie_weights": False}}),
    ("model.layers", {"type": "int", "low": 1, "high": 3, "when": {"model.family": "transformer"}}),
    ("model.layers", {"type": "int", "low": 1, "high": 3, "when": {"optim.lr": 5.0}}),
    ("model.layers", {"type": "int", "low": 1, "high": 3, "when": 3}),
    ("model.layers", [{"type": "int", "low": 1, "high": 3}, {"type": "int", "low": 2, "high": 4}]),
    ("model.layers", []),
    ("model.rank", {"choices": []}),
    ("model.rank", {"choices": [[1]]}),
    ("model.rank", {"choices": [{"a": 1}]}),
    ("model.rank", {"choices": [8, 8]}),
    ("model.rank", {"choices": list(range(1, 1002))}),
    ("model.rank", {"choices": [0, 8]}),
    ("model.roundz", {"type": "int", "low": 1, "high": 3}),
    ("train.epochs", {"type": "int", "low": 1, "high": 3}),
    ("train.progress", {"choices": [True, False]}),
    ("model.hidden", {"type": "int", "low": 16, "high": 64}),
    ("model.family", {"choices": ["lstm", "gru"]}),
    ("model.pos_encode", {"choices": ["rotary"]}),
]
BAD_SETS = [
    "trials=true", "searcher.seed=-1", "searcher.seed=4294967296", "model.roundz=3", "trials", "=3", "model.rounds=-1",
    "scheduler.max_epochs.x=1", "resources.cpus=.inf", "resources.cpus=1e-9", "train.epochs=3",
    "train.progress=true", "name=../x", "search_space=3", "model.dropout=0.3", "fixed=3", "trials=1e9",
    "scheduler.reduction_factor=.inf", "model.hidden=[1, 2]", "optim.lr=fast", "trials=" + "9" * 400,
    *["data.batch_size=1000000", "model.params_budget=1"] * bool(DATA), "model.layers=1000000000",
    "description=[&a [x, x, x, x, x, x, x, x]" + ", *a" * 100 + "]",  # an alias bomb: YAML's limits hold here too
]

# Slow examples are fine on a busy machine (each is timed below); capsys is read, so emptied, in every example.
LENIENT = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
FAST = settings(max_examples=220, deadline=None, suppress_health_check=LENIENT)


@pytest.fixture(autouse=True)
def real_data(monkeypatch):
    if DATA:
        monkeypatch.setenv("LMCORE_DATA_DIR", str(DATA))


def set_dotted(tree: dict, key: str, value) -> None:
    *path, leaf = key.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def write_case(folder: Path, settings_: list, bad_params: list) -> Path:
    spec = yaml.safe_load(yaml.safe_dump(VALID))
    for key, value in settings_:
        set_dotted(spec, key, value)
    if bad_params and isinstance(spec.get("search_space"), dict) and isinstance(spec["search_space"].get("params"),
                                                                              dict):
        spec["search_space"]["params"].update(dict(bad_params))
    (folder / "secret.txt").write_text(f"root:$6${SECRET}:19000:0:99999:7:::\nadmin:{SECRET}\n")
    (folder / "secret.yaml").write_text(f"root: x:0:0:{SECRET}\n{SECRET}: /bin/bash\n")  # YAML, not a space
    path = folder / "fz.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, width=10**6))
    return path


def assert_refused(command: str, path: Path, sets: list[str], capsys) -> str:
    before = sorted(p.name for p in path.parent.rglob("*"))
    started = time.monotonic()
    code = main([command, str(path), *(x for s in sets for x in ("--set", s))])
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code} for {path.read_text()[:2000]} {sets}\n{out[-2000:]}\n{err[-2000:]}"
    assert err.startswith("error: ") and "Traceback" not in err + out and SECRET not in err + out
    lines = err.removeprefix("error: ").rstrip("\n").split("\n")
    assert len(lines) == len(set(lines)), "a line printed twice:\n" + err
    for line in lines:  # each names the file (or --set / the variable) and says something after it
        assert line.startswith("... and ") or str(path.parent) in line or "--set" in line, err
    assert sorted(p.name for p in path.parent.rglob("*")) == before, "something was written"
    assert elapsed < scaled(20), f"took {elapsed:.1f} s"
    return err


@FAST
@given(settings_=st.lists(st.sampled_from(BAD_SETTINGS), max_size=3),
       bad_params=st.lists(st.sampled_from(BAD_PARAMS), max_size=2),
       sets=st.lists(st.sampled_from(BAD_SETS), max_size=2))
def test_malformed_input_is_refused_by_check(settings_, bad_params, sets, capsys):
    if not (settings_ or bad_params or sets):
        settings_ = [("trials", 0)]
    with tempfile.TemporaryDirectory() as tmp:
        assert_refused("check", write_case(Path(tmp), settings_, bad_params), sets, capsys)


@settings(max_examples=25, deadline=None, suppress_health_check=LENIENT)
# A bad `storage` is left to the check test: the --set storage below, which keeps runs in a temporary folder, replaces it.
@given(settings_=st.lists(st.sampled_from([s for s in BAD_SETTINGS if s[0] != "storage"]), min_size=1, max_size=2),
       bad_params=st.lists(st.sampled_from(BAD_PARAMS), max_size=1))
def test_malformed_input_never_starts_a_run(settings_, bad_params, capsys):
    ray_was_loaded = "ray" in sys.modules
    real = driver.run_experiment
    driver.run_experiment = lambda *a, **k: pytest.fail("the run was launched")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_case(Path(tmp), settings_, bad_params)
            assert_refused("run", path, [f"storage={tmp}/results"], capsys)
    finally:
        driver.run_experiment = real
    assert ray_was_loaded or "ray" not in sys.modules


@pytest.mark.parametrize("space", ["secret.txt", "secret.yaml", "/etc/passwd", "/bin/ls", "/dev/zero"])
def test_a_system_file_as_search_space_is_never_echoed(tmp_path, capsys, space):
    path = write_case(tmp_path, [("search_space", space)], [])
    err = assert_refused("check", path, [], capsys)
    assert SECRET not in err and "x:0:0" not in err and len(err.splitlines()) == 1


def test_a_system_file_as_experiment_is_never_echoed(tmp_path, capsys):
    write_case(tmp_path, [], [])
    assert main(["check", str(tmp_path / "secret.yaml")]) == 2
    err = capsys.readouterr().err
    assert "secret.yaml: not an experiment file" in err and SECRET not in err and "x:0:0" not in err


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_bad_cpu_count_is_bad_input_for_check_and_run(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setenv("LMTUNE_NUM_CPUS", "abc")
    path = write_case(tmp_path, [], [])
    assert main([command, str(path)]) == 2
    assert "LMTUNE_NUM_CPUS: expected a whole number of CPUs, at least 1 (got 'abc')" in capsys.readouterr().err
    assert main(["run", str(path), "--num-cpus", "0"]) == 2
    assert "--num-cpus: expected a whole number" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["fz.yaml", "secret.txt", "secret.yaml"]


def test_huge_files_are_refused_fast(tmp_path, capsys):
    for content in ("fixed:\n" + "".join(f"  model.k{i}: 1\n" for i in range(200_000)),
                    "search_space:\n  params:\n    model.rank:\n      choices: [" + ", ".join(["1"] * 300_000) + "]\n"):
        path = tmp_path / "fz.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in VALID.items() if k not in ("fixed", "search_space")})
                        + content)
        started = time.monotonic()
        assert main(["check", str(path)]) == 2
        assert time.monotonic() - started < scaled(20)
        err = capsys.readouterr().err
        assert len(err.splitlines()) <= 21 and "Traceback" not in err
