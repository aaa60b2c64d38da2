"""Fast path of the Mogrifier LSTM layer: one autograd node per sequence, backward through time by hand.

`MogrifierLSTMLayer.forward` (layer.py) calls `mogrifier_lstm` here; the readable
step-by-step autograd version, `forward_reference`, is what this is tested against. What makes it fast:

* One `torch.autograd.Function` for the whole sequence. The forward loop writes every intermediate into
  buffers allocated once per call ([T, B, ...]) with `out=` ops: no per-step allocation, no autograd
  graph. All per-step views of those buffers are made up front with `unbind`, so the loops do list
  look-ups instead of tensor indexing (each index or slice is a dispatcher call of a few microseconds,
  as much as the arithmetic at B=32, n=256).
* The backward loop runs only the truly sequential chain (the state gradients); the weight gradients
  of all time steps are then a few large matrix products over T*B rows (what cuDNN does for the LSTM).
* A round  t <- 2 sigmoid(M s + b) * t  is computed as  t + t * tanh((M/2) s + b/2)  (the same
  function: 2 sigmoid(z) = 1 + tanh(z/2); halving is exact in floating point): one addmm, one tanh,
  one addcmul, and its backward needs only the round's output and the tanh.
* The LSTM gate matmul of x and h is one addmm against [W_ih | W_hh]^T, pre-transposed and contiguous
  (a transposed view is 2-3x slower on the CPU); the mogrifier writes its final x and h straight into
  the two halves of that matmul's input. The elementwise factors of the gate backward are computed for
  all steps at once after the forward loop, so the per-step gate backward is four elementwise ops.
* On the CPU in float32 the two per-step loops run in C++ (cpu.cpp, compiled at first use by
  cpu.py) on the same buffers: raw row pointers instead of tensor ops, MKL's packed GEMM (on
  other CPUs than Intel's with AVX-512, an AVX-512 kernel) against weights packed once per call, fused
  elementwise passes, and one chunk of batch rows per thread. Where the extension cannot be used
  (another OS/CPU/build, no compiler: see cpu.py),
  or it is disabled (LMCORE_MOGRIFIER_CPP=0), the Python loops below run; they are the readable version
  of what the C++ does, and what runs on CUDA, in float64 and under autocast. On CUDA, with
  LMCORE_MOGRIFIER_TRITON=1, each run of elementwise ops between two matrix products is one Triton kernel
  (triton_steps.py): 36 kernels per step, forward and backward, instead of 60 at the PTB paper's shape.
* On the CPU the big buffers come from a workspace that is reused across calls (workspace.py: fresh memory
  of that size costs page faults on every call).

Works on any device and dtype (float64 for gradcheck). Under autocast the matmuls and activations run in
the autocast dtype, the cell state in float32. The backward is not itself differentiable (no double
backward); a state_mask that requires grad makes `MogrifierLSTMLayer.forward` use the reference.

Where the time goes (2-core CPU, B=32, n=256, 5 rounds, C++ loops, 45 ms per forward + backward): ~60% in
the two loops over time (mostly their small products), ~23% in the weight-gradient products, the rest in
per-call setup (buffers, packing, the gate-backward factors).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .workspace import Carve, release_workspace

__all__ = ["mogrifier_lstm", "release_workspace"]

# Sizes, as in the comments below: T steps, B batch rows, m input size, n hidden size.

Carver = Callable[..., Tensor]  # carve(*shape): the next [shape] buffer of one call's workspace buffer


class Round(NamedTuple):
    """One round's parameters: z = M s + b at full rank, z = L (R s) + b at low rank (s: the source vector)."""

    updates_x: bool  # odd rounds (1, 3, ...) update x from h, even rounds h from x
    version: int  # the version of x (odd) or h (even) this round makes, counted from 1
    matrix: Tensor  # M [target, source], or L [target, rank]
    right: Tensor | None  # R [rank, source]; None at full rank
    bias: Tensor


def _rounds(low_rank: tuple[bool, ...], params: tuple[Tensor, ...] | list[Tensor]) -> list[Round]:
    """The rounds from their flat parameters: per round (M, b), or (L, R, b) where low_rank says so."""
    rounds, params, made = [], iter(params), {True: 0, False: 0}  # made: versions of x (True) and h so far
    for i, factored in enumerate(low_rank, start=1):
        updates_x = i % 2 == 1
        made[updates_x] += 1
        matrix = next(params)
        right = next(params) if factored else None
        rounds.append(Round(updates_x, made[updates_x], matrix, right, next(params)))
    return rounds


def _made_by(round_: Round, x_versions: list, h_versions: list) -> Tensor:
    """The x or h version that a round makes."""
    return (x_versions if round_.updates_x else h_versions)[round_.version]


def _cpp_loops(x: Tensor, c: Tensor):
    """The C++ loops (cpu.cpp) where they apply: CPU, float32, the cell state float32 too, and the
    extension enabled and built; else None (the Python loops run)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or c.dtype != torch.float32:
        return None
    from . import cpu

    return cpu.extension()


def triton_enabled() -> bool:
    """LMCORE_MOGRIFIER_TRITON=1: the Python loops' elementwise work as Triton kernels on CUDA (opt-in until a GPU
    check has measured them: docs/benchmarks.md)."""
    return os.environ.get("LMCORE_MOGRIFIER_TRITON", "0") == "1"


def _triton_steps(x: Tensor):
    """The Triton kernels of a step's elementwise work (triton_steps.py) where they apply: enabled, float32 or
    narrower, and a CUDA tensor (or any under Triton's CPU interpreter, TRITON_INTERPRET=1: the tests); else None
    (the loops' torch ops)."""
    if not triton_enabled() or x.dtype == torch.float64:
        return None
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    from . import triton_steps

    return triton_steps


def _on_device_of(x: Tensor):
    """Triton launches on the current CUDA device, not the tensors': make it x's (e.g. cuda:1)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _or_empty(empty: Tensor):
    """The C++ loops take an empty tensor for None."""
    return lambda t: empty if t is None else t


def _fresh(like: Tensor) -> Carver:
    """New memory for each buffer: without keep the buffers are one step long, and memory that small is cheap
    (the workspace is for the big [T, B, ...] buffers)."""
    return lambda *shape: torch.empty(shape, device=like.device, dtype=like.dtype)


# -- forward ------------------------------------------------------------------------------------------------


@dataclass
class ForwardBuffers:
    """Every buffer the forward writes. With `keep` (gradients wanted) the per-step buffers hold all T steps and
    are saved for the backward; without it they are one step long (`steps` = 1) and reused at every step."""

    carve: Carver  # the rest of the workspace buffer: the loops' copies of the weights
    steps: int
    out: Tensor  # [T, B, n] h of every step: the layer's output
    c_all: Tensor  # [T + 1, B, n] c0, then the cell state of every step
    xh: Tensor  # [steps, B, m + n] [final x | final h]: the input of the gate matmul
    gates: Tensor  # [steps, B, 4n] i, f, g, o after their activations
    tanh_c: Tensor  # [steps, B, n] tanh(c)
    forget: Tensor | None  # [T, B, n] f of every step, for the backward (first a temporary); None without keep
    # Version 0 is x itself / the previous h (masked: its own buffer, else None); each round makes a new version
    # of its target; the last version of each is written straight into its half of `xh`.
    x_versions: list[Tensor]
    h_versions: list[Tensor | None]
    round_tanh: list[Tensor]  # per round: u = tanh(z / 2) at every step
    round_low: list[Tensor | None]  # per round: R s at every step (low rank), else None
    copy_x: bool  # no round makes an x and xh is reused per step: every step copies x into xh
    copy_h: bool  # no round makes an h and there is no mask: every step copies the previous h into xh


def _forward_shapes(T: int, B: int, m: int, n: int, rounds: list[Round], masked: bool, pooled_c: bool,
                    cpp) -> list[tuple[int, ...]]:
    """The shapes carved from the workspace buffer (with keep), in the order `_forward_buffers` and then the
    loops carve them."""
    x_made = sum(rd.updates_x for rd in rounds)
    h_made = len(rounds) - x_made
    shapes = [(T + 1, B, n)] * pooled_c  # c_all
    shapes += [(T, B, m + n), (T, B, 4 * n), (T, B, n), (T, B, n)]  # xh, gates, tanh_c, forget
    shapes += [(T, B, m)] * max(x_made - 1, 0) + [(T, B, n)] * max(h_made - 1, 0)  # versions between 0 and last
    shapes += [(T, B, n)] * (masked and h_made > 0)  # the masked previous h
    shapes += [(T, B, m if rd.updates_x else n) for rd in rounds]  # round_tanh
    shapes += [(T, B, rd.right.shape[0]) for rd in rounds if rd.right is not None]  # round_low
    shapes += [(m + n, 4 * n)]  # [W_ih | W_hh], or its transpose
    if cpp is None:  # the Python loop's halved, transposed round matrices (the C++ loops pack their own)
        shapes += [shape for rd in rounds for shape in _halved_transposed_shapes(rd)]
    return shapes


def _forward_buffers(x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None, rounds: list[Round], keep: bool,
                     cpp) -> ForwardBuffers:
    """Every buffer of the forward, carved from one workspace buffer with `keep`, else one step long."""
    T, B, m = x.shape
    n = h0.shape[1]
    steps = T if keep else 1
    x_made = sum(rd.updates_x for rd in rounds)
    h_made = len(rounds) - x_made
    out = torch.empty(T, B, n, device=x.device, dtype=x.dtype)  # returned to the caller: never reused
    pooled_c = c0.dtype == x.dtype  # under autocast the cell state is float32, x is not
    carve = Carve(_forward_shapes(T, B, m, n, rounds, mask is not None, pooled_c, cpp), x.dtype,
                  x.device) if keep else _fresh(x)
    c_all = carve(T + 1, B, n) if pooled_c else torch.empty(T + 1, B, n, device=x.device, dtype=c0.dtype)
    c_all[0] = c0
    xh, gates, tanh_c = carve(steps, B, m + n), carve(steps, B, 4 * n), carve(steps, B, n)
    forget = carve(T, B, n) if keep else None
    x_versions = [x] + [carve(steps, B, m) for _ in range(x_made - 1)] + [xh[..., :m]] * (x_made > 0)
    h_versions = [None] + [carve(steps, B, n) for _ in range(h_made - 1)] + [xh[..., m:]] * (h_made > 0)
    if mask is not None:
        h_versions[0] = carve(steps, B, n) if h_made > 0 else xh[..., m:]
    if x_made == 0 and keep:
        xh[..., :m].copy_(x)  # once for all steps
    round_tanh = [carve(steps, B, m if rd.updates_x else n) for rd in rounds]
    round_low = [None if rd.right is None else carve(steps, B, rd.right.shape[0]) for rd in rounds]
    return ForwardBuffers(carve, steps, out, c_all, xh, gates, tanh_c, forget, x_versions, h_versions, round_tanh,
                          round_low, copy_x=x_made == 0 and not keep, copy_h=h_made == 0 and mask is None)


def _forward_loop_cpp(cpp, buf: ForwardBuffers, rounds: list[Round], x: Tensor, h0: Tensor, mask: Tensor | None,
                      w_ih: Tensor, w_hh: Tensor, bias: Tensor, keep: bool) -> None:
    """The loop over time in C++ (cpu.cpp), on the same buffers."""
    m, n = x.shape[2], h0.shape[1]
    gate_weights = buf.carve(4 * n, m + n)  # [W_ih | W_hh]: the C++ loops pack it themselves
    gate_weights[:, :m].copy_(w_ih)
    gate_weights[:, m:].copy_(w_hh)
    opt = _or_empty(x.new_empty(0))
    cpp.forward_loop(
        x, h0, buf.c_all, buf.out, buf.xh, buf.gates, buf.tanh_c, opt(buf.forget), gate_weights, bias, opt(mask),
        opt(buf.h_versions[0]),
        [rd.updates_x for rd in rounds], [rd.matrix for rd in rounds], [opt(rd.right) for rd in rounds],
        [rd.bias for rd in rounds], buf.round_tanh, [_made_by(rd, buf.x_versions, buf.h_versions) for rd in rounds],
        [opt(low) for low in buf.round_low],
        keep, buf.copy_x, buf.copy_h,
    )  # fmt: skip


def _halved_transposed_shapes(rd: Round) -> list[tuple[int, ...]]:
    """The shapes `_round_forward_steps` carves for a round: (M / 2)^T or (L / 2)^T, and R^T."""
    return [rd.matrix.shape[::-1]] + ([] if rd.right is None else [rd.right.shape[::-1]])


class _RoundForwardSteps(NamedTuple):
    """One round as the Python forward loop uses it: its weights prepared, its buffers as per-step views."""

    updates_x: bool
    bias_half: Tensor  # b / 2
    half_t: Tensor  # (M / 2)^T or (L / 2)^T, contiguous (a transposed view is 2-3x slower on the CPU)
    right_t: Tensor | None  # R^T, contiguous (low rank)
    tanh: tuple[Tensor, ...]  # u
    after: tuple[Tensor, ...]  # the version the round makes
    low: tuple[Tensor, ...] | None  # R s (low rank)


def _round_forward_steps(buf: ForwardBuffers, rounds: list[Round]) -> list[_RoundForwardSteps]:
    """The rounds for the Python forward loop; z / 2 = s (M / 2)^T + b / 2 (halving is exact)."""
    prepared = []
    for rd, tanh, low in zip(rounds, buf.round_tanh, buf.round_low):
        half_t = torch.mul(rd.matrix.t(), 0.5, out=buf.carve(*rd.matrix.shape[::-1]))
        right_t = None if rd.right is None else buf.carve(*rd.right.shape[::-1]).copy_(rd.right.t())
        after = _made_by(rd, buf.x_versions, buf.h_versions)
        prepared.append(_RoundForwardSteps(rd.updates_x, rd.bias * 0.5, half_t, right_t, tanh.unbind(0),
                                           after.unbind(0), None if low is None else low.unbind(0)))
    return prepared


def _forward_loop_python(buf: ForwardBuffers, rounds: list[Round], x: Tensor, h0: Tensor, mask: Tensor | None,
                         w_ih: Tensor, w_hh: Tensor, bias: Tensor, keep: bool) -> None:
    """The loop over time in Python: the readable version of the C++ loop, and what runs elsewhere."""
    T, B, m = x.shape
    n = h0.shape[1]
    gate_weights_t = buf.carve(m + n, 4 * n)  # gates = [x | h] @ [W_ih | W_hh]^T + bias: one addmm per step
    gate_weights_t[:m].copy_(w_ih.t())
    gate_weights_t[m:].copy_(w_hh.t())
    round_steps = _round_forward_steps(buf, rounds)
    # Per-step views, made once: list look-ups in the loop instead of indexing (a dispatcher call each).
    X, OUT, C, XH, G, TC = (a.unbind(0) for a in (x, buf.out, buf.c_all, buf.xh, buf.gates, buf.tanh_c))
    H_PREV = (h0, *OUT[:-1])
    G_IF = buf.gates[..., : 2 * n].unbind(0)
    G_I, G_F, G_G, G_O = (buf.gates.view(buf.steps, B, 4, n)[:, :, k].unbind(0) for k in range(4))
    H_MASKED = None if mask is None else buf.h_versions[0].unbind(0)
    XH_X, XH_H = buf.xh[..., :m].unbind(0), buf.xh[..., m:].unbind(0)
    addmm, addcmul, mul, mm, tanh = torch.addmm, torch.addcmul, torch.mul, torch.mm, torch.tanh
    kernels = _triton_steps(x)  # None: the torch ops below

    for t in range(T):
        s = t if keep else 0  # this step's row of the per-step buffers
        h_cur, x_cur = H_PREV[t], X[t]
        if mask is not None:
            h_cur = mul(h_cur, mask, out=H_MASKED[s])
        elif buf.copy_h:
            XH_H[s].copy_(h_cur)
        if buf.copy_x:
            XH_X[s].copy_(x_cur)
        for updates_x, bias_half, half_t, right_t, U, AFTER, LOW in round_steps:
            u = U[s]
            src, tgt = (h_cur, x_cur) if updates_x else (x_cur, h_cur)
            if right_t is None:
                addmm(bias_half, src, half_t, out=u)
            else:
                low = LOW[s]
                mm(src, right_t, out=low)
                addmm(bias_half, low, half_t, out=u)
            if kernels is None:  # target <- 2 sigmoid(z) target = target + target tanh(z/2)
                after = addcmul(tgt, tgt, u.tanh_(), out=AFTER[s])
            else:
                after = kernels.round_forward(u, tgt, AFTER[s])
            if updates_x:
                x_cur = after
            else:
                h_cur = after
        addmm(bias, XH[s], gate_weights_t, out=G[s])
        if kernels is None:
            G_IF[s].sigmoid_()
            G_G[s].tanh_()
            G_O[s].sigmoid_()
            c = C[t + 1]
            mul(G_F[s], C[t], out=c)
            c.addcmul_(G_I[s], G_G[s])
            tc = tanh(c, out=TC[s])
            mul(G_O[s], tc, out=OUT[t])
        else:
            kernels.cell_forward(G[s], C[t], C[t + 1], TC[s], OUT[t])


def _gate_backward_factors(buf: ForwardBuffers) -> None:
    """Elementwise factors of the gate backward, for all steps at once (the C++ loop writes them itself).
    Afterwards `gates` holds [g i(1-i), c_prev f(1-f), i(1-g^2), tanh(c) o(1-o)]: d gates =
    [dc, dc, dc, dh] * gates; tanh_c holds d c / d h = o (1 - tanh(c)^2); forget holds f."""
    gates, tanh_c, forget = buf.gates, buf.tanh_c, buf.forget
    n = tanh_c.shape[-1]
    ig, fg, gg, og = gates[..., :n], gates[..., n : 2 * n], gates[..., 2 * n : 3 * n], gates[..., 3 * n :]
    tmp = torch.mul(og, tanh_c, out=forget)
    torch.addcmul(og, tmp, tanh_c, value=-1, out=tanh_c)
    torch.addcmul(tmp, tmp, og, value=-1, out=og)
    torch.mul(ig, gg, out=tmp)
    torch.addcmul(ig, tmp, gg, value=-1, out=gg)
    torch.addcmul(tmp, tmp, ig, value=-1, out=ig)
    forget.copy_(fg)
    torch.mul(forget, buf.c_all[:-1], out=fg)
    fg.addcmul_(fg, forget, value=-1)


# -- what the backward reads --------------------------------------------------------------------------------


@dataclass
class SavedForBackward:
    """What the backward reads: the forward's buffers (after `_gate_backward_factors`) and its inputs."""

    out: Tensor  # [T, B, n] h of every step
    h0: Tensor
    mask: Tensor | None
    w_ih: Tensor
    w_hh: Tensor
    xh: Tensor  # [T, B, m + n] [final x | final h] of every step
    gate_factors: Tensor  # [T, B, 4n] d gates = [dc, dc, dc, dh] * gate_factors
    forget: Tensor  # [T, B, n] f
    dc_dh: Tensor  # [T, B, n] d c / d h = o (1 - tanh(c)^2)
    x_versions: list[Tensor]  # as in ForwardBuffers
    h_versions: list[Tensor | None]
    round_tanh: list[Tensor]
    round_low: list[Tensor | None]
    rounds: list[Round]

    @staticmethod
    def save(ctx, buf: ForwardBuffers, x: Tensor, h0: Tensor, mask: Tensor | None, w_ih: Tensor, w_hh: Tensor,
             low_rank: tuple[bool, ...], round_params: tuple[Tensor, ...]) -> None:
        """Everything through save_for_backward: freed after the backward unless retain_graph."""
        ctx.low_rank = low_rank
        ctx.save_for_backward(
            buf.out, h0, mask, w_ih, w_hh, buf.xh, buf.gates, buf.forget, buf.tanh_c, x, buf.h_versions[0],
            *buf.x_versions[1:-1], *buf.h_versions[1:-1], *buf.round_tanh, *buf.round_low, *round_params,
        )  # fmt: skip

    @classmethod
    def load(cls, ctx) -> SavedForBackward:
        """What `save` saved, with the x and h versions and the rounds rebuilt."""
        out, h0, mask, w_ih, w_hh, xh, gate_factors, forget, dc_dh, x, h_version0, *rest = ctx.saved_tensors
        m = xh.shape[-1] - out.shape[-1]
        r = len(ctx.low_rank)
        x_mid, h_mid = max((r + 1) // 2 - 1, 0), max(r // 2 - 1, 0)  # versions between the first and last
        x_versions = [x, *rest[:x_mid], xh[..., :m]]
        h_versions = [h_version0, *rest[x_mid : x_mid + h_mid], xh[..., m:]]
        rest = rest[x_mid + h_mid :]
        return cls(out, h0, mask, w_ih, w_hh, xh, gate_factors, forget, dc_dh, x_versions, h_versions, rest[:r],
                   rest[r : 2 * r], _rounds(ctx.low_rank, rest[2 * r :]))


# -- backward -----------------------------------------------------------------------------------------------


@dataclass
class BackwardBuffers:
    """The gradients the backward computes, and its scratch; the forward's buffers stay intact (retain_graph)."""

    carve: Carver  # the rest of the workspace buffer: the Python loop's scratch
    d_h: Tensor  # [T, B, n] d loss / d h_t: d out, completed step by step with what step t + 1 passes back
    d_c: Tensor  # [B, n] d loss / d c_t of the step being run; d c0 at the end
    d_gates: Tensor  # [T, B, 4n] d loss / d (i, f, g, o before their activations)
    d_xh: Tensor  # [T, B, m + n] d [final x | final h]; when the rounds are undone, d [x | masked previous h]
    d_h0: Tensor  # [B, n]
    round_d_z: list[Tensor]  # per round: d loss / d z' (z' = z / 2, what the tanh takes)
    round_d_low: list[Tensor | None]  # per round: d loss / d (R s) (low rank), else None
    gate_weights: Tensor  # [4n, m + n] [W_ih | W_hh]
    h_prev: Tensor  # [T, B, n] the previous h of every step, unmasked (filled where round 1 needs it)


def _backward_buffers(saved: SavedForBackward, ctx, d_out: Tensor, d_ht: Tensor, d_ct: Tensor) -> BackwardBuffers:
    """The backward's buffers, carved from one workspace buffer."""
    T, B, n = saved.out.shape
    m = saved.xh.shape[-1] - n
    shapes = [(T, B, n), (T, B, 4 * n), *(u.shape for u in saved.round_tanh)]
    shapes += [low.shape for low in saved.round_low if low is not None] + [(4 * n, m + n), (T, B, n)]
    if ctx.cpp is None:  # the Python loop's scratch rows and halved round matrices
        shapes += [(B, m), (B, n)] + [rd.matrix.shape for rd in saved.rounds]
    carve = Carve(shapes, saved.out.dtype, saved.out.device)
    d_h = carve(T, B, n)
    d_h.copy_(d_out)
    d_h[T - 1] += d_ht
    d_gates = carve(T, B, 4 * n)
    round_d_z = [carve(*u.shape) for u in saved.round_tanh]
    round_d_low = [None if low is None else carve(*low.shape) for low in saved.round_low]
    gate_weights = carve(4 * n, m + n)
    gate_weights[:, :m].copy_(saved.w_ih)
    gate_weights[:, m:].copy_(saved.w_hh)
    h_prev = carve(T, B, n)
    d_c = d_ct.to(ctx.c_dtype, copy=True, memory_format=torch.contiguous_format)
    # d x and d h0 are returned to autograd: their own memory, never reused.
    d_xh = saved.out.new_empty(T, B, m + n)
    d_h0 = saved.out.new_empty(B, n)
    return BackwardBuffers(carve, d_h, d_c, d_gates, d_xh, d_h0, round_d_z, round_d_low, gate_weights, h_prev)


def _backward_loop_cpp(cpp, saved: SavedForBackward, grad: BackwardBuffers) -> None:
    """The loop back through time in C++ (cpu.cpp), on the same buffers; it takes the rounds last first."""
    opt = _or_empty(saved.out.new_empty(0))
    back = list(reversed(range(len(saved.rounds))))
    rounds = [saved.rounds[i] for i in back]
    cpp.backward_loop(
        grad.d_h, grad.d_c, saved.dc_dh, saved.forget, saved.gate_factors, grad.d_gates, grad.d_xh,
        grad.gate_weights, opt(saved.mask), grad.d_h0,
        [rd.updates_x for rd in rounds], [rd.matrix for rd in rounds], [opt(rd.right) for rd in rounds],
        [saved.round_tanh[i] for i in back], [grad.round_d_z[i] for i in back],
        [_made_by(rd, saved.x_versions, saved.h_versions) for rd in rounds], [opt(grad.round_d_low[i]) for i in back],
    )  # fmt: skip


class _RoundBackwardSteps(NamedTuple):
    """One round as the Python backward loop uses it, its buffers as per-step views."""

    updates_x: bool
    half: Tensor  # M / 2 or L / 2
    right: Tensor | None  # R (low rank)
    tanh: tuple[Tensor, ...]  # u
    d_z: tuple[Tensor, ...]  # d loss / d z'
    after: tuple[Tensor, ...]  # the version the round made
    d_low: tuple[Tensor, ...] | None  # d loss / d (R s) (low rank)
    scratch: Tensor  # [B, target size]


def _round_backward_steps(saved: SavedForBackward, grad: BackwardBuffers) -> list[_RoundBackwardSteps]:
    """The rounds for the Python backward loop, last round first."""
    B, n = saved.h0.shape
    m = saved.xh.shape[-1] - n
    scratch_x, scratch_h = grad.carve(B, m), grad.carve(B, n)
    halves = [torch.mul(rd.matrix, 0.5, out=grad.carve(*rd.matrix.shape)) for rd in saved.rounds]
    prepared = []
    for i, rd in reversed(list(enumerate(saved.rounds))):
        d_low = grad.round_d_low[i]
        prepared.append(_RoundBackwardSteps(
            rd.updates_x, halves[i], rd.right, saved.round_tanh[i].unbind(0), grad.round_d_z[i].unbind(0),
            _made_by(rd, saved.x_versions, saved.h_versions).unbind(0), None if d_low is None else d_low.unbind(0),
            scratch_x if rd.updates_x else scratch_h,
        ))  # fmt: skip
    return prepared


def _backward_loop_python(saved: SavedForBackward, grad: BackwardBuffers) -> None:
    """The loop back through time in Python: only the sequential chain of state gradients."""
    T, B, n = saved.out.shape
    m, mask = saved.xh.shape[-1] - n, saved.mask
    round_steps = _round_backward_steps(saved, grad)
    d_c = grad.d_c
    d_c3 = d_c.unsqueeze(1)  # a view: broadcasts d c over the i, f, g gates
    # Per-step views, made once.
    D_H, DC_DH, FORGET, D_XH, D_G = (a.unbind(0) for a in (grad.d_h, saved.dc_dh, saved.forget, grad.d_xh,
                                                           grad.d_gates))
    F_3 = saved.gate_factors.view(T, B, 4, n)[:, :, :3].unbind(0)
    F_O = saved.gate_factors[..., 3 * n :].unbind(0)
    D_G3 = grad.d_gates.view(T, B, 4, n)[:, :, :3].unbind(0)
    D_GO = grad.d_gates[..., 3 * n :].unbind(0)
    D_X, D_HH = grad.d_xh[..., :m].unbind(0), grad.d_xh[..., m:].unbind(0)
    FACTORS = saved.gate_factors.unbind(0)
    addcmul, mul, mm = torch.addcmul, torch.mul, torch.mm
    kernels = _triton_steps(saved.out)  # None: the torch ops below

    for t in range(T - 1, -1, -1):
        dh = D_H[t]
        if kernels is None:
            mul(dh, F_O[t], out=D_GO[t])
            d_c.addcmul_(dh, DC_DH[t])
            mul(d_c3, F_3[t], out=D_G3[t])
            d_c.mul_(FORGET[t])  # now d c_{t-1}
        else:
            kernels.gate_backward(dh, d_c, DC_DH[t], FORGET[t], FACTORS[t], D_G[t])
        mm(D_G[t], grad.gate_weights, out=D_XH[t])
        dx, dhh = D_X[t], D_HH[t]
        for updates_x, half, right, U, D_Z, AFTER, D_LOW, scratch in round_steps:
            u, d_z = U[t], D_Z[t]
            d_tgt, d_src = (dx, dhh) if updates_x else (dhh, dx)
            if kernels is None:
                mul(d_tgt, AFTER[t], out=scratch)
                d_tgt.addcmul_(d_tgt, u)  # d target before = d target after * (1 + u)
                addcmul(scratch, scratch, u, value=-1, out=d_z)  # d z' = d after * after * (1 - u)
            else:
                kernels.round_backward(d_tgt, AFTER[t], u, d_z)
            if right is None:
                d_src.addmm_(d_z, half)
            else:
                d_low = mm(d_z, half, out=D_LOW[t])
                d_src.addmm_(d_low, right)
        if t > 0:  # d h_{t-1} += d h (masked), or d h0
            if mask is None:
                D_H[t - 1].add_(dhh)
            else:
                D_H[t - 1].addcmul_(dhh, mask)
        elif mask is None:
            grad.d_h0.copy_(dhh)
        else:
            mul(dhh, mask, out=grad.d_h0)


def _round_source(i: int, saved: SavedForBackward, grad: BackwardBuffers) -> Tensor:
    """The source vector s of round i (from 0), what its matrix multiplied, at every step."""
    rd = saved.rounds[i]
    if not rd.updates_x:
        return saved.x_versions[rd.version]
    if rd.version > 1 or saved.mask is not None:
        return saved.h_versions[rd.version - 1]
    # round 1 without mask: the previous h, unmasked (h0, then the outputs)
    grad.h_prev[0].copy_(saved.h0)
    grad.h_prev[1:].copy_(saved.out[:-1])
    return grad.h_prev


def _weight_gradients(saved: SavedForBackward, grad: BackwardBuffers) -> list[Tensor]:
    """d W_ih, d W_hh, d bias and each round's gradients: a few matmuls over all T*B rows at once."""
    T, B, n = saved.out.shape
    m = saved.xh.shape[-1] - n
    TB = T * B
    d_gates = grad.d_gates.view(TB, 4 * n)
    d_w = torch.mm(d_gates.t(), saved.xh.view(TB, m + n))  # one matmul is faster than two on halves of xh
    grads = [d_w[:, :m].contiguous(), d_w[:, m:].contiguous(), d_gates.sum(0)]
    for i, rd in enumerate(saved.rounds):
        d_z = grad.round_d_z[i].view(TB, -1)  # d z' = 2 d z  (z' = z / 2): hence the halves below
        src = _round_source(i, saved, grad).reshape(TB, -1)
        if rd.right is None:
            grads += [torch.mm(d_z.t(), src).mul_(0.5), d_z.sum(0).mul_(0.5)]
        else:
            d_left = torch.mm(d_z.t(), saved.round_low[i].view(TB, -1)).mul_(0.5)
            d_right = torch.mm(grad.round_d_low[i].view(TB, -1).t(), src)
            grads += [d_left, d_right, d_z.sum(0).mul_(0.5)]
    return grads


class _MogrifierLSTMFunction(torch.autograd.Function):
    """The whole sequence as one autograd node.

    Non-tensor arguments: low_rank (per round: factored or not) and keep (store what the backward
    needs; False without gradients, then the buffers are one step long and reused).
    """

    @staticmethod
    def forward(ctx, low_rank, keep, x, h0, c0, mask, w_ih, w_hh, bias, *round_params):
        rounds = _rounds(low_rank, round_params)
        cpp = _cpp_loops(x, c0)
        buf = _forward_buffers(x, h0, c0, mask, rounds, keep, cpp)
        ctx.cpp = cpp  # the backward runs the same loops
        if cpp is None:
            with _on_device_of(x):
                _forward_loop_python(buf, rounds, x, h0, mask, w_ih, w_hh, bias, keep)
        else:
            _forward_loop_cpp(cpp, buf, rounds, x, h0, mask, w_ih, w_hh, bias, keep)
        h_t, c_t = buf.out[-1].clone(), buf.c_all[-1].clone()
        if not keep:
            return buf.out, h_t, c_t
        if cpp is None:
            _gate_backward_factors(buf)
        ctx.c_dtype = c0.dtype
        SavedForBackward.save(ctx, buf, x, h0, mask, w_ih, w_hh, low_rank, round_params)
        return buf.out, h_t, c_t

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_ht, d_ct):
        saved = SavedForBackward.load(ctx)
        grad = _backward_buffers(saved, ctx, d_out, d_ht, d_ct)
        if ctx.cpp is None:
            with _on_device_of(saved.out):
                _backward_loop_python(saved, grad)
        else:
            _backward_loop_cpp(ctx.cpp, saved, grad)
        m = saved.xh.shape[-1] - saved.out.shape[-1]
        return (None, None, grad.d_xh[..., :m], grad.d_h0, grad.d_c, None, *_weight_gradients(saved, grad))


def mogrifier_lstm(
    x: Tensor,
    state: tuple[Tensor, Tensor] | None,
    state_mask: Tensor | None,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor,
    round_params: list[tuple[Tensor, ...]],
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The Mogrifier LSTM over a sequence; the contract of `MogrifierLSTMLayer.forward_reference`.

    round_params: per round, (weight, bias) for a full-rank round or (left, right, bias) for a low-rank one.
    Gradients flow to x, the initial state and all parameters (not to state_mask).
    """
    B = x.shape[1]
    n = weight_hh.shape[1]
    if state is None:
        h0 = c0 = x.new_zeros(B, n)
    else:
        h0, c0 = state
    low_rank = tuple(len(p) == 3 for p in round_params)
    flat = [p for ps in round_params for p in ps]
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, h0, c0, weight_ih, weight_hh, bias, *flat))
    if state_mask is not None:
        state_mask = state_mask.detach()
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Matmuls and activations in the autocast dtype (as nn.LSTM under autocast); the cell state in float32.
        dtype = torch.get_autocast_dtype(device_type)
        x, h0, weight_ih, weight_hh, bias = (t.to(dtype) for t in (x, h0, weight_ih, weight_hh, bias))
        flat = [p.to(dtype) for p in flat]
        c0 = c0.float()
        if state_mask is not None:
            state_mask = state_mask.to(dtype)
        with torch.autocast(device_type, enabled=False):
            out, h_t, c_t = _MogrifierLSTMFunction.apply(
                low_rank, keep, x.contiguous(), h0, c0, state_mask, weight_ih, weight_hh, bias, *flat
            )
    else:
        out, h_t, c_t = _MogrifierLSTMFunction.apply(
            low_rank, keep, x.contiguous(), h0, c0, state_mask, weight_ih, weight_hh, bias, *flat
        )
    return out, (h_t, c_t)
