"""Search spaces: the YAML grammar and its translation into an Optuna define-by-run function.

A search-space file maps lmcore's dotted config names to what Optuna may choose for them:

    params:
      optim.lr:            {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
      model.layers:        {type: int, low: 1, high: 3}            # optional: step, log
      model.rank:          {type: categorical, choices: [null, 32, 64]}
      model.tie_weights:   true                                     # a fixed value
      model.family:        {choices: [mogrifier, lstm, transformer]}
      model.rounds:        {type: int, low: 1, high: 6, when: {model.family: mogrifier}}
      model.layers:                                                 # alternatives, one per condition
        - {type: int, low: 1, high: 3, when: {model.family: [mogrifier, lstm]}}
        - {type: int, low: 2, high: 6, when: {model.family: transformer}}

`when` makes a parameter exist only while other settings (an earlier parameter, or a fixed setting of the
experiment) take one of the listed values. The define-by-run function walks the parameters in file order, so
Optuna sees exactly the parameters that exist in each trial; a TPE sampler with `group=True` then models each
conditional group jointly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmcore.config import MAX_LINES, Int, Real, error_lines
from lmcore.files import short_repr

# Optuna names an alternative "model.layers|transformer"; trial settings drop these aliases.
ALIAS = "|"
OPTUNA_CHOICE_TYPES = (type(None), bool, int, float, str)
MAX_CHOICES = 1000


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    when: dict[str, Any] | None = Field(None, description="{setting: value or [values]}: exists only then")

    @field_validator("when")
    @classmethod
    def _plain_values(cls, when: dict[str, Any] | None) -> dict[str, Any] | None:
        for name, allowed in (when or {}).items():
            for value in allowed if isinstance(allowed, list) else [allowed]:
                if not isinstance(value, OPTUNA_CHOICE_TYPES):
                    raise ValueError(f"{name}: a condition lists values: null, booleans, numbers or strings "
                                     f"(got {short_repr(value)})")
        return when


class _RangeSpec(_Spec):
    """A numeric range, FloatSpec or IntSpec: `low` and `high` are the subclass's."""

    numbers: ClassVar[tuple[type, ...]] = (int, float)

    def may_take(self, allowed: tuple) -> bool:
        """Whether the range holds one of the `allowed` values."""
        numbers = [v for v in allowed if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return any(self.low <= v <= self.high for v in numbers)

    def why_outside(self, value: Any) -> str | None:
        """Why `value` is not in the range (None when it is)."""
        if isinstance(value, bool) or not isinstance(value, self.numbers):
            return f"{value!r} is not {'an int' if self.numbers == (int,) else 'a number'}"
        return None if self.low <= value <= self.high else f"{value!r} is outside [{self.low}, {self.high}]"


class FloatSpec(_RangeSpec):
    type: Literal["float"]
    low: Real
    high: Real
    log: bool = False
    step: Real | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _valid_range(self) -> FloatSpec:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("step cannot be combined with log: true")
        return self


class IntSpec(_RangeSpec):
    numbers: ClassVar[tuple[type, ...]] = (int,)
    type: Literal["int"]
    low: Int
    high: Int
    log: bool = False
    step: Int = Field(1, gt=0)

    @model_validator(mode="after")
    def _valid_range(self) -> IntSpec:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("step cannot be combined with log: true")
        return self


class CategoricalSpec(_Spec):
    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1, max_length=MAX_CHOICES)

    @model_validator(mode="after")
    def _plain_unique_choices(self) -> CategoricalSpec:
        for choice in self.choices:
            if not isinstance(choice, OPTUNA_CHOICE_TYPES):
                raise ValueError(f"choices must be null, booleans, numbers or strings (got {short_repr(choice)})")
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"choices repeat a value: {short_repr(self.choices)}")
        return self

    def may_take(self, allowed: tuple) -> bool:
        return any(c in allowed for c in self.choices)

    def why_outside(self, value: Any) -> str | None:
        return None if value in self.choices else f"{value!r} is not one of {self.choices}"


class FixedSpec(_Spec):
    type: Literal["fixed"] = "fixed"
    value: Any

    def may_take(self, allowed: tuple) -> bool:
        return self.value in allowed

    def why_outside(self, value: Any) -> str | None:
        return None if value == self.value else f"{value!r} is not the fixed value {self.value!r}"


SPEC_TYPES = {"float": FloatSpec, "int": IntSpec, "categorical": CategoricalSpec, "fixed": FixedSpec}
Spec = FloatSpec | IntSpec | CategoricalSpec | FixedSpec


def _check_range(low: float, high: float, log: bool) -> None:
    if low >= high:
        raise ValueError(f"empty or inverted range: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0 (got {low})")


class SpaceError(ValueError):
    """All problems found in one search-space file, one line each."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class Param:
    name: str  # the lmcore setting, e.g. "model.rounds"
    key: str  # Optuna's name: `name`, or `name|label` for one of several alternatives
    spec: Spec
    when: dict[str, tuple] = field(default_factory=dict)

    def values(self) -> list[Any]:
        """The values worth validating against lmcore's schema: the ends of a range, each choice."""
        s = self.spec
        if isinstance(s, (FloatSpec, IntSpec)):
            return [s.low, s.high]
        return list(s.choices) if isinstance(s, CategoricalSpec) else [s.value]

    def active(self, settings: dict[str, Any]) -> bool:
        return all(name in settings and settings[name] in allowed for name, allowed in self.when.items())

    def suggest(self, trial) -> Any:
        s = self.spec
        if isinstance(s, FloatSpec):
            return trial.suggest_float(self.key, s.low, s.high, log=s.log, step=s.step)
        if isinstance(s, IntSpec):
            return trial.suggest_int(self.key, s.low, s.high, log=s.log, step=s.step)
        if isinstance(s, CategoricalSpec):
            return trial.suggest_categorical(self.key, s.choices)
        return s.value

    def around(self, value: Any, fraction: float) -> Param:
        """This range narrowed to `fraction` of its width on either side of `value` (on the log scale for a log
        range), within the range; other kinds of parameter, and a range without the value (another alternative's),
        as they are."""
        s = self.spec
        if not isinstance(s, (FloatSpec, IntSpec)) or s.why_outside(value) is not None:
            return self
        scale, unscale = (math.log, math.exp) if s.log else (float, float)
        reach = fraction * (scale(s.high) - scale(s.low))
        low, high = max(s.low, unscale(scale(value) - reach)), min(s.high, unscale(scale(value) + reach))
        if isinstance(s, IntSpec):
            low, high = max(s.low, math.floor(low)), min(s.high, math.ceil(high))
            if low == high:  # keep a neighbour on each side that the range has
                low, high = max(s.low, low - s.step), min(s.high, high + s.step)
        return replace(self, spec=s.model_copy(update={"low": low, "high": high}))

    def describe(self) -> str:
        s = self.spec
        if isinstance(s, (FloatSpec, IntSpec)):
            text = f"{s.type} [{s.low}, {s.high}]" + (" log" if s.log else "")
            text += f" step {s.step}" if s.step not in (None, 1) else ""
        elif isinstance(s, CategoricalSpec):
            text = f"one of {s.choices}"
        else:
            text = f"= {s.value!r}"
        cond = " and ".join(f"{k} in {list(v)}" for k, v in self.when.items())
        return f"{self.name}: {text}" + (f"  (when {cond})" if cond else "")


@dataclass
class SearchSpace:
    """Picklable define-by-run function: OptunaSearch calls it with an Optuna trial, Ray pickles it on restore."""

    params: list[Param]
    context: dict[str, Any] = field(default_factory=dict)  # fixed settings that conditions may refer to
    constants: dict[str, Any] = field(default_factory=dict)  # returned with every sample (shown in tables)

    def __call__(self, trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.active({**self.context, **chosen}):
                chosen[param.name] = param.suggest(trial)
        return {**self.constants, **chosen}

    def around(self, point: dict[str, Any], fraction: float) -> SearchSpace:
        """The space narrowed around `point` (searcher.around_start): each range it has a value for, to `fraction`
        of the range's width on either side."""
        params = [p.around(point[p.name], fraction) if p.name in point else p for p in self.params]
        return replace(self, params=params)

    def names(self) -> list[str]:
        """The settings this space varies, in file order, each once."""
        return list(dict.fromkeys(p.name for p in self.params if not isinstance(p.spec, FixedSpec)))

    def draw(self, count: int, seed: int = 0) -> list[dict[str, Any]]:
        """`count` random trial settings from this space (for validation; no study is kept)."""
        import optuna

        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
            draws = []
            for _ in range(count):
                trial = study.ask()
                draws.append(trial_settings(self(trial)))
                study.tell(trial, 0.0)
            return draws
        finally:
            optuna.logging.set_verbosity(level)

    def always_present(self, draws: int = 64) -> list[str]:
        """The settings every trial has (conditional ones left out), found by drawing random configs."""
        keys = [set(d) for d in self.draw(draws)]
        return [name for name in [*self.constants, *self.names()] if all(name in k for k in keys)]

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.params)


def trial_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config as lmcore overrides: Ray's config also carries Optuna's alias names; drop them."""
    return {k: v for k, v in config.items() if ALIAS not in k}


# -- parsing -------------------------------------------------------------------------------------


def parse_params(raw: Any, source: str) -> list[Param]:
    """The `params:` mapping of a search-space file -> Params; SpaceError names the file and the field."""
    if not isinstance(raw, dict) or not raw:
        raise SpaceError([f"{source}: params: expected a non-empty mapping of setting name -> range"])
    params: list[Param] = []
    errors: list[str] = []
    for name, entry in raw.items():
        if len(errors) >= MAX_LINES:
            break  # enough to act on; a file of 50k broken entries is reported at once
        alternatives = entry if isinstance(entry, list) else [entry]
        if isinstance(entry, list) and not entry:
            errors.append(f"{source}: params.{name}: an empty list of alternatives")
        specs = []
        for i, item in enumerate(alternatives):
            where = f"params.{name}" + (f"[{i}]" if isinstance(entry, list) else "")
            try:
                specs.append(_parse_spec(item))
            except ValidationError as err:
                errors += error_lines(err, source, where)
            except ValueError as err:
                errors.append(f"{source}: {where}: {err}")
        if len(specs) != len(alternatives):
            continue
        try:
            params += _as_params(str(name), specs)
        except ValueError as err:
            errors.append(f"{source}: params.{name}: {err}")
    if errors:
        raise SpaceError(errors)
    return params


def _parse_spec(item: Any) -> Spec:
    if not isinstance(item, dict):
        return FixedSpec(value=item)  # a bare value is a fixed setting
    kind = item.get("type") or ("fixed" if "value" in item else "categorical" if "choices" in item else None)
    if not isinstance(kind, str) or kind not in SPEC_TYPES:
        raise ValueError(f"type must be one of {', '.join(SPEC_TYPES)} (got {short_repr(item.get('type'))})")
    return SPEC_TYPES[kind].model_validate({**item, "type": kind})


def _as_params(name: str, specs: list[Spec]) -> list[Param]:
    whens = [{k: tuple(v) if isinstance(v, list) else (v,) for k, v in (s.when or {}).items()} for s in specs]
    if len(specs) == 1:
        return [Param(name, name, specs[0], whens[0])]
    if not all(whens):
        raise ValueError("each of several alternatives needs a `when`")
    for i in range(len(whens)):
        for j in range(i):
            if not any(k in whens[j] and not set(v) & set(whens[j][k]) for k, v in whens[i].items()):
                raise ValueError(f"alternatives {j} and {i} can both apply: give them disjoint `when` values")
    labels = [",".join(str(x) for v in w.values() for x in v) for w in whens]
    return [Param(name, f"{name}{ALIAS}{label}", s, w) for s, w, label in zip(specs, whens, labels)]
