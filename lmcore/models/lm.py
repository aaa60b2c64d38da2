"""The language-model shell shared by every family: embedding -> body -> (projection) -> decoder.

    model(tokens [T, B], state=None) -> (scores [T, B, vocab], new_state)

The scores are logits; with a mixture of softmaxes (K > 1) they are normalised log-probabilities, which
are their own log-softmax, so cross-entropy (the training and evaluation loss) reads both the same way.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import Config, ModelConfig
from .dropout import embedding_dropout, sequence_dropout
from .rnn import FusedRNNStack, MogrifierStack
from .transformer import TransformerStack


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config, self.vocab_size = config, vocab_size
        self.logit_scale = 1.0  # multiplies the logits; evaluation may set it (eval.logit_scale), training never
        embedding_size = embedding_width(config)
        drop = config.dropout
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        if config.family == "mogrifier":
            self.body = MogrifierStack(embedding_size, config.hidden, config.layers, config.rounds, config.rank,
                                       drop.inter, drop.state, drop.mask)
        elif config.family == "transformer":
            self.body = TransformerStack(embedding_size, config.d_model, config.heads, config.layers,
                                         config.ff or 4 * config.d_model, drop.inter, config.pos_encode,
                                         config.max_len, config.memory)
        else:
            self.body = FusedRNNStack(config.family, embedding_size, config.hidden, config.layers,
                                      drop.inter, drop.state, drop.mask)
        if config.forget_bias:
            self.body.add_forget_bias(config.forget_bias)
        out = self.body.output_size
        decoder_input = embedding_size if config.tie_weights else out
        if config.softmax_mixtures > 1:  # the mixture's latent layer also does the tying projection
            self.projection = None
            self.mixture = MixtureOfSoftmaxes(out, decoder_input, config.softmax_mixtures, drop.latent, drop.mask)
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
        x = sequence_dropout(x, drop.input, self.training, drop.mask)
        x, state = self.body(x, state)
        x = sequence_dropout(x, drop.output, self.training, drop.mask)
        if self.mixture is not None:
            return self.mixture(x, self.decoder, self.logit_scale), state
        if self.projection is not None:
            x = sequence_dropout(self.projection(x), drop.latent, self.training, drop.mask)
        logits = self.decoder(x)
        return (logits if self.logit_scale == 1 else logits * self.logit_scale), state

    def num_parameters(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())


class MixtureOfSoftmaxes(nn.Module):
    """Yang et al. (2018): K softmaxes over the (shared, possibly tied) decoder, each fed its own tanh
    latent of the hidden state, mixed by a softmax prior. Returns normalised log-probabilities. Each latent
    has its own dropout mask (`dropout`, drawn per sequence or per step as `mask` says), as in lamb and
    zihangdai/mos."""

    def __init__(self, hidden: int, decoder_input: int, components: int, dropout: float = 0.0,
                 mask: str = "sequence"):
        super().__init__()
        self.components, self.dropout, self.mask = components, dropout, mask
        self.latent = nn.Linear(hidden, components * decoder_input)
        self.prior = nn.Linear(hidden, components, bias=False)  # as in zihangdai/mos

    def forward(self, x: Tensor, decoder: nn.Linear, logit_scale: float = 1.0) -> Tensor:
        latent = sequence_dropout(torch.tanh(self.latent(x)), self.dropout, self.training, self.mask)
        latent = latent.unflatten(-1, (self.components, -1))  # [T, B, K, decoder_input]
        log_probs = torch.log_softmax(decoder(latent).float() * logit_scale, dim=-1)  # [T, B, K, vocab]
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


def embedding_width(config: ModelConfig) -> int:
    """The embedding size: model.embedding, else round(model.embedding_ratio * hidden), else the width."""
    if config.embedding is not None:
        return config.embedding
    if config.embedding_ratio is not None:
        return max(1, round(config.embedding_ratio * config.hidden))  # lamb's round_to_int
    return config.d_model if config.family == "transformer" else config.hidden


def solve_budget(config: ModelConfig, vocab_size: int) -> ModelConfig:
    """Return config with hidden (d_model for the transformer, in steps of `heads`) set so that the
    parameter count is as close as possible to `params_budget` (`budget_rule` nearest) or as large as
    possible without exceeding it (within, as lamb's _budget_hidden_size); unchanged without a budget.
    An `embedding_ratio` keeps the embedding tied to the width while solving."""
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
    if config.budget_rule == "within":
        best = high if count(high) <= config.params_budget else low
    else:
        best = min((low, high), key=lambda u: abs(count(u) - config.params_budget))
    return config.model_copy(update={field: best * step})
