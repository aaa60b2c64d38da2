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

from tests.conftest import process_output, run_process

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Run:
    steps: tuple[str, ...]  # commands run in order ({tmp}, {tiny}, {markov}: see `places`)
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
TINY_TRAIN = ("--hidden-size 32 --model.rank 8 --train.epochs 1 --train.steps_per_epoch 3 --data.eval_batch_size 200 "
              "--test-batch-size 200 "
              "--runs-dir {tmp}/runs")
BENCH_TINY = "--quick --repeats 1 --budget 0.2"
BENCH_LOOP = ("for cpp in 1 0; do LMCORE_MOGRIFIER_CPP=$cpp python -m lmcore train --run-name e2e_$cpp --dataset ptb "
              "--set model.family=mogrifier --set model.hidden=256 --set model.layers=2 --set model.rounds=5 "
              "--set data.batch_size=32 --set data.bptt=35 --set train.epochs=1 --set train.steps_per_epoch=80; done")

# configs/small_*.yaml and the paper's config, a few steps on PTB; their eval.* shrunk for `evaluate --dynamic`
SMALL = ("--model.params_budget 200000 --train.epochs 1 --train.steps_per_epoch 3 --data.eval_batch_size 200 "
         "--test-batch-size 200 --runs-dir {tmp}/runs")
# Dynamic evaluation scores valid several times, a step per window: on PTB minutes, so those runs train on {markov}.
ON_MARKOV = ("--data.name text --data.dir {markov} --model.params_budget 20000 --data.eval_batch_size 8 "
             "--test-batch-size 8")
# docs/results.md section 5: the small runs on PTB (shrunk), their dynamic evaluation on {markov} (see ON_MARKOV)
SMALL_TRAIN_LOOP = ("for f in mogrifier lstm transformer; do python -m lmcore train --run-name small_$f --config "
                    "configs/small_$f.yaml; done")
SMALL_DYNAMIC_LOOP = ("for f in mogrifier lstm transformer; do python -m lmcore evaluate --run-name small_$f "
                      "--dynamic-search; done")
SMALL_LOOP_TINY = ("for f in mogrifier; do python -m lmcore train --run-name small_$f --config configs/small_$f.yaml "
                   f"{SMALL} {ON_MARKOV}; python -m lmcore evaluate --run-name small_$f --dynamic-search --runs-dir "
                   "{tmp}/runs; done")
PAPER_TRAIN = "python -m lmcore train --run-name ptb_paper --config configs/ptb_mogrifier_paper.yaml"
STUDY_LOOP = ("for family in mogrify lstm transformer; do python tune.py experiments/ptb_2m65_$family.yaml "
              "--no-dashboard; done")
LOCAL_LOOP = ("for family in mogrify lstm transformer; do python tune.py experiments/ptb_2m65_${family}_local.yaml "
              "--no-dashboard; done")
SEARCHER_BENCH = ("python benchmarks/searcher_benchmark.py experiments/ptb_2m65_mogrify.yaml --trials 8 16 "
                  "--repeats 30")
SEED_LOOP = ("for family in mogrify lstm transformer; do python tune.py export-best results/ptb_2m65_$family --out "
             "ptb_${family}_best.yaml --force; for seed in 1 2 3; do python -m lmcore train --run-name "
             "ptb_${family}_seed$seed --config ptb_${family}_best.yaml --set train.seed=$seed --set train.threads=1; "
             "done; done")
SEED_LOOP_TINY = (SEED_LOOP.replace("mogrify lstm transformer", "mogrify").replace("1 2 3", "1")  # one of each
                  .replace("results/ptb_2m65_$family", "{tiny}")
                  .replace(" ptb_${family}_best", " {tmp}/ptb_${family}_best")
                  .replace("--run-name", "--runs-dir {tmp}/runs --run-name"))
REF_LOOP = ("for f in lstm mogrifier transformer; do python -m lmcore train --run-name ptb_2m65_$f --config "
            "configs/ptb_2m65_$f.yaml; done")
WT2_LSTM = ("python -m lmcore train --run-name wt2_7m33_lstm --config configs/ptb_2m65_lstm.yaml --set "
            "data.name=wikitext-2")
WT2_LOOP = ("for f in mogrifier transformer; do python -m lmcore train --run-name wt2_7m33_$f --config "
            "configs/ptb_2m65_$f.yaml --set data.name=wikitext-2 --set model.params_budget=7332078; done")
WT2_LSTM_ADAM = ("python -m lmcore train --run-name wt2_7m33_lstm_adam --config configs/ptb_2m65_mogrifier.yaml --set "
                 "model.family=lstm --set data.name=wikitext-2 --set model.params_budget=7332078")
WT2_TRANSFORMER_LR = ("python -m lmcore train --run-name wt2_7m33_transformer_lr3e-3 --config "
                      "configs/ptb_2m65_transformer.yaml --set data.name=wikitext-2 --set model.params_budget=7332078 "
                      "--set optim.lr=0.003")
LAMB_2M65 = ("python -m lmcore train --run-name ptb_2m65_mogrifier_lamb --config configs/ptb_2m65_mogrifier_lamb.yaml "
             "--set train.threads=1")
LAMB_2M65_RERUN = ("python -m lmcore train --run-name ptb_2m65_mogrifier_rerun --config configs/ptb_2m65_mogrifier.yaml "
                   "--set train.threads=1")
# Most documented single runs prove their flags on {markov}: PTB's valid and test take seconds per run to score,
# and test_data.py and the PTB runs kept below (README_TRAIN, REF_LOOP, SMALL_TRAIN_LOOP) prove the real data.
SMALL_ON_MARKOV = f"{SMALL} {ON_MARKOV}".replace("{tmp}/runs", "{tmp}/on_markov")


def one_family(loop: str) -> str:
    """`for f in lstm mogrifier transformer; do ...` -> `for f in mogrifier; do ...`."""
    return re.sub(r"for f in [a-z ]+; do", "for f in mogrifier; do", loop)


def on_markov(command: str) -> str:
    """A WikiText-2 command on {markov} at a tiny budget (its `--set`s win over SMALL_ON_MARKOV's flags)."""
    return (command.replace("data.name=wikitext-2", "data.name=text --set data.dir={markov}")
            .replace("params_budget=7332078", "params_budget=20000"))
FAMILY_SPEED = ("python benchmarks/family_speed.py configs/ptb_2m65_lstm.yaml configs/ptb_2m65_mogrifier.yaml "
                "configs/ptb_2m65_transformer.yaml --steps 20 --rounds 3")
SMALL_SEEDS = ("for seed in 2 3; do python -m lmcore train --run-name small_lstm_seed$seed --config "
               "configs/small_lstm.yaml --set train.seed=$seed; done")
RESULTS_MOG = "python tune.py export-best results/ptb_2m65_mogrify --out ptb_mogrify_best.yaml"
RESULTS_TRANSFORMER = "python tune.py export-best results/ptb_2m65_transformer --out ptb_transformer_best.yaml"
QUICKSTART_BEST = "python tune.py export-best results/quickstart --family mogrifier --out best.yaml"
QUICKSTART_BEST_TINY = QUICKSTART_BEST.replace("results/quickstart", "{tiny}").replace("best.yaml", "{tmp}/qs.yaml")
QUICKSTART_SEEDS = ("for seed in 1 2 3; do python -m lmcore train --run-name quickstart_seed$seed --config best.yaml "
                    "--set train.seed=$seed; done")
QUICKSTART_SEEDS_TINY = (QUICKSTART_SEEDS.replace("1 2 3", "1 2").replace("best.yaml", "{tmp}/qs.yaml")
                         .replace("--run-name", "--runs-dir {tmp}/runs --run-name"))
SEED_TABLE = "python tune.py runs runs/ptb_{mogrify,lstm,transformer}_seed{1,2,3}"
BEST_SEEDS_TINY = tuple(f"python -m lmcore train --run-name best_seed{s} --config {{tmp}}/best.yaml --set train.seed={s} "
                        "--runs-dir {tmp}/runs" for s in (1, 2))

# documented command -> how it is run here. One line per command.
HOW: dict[str, Run | Skip] = {
    "./dev quickstart": check("python tune.py experiments/quickstart.yaml"),  # what ./dev quickstart runs
    "./dev test": Skip("the test suite itself"),
    "python tune.py experiments/quickstart.yaml": check("python tune.py experiments/quickstart.yaml"),
    "python tune.py experiments/quickstart.yaml --set report.seeds=3":
        check("python tune.py experiments/quickstart.yaml --set report.seeds=3"),
    "python tune.py experiments/ptb_mogrify.yaml": check("python tune.py experiments/ptb_mogrify.yaml"),
    "python tune.py experiments/ptb_mogrify.yaml --set trials=32 --set model.dropout.state=0.3":
        check("python tune.py experiments/ptb_mogrify.yaml --set trials=32 --set model.dropout.state=0.3"),
    "python tune.py check experiments/ptb_compare.yaml": Run(("python tune.py check experiments/ptb_compare.yaml",)),
    "python tune.py report results/ptb_mogrify": Run(("python tune.py report {tiny}",)),
    "python tune.py compare results/ptb_mogrify results/ptb_lstm results/ptb_transformer":
        Run(("python tune.py compare {tiny} {tiny} {tiny} --out {tmp}/comparison",)),
    "python tune.py runs runs/best_seed1 runs/best_seed2 runs/best_seed3":
        Run(("python tune.py export-best {tiny} --out {tmp}/best.yaml", *BEST_SEEDS_TINY,
             "python tune.py runs {tmp}/runs/best_seed1 {tmp}/runs/best_seed2")),
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
    BENCH_LOOP: Run((BENCH_LOOP.replace("--run-name", "--runs-dir {tmp}/runs --run-name")
                     .replace("model.hidden=256", "model.hidden=32")
                     # the Python loops score PTB's valid and test in minutes: scored on {markov}
                     .replace("train.steps_per_epoch=80", "train.steps_per_epoch=3 --set data.name=text --set "
                              "data.dir={markov} --set data.batch_size=8 --set data.eval_batch_size=8"),)),
    # The cluster (docs/tuning.md): real machines, or the local cluster that tests/e2e/test_cluster.py starts.
    "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/shared/ray_token": Skip("sets the cluster's environment"),
    "python -c 'import secrets; print(secrets.token_hex(32))' > /shared/ray_token; chmod 600 /shared/ray_token":
        Skip("writes the cluster's token on a shared filesystem"),
    "ray start --head --port 6379 --num-cpus 8 --num-gpus 2": Skip("tests/e2e/test_cluster.py runs the same through scripts/local_cluster.sh"),
    "ray start --address HEAD_IP:6379 --num-cpus 8 --num-gpus 2": Skip("tests/e2e/test_cluster.py runs the same through scripts/local_cluster.sh"),
    "python tune.py experiments/ptb_mogrify.yaml --address HEAD_IP:6379": Skip("tests/e2e/test_cluster.py runs the same through scripts/local_cluster.sh"),
    "scripts/local_cluster.sh start": Skip("tests/e2e/test_cluster.py"),
    "source /tmp/lmcore-cluster-$USER/cluster.env": Skip("tests/e2e/test_cluster.py reads cluster.env"),
    'python tune.py experiments/quickstart.yaml --address "$RAY_ADDRESS"': Skip("tests/e2e/test_cluster.py (tiny)"),
    "scripts/local_cluster.sh stop": Skip("tests/e2e/test_cluster.py"),
    "./dev gpu-prepare": Skip("downloads wheels; tests/e2e/test_benchmarks.py checks its data copy and pip command"),
    "./dev gpu-check OUT": Skip("tests/e2e/test_benchmarks.py runs `./dev gpu-check OUT --dry-run`"),
    "python benchmarks/tuner_overhead.py --cpus 2": Skip("a 10-minute benchmark; its --quick form is the same code"),
    "python benchmarks/tuner_overhead.py --quick --cpus 2": Skip("minutes: run by hand for docs/benchmarks.md"),
    # Exported configs of the tiny experiment ({tiny}: a "text" corpus) train in seconds.
    "python tune.py export-best results/ptb_mogrify --out best.yaml":
        Run(("python tune.py export-best {tiny} --out {tmp}/best.yaml",
             "python -m lmcore train --run-name best --config {tmp}/best.yaml --runs-dir {tmp}/runs")),
    "python -m lmcore evaluate --run-name mog --dynamic-search":
        Run((f"{README_TRAIN} {TINY_TRAIN} {ON_MARKOV} --runs-dir {{tmp}}/markov",
             "python -m lmcore evaluate --run-name mog --dynamic-search --runs-dir {tmp}/markov")),
    # the paper's config with its flags, on {markov} (PTB at batch 64 x 70 steps: seconds per step even tiny)
    PAPER_TRAIN: plus(PAPER_TRAIN, f"{SMALL} --model.rank 8 {ON_MARKOV}".replace("{tmp}/runs", "{tmp}/markov")),
    # docs/paper_tools.md
    "python -m lmcore train --run-name small_transformer --config configs/small_transformer.yaml":
        plus("python -m lmcore train --run-name small_transformer --config configs/small_transformer.yaml",
             SMALL_ON_MARKOV),
    "python -m lmcore train --run-name small_transformer_nomem --config configs/small_transformer.yaml --set "
    "model.memory=0 --set model.pos_encode=sinusoidal":
        plus("python -m lmcore train --run-name small_transformer_nomem --config configs/small_transformer.yaml --set "
             "model.memory=0 --set model.pos_encode=sinusoidal", SMALL_ON_MARKOV),
    # Loops over the families run one of them here: test_shipped_configs.py trains every config in configs/.
    SMALL_TRAIN_LOOP: Run((one_family(SMALL_TRAIN_LOOP).replace(".yaml;", f".yaml {SMALL};")
                           .replace("{tmp}/runs", "{tmp}/ptb"),)),
    SMALL_DYNAMIC_LOOP: Run((SMALL_LOOP_TINY,)),  # its dynamic search of small_mogrifier, trained on {markov}
    "python -m lmcore evaluate --run-name small_mogrifier --dynamic":
        Run((SMALL_LOOP_TINY, "python -m lmcore evaluate --run-name small_mogrifier --dynamic --runs-dir {tmp}/runs")),
    "python -m lmcore evaluate --run-name small_mogrifier --dynamic --set eval.dynamic_lr=1e-4":
        Run((SMALL_LOOP_TINY, "python -m lmcore evaluate --run-name small_mogrifier --dynamic --set "
             "eval.dynamic_lr=1e-4 --runs-dir {tmp}/runs")),
    "python -m lmcore evaluate --run-name small_mogrifier --dynamic-search":
        Run((SMALL_LOOP_TINY, "python -m lmcore evaluate --run-name small_mogrifier --dynamic-search --runs-dir "
             "{tmp}/runs")),
    "python -m lmcore train --run-name small_lstm_mos2 --config configs/small_lstm.yaml --set model.softmax_mixtures=2":
        plus("python -m lmcore train --run-name small_lstm_mos2 --config configs/small_lstm.yaml --set "
             "model.softmax_mixtures=2", f"{SMALL} {ON_MARKOV}"),  # a mixture's softmaxes over PTB: a minute
    "python -m lmcore train --run-name small_lstm_ema --config configs/small_lstm.yaml --set optim.average=ema":
        plus("python -m lmcore train --run-name small_lstm_ema --config configs/small_lstm.yaml --set "
             "optim.average=ema", SMALL_ON_MARKOV),
    "python -m lmcore train --run-name small_lstm_asgd --config configs/small_lstm.yaml --set optim.average=asgd "
    "--set optim.asgd_nonmono=1":
        plus("python -m lmcore train --run-name small_lstm_asgd --config configs/small_lstm.yaml --set "
             "optim.average=asgd --set optim.asgd_nonmono=1", SMALL_ON_MARKOV),
    # docs/results.md
    REF_LOOP: Run((one_family(REF_LOOP).replace(".yaml;", f".yaml {SMALL};"),)),
    LAMB_2M65: plus(LAMB_2M65, SMALL_ON_MARKOV),
    LAMB_2M65_RERUN: plus(LAMB_2M65_RERUN, SMALL_ON_MARKOV),
    "python -m lmcore evaluate --run-name small_transformer --dynamic --set eval.dynamic_stat_windows=100":
        Run(("python -m lmcore train --run-name small_transformer --config configs/small_transformer.yaml "
             f"{SMALL} {ON_MARKOV}".replace("{tmp}/runs", "{tmp}/markov"),  # {tmp}/runs has a PTB one
             "python -m lmcore evaluate --run-name small_transformer --dynamic --set eval.dynamic_stat_windows=100 "
             "--runs-dir {tmp}/markov")),
    # WikiText-2's commands: their flags, on {markov}. Tokenising WikiText-2 and scoring its 460k valid and test
    # words over a 33k-word softmax took minutes per command; test_data.py reads the real WikiText-2.
    WT2_LSTM: plus(on_markov(WT2_LSTM), SMALL_ON_MARKOV),
    WT2_LSTM_ADAM: plus(on_markov(WT2_LSTM_ADAM), SMALL_ON_MARKOV),
    WT2_LOOP: Run((on_markov(WT2_LOOP).replace("mogrifier transformer", "mogrifier")
                   .replace("20000;", f"20000 {SMALL_ON_MARKOV};"),)),
    WT2_TRANSFORMER_LR: plus(on_markov(WT2_TRANSFORMER_LR), SMALL_ON_MARKOV),
    SMALL_SEEDS: Run((SMALL_SEEDS.replace("2 3", "2").replace("seed=$seed;", f"seed=$seed {SMALL_ON_MARKOV};"),)),
    FAMILY_SPEED: plus(FAMILY_SPEED, "--steps 2 --rounds 1"),
    RESULTS_MOG: Run(("python tune.py export-best {tiny} --out {tmp}/ptb_mogrify_best.yaml",)),
    "python -m lmcore train --run-name ptb_mogrify_best --config ptb_mogrify_best.yaml":
        Run(("python tune.py export-best {tiny} --out {tmp}/ptb_mogrify_best.yaml",
             "python -m lmcore train --run-name ptb_mogrify_best --config {tmp}/ptb_mogrify_best.yaml --runs-dir "
             "{tmp}/runs")),
    RESULTS_TRANSFORMER: Run(("python tune.py export-best {tiny} --out {tmp}/ptb_transformer_best.yaml",)),
    "python -m lmcore train --run-name ptb_transformer_best --config ptb_transformer_best.yaml":
        Run(("python tune.py export-best {tiny} --out {tmp}/ptb_transformer_best.yaml",
             "python -m lmcore train --run-name ptb_transformer_best --config {tmp}/ptb_transformer_best.yaml "
             "--runs-dir {tmp}/runs")),
    STUDY_LOOP: check(STUDY_LOOP.replace(" --no-dashboard", "")),  # check takes no Ray options
    LOCAL_LOOP: check(LOCAL_LOOP.replace(" --no-dashboard", "")),
    "python tune.py compare results/ptb_2m65_mogrify_local results/ptb_2m65_lstm_local "
    "results/ptb_2m65_transformer_local --out docs/results/ptb_2m65_local --force":
        Skip("needs the three second-round studies (hours); compare itself is tested on tiny studies"),
    SEARCHER_BENCH: plus(SEARCHER_BENCH, "--trials 3 --repeats 2 --options tpe1 tpe1-near0.15"),
    "python tune.py compare results/ptb_2m65_mogrify results/ptb_2m65_lstm results/ptb_2m65_transformer --out "
    "docs/results/ptb_2m65 --force": Run(("python tune.py compare {tiny} {tiny} {tiny} --out {tmp}/ptb_2m65",
                                          "python tune.py compare {tiny} {tiny} {tiny} --out {tmp}/ptb_2m65 --force")),
    SEED_LOOP: Run((SEED_LOOP_TINY,)),
    SEED_TABLE: Run((SEED_LOOP_TINY, "python tune.py runs {tmp}/runs/ptb_mogrify_seed1")),
    # docs/tuning.md
    QUICKSTART_SEEDS: Run((QUICKSTART_BEST_TINY, QUICKSTART_SEEDS_TINY)),
    "python tune.py runs runs/quickstart_seed1 runs/quickstart_seed2 runs/quickstart_seed3":
        Run((QUICKSTART_BEST_TINY, QUICKSTART_SEEDS_TINY,
             "python tune.py runs {tmp}/runs/quickstart_seed1 {tmp}/runs/quickstart_seed2")),
    QUICKSTART_BEST: Run((QUICKSTART_BEST_TINY,)),
    "python -m lmcore train --run-name quickstart_best --config best.yaml --set train.epochs=12 --set train.seed=2":
        Run((QUICKSTART_BEST_TINY,
             "python -m lmcore train --run-name quickstart_best --config {tmp}/qs.yaml --set train.epochs=12 --set "
             "train.seed=2 --set train.epochs=1 --runs-dir {tmp}/runs")),
}


def documented_commands() -> dict[str, str]:
    """Each shell command of the docs' ```bash blocks (continuation lines joined, comments dropped, a `for ...; do`
    loop joined up to its `done`) -> its file."""
    commands = {}
    for doc in DOCS:
        for block in re.findall(r"^```bash\n(.*?)^```", doc.read_text(), re.S | re.M):
            for command in shell_commands(block):
                commands.setdefault(command, doc.name)
    return commands


def shell_commands(block: str) -> list[str]:
    """The commands of one bash block, each on one line: `a; do` / `b` / `done` -> `a; do b; done`."""
    commands, loop, depth = [], "", 0
    for line in block.replace("\\\n", " ").splitlines():
        line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
        if not line:
            continue
        depth += (line.endswith("; do") or line == "do") - (line == "done")
        loop = line if not loop else f"{loop}{' ' if loop.endswith('do') else '; '}{line}"
        if depth == 0:
            commands.append(loop)
            loop = ""
    return commands


def test_every_documented_command_is_in_the_table():
    missing = {c: doc for c, doc in documented_commands().items() if c not in HOW}
    assert not missing, ("documented commands that no test runs; add a line to HOW in tests/e2e/test_docs_commands.py:\n"
                         + "\n".join(f"  {doc}: {c!r}" for c, doc in missing.items()))


@pytest.fixture(scope="module")
def places(tmp_path_factory, markov_corpus_dir, ray_session) -> dict[str, str]:
    """{tmp}: a folder for this module; {tiny}: the folder of a finished tiny experiment (2 trials, 1 epoch);
    {markov}: the tiny corpus it was trained on (a "text" data.dir)."""
    from lmtune import load_experiment, run_experiment
    from tests.conftest import write_tiny_experiment

    tmp = tmp_path_factory.mktemp("docs")
    path = write_tiny_experiment(tmp / "tiny.yaml", markov_corpus_dir, tmp / "results", trials=2,
                                 scheduler={"type": "fifo", "max_epochs": 1})
    exp = load_experiment(path)
    assert run_experiment(exp) is True
    return {"tmp": str(tmp), "tiny": str(exp.folder), "markov": str(markov_corpus_dir)}


DONE: dict[str, None] = {}  # steps already run in this module (a training that an evaluation needs, once)


@pytest.mark.parametrize("command", [c for c, how in HOW.items() if isinstance(how, Run)])
def test_documented_command_runs(command, places, request, monkeypatch, capsys, tmp_path):
    how = HOW[command]
    if how.gpu:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
    monkeypatch.chdir(REPO)
    # Real data (skipped without it): trainings, configs/, and experiments/ (`check` reads the corpus as `run` does).
    if any(re.search(r"-m lmcore|configs/|experiments/", step) for step in how.steps):
        monkeypatch.setenv("LMCORE_DATA_DIR", str(request.getfixturevalue("data_root")))
    for step in how.steps:
        for name, path in places.items():  # not str.format: the shell's ${x}
            step = step.replace(f"{{{name}}}", path)
        if step in DONE:
            continue
        run_step(step, tmp_path, capsys)
        DONE[step] = None


def run_step(step: str, tmp_path: Path, capsys) -> None:
    """Run one documented step: `python tune.py` and `python -m lmcore` in this process (no interpreter start-up
    and imports per command; a loop is unrolled into them), anything else through bash."""
    for command in unrolled(step):
        words = shlex.split(command)
        if words[:2] == ["python", "tune.py"]:
            from lmtune.cli import main
            code = main(words[2:])
        elif words[:3] == ["python", "-m", "lmcore"]:
            code = _lmcore_main(words[3:])
        else:
            code, output = _in_bash(command, tmp_path)
            assert code == 0, f"{command}\n{output}"
            continue
        assert code == 0, command + "\n" + "\n".join(capsys.readouterr())


LOOP = re.compile(r"for (\w+) in ([^;]+); do (.*); done")


def unrolled(step: str) -> list[str]:
    """`for x in a b; do A $x; B; done` -> [A a, B, A b, B] (nested loops too); any other step as it is."""
    loop = LOOP.fullmatch(step)
    if not loop:
        return [step]
    name, values, body = loop.groups()
    variable = re.compile(rf"\$\{{{name}\}}|\${name}\b")
    return [command for value in values.split() for part in _top_level(body)
            for command in unrolled(variable.sub(value, part))]


def _top_level(body: str) -> list[str]:
    """The commands of a loop's body, an inner loop kept whole: `A; for y in 1; do B; done` -> [A, for ... done]."""
    parts, depth = [], 0
    for part in body.split("; "):
        if depth:
            parts[-1] += "; " + part
        else:
            parts.append(part)
        depth += part.startswith("for ") - (part == "done")
    return parts


def _lmcore_main(argv: list[str]) -> int:
    import torch

    from lmcore.cli import main

    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)  # `--set train.threads=1` must not slow the tests that follow


def _in_bash(command: str, tmp_path: Path) -> tuple[int, str]:
    bin_dir = tmp_path / "bin"  # `python` in a shell command is this interpreter (a script: a symlink loses the venv)
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = run_process(["bash", "-c", command], cwd=REPO, env=env)
    return result.returncode, process_output(result.stdout, result.stderr)


def test_the_table_has_no_stale_lines():
    stale = set(HOW) - set(documented_commands())
    assert not stale, f"HOW lists commands the docs no longer show; remove them: {sorted(stale)}"


def test_run_step_reports_a_failing_command(tmp_path, capsys):
    with pytest.raises(AssertionError, match="no_such_script.py"):
        run_step("python no_such_script.py", tmp_path, capsys)


def test_loops_are_unrolled_with_their_variables():
    nested = ("for family in mogrify lstm; do python tune.py export-best r/$family --out ${family}.yaml; for seed in 1 2; "
              "do python -m lmcore train --run-name ${family}_$seed --set train.seed=$seed; done; done")
    assert unrolled(nested) == [
        "python tune.py export-best r/mogrify --out mogrify.yaml",
        "python -m lmcore train --run-name mogrify_1 --set train.seed=1",
        "python -m lmcore train --run-name mogrify_2 --set train.seed=2",
        "python tune.py export-best r/lstm --out lstm.yaml",
        "python -m lmcore train --run-name lstm_1 --set train.seed=1",
        "python -m lmcore train --run-name lstm_2 --set train.seed=2",
    ]
    assert unrolled("python -m lmcore train --run-name $x") == ["python -m lmcore train --run-name $x"]


def test_every_linked_file_and_figure_is_in_the_repository():
    """A figure or file that README.md or docs/ link to exists in a clean clone (not ignored, e.g. by results/)."""
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (doc.parent / path).exists():
                missing.append(f"{doc.relative_to(REPO)}: {target}")
    assert not missing, "links to nothing:\n" + "\n".join(missing)
