"""One checkpoint file holds everything a run needs: config, vocabulary, model, optimiser, the training
loop's position and every random number generator, so that a resumed run continues identically.

`save` and `restore` are the pair that writes and resumes it; `load_checkpoint` reads one for evaluation.
Every file is read with `torch.load(weights_only=True)`: tensors and plain values only, so a crafted file
cannot run code. A file that is not a readable checkpoint of ours is one `CheckpointError` naming it.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import files
from .config import Config, ModelConfig
from .data import DataError, Vocab
from .models import LanguageModel

FORMAT = "lmcore-checkpoint-1"
KEYS = ("config", "model_config", "vocab", "model", "optimizer", "loop", "rng")


class CheckpointError(DataError):
    """A checkpoint that cannot be used: missing, unreadable, not ours, or refused as unsafe."""


class Loaded(NamedTuple):
    model: LanguageModel
    vocab: Vocab
    config: Config


def read_file(path: str | Path) -> dict[str, Any]:
    """The payload of an lmcore checkpoint; CheckpointError (naming the file) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain values "
                                  f"(a file crafted to run code looks like this); not loaded") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt)") from None
    except Exception:  # torch raises RuntimeError, EOFError, ValueError ... for truncated or foreign bytes
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not all(k in payload for k in KEYS):
        raise CheckpointError(f"{path}: not an lmcore checkpoint (expected format {FORMAT!r})")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """The model (in eval mode, on `device`), its vocabulary and the run's config."""
    payload = read_file(path)
    try:
        vocab = Vocab(payload["vocab"])
        model = LanguageModel(ModelConfig.model_validate(payload["model_config"]), len(vocab))
        model.load_state_dict(payload["model"])
        config = Config.model_validate(payload["config"])
    except Exception as err:  # a payload of the right format whose parts do not fit together
        raise CheckpointError(f"{path}: inconsistent checkpoint ({type(err).__name__})") from None
    return Loaded(model.to(device).eval(), vocab, config)


def saved_config(path: str | Path) -> Config:
    """The config a checkpoint was trained with (what `--resume` continues)."""
    try:
        return Config.model_validate(read_file(path)["config"])
    except ValueError:
        raise CheckpointError(f"{path}: its config is not valid for this version of lmcore") from None


# -- the training loop's side ------------------------------------------------------------------------


def rng_state(windows: torch.Generator) -> dict[str, Any]:
    """Every generator a run draws from, as tensors and plain values (loadable with weights_only=True)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "windows": windows.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any], windows: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    windows.set_state(state["windows"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, *, config: Config, model: LanguageModel, optimizer: torch.optim.Optimizer,
         vocab: Vocab, loop: dict[str, Any], windows: torch.Generator, averaging: dict[str, Any] | None = None
         ) -> None:
    """Write a resumable checkpoint atomically: a crash mid-write never leaves a truncated file behind.
    `averaging`: the weight averager's state (lmcore/averaging.py), when the model holds averaged weights."""
    payload = {"format": FORMAT, "config": config.model_dump(), "model_config": model.config.model_dump(),
               "vocab": vocab.to_list(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "loop": dict(loop), "rng": rng_state(windows), "averaging": averaging}
    files.write_atomically(path, lambda f: torch.save(payload, f))


def restore(path: str | Path, *, model: LanguageModel, optimizer: torch.optim.Optimizer,
            windows: torch.Generator, vocab: Vocab, averager=None) -> dict[str, Any]:
    """Load `save`'s file into the model, optimiser, generators (and weight averager); returns the loop's
    position."""
    saved = read_file(path)
    if saved["vocab"] != vocab.to_list():
        raise CheckpointError(f"{path}: trained on another vocabulary than this run's data")
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], windows)
        if averager is not None:
            averager.load(saved.get("averaging"))  # puts the training weights back under the saved average
        return dict(saved["loop"])
    except Exception as err:
        raise CheckpointError(f"{path}: does not fit this run's model and optimiser ({type(err).__name__}: "
                              f"{files.short_repr(str(err), 160)})") from None
