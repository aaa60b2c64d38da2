"""Which settings each model family reads: the one answer to "does model.rounds matter to an LSTM?" (no).

Summaries and exported configs show a family only the settings it reads; the others keep their defaults, unused.
"""
from __future__ import annotations

from ..config import RNN_FAMILIES

RECURRENT = ("mogrifier", *RNN_FAMILIES)
TRANSFORMER_ONLY = ("d_model", "heads", "ff", "pos_encode", "max_len", "memory")
# The settings only some families read (LanguageModel and its bodies); every setting not named here applies to all.
ONLY_FOR: dict[str, tuple[str, ...]] = {
    "model.hidden": RECURRENT,
    "model.embedding_ratio": RECURRENT,
    "model.dropout.state": RECURRENT,
    "model.rounds": ("mogrifier",),
    "model.rank": ("mogrifier",),
    "model.forget_bias": ("mogrifier", "lstm"),
    **{f"model.{name}": ("transformer",) for name in TRANSFORMER_ONLY},
}


def applies_to(family: str, name: str) -> bool:
    """Whether the dotted setting `name` changes a model of `family` (data, optim, train settings always do)."""
    return family in ONLY_FOR.get(name, (family,))


def width_setting(family: str) -> str:
    """The width a `model.params_budget` is solved into: model.d_model for the transformer, else model.hidden."""
    return "model.d_model" if family == "transformer" else "model.hidden"
