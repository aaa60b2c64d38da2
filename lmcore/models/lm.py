"""The language-model shell shared by every family: embedding -> body -> (projection) -> decoder.

    model(tokens [T, B], state=None) -> (logits [T, B, vocab], new_state)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import Config, ModelConfig
from .dropout import embedding_dropout, locked_dropout
from .rnn import FusedRNNStack, MogrifierStack
from .transformer import TransformerStack


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        width = config.d_model if config.family == "transformer" else config.hidden
        embedding_size = config.embedding or width
        drop = config.dropout
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        if config.family == "mogrifier":
            self.body = MogrifierStack(embedding_size, config.hidden, config.layers, config.rounds, config.rank,
                                       drop.inter, drop.state)
        elif config.family == "transformer":
            self.body = TransformerStack(embedding_size, config.d_model, config.heads, config.layers,
                                         config.ff or 4 * config.d_model, drop.inter, config.pos_encode,
                                         config.max_len)
        else:
            self.body = FusedRNNStack(config.family, embedding_size, config.hidden, config.layers,
                                      drop.inter, drop.state)
        out = self.body.output_size
        # Tied weights need the decoder's input to be embedding-sized: project when the sizes differ.
        self.projection = nn.Linear(out, embedding_size) if config.tie_weights and out != embedding_size else None
        self.decoder = nn.Linear(embedding_size if config.tie_weights else out, vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: Tensor, state=None) -> tuple[Tensor, object]:
        drop = self.config.dropout
        x = embedding_dropout(self.embedding, tokens, drop.embedding, self.training)
        x = locked_dropout(x, drop.input, self.training)
        x, state = self.body(x, state)
        x = locked_dropout(x, drop.output, self.training)
        if self.projection is not None:
            x = self.projection(x)
        return self.decoder(x), state

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())


def build_model(config: Config | ModelConfig | dict, vocab_size: int) -> LanguageModel:
    """Build any family from the config vocabulary; a `params_budget` is solved into a width first."""
    if isinstance(config, dict):
        config = Config.model_validate(config)
    if isinstance(config, Config):
        config = config.model
    return LanguageModel(solve_budget(config, vocab_size), vocab_size)


def count_parameters(config: ModelConfig, vocab_size: int) -> int:
    with torch.device("meta"):  # no memory, no initialisation: counting is instant
        return LanguageModel(config, vocab_size).num_parameters()


def solve_budget(config: ModelConfig, vocab_size: int) -> ModelConfig:
    """Return config with hidden (d_model for the transformer, in steps of `heads`) set so that the
    parameter count is as close as possible to `params_budget`; unchanged without a budget."""
    if config.params_budget is None:
        return config
    field, step = ("d_model", config.heads) if config.family == "transformer" else ("hidden", 1)

    def count(units: int) -> int:
        return count_parameters(config.model_copy(update={field: units * step, "params_budget": None}), vocab_size)

    if count(1) > config.params_budget:
        raise ValueError(f"model.params_budget: {config.params_budget:,} is below the smallest {config.family} "
                         f"model on this vocabulary ({count(1):,} parameters at width {step})")
    low, high = 1, 1
    while count(high) < config.params_budget:  # the count grows with the width: bracket, then bisect
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < config.params_budget else (low, mid)
    best = min((low, high), key=lambda u: abs(count(u) - config.params_budget))
    return config.model_copy(update={field: best * step})
