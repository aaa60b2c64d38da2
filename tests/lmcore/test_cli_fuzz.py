"""Fuzzing the single-run command line: every malformed invocation (a bad flag value, --set, --config file,
run name, a setting that cannot fit the data or this machine) exits 2 with one message naming the field or
file, no traceback, and nothing written under the runs dir. In-process for speed; a few as real processes."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcore.cli import main
from tests.conftest import REPO_ROOT

TIMEOUT = 600 * float(os.environ.get("LMCORE_TEST_TIMEOUT_SCALE", "1"))  # generous: a loaded laptop is normal


@dataclass
class Case:
    argv: list[str]  # appended to a valid tiny training command; "CONFIG" stands for the --config file
    expect: str  # the field, flag or file the message must name ("CONFIG": the config file's path)
    config: bytes | None = None
    command: list[str] = field(default_factory=lambda: ["train"])


INT_MIN = {"data.batch_size": 1, "data.eval_batch_size": 1, "data.bptt": 1, "model.layers": 1, "model.hidden": 1,
           "model.embedding": 1, "model.rounds": 0, "model.rank": 1, "model.params_budget": 1, "model.d_model": 1,
           "model.heads": 1, "model.ff": 1, "model.max_len": 1, "train.epochs": 1, "train.steps_per_epoch": 1,
           "train.seed": 0, "train.threads": 1, "train.log_interval": 1}
PROBABILITIES = ["model.dropout.input", "model.dropout.inter", "model.dropout.state", "model.dropout.output",
                 "model.dropout.embedding", "optim.beta1", "optim.beta2"]
NON_NEGATIVE = ["optim.weight_decay", "optim.clip"]
CHOICES = ["data.name", "model.family", "model.pos_encode", "optim.name", "data.variable_bptt",
           "model.tie_weights", "train.amp", "train.progress"]
NO_CUDA = not torch.cuda.is_available()

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8).map(lambda t: "x" + t)
finite = dict(allow_nan=False, allow_infinity=False)


def bad_int(name: str):
    low = INT_MIN[name]
    values = [st.integers(max_value=low - 1).map(str), st.sampled_from(["true", "false", "yes", "2.5", "[1, 2]"]),
              words]
    if name == "train.seed":
        values.append(st.integers(min_value=2**63).map(str))
    return st.one_of(values)


def bad_value(name: str):
    if name in INT_MIN:
        return bad_int(name)
    if name in PROBABILITIES:
        return st.one_of(st.floats(1.0, 1e6, **finite).map(repr), st.floats(-1e6, -1e-6, **finite).map(repr), words)
    if name in NON_NEGATIVE:
        return st.one_of(st.floats(-1e6, -1e-6, **finite).map(repr), words)
    if name == "optim.lr":
        return st.one_of(st.floats(-1e6, 0.0, **finite).map(repr), words)
    if name == "optim.lr_decay":
        return st.one_of(st.floats(1.0001, 1e6, **finite).map(repr), st.floats(-1e6, 0.0, **finite).map(repr), words)
    if name in CHOICES:
        return st.one_of(words, st.integers(2, 10**6).map(str))
    if name == "train.device":
        unavailable = ["cuda", "cuda:0"] * NO_CUDA + ["cuda:99", "cuda:", "cuda:-1", "gpu0", "banana", "CPU"]
        return st.one_of(st.sampled_from(unavailable), words)
    raise AssertionError(name)


FIELDS = sorted([*INT_MIN, *PROBABILITIES, *NON_NEGATIVE, "optim.lr", "optim.lr_decay", *CHOICES, "train.device"])


@st.composite
def value_cases(draw):
    """One setting with a bad value, as --NAME V, --NAME=V, --set NAME=V or in a --config file."""
    name = draw(st.sampled_from(FIELDS))
    value = draw(bad_value(name))
    form = draw(st.sampled_from(["flag", "flag=", "set", "file"]))
    if form == "file":
        section, _, leaf = name.rpartition(".")
        return Case(["--config", "CONFIG"], name, f"{section}:\n  {leaf}: {value}\n".encode())
    if form == "set":
        return Case(["--set", f"{name}={value}"], name)
    if form == "flag" and not value.startswith("-"):
        return Case([f"--{name}", value], name)
    return Case([f"--{name}={value}"], name)


def unfit_cases():
    """Valid values that cannot run on the tiny corpus (~6k training tokens, ~600 valid) or this machine."""
    transformer = ["--model.family", "transformer", "--model.pos_encode", "learned"]
    return st.one_of(
        st.integers(1_000, 10**12).map(lambda n: Case([f"--data.batch_size={n}"], "data.batch_size")),
        st.integers(10_000, 10**12).map(lambda n: Case([f"--data.eval_batch_size={n}"], "data.eval_batch_size")),
        st.integers(10_000, 10**12).map(lambda n: Case(["--test-batch-size", str(n)], "test batch size")),
        st.integers(1, 27).map(lambda n: Case([*transformer, "--model.max_len", str(n)], "max_len")),
        st.integers(1, 50).map(lambda n: Case(["--model.params_budget", str(n)], "model.params_budget")),
        st.integers(0 if NO_CUDA else 99, 10**6).map(lambda n: Case(["--gpu", str(n)], "train.device")),
        st.just(Case(["--model.family", "transformer", "--model.d_model", "30", "--model.heads", "4"], "d_model")),
        st.just(Case(["--data.dir", "/nonexistent/lmcore-fuzz"], "train.txt")),
    )


def flag_cases():
    """Malformed legacy flags (the first version's spelling), unknown flags, --set forms, run names, --test-batch-size."""
    positive = st.one_of(st.integers(max_value=0).map(str), words)
    return st.one_of(
        st.tuples(st.sampled_from(["--hidden-size", "--d-model", "--heads", "--depth", "--test-batch-size"]),
                  positive).map(lambda fv: Case([f"{fv[0]}={fv[1]}"], fv[0])),
        st.tuples(st.sampled_from(["--dataset", "--model-type", "--rnn-type", "--pos-encode"]), words)
        .map(lambda fv: Case([fv[0], fv[1]], fv[0])),
        st.sampled_from(FIELDS).map(lambda n: Case([f"--{n}x", "1"], f"--{n}x")),
        words.map(lambda w: Case(["--set", w], "--set")),
        words.map(lambda w: Case(["--set", f"model.{w}=1"], f"model.{w}")),
        st.sampled_from(["model=3", "train=cpu", "model.dropout=0.1"]).map(lambda s: Case(["--set", s], "--set")),
        st.sampled_from(["", ".", "..", "../up", "a/b", "/tmp", ".hidden", "a b", "x" * 129, "-x"])
        .map(lambda n: Case([f"--run-name={n}"], "--run-name")),
    )


def alias_bomb() -> bytes:
    """A small "billion laughs": each line refers nine times to the one before."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return ("\n".join(lines) + "\n").encode()


CONFIG_FILES = [
    (b"model: [1, 2\n", "not valid YAML"),
    (b"model:\n  rounds: \xff\xfe\n", "not UTF-8"),
    (b"model: !!python/object/apply:os.system ['touch PWNED']\n", "CONFIG"),
    (b"- model.rounds: 2\n", "expected a mapping"),
    (b"model:\n  rounds: 2\n  rounds: 3\n", "duplicate key"),
    (b"model.colour: red\n", "model.colour"),
    (b"model: 3\n", "model"),
    (b"train:\n  device: banana\n", "train.device"),
    (alias_bomb(), "aliases"),
    (b"a:\n" + b"".join(b"  " * i + b"b:\n" for i in range(1, 40)), "nested"),
    (b"\xff\xfe" + "model: 1\n".encode("utf-16-le"), "not UTF-8"),
]


def config_cases():
    return st.sampled_from(CONFIG_FILES).map(lambda c: Case(["--config", "CONFIG"], c[1], c[0]))


def evaluate_cases():
    return st.one_of(
        st.just(Case(["--checkpoint", "CONFIG"], "CONFIG", os.urandom(64), ["evaluate"])),
        st.just(Case(["--checkpoint", "CONFIG"], "CONFIG", b"", ["evaluate"])),
        st.just(Case(["--checkpoint", "CONFIG"], "CONFIG", b"model: lstm\n", ["evaluate"])),
        words.map(lambda w: Case(["--device", w, "--checkpoint", "x.pt"], "--device", None, ["evaluate"])),
        st.integers(max_value=0).map(lambda n: Case([f"--batch-size={n}", "--checkpoint", "x"], "--batch-size",
                                                    None, ["evaluate"])),
        st.just(Case(["--checkpoint", "/nonexistent/best.pt"], "/nonexistent/best.pt", None, ["evaluate"])),
        st.just(Case(["--run-name", "../.."], "--run-name", None, ["evaluate"])),
        st.just(Case(["--runs-dir", "CONFIG"], "--runs-dir", b"a file", ["train", "--run-name", "x"])),
    )


def base_argv(runs: Path, corpus: Path) -> list[str]:
    """A valid, tiny training command (a case that is accidentally valid trains for a second, and fails)."""
    return ["--run-name", "fuzz", "--runs-dir", str(runs), "--dataset", "text", "--data.dir", str(corpus),
            "--model.family", "lstm", "--model.hidden", "8", "--model.layers", "1", "--data.batch_size", "4",
            "--data.bptt", "8", "--train.epochs", "1", "--train.steps_per_epoch", "2"]


@pytest.fixture(scope="module")
def no_data_dir_from_outside():
    mp = pytest.MonkeyPatch()
    mp.delenv("LMCORE_DATA_DIR", raising=False)  # the fuzzed data.dir is the only place data can come from
    yield
    mp.undo()


def run_case(case: Case, corpus: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs, config = tmp / "runs", tmp / "in" / "c.yaml"
        config.parent.mkdir()
        if case.config is not None:
            config.write_bytes(case.config)
        extra = [str(config) if a == "CONFIG" else a for a in case.argv]
        argv = case.command + (base_argv(runs, corpus) if case.command == ["train"] else []) + extra
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.chdir(tmp):
            code = main(argv)
        err = stderr.getvalue()
        expect = str(config) if case.expect == "CONFIG" else case.expect
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("error:") == 1, (argv, err)
        assert expect in err, (argv, err)
        assert "Traceback" not in err, (argv, err)
        assert not runs.exists() and sorted(os.listdir(config.parent)) == ["c.yaml"] * (case.config is not None)
        assert sorted(os.listdir(tmp)) == ["in"]  # nothing else written (no PWNED, no runs/)


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=st.one_of(value_cases(), value_cases(), unfit_cases(), flag_cases(), config_cases(), evaluate_cases()))
def test_malformed_invocations_exit_2_naming_the_field(case, markov_corpus_dir, no_data_dir_from_outside):
    run_case(case, markov_corpus_dir)


@pytest.mark.parametrize("extra, expect", [
    (["--train.device", "banana"], "train.device"),
    (["--test-batch-size", "-1"], "--test-batch-size"),
    (["--config", "CONFIG"], "CONFIG"),
    (["--train.epochs", "true"], "train.epochs"),
])
def test_real_processes_exit_2_naming_the_field(extra, expect, markov_corpus_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: !!python/object/apply:os.system ['touch PWNED']\n")
    extra = [str(config) if a == "CONFIG" else a for a in extra]
    argv = [sys.executable, "-m", "lmcore", "train", *base_argv(tmp_path / "runs", markov_corpus_dir), *extra]
    env = {k: v for k, v in os.environ.items() if k != "LMCORE_DATA_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=TIMEOUT)
    said = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 2, said
    assert (str(config) if expect == "CONFIG" else expect) in done.stderr and "Traceback" not in done.stderr, said
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"], said
