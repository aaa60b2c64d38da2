"""A causal self-attention language-model body (pre-norm blocks), optionally with a Transformer-XL memory.

With `memory` M > 0 each block also attends over the (detached) inputs it saw for the previous M tokens,
so context crosses window boundaries as an RNN's state does (Dai et al., 2019). The memory is the body's
`state`: returned by forward, passed back in, reset (None) wherever the RNN families reset theirs.
Positions: none, absolute (sinusoidal / learned; only without a memory) or rotary (RoPE, relative).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

if TYPE_CHECKING:  # imported where used: torch.nn.attention.bias pulls in torch._dynamo (a second per process)
    from torch.nn.attention.bias import CausalBias


def sinusoidal_table(length: int, width: int) -> Tensor:
    position = torch.arange(length).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return table


def rotate(x: Tensor, positions: Tensor) -> Tensor:
    """Rotary position embedding of x [B, H, L, head] at `positions` [L] (Su et al., 2021). Pairs of
    features turn by position-dependent angles, so a query-key product depends only on their distance.
    An odd last feature is left as it is."""
    half = x.shape[-1] // 2
    frequency = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / max(half, 1))
    angles = positions.float().unsqueeze(1) * frequency  # [L, half]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class Attention(nn.Module):
    """Multi-head attention of the window's queries over [memory; window] keys and values. The same
    parameters as nn.MultiheadAttention (one in_proj for q, k, v; out_proj), so counts do not move."""

    def __init__(self, d_model: int, heads: int, dropout: float, rope: bool):
        super().__init__()
        self.heads, self.dropout, self.rope = heads, dropout, rope
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj.weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, context: Tensor, mask: CausalBias | None) -> Tensor:
        """x [T, B, d] (normed window), context [M + T, B, d] (normed memory and window)."""
        d = x.shape[-1]
        w_q, w_kv = self.in_proj.weight.split([d, 2 * d])
        b_q, b_kv = self.in_proj.bias.split([d, 2 * d])
        q = self.split_heads(F.linear(x, w_q, b_q))
        k, v = (self.split_heads(t) for t in F.linear(context, w_kv, b_kv).chunk(2, dim=-1))
        if self.rope:  # the window's queries sit at the last T of the context's M + T positions
            positions = torch.arange(context.shape[0], device=x.device)
            q, k = rotate(q, positions[-x.shape[0]:]), rotate(k, positions)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.permute(2, 0, 1, 3).flatten(2))

    def split_heads(self, t: Tensor) -> Tensor:
        """[L, B, d] -> [B, heads, L, d / heads]."""
        return t.unflatten(-1, (self.heads, -1)).permute(1, 2, 0, 3)


class Block(nn.Module):
    """Pre-norm block: x + attention(norm x over [memory; window]), then x + feed-forward(norm x).
    The parameters of nn.TransformerEncoderLayer(norm_first=True, activation="gelu")."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float, rope: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = Attention(d_model, heads, dropout, rope)
        self.feed_forward = nn.Sequential(nn.Linear(d_model, ff), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(ff, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor | None, mask: CausalBias | None) -> Tensor:
        normed = self.norm1(x)
        context = normed if memory is None else torch.cat([self.norm1(memory), normed])
        x = x + self.dropout(self.attention(normed, context, mask))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


def attention_mask(length: int, memory_length: int) -> CausalBias | None:
    """[T, M + T]: a query may attend to every memory slot and the window up to itself; None without a memory
    (plain causal attention). Causal aligned to the lower right, as a bias object rather than a boolean
    tensor: on CUDA scaled_dot_product_attention then keeps its flash and memory-efficient kernels, which a
    boolean mask rules out; elsewhere it is the same mask, made when used."""
    if memory_length == 0:
        return None
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(length, memory_length + length)


class TransformerStack(nn.Module):
    """x [T, B, input] -> [T, B, d_model]. Without a memory each window is attended on its own and the
    state is None; with `memory` M the state is one [<= M, B, d_model] tensor per block: the block's
    inputs for the most recent tokens, detached (no gradient flows into earlier windows)."""

    def __init__(self, input_size: int, d_model: int, heads: int, layers: int, ff: int, dropout: float,
                 pos_encode: str, max_len: int, memory: int = 0):
        super().__init__()
        self.d_model, self.pos_encode, self.max_len, self.memory = d_model, pos_encode, max_len, memory
        self.input_projection = nn.Linear(input_size, d_model) if input_size != d_model else nn.Identity()
        if pos_encode == "sinusoidal":
            self.register_buffer("positions", sinusoidal_table(max_len, d_model), persistent=False)
        elif pos_encode == "learned":
            self.positions = nn.Parameter(torch.zeros(max_len, d_model))
            nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads, ff, dropout, pos_encode == "rope") for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.output_size = d_model

    def forward(self, x: Tensor, state: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor] | None]:
        length = x.shape[0]
        # Scale as pytorch/examples does, so small-initialised embeddings are not drowned by the positions.
        x = self.input_projection(x) * math.sqrt(self.d_model)
        if self.pos_encode in ("sinusoidal", "learned"):
            if length > self.max_len:
                raise ValueError(f"sequence of {length} tokens is longer than model.max_len={self.max_len}")
            x = x + self.positions[:length].unsqueeze(1).to(x.dtype)
        memories = [None] * len(self.blocks) if state is None or not self.memory else state
        mask = attention_mask(length, 0 if memories[0] is None else memories[0].shape[0])
        new_state = []
        for block, memory in zip(self.blocks, memories):
            memory = None if memory is None else memory.detach()
            if self.memory:  # Transformer-XL's update: mem = cat(mem, h)[-M:], detached
                new_state.append((x if memory is None else torch.cat([memory, x]))[-self.memory:].detach())
            x = block(x, memory, mask)
        return self.norm(x), (new_state if self.memory else None)
