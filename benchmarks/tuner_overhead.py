"""What the tuning service itself costs: a fixed study of 16 tiny-LSTM trials, run with tune.py and timed.

    python benchmarks/tuner_overhead.py                    # each trial trains ~60 s (~9 minutes on 2 CPUs)
    python benchmarks/tuner_overhead.py --quick            # each trial trains ~5 s
    python benchmarks/tuner_overhead.py --train-seconds 30 --cpus 4

The trials' length is set by timing the model here first (one torch thread, as a 1-CPU trial), FIFO (no early
stopping), 4 epochs each. Printed: the wall time of `tune.py`; the trials' training time (lmcore's epochs:
training and validation) divided by wall time x CPUs; the time before the first trial starts (Ray, corpus,
searcher); the time after the last trial ends (final evaluation, tables); what each trial spends outside its
epochs (model build, checkpoints, reports); and the CPU-seconds no trial used between those. The corpus is
generated (1,000 word types, 300k training tokens) so that validation is short and no data is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lmcore.exitcodes import quiet_when_output_closes
from lmtune.layout import ray_folder

REPO = Path(__file__).resolve().parent.parent
EPOCHS, TRIALS = 4, 16
FIXED = {"model.family": "lstm", "model.hidden": 64, "model.embedding": 64, "model.layers": 1,
         "data.batch_size": 20, "data.bptt": 35, "data.eval_batch_size": 10}


def write_corpus(folder: Path, words: int = 1000) -> Path:
    """train/valid/test.txt: each word mostly determines the next (a learnable, cheap-to-score corpus)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, tokens in (("train", 300_000), ("valid", 10_000), ("test", 10_000)):
        lines, w = [], 0
        for _ in range(tokens // 20):
            line = []
            for _ in range(20):
                w = (w * 7 + 3) % words if rng.random() < 0.8 else rng.randrange(words)
                line.append(f"w{w}")
            lines.append(" ".join(line))
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def seconds_per_epoch(steps: int, data_dir: Path) -> float:
    """One epoch of `steps` training steps and the validation pass, timed on one thread."""
    import lmcore

    config = lmcore.make_config({}, {**FIXED, "data.name": "text", "data.dir": str(data_dir), "train.epochs": 1,
                                     "train.steps_per_epoch": steps, "train.threads": 1, "train.progress": False})
    return lmcore.train(config)["elapsed_s"]


def steps_for(train_seconds: float, data_dir: Path) -> int:
    """Steps per epoch so that EPOCHS epochs take `train_seconds`: epoch time = validation + steps x step."""
    few, many = 10, 60
    t_few, t_many = seconds_per_epoch(few, data_dir), seconds_per_epoch(many, data_dir)
    step = max((t_many - t_few) / (many - few), 1e-4)
    validation = max(t_few - few * step, 0.0)
    steps = round((train_seconds / EPOCHS - validation) / step)
    print(f"calibration: {step * 1000:.1f} ms per step, {validation:.2f} s validation per epoch -> "
          f"{max(steps, 1)} steps per epoch")
    return max(steps, 1)


def write_experiment(folder: Path, steps: int, data_dir: Path) -> Path:
    experiment = {
        "name": "overhead", "dataset": "text",
        "fixed": {**FIXED, "train.steps_per_epoch": steps, "data.dir": str(data_dir)},
        "search_space": {"params": {"optim.lr": {"type": "float", "low": 1e-3, "high": 2e-2, "log": True}}},
        "searcher": {"sampler": "tpe", "seed": 0, "n_startup_trials": 4},
        "scheduler": {"type": "fifo", "max_epochs": EPOCHS},
        "trials": TRIALS, "resources": {"cpus": 1}, "storage": str(folder / "results"), "checkpoints": {"keep": 1},
    }
    path = folder / "overhead.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


@quiet_when_output_closes
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-seconds", type=float, default=60.0, help="training time per trial (default 60)")
    parser.add_argument("--quick", action="store_true", help="trials of ~5 s of training")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray's CPUs = trials at once")
    parser.add_argument("--keep", default=None, help="keep the experiment here (default: a temporary folder)")
    args = parser.parse_args(argv)
    train_seconds = 5.0 if args.quick else args.train_seconds

    print(f"# load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.cpus} CPUs for Ray")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        corpus = write_corpus(folder / "corpus")
        path = write_experiment(folder, steps_for(train_seconds, corpus), corpus)
        command = [sys.executable, str(REPO / "tune.py"), str(path), "--num-cpus", str(args.cpus), "--no-dashboard"]
        started = time.time()
        with open(folder / "tune.log", "w") as log:
            run = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.time() - started
        if run.returncode != 0:
            print((folder / "tune.log").read_text()[-5000:])
            return 1
        experiment = folder / "results" / "overhead"
        trials = [[json.loads(line) for line in f.read_text().splitlines()]
                  for f in ray_folder(experiment).glob("trial_*/result.json")]
        print_figures(trials, wall, started, args.cpus, train_seconds)
        print_phases(experiment, trials, started, started + wall)
    print(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def print_figures(trials: list[list[dict]], wall: float, started: float, cpus: int, target: float) -> None:
    training = sum(t[-1]["elapsed_s"] for t in trials)  # lmcore's epochs, training and validation
    spans = [t[-1]["reported_at"] - t[0]["started_at"] for t in trials]
    before = min(t[0]["started_at"] for t in trials) - started
    after = started + wall - max(t[-1]["reported_at"] for t in trials)
    outside = sum(spans) - training
    idle = wall * cpus - sum(spans) - (before + after) * cpus
    rows = [
        ("trials", f"{len(trials)}, {EPOCHS} epochs each, target {target:.0f} s of training each"),
        ("wall time", f"{wall:.1f} s"),
        ("training time / (wall x CPUs)",
         f"{training:.1f} s / ({wall:.1f} s x {cpus}) = {training / (wall * cpus):.1%}"),
        ("mean training per trial", f"{training / len(trials):.1f} s"),
        ("before the first trial starts", f"{before:.1f} s (Ray start, corpus, searcher, first trial process)"),
        ("after the last trial ends", f"{after:.1f} s (final evaluation, tables, Ray shutdown)"),
        ("per trial outside its epochs", f"{outside / len(trials):.2f} s (model build, checkpoints, reports)"),
        ("CPU-s no trial used in between", f"{idle:.1f} s (scheduling, trial start-up, uneven last wave)"),
    ]
    for name, value in rows:
        print(f"| {name:<32} | {value} |")


def print_phases(folder: Path, trials: list[list[dict]], started: float, ended: float) -> None:
    """Where the time before the first trial and after the last goes, from when the files appeared."""
    def written(name: str) -> float:
        return (folder / name).stat().st_mtime

    marker = (ray_folder(folder) / ".validate_storage_marker").stat().st_mtime  # Tune has started
    first = min(t[0]["started_at"] for t in trials)
    last = max(t[-1]["reported_at"] for t in trials)
    marks = [
        ("launch -> experiment.yaml", started, written("experiment.yaml"), "Python, imports, validation, corpus"),
        ("-> Tune's storage marker", written("experiment.yaml"), marker,
         "Ray start, corpus warm-up, searcher"),
        ("-> first trial starts", marker, first, "trial process start, imports"),
        ("last trial ends -> final_eval.json", last, written("final_eval.json"),
         "Tune's end, Ray shutdown, results, test evaluation"),
        ("-> summary.md", written("final_eval.json"), written("summary.md"), "tables"),
        ("-> exit", written("summary.md"), ended, "printing, interpreter exit"),
    ]
    for name, start, end, what in marks:
        print(f"| {name:<36} | {end - start:6.1f} s | {what} |")


if __name__ == "__main__":
    sys.exit(main())
