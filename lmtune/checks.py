"""An experiment's checks against lmcore: its fixed settings and the ones the experiment itself manages, each
search-space parameter against lmcore's schema, random draws of the space as whole configs, and (`check_fits`,
which reads the corpus) what each trial's training would refuse before its first step.

Each check returns (or raises as ExperimentError) lines naming the file and the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmcore import files
from lmcore.config import (
    MAX_LINES,
    Config,
    SettingError,
    error_lines,
    error_message,
    field_names,
    make_config,
    unknown_setting,
)
from lmcore.data import load_corpus
from lmcore.train import check_fits as check_fits_corpus
from lmtune.schema import ExperimentError, ExperimentSpec
from lmtune.space import Param, SearchSpace

# Settings the experiment itself decides; a search space must not vary them.
MANAGED = {
    "data.name": "dataset",
    "train.epochs": "scheduler.max_epochs",
    "train.threads": "resources.cpus (torch threads = the trial's CPUs)",
    "train.device": "resources.gpus (a trial with GPUs trains on cuda)",
    "train.progress": "the tuner (trials log through Ray, not progress lines)",
}
SAMPLES_CHECKED = 32  # random draws from the space, each validated as a whole config


def base_config(spec: ExperimentSpec, source: str) -> Config:
    """The lmcore config every trial starts from: the experiment's fixed settings and those it manages."""
    names = set(field_names())
    unknown = [k for k in spec.fixed if k not in names]
    # did-you-mean for the lines shown only: a file of 100k typos is refused at once
    errors = [unknown_setting(f"{source}: fixed.{k}", k, names if i < MAX_LINES else ()) for i, k in enumerate(unknown)]
    decided = {"data.name": spec.dataset, "train.epochs": spec.scheduler.max_epochs}
    for key in MANAGED:
        if key in spec.fixed:
            now = f" ({decided[key]!r})" if key in decided else ""
            errors.append(f"{source}: fixed.{key}: is set by {MANAGED[key]}{now}; remove it")
    if spec.family and spec.fixed.get("model.family", spec.family) != spec.family:
        errors.append(f"{source}: fixed.model.family: contradicts family ({spec.family}); keep one of them")
    if errors:
        raise ExperimentError(error_message(errors))
    overrides = {**spec.fixed, **decided, "train.progress": False}
    if spec.family:
        overrides["model.family"] = spec.family
    try:
        base = make_config({}, overrides)
    except ValidationError as err:
        raise ExperimentError(error_message(error_lines(err, source, "fixed"))) from None
    if base.data.dir is not None:  # trials run in their own working directories
        base.data.dir = str(Path(base.data.dir).expanduser().resolve())
    return base


def check_storage(spec: ExperimentSpec, source: str) -> None:
    """`storage` is (or can be made as) a folder this user may write, outside /proc and /sys: checked before
    anything starts, so that a run never fails making its experiment folder."""
    problem = files.why_unwritable(spec.storage, folder=True)
    if problem:
        raise ExperimentError(f"{source}: storage: {spec.storage} {problem}; choose a folder you can write "
                              "(e.g. storage: results)")


def check_params(params: list[Param], spec: ExperimentSpec, base: Config, source: str) -> list[str]:
    """Each parameter names a setting lmcore knows and the experiment leaves to the search; its values and
    conditions are possible."""
    names = set(field_names())
    flat = base.flat()
    errors: list[str] = []
    seen: dict[str, list[Param]] = {}
    for p in params:
        if len(errors) >= MAX_LINES:
            break
        where = f"{source}: params.{p.name}"
        if p.name not in names:
            errors.append(unknown_setting(where, p.name, names))
            continue
        if p.name in MANAGED:
            errors.append(f"{where}: is set by {MANAGED[p.name]}, not searched")
        if p.name in spec.fixed:
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
            errors.append(unknown_setting(f"{where}.when.{ref}", ref, names))
        elif ref in seen:
            if not any(q.spec.may_take(allowed) for q in seen[ref]):
                errors.append(f"{where}.when: {ref} never takes {list(allowed)}")
        elif ref in searched:
            errors.append(f"{where}.when: {ref} must be defined above {p.name}")
        elif fixed[ref] not in allowed:
            errors.append(f"{where}.when: {ref} is fixed to {fixed[ref]!r}, never {list(allowed)}: "
                          "the parameter would never be used")
    return errors


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


def check_samples(space: SearchSpace, base: Config, source: str) -> None:
    """Validate random draws from the space as whole configs: catches combinations no single value shows."""
    for settings in space.draw(SAMPLES_CHECKED):
        try:
            make_config(base, settings)
        except ValidationError as err:
            raise ExperimentError(error_message(
                [f"{source}: these settings are invalid together: {files.short_repr(settings, 400)}",
                 *error_lines(err, source)])) from None


def check_fits(space: SearchSpace, base: Config, source: str) -> None:
    """What lmcore.train would refuse before a trial's first step, on the corpus itself (loaded as the run loads
    it; DataError when it cannot be): a batch larger than a split, a parameter budget below the smallest model.
    Each distinct shape among random draws of the space once (dropouts and the optimiser change no size)."""
    corpus = load_corpus(base.data.name, base.data.dir)
    shapes = set()
    for settings in space.draw(SAMPLES_CHECKED):
        config = base.updated(settings)
        shape = repr((config.data, config.model.model_dump(exclude={"dropout"})))
        if shape in shapes:
            continue
        shapes.add(shape)
        try:
            check_fits_corpus(config, corpus)
        except SettingError as err:
            field = str(err).partition(":")[0]
            drawn = f" (a trial of the search space: {files.short_repr(settings, 200)})" if field in settings else ""
            raise ExperimentError(f"{source}: {err}{drawn}") from None
