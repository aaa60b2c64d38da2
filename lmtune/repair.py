"""Before a restore: Ray's saved experiment state made to name only checkpoints that exist.

Ray deletes a trial's older checkpoints as soon as newer ones are saved (`checkpoints.keep`), but saves its experiment
state (ray/experiment_state-*.json) only every few seconds. A driver killed in between leaves a state that names
checkpoints that are gone: restored as it is, the trial would fail to load its latest checkpoint, and Ray would fail
to delete the others. Such a trial gets the checkpoints its folder holds instead, the newest whole one its latest (the
one it resumes from), so it loses no epoch it had saved; with none left it starts again from scratch.
"""
from __future__ import annotations

import json
from pathlib import Path

from lmcore import files
from lmcore.checkpoint import CheckpointError, read_file
from lmtune import ray_internals
from lmtune.layout import CHECKPOINT_FILE, METRICS_FILE

STATE_FILES = "experiment_state-*.json"  # Ray restores the newest (by name: the time its session began)
CHECKPOINT_FOLDERS = "checkpoint_*"  # Ray's names for a trial's checkpoints, numbered in the order they were saved


def repair_experiment_state(ray_folder: Path) -> list[str]:
    """Rewrite the newest experiment state in `ray_folder` where it names checkpoints that are gone (a line printed
    per trial); the ids of the trials repaired."""
    states = sorted(ray_folder.glob(STATE_FILES))
    if not states:
        return []
    state = json.loads(states[-1].read_text())
    repaired = []
    for i, saved in enumerate(state["trial_data"]):
        trial = ray_internals.load_trial(saved)
        if repair_trial(trial, ray_folder):
            state["trial_data"][i] = ray_internals.dump_trial(trial)
            repaired.append(trial.trial_id)
            print(f"  trial {trial.trial_id}: Ray's saved state named checkpoints since deleted; it continues from "
                  "the newest one left, if any")
    if repaired:
        files.write_text(states[-1], json.dumps(state))
    return repaired


def repair_trial(trial, ray_folder: Path) -> bool:
    """Give `trial` the checkpoints its folder holds if it names one that is gone; whether it did."""
    if trial.checkpoint is None:  # its latest; Ray keeps it among the others
        return False
    known = {Path(path).name: metrics for path, metrics in ray_internals.trial_checkpoints(trial)}
    latest = known.get(Path(trial.checkpoint.path).name, {})
    folder = ray_folder / Path(trial.path).name  # Ray records where it wrote them; the folder may have moved since
    if all((folder / name).is_dir() for name in known):
        return False
    found = {}
    for checkpoint in sorted(folder.glob(CHECKPOINT_FOLDERS)):
        metrics = epoch_metrics(checkpoint)
        if metrics is not None:
            found[checkpoint.name] = known.get(checkpoint.name) or carried_on(latest, metrics)
    while found and max(found) not in known and not is_whole(folder / max(found)):
        del found[max(found)]  # being written when the trial was killed: the trial saves that one again
    ray_internals.set_trial_checkpoints(trial, [(f"{trial.path}/{name}", found[name]) for name in sorted(found)])
    return True


def epoch_metrics(checkpoint: Path) -> dict | None:
    """What the trial reported with the checkpoint (its metrics.json); None if that is unreadable."""
    try:
        metrics = json.loads((checkpoint / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) and isinstance(metrics.get("epoch"), int) else None


def is_whole(checkpoint: Path) -> bool:
    """Whether the checkpoint's model file reads (Ray registers a checkpoint only once it is whole; not this one)."""
    try:
        read_file(checkpoint / CHECKPOINT_FILE)
    except CheckpointError:
        return False
    return True


def carried_on(saved: dict, metrics: dict) -> dict:
    """A checkpoint's metrics, with the counters Ray restores with it carried on from `saved`, the trial's latest
    result in Ray's state: one training iteration per epoch, the time between the two reports added."""
    both = "reported_at" in saved and "reported_at" in metrics
    return {
        **metrics,
        "training_iteration": saved.get("training_iteration", 0) + metrics["epoch"] - saved.get("epoch", 0),
        "time_total_s": saved.get("time_total_s", 0.0) + (metrics["reported_at"] - saved["reported_at"] if both else 0),
    }
