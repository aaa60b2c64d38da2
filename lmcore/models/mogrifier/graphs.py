"""The Mogrifier fast path replayed as CUDA graphs: two launches per sequence instead of thousands.

On CUDA the fast path's loops (fast.py) issue ~60 small kernels per layer and time step from Python; at the
paper's shape that launch overhead, not arithmetic, sets the speed. The loops have no host syncs and allocate
their buffers once per call, so the forward and the backward of a whole sequence (fast.py's
`_MogrifierLSTMFunction.forward` and `.backward`, called directly, outside autograd) are captured as two CUDA
graphs, and an autograd Function replays them.

A graph holds fixed shapes, fixed tensor addresses and fixed kernels, so there is one pair per input shape, dtype,
autocast dtype, TF32 setting, Triton kernels or not (fast.py), mask or not, and the addresses of the parameters (a
parameter moved to new memory, e.g. by `.to()`, gets a new pair). A key is captured the second time it is seen
with gradients on (the last, shorter window of an epoch is seen once per epoch and stays eager); each layer keeps
at most `MAX_GRAPHS` pairs (least recently used go), since each holds its buffers' memory. Without gradients
(evaluation) the eager fast path runs, and so does a second forward of a key whose first has not had its backward
yet (the buffers are the graph's own).
`MogrifierLSTMLayer.cuda_graphs = False`, or LMCORE_CUDA_GRAPHS=0, turns graphs off.
"""
from __future__ import annotations

import os
import weakref
from collections import Counter, OrderedDict

import torch
from torch import Tensor

from .fast import _MogrifierLSTMFunction, mogrifier_lstm, triton_enabled

MAX_GRAPHS = 8

# Per layer: its captured graphs (key -> Captured) and how often each key was seen. Kept beside the layer, not
# in it, so that copying, pickling or saving a layer never meets a CUDA graph.
_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get("LMCORE_CUDA_GRAPHS", "1") != "0"


def applies(x: Tensor) -> bool:
    """Graphs help where the launches are the cost: CUDA, with gradients (training); elsewhere the eager path."""
    return x.is_cuda and enabled() and torch.is_grad_enabled()


class _Ctx:
    """What fast.py's Function uses of its autograd context, for calling it outside autograd."""

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        self.saved_tensors = tensors


class _Token:
    """Alive while a replayed forward's backward is still to come (its autograd graph holds it)."""


class Captured:
    """The forward and backward graphs of one key, over static input, output and gradient buffers.

    inputs: x, h0, c0, [mask,] then W_ih, W_hh, bias and the rounds' parameters (the parameters are used in
    place: the graphs read their current values)."""

    def __init__(self, inputs: list[Tensor], low_rank: tuple[bool, ...], masked: bool, dtype: torch.dtype | None):
        self.low_rank, self.masked, self.dtype = low_rank, masked, dtype
        self.user = 3 + masked  # x, h0, c0, [mask]: copied into the static buffers at every replay
        self.inputs = [t.detach().clone() for t in inputs[: self.user]] + [p.detach() for p in inputs[self.user :]]
        self.pending: weakref.ref | None = None
        self._capture()

    def _capture(self) -> None:
        device = self.inputs[0].device  # e.g. cuda:1: entering the stream's context makes it the current device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up where the capture runs (lazy cuBLAS workspaces, allocator)
            for _ in range(2):
                outputs = self._forward()
                self.grad_outputs = [torch.ones_like(o) for o in outputs]
                self._backward()
        torch.cuda.current_stream(device).wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, pool=pool, stream=stream):
            self.outputs = self._forward()
        with torch.cuda.graph(self.backward_graph, pool=pool, stream=stream):
            self.grads = self._backward()

    def _forward(self) -> tuple[Tensor, Tensor, Tensor]:
        """fast.py's forward on the static inputs, cast as `mogrifier_lstm` casts them under autocast."""
        x, h0, c0, *rest = self.inputs
        mask, params = (rest[0], rest[1:]) if self.masked else (None, rest)
        if self.dtype is not None:
            x, h0, *params = (t.to(self.dtype) for t in (x, h0, *params))
            c0 = c0.float()
            mask = None if mask is None else mask.to(self.dtype)
        self.ctx = _Ctx()
        with torch.autocast(x.device.type, enabled=False), torch.no_grad():
            return _MogrifierLSTMFunction.forward(self.ctx, self.low_rank, True, x.contiguous(), h0, c0, mask,
                                                  *params)

    def _backward(self) -> list[Tensor | None]:
        """fast.py's backward from the static output gradients: a gradient per input, in the input's dtype."""
        with torch.autocast(self.inputs[0].device.type, enabled=False), torch.no_grad():
            grads = list(_MogrifierLSTMFunction.backward(self.ctx, *self.grad_outputs)[2:])  # not low_rank, keep
        if not self.masked:
            del grads[3]  # the mask's (None)
        return [None if g is None else g.to(t.dtype) for g, t in zip(grads, self.inputs)]

    def busy(self) -> bool:
        return self.pending is not None and self.pending() is not None


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, captured: Captured, *inputs: Tensor):
        for static, given in zip(captured.inputs[: captured.user], inputs):
            static.copy_(given)
        captured.forward_graph.replay()
        ctx.captured, ctx.token = captured, _Token()
        captured.pending = weakref.ref(ctx.token)
        # The static outputs are overwritten at the next replay: hand out copies.
        return tuple(o.clone() for o in captured.outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        captured = ctx.captured
        for static, given in zip(captured.grad_outputs, grad_outputs):
            static.copy_(given)
        captured.backward_graph.replay()
        captured.pending = None
        return (None, *(g.clone() if g is not None and need else None
                        for g, need in zip(captured.grads, ctx.needs_input_grad[1:])))


def _autocast_dtype(device: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _key(inputs: list[Tensor], low_rank: tuple[bool, ...], masked: bool) -> tuple:
    # A graph keeps the kernels it was captured with: TF32 or not, and Triton's or torch's, are part of the key.
    return (low_rank, masked, _autocast_dtype(inputs[0].device.type), torch.backends.cuda.matmul.allow_tf32,
            triton_enabled(),
            tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in inputs),
            tuple(t.data_ptr() for t in inputs[3 + masked:]))


def graphed_mogrifier_lstm(layer, x: Tensor, state: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                           weight_ih: Tensor, weight_hh: Tensor, bias: Tensor,
                           round_params: list[tuple[Tensor, ...]]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`mogrifier_lstm` (same arguments) through the layer's graphs for this key, captured on the key's second
    sighting; `mogrifier_lstm` itself where no graph applies."""
    params = [weight_ih, weight_hh, bias] + [p for ps in round_params for p in ps]
    if not any(p.requires_grad for p in params):
        return mogrifier_lstm(x, state, mask, weight_ih, weight_hh, bias, round_params)
    h0, c0 = state if state is not None else (x.new_zeros(x.shape[1], weight_hh.shape[1]),) * 2
    low_rank = tuple(len(ps) == 3 for ps in round_params)
    masked = mask is not None
    inputs = [x.contiguous(), h0, c0] + ([mask.detach()] if masked else []) + params
    key = _key(inputs, low_rank, masked)
    graphs = _graphs.setdefault(layer, OrderedDict())
    captured = graphs.get(key)
    if captured is None:
        seen = _seen.setdefault(layer, Counter())
        seen[key] += 1
        if seen[key] >= 2:
            captured = graphs[key] = Captured(inputs, low_rank, masked, _autocast_dtype(x.device.type))
            del seen[key]
            while len(graphs) > MAX_GRAPHS:
                graphs.popitem(last=False)
    if captured is None or captured.busy():
        return mogrifier_lstm(x, (h0, c0), mask, weight_ih, weight_hh, bias, round_params)
    graphs.move_to_end(key)
    out, h, c = _Replay.apply(captured, *inputs)
    return out, (h, c)


def captured(layer) -> int:
    """How many graph pairs the layer holds (for tests and the GPU check)."""
    return len(_graphs.get(layer, ()))
