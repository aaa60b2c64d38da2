"""How well each searcher option finds a point better than a known good one, in minutes instead of hours.

A real 2.65M study takes hours; this replays the searcher alone (Optuna, built as lmtune builds it) on a stand-in
objective over an experiment's real search space and `start_from` point:

    valid(u) = 100 + scale * sum_i w_i (u_i - u*_i)^2 + noise        (u: each setting mapped onto [0, 1])

u_i is the setting's position in its range (log ranges on the log scale; a categorical's choice index), u* an
optimum placed at random near the start point (each coordinate moved by N(0, 0.13), clipped: a random point then scores
about 230 in the median, printed as a calibration line; section 3's random points scored 162-745 when ASHA stopped
them after 1 or 2 epochs), the weights w_i
drawn so that a few settings matter and most barely do (as importances of real studies look), the scale such that
the start point scores 109 (the 2.65M Mogrifier's start point: valid 109.35), and the noise that of a seed
(sd 1). Per option and repetition it runs `trials` trials (the start point first, as `start_from` enqueues it)
and reports, over the repetitions: how often a searched point (not the start point) truly beats the start point,
the median of the best true value found, and the median regret (best - 100).

    python benchmarks/searcher_benchmark.py experiments/ptb_2m65_mogrify.yaml --trials 8 16 --repeats 30

Options are searcher settings of the experiment vocabulary (lmtune/schema.py `SearcherSpec`), so a winner can be
written into an experiment as it is. A stand-in is not the real objective: it judges how a searcher spends a small
budget around a known point, not which settings win on PTB.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmtune.experiment import load_experiment  # noqa: E402
from lmtune.schema import SearcherSpec  # noqa: E402
from lmtune.search import make_sampler  # noqa: E402

START_VALUE, OPTIMUM, NOISE, SPREAD = 109.0, 100.0, 1.0, 0.13
OPTIONS = {  # name -> the experiment's `searcher:` settings
    "tpe4": {"sampler": "tpe", "n_startup_trials": 4},  # section 3's studies
    "tpe1": {"sampler": "tpe", "n_startup_trials": 1},
    "tpe1-near0.15": {"sampler": "tpe", "n_startup_trials": 1, "around_start": 0.15},
    "tpe1-near0.3": {"sampler": "tpe", "n_startup_trials": 1, "around_start": 0.3},
    "gp1": {"sampler": "gp", "n_startup_trials": 1},
    "gp1-near0.15": {"sampler": "gp", "n_startup_trials": 1, "around_start": 0.15},
    "random": {"sampler": "random"},
}


def unit(value, dist: optuna.distributions.BaseDistribution) -> float:
    """A setting's position in its range, in [0, 1]."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return dist.choices.index(value) / max(len(dist.choices) - 1, 1)
    low, high, v = dist.low, dist.high, value
    if getattr(dist, "log", False):
        low, high, v = math.log(low), math.log(high), math.log(v)
    return (v - low) / (high - low) if high > low else 0.0


def distributions(space) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of each setting of a (define-by-run) search space."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    space(trial)
    return dict(trial.distributions)


class StandIn:
    """One random instance of the stand-in objective around the start point."""

    def __init__(self, space: dict, start: dict, rng: np.random.Generator):
        self.space, self.names = space, sorted(space)
        self.start = np.array([unit(start[n], space[n]) for n in self.names])
        self.best = np.clip(self.start + rng.normal(0, SPREAD, len(self.names)), 0, 1)
        self.weights = rng.dirichlet(np.full(len(self.names), 0.3))  # a few settings carry most of the weight
        self.scale = (START_VALUE - OPTIMUM) / max(self._distance(self.start), 1e-9)
        self.rng = rng

    def _distance(self, u: np.ndarray) -> float:
        return float(np.sum(self.weights * (u - self.best) ** 2))

    def true_value(self, params: dict) -> float:
        u = np.array([unit(params[n], self.space[n]) for n in self.names])
        return OPTIMUM + self.scale * self._distance(u)

    def __call__(self, params: dict) -> float:
        return self.true_value(params) + self.rng.normal(0, NOISE)


def one_study(space, start: dict, option: dict, trials: int, seed: int) -> tuple[float, bool]:
    """(the best true value among searched points, whether one beat the start point) of one study."""
    objective = StandIn(distributions(space), start, np.random.default_rng(seed))  # over the whole space
    spec = SearcherSpec(**option, seed=seed)
    if spec.around_start is not None:
        space = space.around(start, spec.around_start)  # as load_experiment narrows it
    sampler = make_sampler(spec)
    study = optuna.create_study(sampler=sampler, direction="minimize")
    study.enqueue_trial(start)
    searched = []
    for number in range(trials):
        trial = study.ask()
        space(trial)  # the space as the service samples it (define-by-run)
        study.tell(trial, objective(trial.params))
        if number > 0:
            searched.append(objective.true_value(trial.params))
    best = min(searched) if searched else float("inf")
    return best, best < objective.true_value(start)


def median_random_point(space, start: dict, repeats: int, per_repeat: int = 20) -> float:
    values = []
    for seed in range(repeats):
        objective = StandIn(distributions(space), start, np.random.default_rng(seed))
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        for _ in range(per_repeat):
            trial = study.ask()
            space(trial)
            values.append(objective.true_value(trial.params))
            study.tell(trial, 0.0)
    return statistics.median(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--trials", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    args = parser.parse_args(argv)
    exp = load_experiment(args.experiment)
    if not exp.start_points:
        sys.exit(f"{args.experiment}: no start_from point to beat")
    space, start = exp.space, exp.start_points[0]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    print(f"# {args.experiment}: {len(space.names())} settings, start point at {START_VALUE:g}, optimum {OPTIMUM:g}, "
          f"noise sd {NOISE:g}; {args.repeats} repetitions per row\n")
    print(f"calibration: a random point scores {median_random_point(space, start, args.repeats):.0f} in the median\n")
    print("| option | searcher settings | trials | beats the start point | median best (searched) | median regret "
          "| s per study |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for trials in args.trials:
        for name in args.options:
            began = time.perf_counter()
            runs = [one_study(space, start, OPTIONS[name], trials, seed) for seed in range(args.repeats)]
            seconds = (time.perf_counter() - began) / args.repeats
            best = statistics.median(b for b, _ in runs)
            wins = sum(w for _, w in runs) / len(runs)
            settings = ", ".join(f"{k}: {v}" for k, v in OPTIONS[name].items())
            print(f"| {name} | {settings} | {trials} | {wins:.0%} | {best:.2f} | {best - OPTIMUM:.2f} | "
                  f"{seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
