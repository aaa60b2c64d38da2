"""The RNN baselines (LSTM, GRU, tanh-RNN) on PyTorch's fused modules, so they run on cuDNN on a GPU."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .dropout import locked_dropout, variational_mask
from .mogrifier import MogrifierLSTMLayer

FUSED = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class FusedRNNStack(nn.Module):
    """`layers` single-layer fused RNNs with variational dropout between them.

    State dropout: a fused kernel runs the whole sequence in one call, so h cannot be masked per step
    from outside. Dropping columns of W_hh is the same as dropping units of h at every step, with one
    mask per batch instead of per sequence (DropConnect on W_hh, as in AWD-LSTM) and keeps cuDNN.
    """

    def __init__(self, family: str, input_size: int, hidden_size: int, layers: int, inter: float, state: float):
        super().__init__()
        self.hidden_size, self.inter, self.state = hidden_size, inter, state
        self.layers = nn.ModuleList(
            FUSED[family](input_size if i == 0 else hidden_size, hidden_size) for i in range(layers)
        )
        self.output_size = hidden_size

    def forward(self, x: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        state = state if state is not None else [None] * len(self.layers)
        new_state = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = locked_dropout(x, self.inter, self.training)
            if self.training and self.state > 0:
                weights = dict(layer.named_parameters())
                keep = variational_mask(1, self.hidden_size, self.state, x)
                weights["weight_hh_l0"] = weights["weight_hh_l0"] * keep
                x, s = functional_call(layer, weights, (x, state[i]))
            else:
                x, s = layer(x, state[i])
            new_state.append(s)
        return x, new_state


class MogrifierStack(nn.Module):
    """`layers` Mogrifier LSTM layers with variational inter-layer and state dropout (per sequence)."""

    def __init__(self, input_size: int, hidden_size: int, layers: int, rounds: int, rank: int | None,
                 inter: float, state: float):
        super().__init__()
        self.hidden_size, self.inter, self.state = hidden_size, inter, state
        self.layers = nn.ModuleList(
            MogrifierLSTMLayer(input_size if i == 0 else hidden_size, hidden_size, rounds, rank)
            for i in range(layers)
        )
        self.output_size = hidden_size

    def forward(self, x: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        state = state if state is not None else [None] * len(self.layers)
        new_state = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = locked_dropout(x, self.inter, self.training)
            mask = None
            if self.training and self.state > 0:
                mask = variational_mask(x.shape[1], self.hidden_size, self.state, x)
            x, s = layer(x, state[i], mask)
            new_state.append(s)
        return x, new_state


def detach_state(state):
    """Cut the graph between BPTT windows (state is a tensor, or nested tuples/lists of tensors)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)
