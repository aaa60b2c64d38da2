"""Every shell command in README.md and docs/*.md (```bash blocks) runs: each is looked up in HOW, which says how
it is run on a tiny setting (`tune.py X.yaml` validated with `check`, a training shortened to a few steps, a report
of a tiny experiment folder made here) or, rarely, why it is not run. A documented command missing from HOW fails
the test: add one line for it."""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import process_output, run_process

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Run:
    steps: tuple[str, ...]  # commands run in order ({tmp}: a folder of this module, {tiny}: a finished experiment)
    gpu: bool = False  # run only where CUDA is available


@dataclass(frozen=True)
class Skip:
    reason: str


def check(command: str) -> Run:
    """`python tune.py X.yaml ...` -> `python tune.py check X.yaml ...`: validated, nothing run."""
    return Run((command.replace("tune.py ", "tune.py check ", 1),))


def plus(command: str, extra: str, gpu: bool = False) -> Run:
    """The command as documented, with arguments appended that shrink it (later flags win)."""
    return Run((f"{command} {extra}",), gpu)


README_TRAIN = ("python -m lmcore train --run-name mog --dataset ptb --model-type Mogrify --hidden-size 650 --depth 2 "
                "--model.rounds 5 --model.rank 84 --model.dropout.state 0.2 --optim.lr 1e-3 --optim.beta1 0")
TINY_TRAIN = ("--hidden-size 32 --model.rank 8 --train.epochs 1 --train.steps_per_epoch 3 --test-batch-size 200 "
              "--runs-dir {tmp}/runs")
BENCH_TINY = "--quick --repeats 1 --budget 0.2"
BENCH_LOOP = ("for cpp in 1 0; do LMCORE_MOGRIFIER_CPP=$cpp python -m lmcore train --run-name e2e_$cpp --dataset ptb "
              "--set model.family=mogrifier --set model.hidden=256 --set model.layers=2 --set model.rounds=5 "
              "--set data.batch_size=32 --set data.bptt=35 --set train.epochs=1 --set train.steps_per_epoch=80; done")

# documented command -> how it is run here. One line per command.
HOW: dict[str, Run | Skip] = {
    "./dev quickstart": check("python tune.py experiments/quickstart.yaml"),  # what ./dev quickstart runs
    "./dev test": Skip("the test suite itself"),
    "python tune.py experiments/quickstart.yaml": check("python tune.py experiments/quickstart.yaml"),
    "python tune.py experiments/ptb_mogrify.yaml": check("python tune.py experiments/ptb_mogrify.yaml"),
    "python tune.py experiments/ptb_mogrify.yaml --set trials=32 --set model.dropout.state=0.3":
        check("python tune.py experiments/ptb_mogrify.yaml --set trials=32 --set model.dropout.state=0.3"),
    "python tune.py check experiments/ptb_compare.yaml": Run(("python tune.py check experiments/ptb_compare.yaml",)),
    "python tune.py report results/ptb_mogrify": Run(("python tune.py report {tiny}",)),
    "python tune.py compare results/ptb_mogrify results/ptb_lstm results/ptb_transformer":
        Run(("python tune.py compare {tiny} {tiny} {tiny} --out {tmp}/comparison",)),
    README_TRAIN: plus(README_TRAIN, TINY_TRAIN),
    "python -m lmcore evaluate --run-name mog --batch-size 1":
        Run((f"{README_TRAIN} {TINY_TRAIN}", "python -m lmcore evaluate --run-name mog --batch-size 200 --runs-dir "
             "{tmp}/runs")),
    "pip install -e '.[bench]'": Skip("installs packages"),
    "python benchmarks/mogrifier_speed.py": plus("python benchmarks/mogrifier_speed.py", BENCH_TINY),
    "python benchmarks/mogrifier_speed.py --quick": plus("python benchmarks/mogrifier_speed.py --quick", BENCH_TINY),
    "python benchmarks/mogrifier_speed.py --threads 1":
        plus("python benchmarks/mogrifier_speed.py --threads 1", BENCH_TINY),
    "python benchmarks/mogrifier_speed.py --device cuda":
        plus("python benchmarks/mogrifier_speed.py --device cuda", BENCH_TINY, gpu=True),
    "python benchmarks/mogrifier_speed.py --device cuda --amp":
        plus("python benchmarks/mogrifier_speed.py --device cuda --amp", BENCH_TINY, gpu=True),
    BENCH_LOOP: Run((BENCH_LOOP.replace("--run-name", "--runs-dir {tmp}/runs --run-name")
                     .replace("model.hidden=256", "model.hidden=32")
                     .replace("train.steps_per_epoch=80", "train.steps_per_epoch=3 --test-batch-size 200"),)),
    "python -m pytest -q tests/test_mogrifier.py": Skip("part of this test suite"),
    # The cluster (docs/tuning.md): real machines, or the local cluster that tests/test_cluster.py starts.
    "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/shared/ray_token": Skip("sets the cluster's environment"),
    "python -c 'import secrets; print(secrets.token_hex(32))' > /shared/ray_token; chmod 600 /shared/ray_token":
        Skip("writes the cluster's token on a shared filesystem"),
    "ray start --head --port 6379 --num-cpus 8 --num-gpus 2": Skip("tests/test_cluster.py runs the same through scripts/local_cluster.sh"),
    "ray start --address HEAD_IP:6379 --num-cpus 8 --num-gpus 2": Skip("tests/test_cluster.py runs the same through scripts/local_cluster.sh"),
    "python tune.py experiments/ptb_mogrify.yaml --address HEAD_IP:6379": Skip("tests/test_cluster.py runs the same through scripts/local_cluster.sh"),
    "scripts/local_cluster.sh start": Skip("tests/test_cluster.py"),
    "source /tmp/lmcore-cluster-$USER/cluster.env": Skip("tests/test_cluster.py reads cluster.env"),
    'python tune.py experiments/quickstart.yaml --address "$RAY_ADDRESS"': Skip("tests/test_cluster.py (tiny)"),
    "scripts/local_cluster.sh stop": Skip("tests/test_cluster.py"),
    "python benchmarks/tuner_overhead.py --cpus 2": Skip("a 10-minute benchmark; its --quick form is the same code"),
    "python benchmarks/tuner_overhead.py --quick --cpus 2": Skip("minutes: run by hand for docs/benchmarks.md"),
}


def documented_commands() -> dict[str, str]:
    """Each shell command of the docs' ```bash blocks (continuation lines joined, comments dropped) -> its file."""
    commands = {}
    for doc in DOCS:
        for block in re.findall(r"^```bash\n(.*?)^```", doc.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                command = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
                if command:
                    commands.setdefault(command, doc.name)
    return commands


def test_every_documented_command_is_in_the_table():
    missing = {c: doc for c, doc in documented_commands().items() if c not in HOW}
    assert not missing, ("documented commands that no test runs; add a line to HOW in tests/test_docs_commands.py:\n"
                         + "\n".join(f"  {doc}: {c!r}" for c, doc in missing.items()))


@pytest.fixture(scope="module")
def places(tmp_path_factory, markov_corpus_dir, ray_session) -> dict[str, str]:
    """{tmp}: a folder for this module; {tiny}: the folder of a finished tiny experiment (2 trials, 1 epoch)."""
    from conftest import write_tiny_experiment
    from lmtune import load_experiment, run_experiment

    tmp = tmp_path_factory.mktemp("docs")
    path = write_tiny_experiment(tmp / "tiny.yaml", markov_corpus_dir, tmp / "results", trials=2,
                                 scheduler={"type": "fifo", "max_epochs": 1})
    exp = load_experiment(path)
    assert run_experiment(exp) is True
    return {"tmp": str(tmp), "tiny": str(exp.folder)}


DONE: dict[str, None] = {}  # steps already run in this module (a training that an evaluation needs, once)


@pytest.mark.parametrize("command", [c for c, how in HOW.items() if isinstance(how, Run)])
def test_documented_command_runs(command, places, request, monkeypatch, capsys, tmp_path):
    how = HOW[command]
    if how.gpu:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    monkeypatch.chdir(REPO)
    if any("-m lmcore" in step for step in how.steps):  # trains on the real data (skipped without it)
        monkeypatch.setenv("LMCORE_DATA_DIR", str(request.getfixturevalue("data_root")))
    for step in how.steps:
        step = step.format(**places)
        if step in DONE:
            continue
        run_step(step, tmp_path, capsys)
        DONE[step] = None


def run_step(step: str, tmp_path: Path, capsys) -> None:
    words = shlex.split(step)
    if words[:2] == ["python", "tune.py"]:  # in-process: no interpreter start-up per command
        from lmtune.cli import main

        assert main(words[2:]) == 0, step + "\n" + "\n".join(capsys.readouterr())
        return
    bin_dir = tmp_path / "bin"  # `python` in a shell command is this interpreter (a script: a symlink loses the venv)
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = run_process(["bash", "-c", step], cwd=REPO, env=env)
    assert result.returncode == 0, f"{step}\n{process_output(result.stdout, result.stderr)}"


def test_the_table_has_no_stale_lines():
    stale = set(HOW) - set(documented_commands())
    assert not stale, f"HOW lists commands the docs no longer show; remove them: {sorted(stale)}"


def test_run_step_reports_a_failing_command(tmp_path, capsys):
    with pytest.raises(AssertionError, match="no_such_script.py"):
        run_step("python no_such_script.py", tmp_path, capsys)
