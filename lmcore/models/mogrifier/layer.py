"""The Mogrifier LSTM (Melis, Kocisky, Blunsom, ICLR 2020).

Before each LSTM step the input x and the previous output h gate each other for `rounds` rounds,
counted from 1: odd rounds  x <- 2*sigmoid(Q_i h + b_i) * x,  even rounds  h <- 2*sigmoid(R_i x + b_i) * h.
Every round has its own matrix and bias; with `rank=k` each matrix is a product (out x k)(k x in).
The cell state is not mogrified, and rounds=0 is exactly an LSTM (gate order i, f, g, o as torch.nn.LSTM).

`MogrifierLSTMLayer.forward_reference` is the straightforward step-by-step version that the tests
check the equations against; `forward` picks the fastest implementation that applies: the hand-written
backward-through-time of `lmcore.models.mogrifier.fast` (one autograd node per sequence), unless
`MogrifierLSTMLayer.fast_path` (class-wide, or per instance) is set to False. On CUDA, when training, the fast
path is replayed as CUDA graphs (graphs.py) unless `MogrifierLSTMLayer.cuda_graphs` is set to False.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import graphs
from .fast import mogrifier_lstm


class MogrifierRound(nn.Module):
    """One round: out-vector <- 2*sigmoid(M @ in-vector + b) * out-vector, M full or low rank."""

    def __init__(self, out_size: int, in_size: int, rank: int | None = None):
        super().__init__()
        self.out_size, self.in_size, self.rank = out_size, in_size, rank
        if rank is None:
            self.weight = nn.Parameter(torch.empty(out_size, in_size))
        else:
            self.left = nn.Parameter(torch.empty(out_size, rank))
            self.right = nn.Parameter(torch.empty(rank, in_size))
        self.bias = nn.Parameter(torch.empty(out_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small weights and zero bias: 2*sigmoid(.) starts near 1, so the layer starts close to an LSTM.
        if self.rank is None:
            nn.init.uniform_(self.weight, -1 / math.sqrt(self.in_size), 1 / math.sqrt(self.in_size))
        else:
            nn.init.uniform_(self.left, -1 / math.sqrt(self.rank), 1 / math.sqrt(self.rank))
            nn.init.uniform_(self.right, -1 / math.sqrt(self.in_size), 1 / math.sqrt(self.in_size))
        nn.init.zeros_(self.bias)

    def matrix(self) -> Tensor:
        """The (out x in) matrix of this round."""
        return self.weight if self.rank is None else self.left @ self.right

    def forward(self, target: Tensor, source: Tensor) -> Tensor:
        if self.rank is None:
            pre = nn.functional.linear(source, self.weight, self.bias)
        else:
            pre = nn.functional.linear(nn.functional.linear(source, self.right), self.left, self.bias)
        return 2 * torch.sigmoid(pre) * target


class MogrifierLSTMLayer(nn.Module):
    """One Mogrifier LSTM layer over a whole sequence: x [T, B, input] -> h [T, B, hidden]."""

    # Escape hatch: `MogrifierLSTMLayer.fast_path = False` (all layers) or `layer.fast_path = False`
    # (one layer) makes `forward` run `forward_reference`.
    fast_path: bool = True
    # On CUDA with gradients: replay the fast path as CUDA graphs (graphs.py); False: the eager fast path.
    cuda_graphs: bool = True

    def __init__(self, input_size: int, hidden_size: int, rounds: int = 5, rank: int | None = None):
        super().__init__()
        self.input_size, self.hidden_size, self.rounds, self.rank = input_size, hidden_size, rounds, rank
        n = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * n, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * n, n))
        self.bias = nn.Parameter(torch.empty(4 * n))
        # Round i (from 1): odd rounds update x from h (input x hidden), even rounds h from x.
        self.mogrify_rounds = nn.ModuleList(
            MogrifierRound(input_size, n, rank) if i % 2 == 1 else MogrifierRound(n, input_size, rank)
            for i in range(1, rounds + 1)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.hidden_size)  # torch.nn.LSTM's initialisation
        for p in (self.weight_ih, self.weight_hh, self.bias):
            nn.init.uniform_(p, -bound, bound)
        for r in self.mogrify_rounds:
            r.reset_parameters()

    def mogrify(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        for i, round_ in enumerate(self.mogrify_rounds, start=1):
            if i % 2 == 1:
                x = round_(x, h)
            else:
                h = round_(h, x)
        return x, h

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, state_mask: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if self.fast_path and x.shape[0] > 0 and not (state_mask is not None and state_mask.requires_grad):
            return self.forward_fast(x, state, state_mask)
        return self.forward_reference(x, state, state_mask)

    def forward_fast(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, state_mask: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Same as `forward_reference`, with a hand-written backward through time (fast.py)."""
        round_params = [
            (r.weight, r.bias) if r.rank is None else (r.left, r.right, r.bias) for r in self.mogrify_rounds
        ]
        if self.cuda_graphs and graphs.applies(x):
            return graphs.graphed_mogrifier_lstm(self, x, state, state_mask, self.weight_ih, self.weight_hh, self.bias,
                                                 round_params)
        return mogrifier_lstm(x, state, state_mask, self.weight_ih, self.weight_hh, self.bias, round_params)

    def forward_reference(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None, state_mask: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [T, B, input]; state (h, c) each [B, hidden]; state_mask [B, hidden] multiplies h
        (variational state dropout: the same mask at every step) before it is used."""
        if state is None:
            zeros = x.new_zeros(x.shape[1], self.hidden_size)
            state = (zeros, zeros)
        h, c = state
        outputs = []
        for x_t in x:
            h_in = h if state_mask is None else h * state_mask
            x_t, h_in = self.mogrify(x_t, h_in)
            gates = nn.functional.linear(x_t, self.weight_ih, self.bias) + nn.functional.linear(h_in, self.weight_hh)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), (h, c)
