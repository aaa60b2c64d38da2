"""`report: {seeds: N}`: after the search, each family's best config is rerun with N other seeds, as trials on Ray.

The reruns are a Ray experiment of their own, results/NAME/seeds/TRIALS/ (TRIALS: the ids of the trials rerun), with
the search's trainable and resources per trial, all trials at once as the resources allow, no searcher and no early
stopping: each rerun trains the full `scheduler.max_epochs`. An interrupted run is restored like the search: finished
reruns are kept, unfinished ones continue from their checkpoints. A study grown afterwards whose best trials changed
gets a new folder; the old reruns are kept.

Seed k of N is the rerun trial's own `train.seed` + k: none repeats the seed the search chose the trial with, so the
reruns' perplexities are free of the selection (the best of many trials is lucky on average). A rerun that ended
in an earlier folder (a family's best unchanged by the growth) is not run again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmtune.experiment import Experiment
from lmtune.layout import RERUN, ExperimentFolder
from lmtune.repair import repair_experiment_state
from lmtune.space import trial_settings
from lmtune.trackers import tracker_callbacks

MAX_SEED = 2**63  # lmcore's train.seed is below it


def rerun_configs(exp: Experiment) -> tuple[list[dict[str, Any]], set[tuple[str, int]]]:
    """One config per seed rerun of each family's best trial, seed by seed (so an interruption leaves each family
    some finished reruns); and the (trial, seed) reruns that have ended already, in any folder."""
    from lmtune.results import ENDED, load_results

    results = load_results(exp.folder)
    runs = results.seed_runs
    ended = {(t, s) for t, s, status in zip(runs["of_trial"], runs["seed"], runs["status"]) if status in ENDED}
    best = results.best_per_family()
    trials = {t.trial_id: t for t in results.analysis.trials}
    reruns = []
    for k in range(1, exp.spec.report.seeds + 1):
        for trial_id, family in zip(best["trial_id"], best["family"]):
            settings = trial_settings(trials[trial_id].config or {})
            seed = (settings.get("train.seed", exp.base.train.seed) + k) % MAX_SEED
            reruns.append({"of_trial": trial_id, "family": family, "seed": seed, "settings": settings})
    return reruns, ended


def seed_folder(folder: Path, trial_ids: list[str]) -> Path:
    """The Ray experiment of the reruns of these trials."""
    return ExperimentFolder(folder).seeds / "-".join(sorted(set(trial_ids)))


def run_seeds(exp: Experiment) -> bool:
    """Rerun each family's best trial with `report.seeds` other seeds (resuming reruns begun before), on the Ray this
    process is connected to. True when every rerun has ended; False when interrupted (Ctrl-C)."""
    from ray import tune

    wanted, ended = rerun_configs(exp)
    reruns = [r for r in wanted if (r["of_trial"], r["seed"]) not in ended]
    where = seed_folder(exp.folder, [r["of_trial"] for r in wanted])
    resources = {"cpu": exp.spec.resources.cpus, "gpu": exp.spec.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(train_rerun, base=exp.base.model_dump()), resources)
    if tune.Tuner.can_restore(str(where)):
        print(f"Resuming the seed reruns in {where}: finished ones are kept, unfinished ones continue.")
        repair_experiment_state(where)
        tuner = tune.Tuner.restore(str(where), trainable, resume_unfinished=True, resume_errored=False)
    elif not reruns:
        return True  # no family has a usable trial, or every rerun has ended already
    else:
        print(f"Rerunning each family's best trial with {exp.spec.report.seeds} other seeds: {where}")
        tuner = tune.Tuner(
            trainable,
            param_space={RERUN: tune.grid_search(reruns)},
            tune_config=tune.TuneConfig(
                metric="valid_ppl", mode="min", max_concurrent_trials=exp.spec.max_concurrent,
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}", reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=where.name,
                storage_path=str(where.parent),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=exp.spec.checkpoints.keep,
                                                        checkpoint_score_attribute="valid_ppl",
                                                        checkpoint_score_order="min"),
                failure_config=tune.FailureConfig(max_failures=exp.spec.failure.max_failures),
                callbacks=tracker_callbacks(exp),
                progress_reporter=tune.CLIReporter(
                    parameter_columns={f"{RERUN}/family": "family", f"{RERUN}/seed": "seed"},
                    metric_columns={"epoch": "epoch", "valid_ppl": "valid ppl"}, max_report_frequency=30),
                verbose=1,
            ),
        )
    tuner.fit()
    return reruns_ended(where)


def train_rerun(config: dict[str, Any], base: dict[str, Any]) -> None:
    """A seed trial: the rerun trial's settings with another train.seed, trained as the search trains a trial."""
    from lmtune.trainable import train_lm

    rerun = config[RERUN]
    train_lm({**rerun["settings"], "train.seed": rerun["seed"]}, base)


def reruns_ended(where: Path) -> bool:
    """Whether every seed trial has ended, as Ray saved it (after a Ctrl-C, running trials are saved unfinished)."""
    from ray.tune import ExperimentAnalysis

    return all(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(where)).trials)
