"""Experiment files: one YAML file = one search, validated completely before anything starts.

Every problem becomes one line naming the file and the field (`experiments/x.yaml: scheduler.grace_period:
...`); `ExperimentError` carries them to the CLI, which exits with status 2 having launched nothing.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmcore.config import Config, Family, field_names, flatten, make_config, set_dotted
from lmtune.space import CategoricalSpec, FixedSpec, IntSpec, Param, SearchSpace, SpaceError, error_lines, parse_params

LMCORE_SECTIONS = ("data", "model", "optim", "train", "eval")
METRICS = ("valid_ppl", "valid_loss", "best_valid_ppl")
# Settings the experiment itself decides; a search space must not vary them.
MANAGED = {
    "data.name": "dataset",
    "train.epochs": "scheduler.max_epochs",
    "train.threads": "resources.cpus (torch threads = the trial's CPUs)",
    "train.device": "resources.gpus (a trial with GPUs trains on cuda)",
    "train.progress": "the tuner (trials log through Ray, not progress lines)",
}
SAMPLES_CHECKED = 32  # random draws from the space, each validated as a whole config


class ExperimentError(Exception):
    """An invalid experiment, search space or --set override; str() is the full message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearcherSpec(_Strict):
    sampler: Literal["tpe", "random"] = Field("tpe", description="tpe: multivariate, grouped (conditional) TPE")
    seed: int | None = 0
    n_startup_trials: int = Field(10, ge=0, description="random trials before TPE starts modelling")


class SchedulerSpec(_Strict):
    type: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early; fifo never does")
    max_epochs: int = Field(gt=0, description="epochs of a trial that is never stopped (= train.epochs)")
    grace_period: int = Field(1, gt=0, description="epochs before ASHA may stop a trial")
    reduction_factor: float = Field(3, gt=1)

    @model_validator(mode="after")
    def _grace_within_max(self) -> "SchedulerSpec":
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) exceeds max_epochs ({self.max_epochs})")
        return self


class ResourcesSpec(_Strict):
    cpus: float = Field(1, gt=0, description="CPUs per trial (= torch threads)")
    gpus: float = Field(0, ge=0, description="GPUs per trial; a fraction shares one GPU between trials")

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> "ResourcesSpec":
        if self.gpus > 1 and not float(self.gpus).is_integer():
            raise ValueError(f"gpus above 1 must be a whole number (got {self.gpus})")
        return self


class CheckpointSpec(_Strict):
    keep: int = Field(3, ge=1, description="best checkpoints (by valid_ppl) kept per trial, plus the latest")


class FailureSpec(_Strict):
    max_failures: int = Field(2, ge=-1, description="retries of a trial whose process dies; -1 = forever")


class ReportSpec(_Strict):
    top_k: int = Field(5, ge=1, description="rows of the top-k table")
    dynamic: bool = Field(False, description="also dynamic evaluation of each family's best (dynamic_test_ppl)")


class ExperimentSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="folder name under storage")
    description: str = ""
    dataset: Literal["ptb", "wikitext-2", "text"]
    family: Family | None = Field(None, description="model.family, unless the search space chooses it")
    fixed: dict[str, Any] = Field(default_factory=dict, description="lmcore settings shared by all trials")
    search_space: str | dict[str, Any] = Field(description="a search_spaces/*.yaml path (relative to this file)")
    metric: Literal["valid_ppl", "valid_loss", "best_valid_ppl"] = "valid_ppl"
    mode: Literal["min", "max"] = "min"
    searcher: SearcherSpec = Field(default_factory=SearcherSpec)
    scheduler: SchedulerSpec
    trials: int = Field(gt=0, description="trials in the whole study")
    max_concurrent: int | None = Field(None, gt=0, description="None = as many as the resources allow")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: str = Field("results", description="results folder (a shared path on a multi-node cluster)")
    checkpoints: CheckpointSpec = Field(default_factory=CheckpointSpec)
    failure: FailureSpec = Field(default_factory=FailureSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    start_from: list[dict[str, Any]] = Field(
        default_factory=list, description="known configurations (searched settings) the study tries first"
    )

    @field_validator("storage")
    @classmethod
    def _storage_is_a_path(cls, storage: str) -> str:
        if "://" in storage:
            raise ValueError("storage must be a filesystem path (mount shared storage on every node)")
        return storage


class SpaceFile(_Strict):
    description: str = ""
    params: dict[str, Any]


@dataclass
class Experiment:
    """A validated experiment: its settings, the fixed lmcore config and the search space."""

    spec: ExperimentSpec
    base: Config
    space: SearchSpace
    source: str  # the experiment file, for messages
    start_points: list[dict[str, Any]] = field(default_factory=list)  # start_from in Optuna's parameter names

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def folder(self) -> Path:
        return Path(self.spec.storage) / self.spec.name

    def snapshot(self) -> dict[str, Any]:
        """What resuming must not change; saved as experiment.yaml in the folder."""
        spec = self.spec.model_dump(mode="json", exclude={"search_space", "description"})
        return {**spec, "space": self.space.describe().splitlines(), "base": self.base.flat()}


# -- loading ---------------------------------------------------------------------------------------


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override (`--set key=value`) and validate an experiment file; ExperimentError if anything is wrong."""
    path = Path(path)
    source = str(path)
    raw = _read_yaml(path, source)
    raw.setdefault("name", path.stem)
    if overrides:
        source += " (with --set " + " ".join(overrides) + ")"
        _apply_overrides(raw, overrides)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise ExperimentError("\n".join(error_lines(err, source))) from None
    spec.storage = str(Path(spec.storage).expanduser().resolve())
    base = _base_config(spec, source)
    space = _search_space(spec, base, path, source)
    points = _start_points(spec.start_from, space, base, source)
    return Experiment(spec=spec, base=base, space=space, source=source, start_points=points)


def parse_value(text: str) -> Any:
    """A --set value as YAML would read it (`4`, `1e-3`, `true`, `null`, `[a, b]`, `mogrifier`)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> None:
    names = set(field_names())
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ExperimentError(f"--set {item}: expected key=value")
        if key.split(".")[0] in LMCORE_SECTIONS:  # an lmcore setting: goes to fixed
            if key not in names:
                raise ExperimentError(f"--set {key}: unknown setting{_did_you_mean(key, names)}")
            fixed = raw.setdefault("fixed", {})
            if not isinstance(fixed, dict):
                raise ExperimentError(f"--set {key}: the experiment's `fixed` is not a mapping")
            fixed[key] = parse_value(text)
        else:
            try:
                set_dotted(raw, key, parse_value(text))
            except ValueError as err:
                raise ExperimentError(f"--set {item}: {err}") from None


def _base_config(spec: ExperimentSpec, source: str) -> Config:
    fixed = flatten(spec.fixed)
    names = set(field_names())
    errors = [f"{source}: fixed.{k}: unknown setting{_did_you_mean(k, names)}" for k in fixed if k not in names]
    decided = {"data.name": spec.dataset, "train.epochs": spec.scheduler.max_epochs}
    for key, value in decided.items():
        if key in fixed and fixed[key] != value:
            errors.append(f"{source}: fixed.{key}: is set by {MANAGED[key]} ({value!r}); remove it")
    per_trial = [k for k in ("train.threads", "train.device") if k in fixed]
    errors += [f"{source}: fixed.{k}: is set by {MANAGED[k]}; remove it" for k in per_trial]
    if spec.family and fixed.get("model.family", spec.family) != spec.family:
        errors.append(f"{source}: fixed.model.family: contradicts family ({spec.family})")
    if errors:
        raise ExperimentError("\n".join(errors))
    overrides = {**fixed, **decided, "train.progress": False}
    if spec.family:
        overrides["model.family"] = spec.family
    try:
        base = make_config({}, overrides)
    except ValidationError as err:
        raise ExperimentError("\n".join(error_lines(err, source, "fixed"))) from None
    if base.data.dir is not None:  # trials run in their own working directories
        base.data.dir = str(Path(base.data.dir).expanduser().resolve())
    return base


def _search_space(spec: ExperimentSpec, base: Config, path: Path, source: str) -> SearchSpace:
    if isinstance(spec.search_space, dict):
        raw, space_source = spec.search_space, f"{source}: search_space"
    else:
        space_path = path.parent / spec.search_space
        if not space_path.is_file():
            raise ExperimentError(f"{source}: search_space: no such file: {space_path}")
        raw, space_source = _read_yaml(space_path, str(space_path)), str(space_path)
    try:
        params = parse_params(SpaceFile.model_validate(raw).params, space_source)
    except ValidationError as err:
        raise ExperimentError("\n".join(error_lines(err, space_source))) from None
    except SpaceError as err:
        raise ExperimentError(str(err)) from None

    errors = _check_params(params, spec, base, space_source)
    if errors:
        raise ExperimentError("\n".join(errors))
    searched = {p.name for p in params}
    context = {name: base.flat()[name] for p in params for name in p.when if name not in searched}
    constants = {} if "model.family" in searched else {"model.family": base.model.family}
    space = SearchSpace(params, context=context, constants=constants)
    _check_samples(space, base, space_source)
    return space


def _check_params(params, spec: ExperimentSpec, base: Config, source: str) -> list[str]:
    names = set(field_names())
    fixed = set(flatten(spec.fixed))
    errors, seen = [], {}
    for p in params:
        where = f"{source}: params.{p.name}"
        if p.name not in names:
            errors.append(f"{where}: unknown setting{_did_you_mean(p.name, names)}")
            continue
        if p.name in MANAGED:
            errors.append(f"{where}: is set by {MANAGED[p.name]}, not searched")
        if p.name in fixed:
            errors.append(f"{where}: is also in the experiment's fixed settings; keep one of them")
        if p.name == "model.family" and spec.family:
            errors.append(f"{where}: the experiment fixes family: {spec.family}; drop one of them")
        for ref, allowed in p.when.items():
            if ref not in names:
                errors.append(f"{where}.when: unknown setting {ref}{_did_you_mean(ref, names)}")
            elif ref in {q.name for q in params} and ref not in seen:
                errors.append(f"{where}.when: {ref} must be defined above {p.name}")
            elif isinstance(getattr(seen.get(ref), "spec", None), CategoricalSpec):
                if not set(allowed) & set(seen[ref].spec.choices):
                    errors.append(f"{where}.when: {ref} never takes {list(allowed)}")
        for value in p.values():
            try:
                make_config(base, {p.name: value})
            except ValidationError as err:
                # This value's own errors; cross-field checks are left to the joint samples below.
                own = [e for e in err.errors() if ".".join(map(str, e["loc"])) == p.name]
                if own:
                    err = ValidationError.from_exception_data(err.title, own)
                    errors += [line.replace(f"{source}: {p.name}", where, 1) for line in error_lines(err, source)]
        seen[p.name] = p
    if not spec.family and "model.family" not in seen and "model.family" not in fixed:
        errors.append(f"{spec.name}: family: required unless the search space chooses model.family")
    return errors


def _check_samples(space: SearchSpace, base: Config, source: str) -> None:
    """Validate random draws from the space as whole configs: catches combinations no single value shows."""
    for settings in space.draw(SAMPLES_CHECKED):
        try:
            make_config(base, settings)
        except ValidationError as err:
            raise ExperimentError(
                f"{source}: these settings are invalid together: {settings}\n" + "\n".join(error_lines(err, source))
            ) from None


def _start_points(start_from: list[dict[str, Any]], space: SearchSpace, base: Config,
                  source: str) -> list[dict[str, Any]]:
    """Validate `start_from` like search-space values and translate each point to Optuna's parameter names.
    A point names searched settings only; settings it leaves out are sampled as usual."""
    names, points, errors = set(field_names()), [], []
    for i, point in enumerate(start_from):
        where = f"{source}: start_from[{i}]"
        point = flatten(point)
        errors += [f"{where}.{k}: unknown setting{_did_you_mean(k, names)}" for k in point if k not in names]
        errors += [f"{where}.{k}: not searched by this experiment's space (set it in `fixed`)" for k in point
                   if k in names and k not in space.names()]
        keys, chosen = {}, dict(space.context)
        for p in space.params:
            if p.name not in point or isinstance(p.spec, FixedSpec):
                continue
            if not p.active({**chosen, **point}):
                continue
            problem = _outside(p, point[p.name])
            if problem:
                errors.append(f"{where}.{p.name}: {problem}")
            keys[p.key], chosen[p.name] = point[p.name], point[p.name]
        errors += [f"{where}.{k}: does not exist with this point's other settings (see its `when`)"
                   for k in point if k in space.names() and k not in chosen]
        if not errors:
            try:
                make_config(base, {**space.constants, **point})
            except ValidationError as err:
                errors += error_lines(err, where)
        points.append(keys)
    if errors:
        raise ExperimentError("\n".join(errors))
    return points


def _outside(param: Param, value: Any) -> str | None:
    """Why `value` is not in the param's range or choices (None when it is)."""
    s = param.spec
    if isinstance(s, CategoricalSpec):
        return None if value in s.choices else f"{value!r} is not one of {s.choices}"
    wanted = "an int" if isinstance(s, IntSpec) else "a number"
    if isinstance(value, bool) or not isinstance(value, int if isinstance(s, IntSpec) else (int, float)):
        return f"{value!r} is not {wanted}"
    return None if s.low <= value <= s.high else f"{value!r} is outside [{s.low}, {s.high}]"


def _read_yaml(path: Path, source: str) -> dict[str, Any]:
    if not path.is_file():
        raise ExperimentError(f"{source}: no such file")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise ExperimentError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{source}: expected a mapping of settings at the top level")
    return raw


def _did_you_mean(name: str, names: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; researchers write learning rates that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
