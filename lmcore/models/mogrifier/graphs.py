"""The Mogrifier fast path replayed as CUDA graphs: one launch per sequence instead of thousands.

On CUDA the fast path's loops (fast.py) issue ~60 small kernels per layer and time step from Python; at the
paper's shape that launch overhead, not arithmetic, sets the speed. The loops have no host syncs and allocate
their buffers once per call, so the forward and the backward of a whole sequence can be captured as CUDA
graphs (`torch.cuda.make_graphed_callables`) and replayed.

A graph holds fixed shapes and fixed tensor addresses, so there is one per input shape, dtype, autocast
dtype, mask or not, which inputs need gradients, and the addresses of the parameters (a parameter moved to new
memory, e.g. by `.to()`, gets a new graph). A shape is captured the second time it is seen with gradients on
(the last, shorter window of an epoch is seen once per epoch and stays eager); each layer keeps at most
`MAX_GRAPHS` of them (least recently used go), since each holds its buffers' memory. Without gradients
(evaluation) the eager fast path runs. `MogrifierLSTMLayer.cuda_graphs = False`, or LMCORE_CUDA_GRAPHS=0,
turns this off.
"""
from __future__ import annotations

import os
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from .fast import mogrifier_lstm

MAX_GRAPHS = 8

# Per layer: its captured graphs (key -> callable) and how often each key was seen. Kept beside the layer, not
# in it, so that copying, pickling or saving a layer never meets a CUDA graph.
_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get("LMCORE_CUDA_GRAPHS", "1") != "0"


def applies(x: Tensor, params: list[Tensor]) -> bool:
    """Graphs help where the launches are the cost: CUDA, with gradients (training); elsewhere the eager path."""
    return x.is_cuda and enabled() and torch.is_grad_enabled() and any(p.requires_grad for p in params)


def _autocast_dtype() -> torch.dtype | None:
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _sequence(low_rank: tuple[bool, ...], masked: bool) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The fast path with every input a tensor argument (what a graph captures): x, h0, c0, [mask,] then
    W_ih, W_hh, bias and the rounds' parameters."""

    def run(x, h0, c0, *rest):
        mask, (w_ih, w_hh, bias, *flat) = (rest[0], rest[1:]) if masked else (None, rest)
        round_params, it = [], iter(flat)
        for factored in low_rank:
            round_params.append(tuple(next(it) for _ in range(3 if factored else 2)))
        out, (h, c) = mogrifier_lstm(x, (h0, c0), mask, w_ih, w_hh, bias, round_params)
        return out, h, c

    return run


def _key(args: list[Tensor], low_rank: tuple[bool, ...], masked: bool) -> tuple:
    return (low_rank, masked, _autocast_dtype(),
            tuple((tuple(a.shape), a.dtype, a.requires_grad) for a in args),
            tuple(a.data_ptr() for a in args[3 + masked:]))


def graphed_mogrifier_lstm(layer, x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None, params: list[Tensor],
                           low_rank: tuple[bool, ...]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`mogrifier_lstm` through the layer's graph for this key, captured on the key's second sighting."""
    masked = mask is not None
    args = [x.contiguous(), h0, c0] + ([mask.detach()] if masked else []) + list(params)
    key = _key(args, low_rank, masked)
    graphs = _graphs.setdefault(layer, OrderedDict())
    seen = _seen.setdefault(layer, Counter())
    # make_graphed_callables refuses autocast's weight cache: the fast path casts its weights itself anyway.
    with torch.autocast("cuda", dtype=_autocast_dtype() or torch.bfloat16, enabled=_autocast_dtype() is not None,
                        cache_enabled=False):
        run = graphs.get(key)
        if run is None:
            seen[key] += 1
            if seen[key] < 2:
                out, h, c = _sequence(low_rank, masked)(*args)
                return out, (h, c)
            samples = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args[: 3 + masked])
            run = torch.cuda.make_graphed_callables(_sequence(low_rank, masked), samples + tuple(params))
            graphs[key] = run
            del seen[key]
            while len(graphs) > MAX_GRAPHS:
                graphs.popitem(last=False)
        graphs.move_to_end(key)
        out, h, c = run(*args)
    # The graph's outputs are its own static buffers, overwritten at the next replay: hand out copies.
    return out.clone(), (h.clone(), c.clone())


def captured(layer) -> int:
    """How many graphs the layer holds (for tests and the GPU check)."""
    return len(_graphs.get(layer, ()))
