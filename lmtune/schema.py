"""Experiment files: one YAML file = one search, validated completely before anything starts.

Every problem becomes one line naming the file and the field (`experiments/x.yaml: scheduler.grace_period:
...`); `ExperimentError` carries them to the CLI, which exits with status 2 having launched nothing.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from lmcore import files
from lmcore.config import Config, Family, did_you_mean, error_lines, field_names, flatten, make_config, set_dotted
from lmcore.train import EpochMetrics
from lmtune.space import CategoricalSpec, FixedSpec, IntSpec, Param, SearchSpace, SpaceError, parse_params

LMCORE_SECTIONS = ("data", "model", "optim", "train", "eval")
# A study ranks trials by one of the validation metrics that `lmcore.train` reports each epoch.
METRICS = tuple(k for k in EpochMetrics.__annotations__ if k.startswith(("valid_", "best_valid_")))
# Settings the experiment itself decides; a search space must not vary them.
MANAGED = {
    "data.name": "dataset",
    "train.epochs": "scheduler.max_epochs",
    "train.threads": "resources.cpus (torch threads = the trial's CPUs)",
    "train.device": "resources.gpus (a trial with GPUs trains on cuda)",
    "train.progress": "the tuner (trials log through Ray, not progress lines)",
}
SAMPLES_CHECKED = 32  # random draws from the space, each validated as a whole config
MAX_EXTENDS = 8  # files in one `extends` chain
MAX_LINES = 20  # an error message lists at most this many problems (a file of 100k typos is one message)
# Whole numbers must be written as such (`trials: true` is not 1) and reals must be finite.
Int = Annotated[int, Strict()]
Real = Annotated[float, Strict(), AllowInfNan(False)]


class ExperimentError(Exception):
    """An invalid experiment, search space or --set override; str() is the full message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearcherSpec(_Strict):
    sampler: Literal["tpe", "random"] = Field("tpe", description="tpe: multivariate, grouped (conditional) TPE")
    seed: Int | None = Field(0, ge=0, le=2**32 - 1)
    n_startup_trials: Int = Field(10, ge=0, le=1_000_000, description="random trials before TPE starts modelling")


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
    pinned: dict[str, Any] = field(default_factory=dict)  # lmcore settings pinned with --set
    start_points: list[dict[str, Any]] = field(default_factory=list)  # start_from in Optuna's parameter names

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def folder(self) -> Path:
        return Path(self.spec.storage) / self.spec.name

    def snapshot(self) -> dict[str, Any]:
        """What resuming must not change; saved as experiment.yaml in the folder. The fixed settings are in `base`,
        resolved (however a file spells them: nested, dotted, through `extends`). Trackers may change."""
        spec = self.spec.model_dump(mode="json", exclude={"search_space", "description", "fixed", "loggers"})
        return {**spec, "space": self.space.describe().splitlines(), "base": self.base.flat()}


# -- loading ---------------------------------------------------------------------------------------


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override (`--set key=value`) and validate an experiment file; ExperimentError if anything is wrong.

    An lmcore setting given with --set pins it: it joins the fixed settings and leaves the search space."""
    path = Path(path)
    source = str(path)
    raw = read_experiment_file(path)
    raw.setdefault("name", path.stem)
    pinned: dict[str, Any] = {}
    if overrides:
        source += " (with --set " + " ".join(overrides) + ")"
        pinned = _apply_overrides(raw, overrides, path.parent)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise ExperimentError(message(error_lines(err, source))) from None
    spec.storage = str(Path(spec.storage).expanduser().resolve())
    base = _base_config(spec, source)
    space = _search_space(spec, base, source, pinned)
    points = _start_points(_under_pins(spec.start_from, pinned, space), space, base, source)
    return Experiment(spec=spec, base=base, space=space, source=source, pinned=pinned, start_points=points)


def message(lines: list[str]) -> str:
    """The lines of one error message, each once, at most MAX_LINES of them."""
    lines = list(dict.fromkeys(lines))
    more = len(lines) - MAX_LINES
    return "\n".join(lines[:MAX_LINES] + [f"... and {more} more problems"] * (more > 0))


def read_experiment_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """An experiment file as a dict, with `extends: base.yaml` (relative to the file) deep-merged under it.
    A `search_space` path is made relative to the file that states it."""
    raw = _read_yaml(path, str(path))
    if isinstance(raw.get("search_space"), str):
        raw["search_space"] = str(path.parent / raw["search_space"])
    if "extends" not in raw:
        return raw
    parent = raw.pop("extends")
    if not isinstance(parent, str) or not parent.strip():
        raise ExperimentError(f"{path}: extends: expected the path of a base experiment file "
                              f"(got {files.short_repr(parent)})")
    base_path = path.parent / parent
    here = (*chain, path.resolve())
    if base_path.resolve() in here:
        raise ExperimentError(f"{path}: extends: {parent} leads back to {path} (a cycle); remove one of the extends")
    if len(here) > MAX_EXTENDS:
        raise ExperimentError(f"{path}: extends: more than {MAX_EXTENDS} files deep")
    base = read_experiment_file(base_path, here)
    if "name" in base:
        raise ExperimentError(f"{base_path}: name: a base file must not set name (each experiment is named by its "
                              "own file)")
    return _merge(base, raw)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `base`, sections merged key by key; `fixed` by dotted name; an inline space replaced whole."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "search_space":
            out[key] = {**flatten(out[key]), **flatten(value)} if key == "fixed" else _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, source: str) -> dict[str, Any]:
    try:
        return files.read_yaml(path, source)
    except files.FileError as err:
        raise ExperimentError(str(err)) from None


def _apply_overrides(raw: dict[str, Any], overrides: list[str], folder: Path) -> dict[str, Any]:
    """Apply each `key=value` to `raw` (a search_space path is relative to the experiment's `folder`, as in the
    file); returns the lmcore settings pinned this way."""
    names = set(field_names())
    pinned = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ExperimentError(f"--set {item}: expected key=value")
        try:
            value = files.parse_value(text)
        except files.FileError as err:
            raise ExperimentError(f"--set {key}: {err}") from None
        if key.split(".")[0] in LMCORE_SECTIONS:  # an lmcore setting: pinned in fixed
            if key not in names:
                raise ExperimentError(f"--set {key}: unknown setting{did_you_mean(key, names)}")
            fixed = raw.get("fixed", {})
            if not isinstance(fixed, dict):
                raise ExperimentError(f"--set {key}: the experiment's `fixed` is not a mapping")
            raw["fixed"] = {**flatten(fixed), key: value}
            if key == "model.family" and "family" in raw:
                raw["family"] = value  # the experiment's family, pinned too
            pinned[key] = value
        else:
            if key == "search_space" and isinstance(value, str):
                value = str(folder / value)
            try:
                set_dotted(raw, key, value)
            except ValueError as err:
                raise ExperimentError(f"--set {item}: {err}") from None
    return pinned


def _base_config(spec: ExperimentSpec, source: str) -> Config:
    fixed = flatten(spec.fixed)
    names = set(field_names())
    unknown = [k for k in fixed if k not in names]
    errors = [f"{source}: fixed.{k}: unknown setting{did_you_mean(k, names)}" for k in unknown[:MAX_LINES]]
    errors += [f"{source}: fixed.{k}: unknown setting" for k in unknown[MAX_LINES:]]
    decided = {"data.name": spec.dataset, "train.epochs": spec.scheduler.max_epochs}
    for key in MANAGED:
        if key in fixed:
            now = f" ({decided[key]!r})" if key in decided else ""
            errors.append(f"{source}: fixed.{key}: is set by {MANAGED[key]}{now}; remove it")
    if spec.family and "model.family" in fixed and fixed["model.family"] != spec.family:
        errors.append(f"{source}: fixed.model.family: contradicts family ({spec.family}); keep one of them")
    if errors:
        raise ExperimentError(message(errors))
    overrides = {**fixed, **decided, "train.progress": False}
    if spec.family:
        overrides["model.family"] = spec.family
    try:
        base = make_config({}, overrides)
    except ValidationError as err:
        raise ExperimentError(message(error_lines(err, source, "fixed"))) from None
    if base.data.dir is not None:  # trials run in their own working directories
        base.data.dir = str(Path(base.data.dir).expanduser().resolve())
    return base


def _search_space(spec: ExperimentSpec, base: Config, source: str, pinned: dict[str, Any]) -> SearchSpace:
    if isinstance(spec.search_space, dict):
        raw, space_source = spec.search_space, f"{source}: search_space"
    else:
        space_path = Path(spec.search_space)
        if not space_path.is_file():
            raise ExperimentError(f"{source}: search_space: no such file: {space_path}")
        try:
            raw, space_source = files.read_yaml(space_path), str(space_path)
        except files.FileError as err:
            raise ExperimentError(f"{source}: search_space: {err}") from None
    try:
        params = parse_params(SpaceFile.model_validate(raw).params, space_source)
    except ValidationError as err:
        raise ExperimentError(message(error_lines(err, space_source))) from None
    except SpaceError as err:
        raise ExperimentError(message(err.lines)) from None

    params = _without_pinned(params, pinned)
    errors = _check_params(params, spec, base, space_source)
    if not spec.family and "model.family" not in {p.name for p in params} | set(flatten(spec.fixed)):
        errors.append(f"{source}: family: required unless the search space chooses model.family")
    if errors:
        raise ExperimentError(message(errors))
    searched = {p.name for p in params}
    context = {name: base.flat()[name] for p in params for name in p.when if name not in searched}
    constants = {} if "model.family" in searched else {"model.family": base.model.family}
    space = SearchSpace(params, context=context, constants=constants)
    _check_samples(space, base, space_source)
    return space


def _without_pinned(params: list[Param], pinned: dict[str, Any]) -> list[Param]:
    """The space with the --set settings taken out, and with the parameters that exist only for another value of
    a pinned setting (or only beside a parameter taken out this way)."""
    kept, gone = [], set(pinned)
    never_value = object()  # a parameter taken out takes no value
    for p in params:
        never = any(ref in gone and pinned.get(ref, never_value) not in allowed for ref, allowed in p.when.items())
        if p.name in pinned or never:
            gone.add(p.name)
        else:
            kept.append(p)
    return kept


def _check_params(params: list[Param], spec: ExperimentSpec, base: Config, source: str) -> list[str]:
    names = set(field_names())
    fixed = set(flatten(spec.fixed))
    flat = base.flat()
    errors: list[str] = []
    seen: dict[str, list[Param]] = {}
    for p in params:
        if len(errors) >= MAX_LINES:
            break
        where = f"{source}: params.{p.name}"
        if p.name not in names:
            errors.append(f"{where}: unknown setting{did_you_mean(p.name, names)}")
            continue
        if p.name in MANAGED:
            errors.append(f"{where}: is set by {MANAGED[p.name]}, not searched")
        if p.name in fixed:
            errors.append(f"{where}: is also in the experiment's fixed settings; remove it from one of them "
                          f"(or pin it from the command line: --set {p.name}=VALUE)")
        if p.name == "model.family" and spec.family:
            errors.append(f"{where}: the experiment fixes family: {spec.family}; drop one of them")
        errors += _check_when(p, where, names, {q.name for q in params}, seen, flat)
        errors += _check_values(p, where, base, source)
        seen.setdefault(p.name, []).append(p)
    return errors


def _check_when(p: Param, where: str, names: set[str], searched: set[str], seen: dict[str, list[Param]],
                fixed: dict[str, Any]) -> list[str]:
    """A condition names a known setting (a parameter defined above, or a fixed setting) and can hold."""
    errors = []
    for ref, allowed in p.when.items():
        if ref not in names:
            errors.append(f"{where}.when: unknown setting {ref}{did_you_mean(ref, names)}")
        elif ref in seen:
            if not any(_may_take(q, allowed) for q in seen[ref]):
                errors.append(f"{where}.when: {ref} never takes {list(allowed)}")
        elif ref in searched:
            errors.append(f"{where}.when: {ref} must be defined above {p.name}")
        elif fixed[ref] not in allowed:
            errors.append(f"{where}.when: {ref} is fixed to {fixed[ref]!r}, never {list(allowed)}: "
                          "the parameter would never be used")
    return errors


def _may_take(param: Param, allowed: tuple) -> bool:
    """Whether `param` can take one of the `allowed` values."""
    s = param.spec
    if isinstance(s, CategoricalSpec):
        return any(c in allowed for c in s.choices)
    if isinstance(s, FixedSpec):
        return s.value in allowed
    numbers = [v for v in allowed if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return any(s.low <= v <= s.high for v in numbers)


def _check_values(p: Param, where: str, base: Config, source: str) -> list[str]:
    """This parameter's own values against lmcore's schema; cross-field checks are left to the joint samples."""
    errors = []
    for value in p.values():
        try:
            make_config(base, {p.name: value})
        except ValidationError as err:
            own = [e for e in err.errors() if ".".join(map(str, e["loc"])) == p.name]
            if own:
                err = ValidationError.from_exception_data(err.title, own)
                errors += [line.replace(f"{source}: {p.name}", where, 1) for line in error_lines(err, source)]
    return errors


def _check_samples(space: SearchSpace, base: Config, source: str) -> None:
    """Validate random draws from the space as whole configs: catches combinations no single value shows."""
    for settings in space.draw(SAMPLES_CHECKED):
        try:
            make_config(base, settings)
        except ValidationError as err:
            raise ExperimentError(message(
                [f"{source}: these settings are invalid together: {files.short_repr(settings, 400)}",
                 *error_lines(err, source)])) from None


def _under_pins(start_from: list[dict[str, Any]], pinned: dict[str, Any], space: SearchSpace) -> list[dict[str, Any]]:
    """The `start_from` points under the settings pinned by --set, without those settings (no longer searched).
    A point whose family, or another setting a `when` depends on, differs from a pin is left out (pinning
    model.family=lstm leaves out a Mogrifier starting point rather than refusing it); a point that differs
    only in a plain setting keeps its other settings (--set model.dropout.state=0.3 keeps the paper's point)."""
    deciding = {"model.family"} | {name for p in space.params for name in p.when}
    points = [flatten(point) for point in start_from]
    agree = [p for p in points if all(p.get(name, value) == value for name, value in pinned.items()
                                      if name in deciding)]
    return [kept for p in agree if (kept := {k: v for k, v in p.items() if k not in pinned})]


def _start_points(start_from: list[dict[str, Any]], space: SearchSpace, base: Config,
                  source: str) -> list[dict[str, Any]]:
    """Validate `start_from` like search-space values and translate each point to Optuna's parameter names.
    A point names searched settings only; settings it leaves out are sampled as usual."""
    names, points, errors = set(field_names()), [], []
    for i, point in enumerate(start_from):
        where = f"{source}: start_from[{i}]"
        point = flatten(point)
        errors += [f"{where}.{k}: unknown setting{did_you_mean(k, names)}" for k in point if k not in names]
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
        raise ExperimentError(message(errors))
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
