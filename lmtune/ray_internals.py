"""Every use of Ray's and Optuna's private attributes, in one place; the rest of lmtune calls only these functions.

Each reaches something no public API gives (the comment above each says what and why). pyproject.toml bounds ray and
optuna to the versions this was tested with, and tests/lmtune/test_ray_internals.py checks every access on objects
built directly (no Ray started): an upgrade that removes one fails there, and here, with InternalsChanged naming it.
"""
from __future__ import annotations

import sys
from typing import Any


class InternalsChanged(RuntimeError):
    """A private attribute lmtune relies on is gone: the installed Ray or Optuna is not a version it was tested with."""


def _get(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        packages = [c.__module__.split(".")[0] for c in type(obj).__mro__]  # ours subclass theirs: name theirs
        package = next((p for p in packages if p in ("ray", "optuna")), packages[0])
        version = getattr(sys.modules.get(package), "__version__", "")
        raise InternalsChanged(
            f"{type(obj).__name__}.{name} is gone in {package} {version}: lmtune/ray_internals.py reaches it; "
            f"install the ray and optuna versions pyproject.toml names, or adapt that module"
        ) from None


def _set(obj: Any, name: str, value: Any) -> None:
    _get(obj, name)  # a renamed attribute must fail, not be created afresh and silently ignored
    setattr(obj, name, value)


# -- OptunaSearch (ray.tune.search.optuna) -------------------------------------------------------------

# OptunaSearch's {Ray trial id: the Optuna trial it asked for}: no public getter; we name each Optuna trial after its
# Ray trial, and after a restore close the study's trials that no Ray trial owns.
def optuna_trials(searcher) -> dict[str, Any]:
    return _get(searcher, "_ot_trials")


# OptunaSearch's optuna.Study (built from our storage and name): no public getter; a restore tells it about orphans.
def optuna_study(searcher):
    return _get(searcher, "_ot_study")


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
