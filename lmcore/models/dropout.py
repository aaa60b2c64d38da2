"""The dropouts of the AWD-LSTM / lamb line. Masks are variational (drawn once per sequence, i.e. per batch
column, and reused at every time step) or, with `mask="step"`, drawn anew at every step, as lamb's
`shared_mask_dropout False` does; either way scaled by 1/(1-p) so that evaluation needs no rescaling."""
from __future__ import annotations

from torch import Tensor, nn


def variational_mask(batch: int, size: int, p: float, like: Tensor) -> Tensor:
    """A [batch, size] mask of 0 and 1/(1-p)."""
    return like.new_empty(batch, size).bernoulli_(1 - p) / (1 - p)


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout on x [T, B, D] with one mask per sequence (the same units dropped at every step)."""
    if not training or p == 0:
        return x
    return x * variational_mask(x.shape[1], x.shape[2], p, x).unsqueeze(0)


def sequence_dropout(x: Tensor, p: float, training: bool, mask: str) -> Tensor:
    """Dropout on x [T, B, D] with one mask per sequence (`mask="sequence"`) or per step (`"step"`)."""
    if mask == "step":
        return nn.functional.dropout(x, p, training) if p else x
    return locked_dropout(x, p, training)


def embedding_dropout(embedding: nn.Embedding, tokens: Tensor, p: float, training: bool) -> Tensor:
    """Word dropout: drop whole rows of the embedding matrix, i.e. every occurrence of a word type."""
    if not training or p == 0:
        return embedding(tokens)
    weight = embedding.weight
    keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - p) / (1 - p)
    return nn.functional.embedding(tokens, weight * keep)
