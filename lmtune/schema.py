"""The experiment file's vocabulary: one YAML file = one search (`ExperimentSpec` and its sections), and the
search-space file around its `params` (`SpaceFile`; the params themselves are lmtune/space.py's).

Loading a file (`extends`, `--set`) is lmtune/experiment.py; its checks against lmcore, lmtune/checks.py. Every
problem becomes one line naming the file and the field (`experiments/x.yaml: scheduler.grace_period: ...`);
`ExperimentError` carries them to the CLI, which exits with status 2 having launched nothing.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmcore.config import Family, Int, Real, flatten
from lmcore.train import EpochMetrics

# A study ranks trials by one of the validation metrics that `lmcore.train` reports each epoch.
METRICS = tuple(k for k in EpochMetrics.__annotations__ if k.startswith(("valid_", "best_valid_")))


class ExperimentError(Exception):
    """An invalid experiment, search space or --set override; str() is the full message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearcherSpec(_Strict):
    sampler: Literal["tpe", "gp", "random"] = Field(
        "tpe", description="tpe: multivariate, grouped (conditional) TPE; gp: a Gaussian process (Optuna's GPSampler)")
    seed: Int | None = Field(0, ge=0, le=2**32 - 1)
    n_startup_trials: Int = Field(10, ge=0, le=1_000_000, description="random trials before TPE starts modelling")
    around_start: Real | None = Field(
        None, gt=0, le=1, description="search only within this fraction of each range's width on either side of "
        "the first start_from point (log ranges on the log scale); None = the whole space")


class SchedulerSpec(_Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early; fifo never does")
    max_epochs: Int = Field(gt=0, le=1_000_000, description="epochs of a trial that is never stopped (= train.epochs)")
    grace_period: Int = Field(1, gt=0, description="epochs before ASHA may stop a trial")
    reduction_factor: Real = Field(3, gt=1, le=100)

    @model_validator(mode="after")
    def _grace_within_max(self) -> SchedulerSpec:
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) exceeds max_epochs ({self.max_epochs})")
        return self


class ResourcesSpec(_Strict):
    cpus: Real = Field(1, ge=0.01, le=1024, description="CPUs per trial (= torch threads)")
    gpus: Real = Field(0, ge=0, le=1024, description="GPUs per trial; a fraction shares one GPU between trials")

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> ResourcesSpec:
        if self.gpus > 1 and not float(self.gpus).is_integer():
            raise ValueError(f"gpus above 1 must be a whole number (got {self.gpus})")
        return self


class CheckpointSpec(_Strict):
    keep: Int = Field(3, ge=1, le=1000, description="best checkpoints (by valid_ppl) kept per trial, plus the latest")


class FailureSpec(_Strict):
    max_failures: Int = Field(2, ge=-1, le=1000, description="retries of a trial whose process dies; -1 = forever")


class ReportSpec(_Strict):
    top_k: Int = Field(5, ge=1, le=1000, description="rows of the top-k table")
    dynamic: bool = Field(False, description="also dynamic evaluation of each family's best (dynamic_test_ppl)")
    seeds: Int = Field(0, ge=0, le=1000, description="after the search, each family's best config rerun with this "
                       "many other seeds (train.seed) as trials: mean ± sd in the tables; 0: none, else at least 2")

    @field_validator("seeds")
    @classmethod
    def _none_or_a_spread(cls, seeds: int) -> int:
        if seeds == 1:
            raise ValueError("0 (no reruns) or at least 2: a standard deviation needs two seeds")
        return seeds


class ExperimentSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="folder name under storage")
    description: str = ""
    dataset: Literal["ptb", "wikitext-2", "text"]
    family: Family | None = Field(None, description="model.family, unless the search space chooses it")
    fixed: dict[str, Any] = Field(default_factory=dict, description="lmcore settings shared by all trials")
    search_space: str | dict[str, Any] = Field(description="a search_spaces/*.yaml path (relative to this file)")
    metric: Literal[METRICS] = "valid_ppl"  # type: ignore[valid-type]
    mode: Literal["min", "max"] = "min"
    searcher: SearcherSpec = Field(default_factory=SearcherSpec)
    scheduler: SchedulerSpec
    trials: Int = Field(gt=0, le=1_000_000, description="trials in the whole study")
    max_concurrent: Int | None = Field(None, gt=0, le=1_000_000, description="None = as many as the resources allow")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: str = Field("results", description="results folder (a shared path on a multi-node cluster)")
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    loggers: list[Literal["mlflow", "wandb"]] = Field(
        default_factory=list, description="experiment trackers Ray Tune logs every trial to (the [trackers] extra)"
    )

    @field_validator("loggers")
    @classmethod
    def _trackers_installed(cls, loggers: list[str]) -> list[str]:
        missing = [name for name in loggers if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed: pip install {' '.join(missing)} "
                             "(or the project's [trackers] extra)")
        return list(dict.fromkeys(loggers))
    start_from: list[dict[str, Any]] = Field(
        default_factory=list, description="known configurations (searched settings) the study tries first"
    )

    @field_validator("fixed")
    @classmethod
    def _by_dotted_name(cls, fixed: dict[str, Any]) -> dict[str, Any]:
        return flatten(fixed)  # nested sections or dotted names, however the file spells them: flattened once

    @field_validator("storage")
    @classmethod
    def _storage_is_a_path(cls, storage: str) -> str:
        if "://" in storage:
            raise ValueError("storage must be a filesystem path (mount shared storage on every node)")
        return storage


class SpaceFile(_Strict):
    description: str = ""
    params: dict[str, Any]
