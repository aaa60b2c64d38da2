"""The RNN baselines (LSTM, GRU, tanh-RNN) on PyTorch's fused modules, so they run on cuDNN on a GPU."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .dropout import sequence_dropout, variational_mask
from .mogrifier import MogrifierLSTMLayer

FUSED = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RecurrentStack(nn.Module):
    """`layers` recurrent layers with dropout between them (one mask per sequence or per step, as `mask`
    says); the subclass says how one layer runs with state dropout."""

    def __init__(self, layers: nn.ModuleList, hidden_size: int, inter: float, state: float,
                 mask: str = "sequence"):
        super().__init__()
        self.layers, self.hidden_size, self.output_size = layers, hidden_size, hidden_size
        self.inter, self.state, self.mask = inter, state, mask

    def forward(self, x: Tensor, state: list | None = None) -> tuple[Tensor, list]:
        state = state if state is not None else [None] * len(self.layers)
        new_state = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = sequence_dropout(x, self.inter, self.training, self.mask)
            x, s = self.run_layer(layer, x, state[i], self.training and self.state > 0)
            new_state.append(s)
        return x, new_state

    def run_layer(self, layer: nn.Module, x: Tensor, state, drop_state: bool):
        raise NotImplementedError

    @torch.no_grad()
    def add_forget_bias(self, value: float) -> None:
        """Add `value` to every layer's forget-gate bias (gate order i, f, g, o; lamb's forget_bias)."""
        n = self.hidden_size
        for layer in self.layers:
            bias = layer.bias if isinstance(layer, MogrifierLSTMLayer) else layer.bias_ih_l0
            bias[n : 2 * n] += value


class FusedRNNStack(RecurrentStack):
    """Single-layer fused RNNs (LSTM, GRU or tanh-RNN) stacked.

    State dropout: a fused kernel runs the whole sequence in one call, so h cannot be masked per step
    from outside. Dropping columns of W_hh is the same as dropping units of h at every step, with one
    mask per batch instead of per sequence (DropConnect on W_hh, as in AWD-LSTM) and keeps cuDNN.
    """

    def __init__(self, family: str, input_size: int, hidden_size: int, layers: int, inter: float, state: float,
                 mask: str = "sequence"):
        super().__init__(nn.ModuleList(FUSED[family](input_size if i == 0 else hidden_size, hidden_size)
                                       for i in range(layers)), hidden_size, inter, state, mask)

    def run_layer(self, layer: nn.Module, x: Tensor, state, drop_state: bool):
        if not drop_state:
            return layer(x, state)
        weights = dict(layer.named_parameters())
        keep = variational_mask(1, self.hidden_size, self.state, x)
        weights["weight_hh_l0"] = weights["weight_hh_l0"] * keep
        return functional_call(layer, weights, (x, state))


class MogrifierStack(RecurrentStack):
    """Mogrifier LSTM layers stacked, with state dropout masks drawn per sequence."""

    def __init__(self, input_size: int, hidden_size: int, layers: int, rounds: int, rank: int | None,
                 inter: float, state: float, mask: str = "sequence"):
        super().__init__(nn.ModuleList(MogrifierLSTMLayer(input_size if i == 0 else hidden_size, hidden_size,
                                                          rounds, rank) for i in range(layers)),
                         hidden_size, inter, state, mask)

    def run_layer(self, layer: nn.Module, x: Tensor, state, drop_state: bool):
        mask = variational_mask(x.shape[1], self.hidden_size, self.state, x) if drop_state else None
        return layer(x, state, mask)


def detach_state(state):
    """Cut the graph between BPTT windows (state is a tensor, or nested tuples/lists of tensors)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)
