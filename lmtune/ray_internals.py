"""Every use of Ray's and Optuna's private attributes, in one place; the rest of lmtune calls only these functions.

Each reaches something no public API gives (the comment above each says what and why). pyproject.toml bounds ray and
optuna to the versions this was tested with, and tests/lmtune/test_ray_internals.py checks every access on objects
built directly (a Ray only for the access about it): an upgrade that removes one fails there, and here, with
InternalsChanged naming it.
"""
from __future__ import annotations

import sys
from typing import Any


class InternalsChanged(RuntimeError):
    """A private attribute lmtune relies on is gone: the installed Ray or Optuna is not a version it was tested with."""


def _gone(what: str, package: str) -> InternalsChanged:
    version = getattr(sys.modules.get(package), "__version__", "")
    return InternalsChanged(f"{what} is gone in {package} {version}: lmtune/ray_internals.py reaches it; "
                            f"install the ray and optuna versions pyproject.toml names, or adapt that module")


def _get(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        packages = [c.__module__.split(".")[0] for c in type(obj).__mro__]  # ours subclass theirs: name theirs
        package = next((p for p in packages if p in ("ray", "optuna")), packages[0])
        raise _gone(f"{type(obj).__name__}.{name}", package) from None


def _set(obj: Any, name: str, value: Any) -> None:
    _get(obj, name)  # a renamed attribute must fail, not be created afresh and silently ignored
    setattr(obj, name, value)


def _private(module: str, name: str) -> Any:
    """A private name of Ray's, imported; InternalsChanged if it is gone."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise _gone(f"{module}.{name}", "ray") from None


# -- OptunaSearch (ray.tune.search.optuna) -------------------------------------------------------------

# OptunaSearch's {Ray trial id: the Optuna trial it asked for}: no public getter; we name each Optuna trial after its
# Ray trial, and after a restore close the study's trials that no Ray trial owns.
def optuna_trials(searcher) -> dict[str, Any]:
    return _get(searcher, "_ot_trials")


# OptunaSearch's optuna.Study (built from our storage and name): no public getter; a restore tells it about orphans.
def optuna_study(searcher):
    return _get(searcher, "_ot_study")


# After a restore onto a study file rebuilt from Ray's trials, the pickled study's cache holds the lost file's trials:
# the searcher is given the study read afresh (no public setter).
def set_optuna_study(searcher, study) -> None:
    _set(searcher, "_ot_study", study)


# -- SearchGenerator (ray.tune.search) ---------------------------------------------------------------

# The study's number of trials: Ray restores it from the snapshot as it was and has no setter; a study may grow.
def set_total_samples(generator, trials: int) -> None:
    _set(generator, "_total_samples", trials)


# An interrupted run's generator is saved as finished, with no public way to reopen it; our search never ends itself.
def reopen(generator) -> None:
    _set(generator, "_finished", False)


# -- ASHAScheduler (ray.tune.schedulers) -------------------------------------------------------------

# ASHA's rungs, per bracket [(milestone, {trial id: metric recorded there})], the dicts live: Ray neither saves them
# with the experiment (ray-project/ray#30838) nor exposes them, so we save and restore them ourselves.
def asha_rungs(scheduler) -> list[list[tuple[float, dict]]]:
    return [_get(bracket, "_rungs") for bracket in _get(scheduler, "_brackets")]


# How many trials ASHA has stopped (saved and restored with the rungs); no public getter or setter.
def asha_stopped(scheduler) -> int:
    return _get(scheduler, "_num_stopped")


def set_asha_stopped(scheduler, stopped: int) -> None:
    _set(scheduler, "_num_stopped", stopped)


# -- Tuner (ray.tune) --------------------------------------------------------------------------------

# A restored Tuner's TuneConfig, holding the searcher and scheduler as pickled when the study began: Tuner.restore
# takes no new ones and Tuner has no getter; the study's trial count and ASHA's rungs are put back through it.
def tune_config(tuner):
    return _get(_get(tuner, "_local_tuner"), "_tune_config")


# -- The Ray this process is connected to --------------------------------------------------------------------------

# Whether this process started the local Ray node (ray.init without an address, or address="local"; a notebook's or a
# test's too) rather than joined one (`--address`): no public API says. Only then do that node's workers have this
# process's environment, and so its corpus cache (lmtune/driver.py, warm_nodes). Ray keeps the daemons a node it
# started spawned in all_processes; a joined node has none there.
def started_local_ray() -> bool:
    node = _private("ray._private.worker", "_global_node")
    return node is not None and bool(_get(node, "all_processes"))


# -- A trial as Ray's experiment state (ray/experiment_state-*.json) saves it ---------------------------------------

# Ray saves each trial as two JSON strings, its state and its run metadata (which holds its checkpoints), and reads
# them back with these Trial methods; no public API reads or edits a saved trial. Loaded as a stub: no trainable needed.
def load_trial(saved: list[str]):
    from ray.tune.experiment import Trial

    trial = Trial.from_json_state(saved[0], stub=True)
    trial.restore_run_metadata(saved[1])
    return trial


def dump_trial(trial) -> list[str]:
    _set(trial, "stub", False)  # as the driver saved it: a stub would not run when restored
    return list(trial.get_json_state())


# The checkpoints a trial's checkpoint manager keeps, as (path, metrics), best last: no public getter. Ray deletes them
# as they fall out of CheckpointConfig.num_to_keep, and restores the trial from the latest.
def trial_checkpoints(trial) -> list[tuple[str, dict]]:
    return [(r.checkpoint.path, r.metrics) for r in _get(_manager(trial), "_checkpoint_results")]


# A trial's checkpoints replaced by `checkpoints`, (path, metrics) oldest first, the last its latest: each registered
# as Ray does (its manager and result classes are private), deleting none; Ray applies num_to_keep again from the
# trial's next checkpoint on, which it names after the index of the last it registered: set to follow the latest.
def set_trial_checkpoints(trial, checkpoints: list[tuple[str, dict]]) -> None:
    import dataclasses
    from pathlib import Path

    from ray.train import Checkpoint

    config = _manager(trial).checkpoint_config
    manager = _private("ray.train._internal.checkpoint_manager", "_CheckpointManager")(
        dataclasses.replace(config, num_to_keep=None))
    result = _private("ray.train._internal.session", "_TrainingResult")
    for path, metrics in checkpoints:
        manager.register_checkpoint(result(checkpoint=Checkpoint(path), metrics=metrics))
    _set(manager, "_checkpoint_config", config)
    _set(trial.run_metadata, "checkpoint_manager", manager)
    if checkpoints:  # Ray's folder names: checkpoint_000003 is checkpoint 3
        _set(trial.storage, "current_checkpoint_index", int(Path(checkpoints[-1][0]).name.rsplit("_", 1)[-1]))
    trial.invalidate_json_state()


def _manager(trial):
    return _get(_get(trial, "run_metadata"), "checkpoint_manager")
