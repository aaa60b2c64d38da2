"""Loading an experiment: its file, the `extends` chain under it and the `--set` overrides over it, read into the
vocabulary of lmtune/schema.py and checked against lmcore (lmtune/checks.py) before anything starts.

    exp = load_experiment("experiments/ptb_mogrify.yaml", ["trials=8", "model.dropout.state=0.3"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmcore import files
from lmcore.config import Config, error_lines, error_message, field_names, flatten, parse_override, set_dotted
from lmtune.checks import base_config, check_params, check_samples, check_storage
from lmtune.schema import ExperimentError, ExperimentSpec, SpaceFile
from lmtune.space import Param, SearchSpace, SpaceError, parse_params
from lmtune.start_points import start_points, under_pins

MAX_EXTENDS = 8  # files in one `extends` chain
SHOWN_OVERRIDES = 4  # --set items named in messages: every line names its source, 20,000 of them would swamp it


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


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override (`--set key=value`) and validate an experiment file; ExperimentError if anything is wrong.

    An lmcore setting given with --set pins it: it joins the fixed settings and leaves the search space."""
    path = Path(path)
    source = str(path)
    raw = read_experiment_file(path)
    raw.setdefault("name", path.stem)
    pinned: dict[str, Any] = {}
    if overrides:
        source = with_overrides(source, overrides)
        pinned = _apply_overrides(raw, overrides, path.parent)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise ExperimentError(error_message(error_lines(err, source))) from None
    spec.storage = str(Path(spec.storage).expanduser().resolve())
    check_storage(spec, source)
    base = base_config(spec, source)
    space = _search_space(spec, base, source, pinned)
    points = start_points(under_pins(spec.start_from, pinned, space), space, base, source)
    if spec.searcher.around_start is not None:
        if not points:
            raise ExperimentError(f"{source}: searcher.around_start: needs a start_from point to search around")
        space = space.around(points[0], spec.searcher.around_start)
    return Experiment(spec=spec, base=base, space=space, source=source, pinned=pinned, start_points=points)


def with_overrides(source: str, overrides: list[str]) -> str:
    """`x.yaml (with --set trials=8 ...)`, the source named in messages: the first overrides, each cut short and
    with its control characters escaped, then how many more."""
    shown = [files.printable(o if len(o) <= 80 else o[:77] + "...") for o in overrides[:SHOWN_OVERRIDES]]
    more = len(overrides) - len(shown)
    return f"{source} (with --set {' '.join(shown)}" + (f" and {more:,} more" if more else "") + ")"


# -- the file and its `extends` chain --------------------------------------------------------------


def read_experiment_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """An experiment file as a dict, with `extends: base.yaml` (relative to the file) deep-merged under it.
    A `search_space` path is made relative to the file that states it."""
    raw = _read_yaml(path)
    if raw and not set(raw) & {*ExperimentSpec.model_fields, "extends"}:  # another kind of file: never echo it
        raise ExperimentError(f"{path}: not an experiment file (none of its keys is an experiment's, e.g. dataset)")
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


def _read_yaml(path: Path, source: str | None = None) -> dict[str, Any]:
    try:
        return files.read_yaml(path, source)
    except files.FileError as err:
        raise ExperimentError(str(err)) from None


# -- --set -----------------------------------------------------------------------------------------


def _apply_overrides(raw: dict[str, Any], overrides: list[str], folder: Path) -> dict[str, Any]:
    """Apply each `key=value` to `raw` (a search_space path is relative to the experiment's `folder`, as in the
    file); returns the lmcore settings pinned this way."""
    names = set(field_names())
    pinned = {}
    for item in overrides:
        try:
            key, value = parse_override(item, experiment_keys=True)
        except ValueError as err:
            raise ExperimentError(f"--set {err}") from None
        if key in names:  # an lmcore setting: pinned in fixed
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


# -- the search space ------------------------------------------------------------------------------


def _search_space(spec: ExperimentSpec, base: Config, source: str, pinned: dict[str, Any]) -> SearchSpace:
    params, space_source = _read_params(spec, source)
    params = _without_pinned(params, pinned)
    errors = check_params(params, spec, base, space_source)
    if not spec.family and "model.family" not in {p.name for p in params} | set(spec.fixed):
        errors.append(f"{source}: family: required unless the search space chooses model.family")
    if errors:
        raise ExperimentError(error_message(errors))
    searched = {p.name for p in params}
    context = {name: base.flat()[name] for p in params for name in p.when if name not in searched}
    constants = {} if "model.family" in searched else {"model.family": base.model.family}
    space = SearchSpace(params, context=context, constants=constants)
    check_samples(space, base, space_source)
    return space


def _read_params(spec: ExperimentSpec, source: str) -> tuple[list[Param], str]:
    """The parameters of the experiment's search space (inline, or the file it names), and where they are."""
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
        if "params" not in raw:  # another kind of file (a system file, say): its keys are never echoed
            raise ExperimentError(f"{source}: search_space: {space_path}: not a search-space file (no `params:`)")
    try:
        return parse_params(SpaceFile.model_validate(raw).params, space_source), space_source
    except ValidationError as err:
        raise ExperimentError(error_message(error_lines(err, space_source))) from None
    except SpaceError as err:
        raise ExperimentError(error_message(err.lines)) from None


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
