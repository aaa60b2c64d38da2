"""Experiment trackers (`loggers: [mlflow, wandb]`, installed as extras): Ray Tune's logger callbacks, given to the
search's trials and to the seed reruns alike, so that a tracker holds every model a study trained."""
from __future__ import annotations

from lmtune.experiment import Experiment


def tracker_callbacks(exp: Experiment) -> list:
    """Ray Tune's logger callbacks for the trackers named in the experiment's `loggers` (installed as extras).
    MLflow logs where $MLFLOW_TRACKING_URI says; W&B to the project named after the experiment ($WANDB_MODE)."""
    callbacks = []
    if "mlflow" in exp.spec.loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(experiment_name=exp.name))
    if "wandb" in exp.spec.loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=exp.name, dir=str(exp.folder)))  # W&B's run files: in it
    return callbacks
