"""The language-model shell shared by every family: embedding -> body -> (projection) -> decoder.

    model(tokens [T, B], state=None) -> (scores [T, B, vocab], new_state)

The scores are logits; with a mixture of softmaxes (K > 1) they are normalised log-probabilities, which
are their own log-softmax, so cross-entropy (the training and evaluation loss) reads both the same way.
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
                                         config.max_len, config.memory)
        else:
            self.body = FusedRNNStack(config.family, embedding_size, config.hidden, config.layers,
                                      drop.inter, drop.state)
        out = self.body.output_size
        decoder_input = embedding_size if config.tie_weights else out
        if config.softmax_mixtures > 1:  # the mixture's latent layer also does the tying projection
            self.projection = None
            self.mixture = MixtureOfSoftmaxes(out, decoder_input, config.softmax_mixtures)
        else:
            # Tied weights need the decoder's input to be embedding-sized: project when the sizes differ.
            self.projection = nn.Linear(out, embedding_size) if decoder_input != out else None
            self.mixture = None
        self.decoder = nn.Linear(decoder_input, vocab_size)
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
        if self.mixture is not None:
            return self.mixture(x, self.decoder), state
        if self.projection is not None:
            x = self.projection(x)
        return self.decoder(x), state

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())


class MixtureOfSoftmaxes(nn.Module):
    """Yang et al. (2018): K softmaxes over the (shared, possibly tied) decoder, each fed its own tanh
    latent of the hidden state, mixed by a softmax prior. Returns normalised log-probabilities."""

    def __init__(self, hidden: int, decoder_input: int, components: int):
        super().__init__()
        self.components = components
        self.latent = nn.Linear(hidden, components * decoder_input)
        self.prior = nn.Linear(hidden, components, bias=False)  # as in zihangdai/mos

    def forward(self, x: Tensor, decoder: nn.Linear) -> Tensor:
        latent = torch.tanh(self.latent(x)).unflatten(-1, (self.components, -1))  # [T, B, K, decoder_input]
        log_probs = torch.log_softmax(decoder(latent).float(), dim=-1)  # [T, B, K, vocab]
        log_prior = torch.log_softmax(self.prior(x).float(), dim=-1).unsqueeze(-1)  # [T, B, K, 1]
        return torch.logsumexp(log_prior + log_probs, dim=-2)


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
