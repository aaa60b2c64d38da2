"""A causal self-attention language-model body (pre-norm blocks), with or without positional encoding."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(length: int, width: int) -> Tensor:
    position = torch.arange(length).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table


class TransformerStack(nn.Module):
    """x [T, B, input] -> [T, B, d_model]. Each window is attended causally on its own: no state is
    carried between windows (the `state` argument is accepted and ignored, None is returned)."""

    def __init__(self, input_size: int, d_model: int, heads: int, layers: int, ff: int, dropout: float,
                 pos_encode: str, max_len: int):
        super().__init__()
        self.d_model, self.pos_encode, self.max_len = d_model, pos_encode, max_len
        self.input_projection = nn.Linear(input_size, d_model) if input_size != d_model else nn.Identity()
        if pos_encode == "sinusoidal":
            self.register_buffer("positions", sinusoidal_table(max_len, d_model), persistent=False)
        elif pos_encode == "learned":
            self.positions = nn.Parameter(torch.zeros(max_len, d_model))
            nn.init.normal_(self.positions, std=0.02)
        block = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, activation="gelu", norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.output_size = d_model

    def forward(self, x: Tensor, state=None) -> tuple[Tensor, None]:
        length = x.shape[0]
        # Scale as pytorch/examples does, so small-initialised embeddings are not drowned by the positions.
        x = self.input_projection(x) * math.sqrt(self.d_model)
        if self.pos_encode != "none":
            if length > self.max_len:
                raise ValueError(f"sequence of {length} tokens is longer than model.max_len={self.max_len}")
            x = x + self.positions[:length].unsqueeze(1).to(x.dtype)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        return self.blocks(x, mask=mask, is_causal=True), None
