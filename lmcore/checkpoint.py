"""One checkpoint file holds everything a run needs: config, vocabulary, model, optimiser, the training
loop's position and every random number generator, so that a resumed run continues identically."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import Config, ModelConfig
from .data import Vocab
from .models import LanguageModel

FORMAT = "lmcore-checkpoint-1"


class Loaded(NamedTuple):
    model: LanguageModel
    vocab: Vocab
    config: Config


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # weights_only=False: the payload holds Python RNG state and plain dicts, written by us.
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lmcore checkpoint (expected format {FORMAT!r})")
    return payload


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """The model (in eval mode, on `device`), its vocabulary and the run's config."""
    payload = read_file(path)
    vocab = Vocab(payload["vocab"])
    model = LanguageModel(ModelConfig.model_validate(payload["model_config"]), len(vocab))
    model.load_state_dict(payload["model"])
    return Loaded(model.to(device).eval(), vocab, Config.model_validate(payload["config"]))
