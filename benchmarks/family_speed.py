"""Training speed of whole language models, side by side: tokens/s of each config's model, as `lmcore train`
trains it (its data, batch, BPTT, optimizer, clipping and torch threads), with the ratio to the first config.

    python benchmarks/family_speed.py configs/ptb_2m65_lstm.yaml configs/ptb_2m65_mogrifier.yaml \
        configs/ptb_2m65_transformer.yaml --steps 20 --rounds 3   # docs/results.md section 1 (~2 minutes)
    python benchmarks/family_speed.py A.yaml B.yaml            # 5 rounds of 50 steps each

The configs take turns (`--steps` training steps of each, `--rounds` times) and the median of each config's
rounds is reported, so a machine that other work loads slows every config alike and the ratios stay fair.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from pydantic import ValidationError

from lmcore import build_model, load_corpus
from lmcore.batching import batchify
from lmcore.cli import positive_int
from lmcore.config import error_lines, make_config
from lmcore.exitcodes import ExitCode, quiet_when_output_closes
from lmcore.files import read_yaml
from lmcore.train import make_optimizer, resolve_device, reuse_freed_memory, seed_everything, train_epoch


class Trainee:
    """One config's model, optimizer and place in its training data, trained `steps` steps at a time."""

    def __init__(self, path: str, steps: int):
        self.name = path
        self.config = make_config(read_yaml(path), {"train.steps_per_epoch": steps, "train.progress": False})
        reuse_freed_memory()  # as lmcore.train does
        corpus = load_corpus(self.config.data.name, self.config.data.dir)
        seed_everything(self.config.train.seed)
        self.device = resolve_device(self.config.train.device)
        self.model = build_model(self.config, len(corpus.vocab)).to(self.device)
        self.optimizer = make_optimizer(self.config, self.model)
        self.data = batchify(corpus.train, self.config.data.batch_size).to(self.device)
        self.loop = {"epoch": 0, "position": 0, "lr": self.config.optim.lr}
        self.windows = torch.Generator().manual_seed(self.config.train.seed)
        self.rates: list[float] = []

    def train(self) -> None:
        torch.set_num_threads(self.config.train.threads or torch.get_num_threads())
        started = time.perf_counter()
        _, tokens = train_epoch(self.model, self.optimizer, self.data, self.config, self.loop, self.windows,
                                self.device, epoch=1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.rates.append(tokens / (time.perf_counter() - started))


@quiet_when_output_closes
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="lmcore config files (YAML)")
    parser.add_argument("--steps", type=positive_int, default=50, help="training steps per config per round")
    parser.add_argument("--rounds", type=positive_int, default=5, help="measured turns (after a warm-up)")
    args = parser.parse_args()
    trainees = []
    for path in args.configs:  # a bad file is one message and exit 2, before any training
        try:
            trainees.append(Trainee(path, args.steps))
        except ValueError as err:  # a bad setting; FileError, SettingError: a missing file, a setting unusable here
            lines = error_lines(err, path) if isinstance(err, ValidationError) else [f"family_speed.py: {err}"]
            print("\n".join(lines), file=sys.stderr)
            sys.exit(ExitCode.BAD_INPUT)
    for trainee in trainees:  # warm-up: the first steps build caches and load the Mogrifier's C++ loops
        trainee.train()
        trainee.rates.clear()
    for _ in range(args.rounds):
        for trainee in trainees:
            trainee.train()
    base = statistics.median(trainees[0].rates)
    print(f"{args.rounds} rounds of {args.steps} steps each, median tokens/s (ratio to {trainees[0].name})")
    print("| config | family | parameters | threads | tokens/s | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for t in trainees:
        rate, threads = statistics.median(t.rates), t.config.train.threads or "all"
        print(f"| {t.name} | {t.config.model.family} | {t.model.num_parameters():,} | {threads} | {rate:,.0f} "
              f"| {rate / base:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
