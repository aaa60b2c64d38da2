"""The one configuration vocabulary.

Every setting of a run lives here once, with its default and its validation. The CLI flags
(`--model.rounds 3`), the experiment and search-space YAML files, checkpoints and result tables all use
these dotted names (`data.bptt`, `model.dropout.state`, `optim.lr`, ...).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import files
from .batching import longest_window

Family = Literal["mogrifier", "lstm", "gru", "rnn", "transformer"]
RNN_FAMILIES = ("lstm", "gru", "rnn")
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
MAX_LINES = 20  # an error message lists at most this many problems (a file of 100k typos is one message)


class SettingError(ValueError):
    """A setting that is valid on its own but cannot run here (no CUDA, a batch larger than the data):
    str() names the field. The command lines report it as bad input."""


# The number types of both vocabularies (lmcore's settings, lmtune's experiments): a whole number must be
# written as one (`true`, "3" and 3.0 are not 3), and a real must be finite.
Int = Annotated[int, Strict()]
Real = Annotated[float, Strict(), AllowInfNan(False)]


class _Section(BaseModel):
    # Unknown keys are errors, not silently ignored typos; assignments are validated too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DropoutConfig(_Section):
    """The regularisers of the AWD-LSTM / lamb line. The state mask is always drawn once per sequence; the
    input, inter, output and latent masks once per sequence (AWD-LSTM) or at every step (lamb), per `mask`."""

    input: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the embedded input")
    inter: float = Field(0.0, ge=0.0, lt=1.0, description="between layers (inside blocks for the transformer)")
    state: float = Field(0.0, ge=0.0, lt=1.0, description="on the recurrent state h (RNN families)")
    output: float = Field(0.0, ge=0.0, lt=1.0, description="on the last layer's output, before the decoder")
    embedding: float = Field(0.0, ge=0.0, lt=1.0, description="word dropout: whole rows of the embedding")
    latent: float = Field(0.0, ge=0.0, lt=1.0, description="on each softmax mixture component's latent (or the "
                          "tying projection's output); lamb's downprojected_output_dropout")
    mask: Literal["sequence", "step"] = Field(
        "sequence", description="input, inter, output and latent masks: sequence (one per sequence, reused at "
        "every step) | step (a new mask every time step: lamb's shared_mask_dropout false)")


class DataConfig(_Section):
    name: Literal["ptb", "wikitext-2", "text"] = Field(
        "ptb", description="ptb | wikitext-2 | text (your own train/valid/test.txt in data.dir, not checksummed)"
    )
    dir: str | None = Field(None, description="data folder; else $LMCORE_DATA_DIR, else the per-user cache")
    batch_size: Int = Field(20, gt=0)
    eval_batch_size: Int = Field(10, gt=0, description="batch size of validation (and test) evaluation")
    bptt: Int = Field(35, gt=0, description="truncated back-propagation length (tokens)")
    variable_bptt: bool = Field(True, description="AWD-LSTM randomised window lengths in training")
    random_offset: bool = Field(False, description="fixed windows (variable_bptt false) start each pass over the "
                                "training data at a random row below bptt, so window boundaries move (lamb)")

    @model_validator(mode="after")
    def _offset_needs_fixed_windows(self) -> DataConfig:
        if self.random_offset and self.variable_bptt:
            raise ValueError("data.random_offset needs data.variable_bptt false (random lengths already move "
                             "the window boundaries)")
        return self


class ModelConfig(_Section):
    family: Family = "mogrifier"
    # Upper bounds: layers and rounds are built module by module (and counted many times under a budget), heads is
    # the step of the width solved under a budget: a billion would hang or overflow rather than be refused.
    layers: Int = Field(2, gt=0, le=100, description="recurrent layers or transformer blocks")
    hidden: Int = Field(650, gt=0, description="hidden size of the RNN families")
    embedding: Int | None = Field(None, gt=0, description="embedding size; None = hidden (d_model)")
    rounds: Int = Field(5, ge=0, le=100, description="mogrifier rounds; 0 is exactly an LSTM")
    rank: Int | None = Field(None, gt=0, description="low rank of the mogrifier matrices; None = full")
    tie_weights: bool = True
    params_budget: Int | None = Field(
        None, gt=0, description="solve hidden (d_model for the transformer) for this parameter count"
    )
    d_model: Int = Field(256, gt=0, description="transformer width")
    heads: Int = Field(4, gt=0, le=1024, description="transformer attention heads")
    ff: Int | None = Field(None, gt=0, description="transformer feed-forward size; None = 4 * d_model")
    pos_encode: Literal["none", "sinusoidal", "learned", "rope"] = Field(
        "sinusoidal", description="transformer positions: none | sinusoidal | learned (absolute) | rope (rotary)"
    )
    max_len: Int = Field(512, gt=0, description="longest window the transformer's absolute positions cover")
    memory: Int = Field(
        0, ge=0, description="transformer: tokens of earlier windows each block attends to (Transformer-XL); 0 = none"
    )
    softmax_mixtures: Int = Field(1, gt=0, description="mixture of softmaxes components (Yang et al.); 1 = one softmax")
    embedding_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="embedding = round(ratio * hidden), also while a budget is solved "
        "(lamb's input_embedding_ratio); None = model.embedding")
    budget_rule: Literal["nearest", "within"] = Field(
        "nearest", description="params_budget: the width whose count is nearest the budget | within (the widest "
        "that does not exceed it, as lamb)")
    forget_bias: Real = Field(0.0, description="added to the LSTM forget gates' bias at initialisation "
                               "(mogrifier, lstm; lamb: 1.0)")
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.family == "transformer" and self.params_budget is None and self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        return self

    @model_validator(mode="after")
    def _settings_apply_to_family(self) -> ModelConfig:
        if self.embedding_ratio is not None and (self.embedding is not None or self.family == "transformer"):
            raise ValueError("model.embedding_ratio sizes the embedding from model.hidden: it needs an RNN family "
                             "and no model.embedding")
        if self.forget_bias and self.family not in ("mogrifier", "lstm"):
            raise ValueError(f"model.forget_bias needs a forget gate: family mogrifier or lstm, not {self.family}")
        return self

    @model_validator(mode="after")
    def _memory_needs_relative_positions(self) -> ModelConfig:
        # Absolute positions restart at 0 in every window, so a memory would see the same positions twice.
        if self.family == "transformer" and self.memory and self.pos_encode in ("sinusoidal", "learned"):
            raise ValueError(f"model.memory ({self.memory}) needs model.pos_encode rope or none "
                             f"(absolute {self.pos_encode} positions restart in every window)")
        return self


class OptimConfig(_Section):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam beta1 (the Mogrifier paper uses 0)")
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    clip: float = Field(0.25, ge=0.0, description="gradient norm clipping; 0 = off")
    clip_unit: Literal["token", "window"] = Field(
        "token", description="what optim.clip bounds: token (the gradient of the per-token mean loss) | window "
        "(of the loss summed over a window's steps, as lamb: the same clip acts window-length times sooner)")
    lr_decay: float = Field(
        0.25, gt=0.0, le=1.0, description="multiply lr by this when valid ppl does not improve; 1 = off"
    )
    average: Literal["none", "ema", "asgd"] = Field(
        "none", description="validate and save averaged weights: none | ema | asgd (AWD-LSTM's triggered average)"
    )
    ema_decay: float = Field(
        0.999, gt=0.0, lt=1.0, description="ema: weight of the old average at each step, after a warm-up")
    asgd_nonmono: int = Field(5, gt=0, description="asgd: start averaging when valid loss is worse than "
                                                  "the best of all but this many last epochs")
    asgd_trigger: Literal["nonmono", "stale"] = Field(
        "nonmono", description="asgd: nonmono (AWD-LSTM, as asgd_nonmono says) | stale (lamb: once the best "
        "valid loss is asgd_nonmono epochs old)")
    asgd_latest: Int | None = Field(None, gt=0, description="asgd: start averaging after this epoch at the "
                                    "latest (lamb's trigger_averaging_at_the_latest); None = no limit")


class TrainConfig(_Section):
    epochs: Int = Field(40, gt=0)
    steps_per_epoch: Int | None = Field(
        None, gt=0, description="an 'epoch' of this many steps (data position carries over); None = whole split"
    )
    seed: Int = Field(1111, ge=0, lt=2**63, description="seeds Python, torch and the BPTT lengths")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    amp: bool = Field(False, description="bf16 autocast (GPU only)")
    tf32: bool = Field(False, description="on a GPU, float32 matmuls and cuDNN in TF32: faster, about 1e-3 relative "
                       "error (no effect under amp)")
    threads: Int | None = Field(None, gt=0, description="torch CPU threads; None = torch's default")
    log_interval: Int = Field(200, gt=0, description="steps between progress lines")
    progress: bool = Field(True, description="print progress lines")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not DEVICE.fullmatch(device):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N (got {files.short_repr(device)})")
        return device


class EvalConfig(_Section):
    """Dynamic evaluation (Krause et al., 2018): after scoring each window, a gradient step on it, decaying
    toward the trained weights. Used by `evaluate --dynamic`; the defaults are those of their code
    (benkrause/dynamic-evaluation). And the scale of the logits at every evaluation (lamb's softmax temperature)."""

    dynamic_method: Literal["rms", "sgd"] = Field(
        "rms", description="dynamic evaluation: rms (steps scaled by training gradients' RMS) | sgd"
    )
    dynamic_lr: float = Field(5e-5, ge=0.0, description="dynamic evaluation step size; 0 = static evaluation")
    dynamic_decay: float = Field(2e-3, ge=0.0, description="dynamic evaluation decay toward the trained weights")
    dynamic_epsilon: float = Field(2e-5, gt=0.0, description="rms: added to the gradient RMS")
    dynamic_bptt: Int = Field(5, gt=0, description="dynamic evaluation window (tokens per step)")
    dynamic_batch_size: Int = Field(1, gt=0, description="dynamic evaluation batch size (1: one stream)")
    dynamic_stat_batch_size: Int = Field(100, gt=0, description="rms: batch size of the training-gradient pass")
    dynamic_stat_windows: Int | None = Field(
        None, gt=0, description="rms: training windows for the gradient RMS; None = the whole training split"
    )
    dynamic_decay_mean: Literal["tensors", "elements"] = Field(
        "tensors", description="rms: a weight's decay is scaled by its RMS over the mean RMS: the mean of the "
        "tensors' means (Krause et al.) | of all elements (lamb's dyneval.py)")
    logit_scale: Real = Field(1.0, gt=0.0, description="multiplies the logits (each mixture component's) at "
                               "evaluation: lamb's eval_softmax_temperature, an inverse temperature")
    logit_scale_search: float | None = Field(
        None, gt=0.0, lt=1.06, description="search eval.logit_scale before each evaluation as lamb does: 1.06, "
        "1.04, ... down to this (lamb: 0.8) on the first eval.logit_scale_tokens validation tokens, ending after "
        "two without improvement; None = no search")
    logit_scale_tokens: Int = Field(50000, gt=0, description="validation tokens the logit-scale search scores")


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("model")
    @classmethod
    def _positions_cover_windows(cls, m: ModelConfig, info: ValidationInfo) -> ModelConfig:
        data = info.data.get("data")  # validated first (declared first); absent when it was invalid
        if data is None or m.family != "transformer" or m.pos_encode in ("none", "rope"):  # rope has no table
            return m
        longest = longest_window(data.bptt, data.variable_bptt)
        if m.max_len < longest:
            window = f"data.bptt {data.bptt}" + " + 20 with data.variable_bptt" * data.variable_bptt
            raise ValueError(f"max_len ({m.max_len}) is shorter than the longest training window, {longest} "
                             f"tokens ({window}): raise model.max_len or lower data.bptt")
        return m

    # -- dotted names -------------------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """{"model.rounds": 5, "model.dropout.state": 0.0, ...}: the columns of result tables."""
        return flatten(self.model_dump())

    def updated(self, overrides: dict[str, Any]) -> Config:
        """A new, validated Config with dotted-name overrides applied."""
        return make_config(self.model_dump(), overrides)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def set_dotted(tree: dict[str, Any], name: str, value: Any) -> None:
    """Set tree["a"]["b"] = value for name "a.b", creating sections as needed."""
    *path, leaf = name.split(".")
    for key in path:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"{name}: '{key}' is a value, not a section")
        tree = node
    tree[leaf] = value


def make_config(base: dict[str, Any] | Config | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated Config from a nested dict (or Config) plus dotted-name overrides."""
    tree = base.model_dump() if isinstance(base, Config) else _deepcopy(base or {})
    for name, value in (overrides or {}).items():
        set_dotted(tree, name, value)
    return Config.model_validate(tree)


def field_names() -> list[str]:
    """Every dotted name of the vocabulary, in schema order."""
    return list(Config().flat())


def field_help() -> dict[str, str]:
    """{"model.rounds": "mogrifier rounds; 0 is exactly an LSTM (default: 5)", ...}: the CLI's --help."""
    out = {}

    def walk(section: type[BaseModel], prefix: str) -> None:
        for key, info in section.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                walk(info.annotation, f"{prefix}{key}.")
                continue
            choices = getattr(info.annotation, "__args__", ())
            if info.annotation is bool:
                choices = ("true", "false")
            text = info.description or (" | ".join(choices) if choices and all(isinstance(c, str) for c in choices)
                                        else "")
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            out[prefix + key] = f"{text} (default: {default})".lstrip()

    walk(Config, "")
    return out


def error_lines(err: ValidationError, source: str, prefix: str = "") -> list[str]:
    """One line per problem: `source: prefix.model.rounds: Input should be ... (got 'x')`. The one formatter of
    validation errors for both command lines; a value is shown only when it is short and a scalar."""
    lines = []
    for e in err.errors():
        field = ".".join([prefix] * bool(prefix) + [str(p) for p in e["loc"]]) or "(top level)"
        value = e.get("input")
        shown = e["type"] not in ("missing", "value_error", "extra_forbidden") and not isinstance(value, (dict, list))
        got = f" (got {files.short_repr(value)})" if shown else ""
        lines.append(f"{source}: {field}: {e['msg'].removeprefix('Value error, ')}{got}")
    return list(dict.fromkeys(lines))  # a union type can report the same problem twice


def error_message(lines: list[str]) -> str:
    """The lines of one error message, each once, at most MAX_LINES of them."""
    lines = list(dict.fromkeys(lines))
    more = len(lines) - MAX_LINES
    return "\n".join(lines[:MAX_LINES] + [f"... and {more} more problems"] * (more > 0))


def did_you_mean(name: str, names: Iterable[str] | None = None) -> str:
    """" (did you mean model.rounds?)" for a misspelt setting, else ""."""
    close = difflib.get_close_matches(name, sorted(names if names is not None else field_names()), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_setting(where: str, name: str, names: Iterable[str] | None = None) -> str:
    """`WHERE: unknown setting (did you mean model.rounds?)`: the one message for a misspelt setting `name`
    (among `names`, by default lmcore's)."""
    return f"{where}: unknown setting{did_you_mean(name, names)}"


def _deepcopy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def parse_override(text: str, experiment_keys: bool = False) -> tuple[str, Any]:
    """`--set KEY=VALUE` of both command lines: "model.rounds=3" -> ("model.rounds", 3). An lmcore setting's
    value is read by `parse_value`; with `experiment_keys`, a key outside lmcore's sections (tune.py's
    `trials=8`, `search_space=...`) is accepted and its value read as YAML. ValueError: "KEY: problem"."""
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"{text if len(text) <= 80 else text[:77] + '...'}: expected key=value")
    if experiment_keys and name.split(".")[0] not in Config.model_fields:
        return name, read_value(name, value)
    return name, parse_value(name, value)


def take_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """A command line without its `--set KEY=VALUE` items, and those items in order. argparse's time grows with
    the square of the options given (20,000 --set took 18 s), so the items are taken out before it parses the rest;
    a `--set` with nothing after it is left for argparse to report."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # what follows is positional
            rest += argv[i:]
            break
        if arg == "--set" and i + 1 < len(argv):
            overrides.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--set="):
            overrides.append(arg.removeprefix("--set="))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_value(name: str, text: str) -> Any:
    """Command-line text -> a value for lmcore setting `name`, read as YAML (3, 0.5, true, 1e-3);
    "none"/"null" mean None for fields that accept None. Validation happens in make_config."""
    if name not in field_names():
        raise ValueError(unknown_setting(name, name))
    value = read_value(name, text)
    if isinstance(value, str) and value.lower() in ("none", "null") and _accepts_none(name):
        return None
    if isinstance(value, (dict, list)):
        return text  # not a scalar: let validation report it as the wrong type
    return value


def read_value(name: str, text: str) -> Any:
    """Command-line text as YAML reads it, within a settings file's limits (size, nesting, aliases: ValueError
    naming `name`); text YAML cannot parse stays text."""
    try:
        return files.parse_value(text, name)
    except files.FileError as err:
        raise ValueError(str(err)) from None


def _accepts_none(name: str) -> bool:
    section: type[BaseModel] = Config
    *path, leaf = name.split(".")
    for key in path:
        section = section.model_fields[key].annotation  # type: ignore[assignment]
    annotation = section.model_fields[leaf].annotation
    return type(None) in getattr(annotation, "__args__", ())
