"""`start_from`: known configurations (searched settings) a study tries first, checked like the search space's
values and translated to Optuna's parameter names."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lmcore.config import Config, error_lines, error_message, field_names, flatten, make_config, unknown_setting
from lmtune.schema import ExperimentError
from lmtune.space import FixedSpec, SearchSpace


def under_pins(start_from: list[dict[str, Any]], pinned: dict[str, Any], space: SearchSpace) -> list[dict[str, Any]]:
    """The `start_from` points under the settings pinned by --set, without those settings (no longer searched).
    A point whose family, or another setting a `when` depends on, differs from a pin is left out (pinning
    model.family=lstm leaves out a Mogrifier starting point rather than refusing it); a point that differs
    only in a plain setting keeps its other settings (--set model.dropout.state=0.3 keeps the paper's point)."""
    deciding = {"model.family"} | {name for p in space.params for name in p.when}
    points = [flatten(point) for point in start_from]
    agree = [p for p in points if all(p.get(name, value) == value for name, value in pinned.items()
                                      if name in deciding)]
    return [kept for p in agree if (kept := {k: v for k, v in p.items() if k not in pinned})]


def start_points(start_from: list[dict[str, Any]], space: SearchSpace, base: Config,
                 source: str) -> list[dict[str, Any]]:
    """Validate `start_from` like search-space values and translate each point to Optuna's parameter names.
    A point names searched settings only; settings it leaves out are sampled as usual."""
    names, points, errors = set(field_names()), [], []
    for i, point in enumerate(start_from):
        where = f"{source}: start_from[{i}]"
        point = flatten(point)
        errors += [unknown_setting(f"{where}.{k}", k, names) for k in point if k not in names]
        errors += [f"{where}.{k}: not searched by this experiment's space (set it in `fixed`)" for k in point
                   if k in names and k not in space.names()]
        keys, chosen = {}, dict(space.context)
        for p in space.params:
            if p.name not in point or isinstance(p.spec, FixedSpec):
                continue
            if not p.active({**chosen, **point}):
                continue
            problem = p.spec.why_outside(point[p.name])
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
        raise ExperimentError(error_message(errors))
    return points
