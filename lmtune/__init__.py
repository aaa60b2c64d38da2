"""The tuning layer: Ray Tune + Optuna + ASHA over `lmcore.train`.

    from lmtune import load_experiment, run_experiment, load_results
    exp = load_experiment("experiments/quickstart.yaml")
    run_experiment(exp)
    results = load_results(exp.folder)          # pandas DataFrames
    results.trials.sort_values("best_valid_ppl").head()
    from lmtune import plots; plots.learning_curves(results)   # matplotlib Figures
    runs = load_runs(["runs/a_seed1", "runs/a_seed2"]); seed_groups(runs)   # single lmcore runs, mean ± sd
    results.seed_runs; pairs_frame(["results/a", "results/b"])   # report.seeds: reruns; Welch's interval per pair
"""
from lmtune.experiment import Experiment, load_experiment
from lmtune.results import Results, compare_frame, load_results, pairs_frame, results_frame, seed_runs_frame
from lmtune.schema import ExperimentError
from lmtune.single_runs import load_runs, seed_groups

__all__ = [
    "Experiment",
    "ExperimentError",
    "Results",
    "compare_frame",
    "load_experiment",
    "load_results",
    "load_runs",
    "pairs_frame",
    "results_frame",
    "run_experiment",
    "seed_groups",
    "seed_runs_frame",
]


def run_experiment(*args, **kwargs):
    """Run (or resume) an experiment; see `lmtune.driver.run_experiment`. Imported lazily: Ray is slow to load."""
    from lmtune.driver import run_experiment as run

    return run(*args, **kwargs)
