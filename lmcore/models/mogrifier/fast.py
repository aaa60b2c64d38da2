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
  cpu.py) on the same buffers: raw row pointers instead of tensor ops, MKL's packed GEMM
  against weights packed once per call, fused elementwise passes, and one chunk of batch rows per
  thread. Where the extension cannot be used (another OS/CPU/build, no compiler: see cpu.py),
  or it is disabled (LMCORE_MOGRIFIER_CPP=0), the Python loops below run; they are the readable version
  of what the C++ does, and what runs on CUDA, in float64 and under autocast.
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

from types import SimpleNamespace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .workspace import Carve, release_workspace

__all__ = ["mogrifier_lstm", "release_workspace"]


class _Round:
    """One round. Its matrix and bias are used halved (exact in floating point):
    full rank z/2 = s @ (M/2)^T + b/2, low rank z/2 = (s @ R^T) @ (L/2)^T + b/2."""

    def __init__(self, index: int, version: int, params: tuple[Tensor, ...]):
        self.odd = index % 2 == 1  # odd rounds (1, 3, ...) update x from h, even rounds h from x
        self.version = version  # the x (odd) or h (even) version this round makes, from 1
        self.matrix, self.right, self.bias = params if len(params) == 3 else (params[0], None, params[1])

    def forward_shapes(self) -> list[tuple[int, int]]:
        half_t = self.matrix.shape[::-1]
        return [half_t] if self.right is None else [half_t, self.right.shape[::-1]]

    def prepare_forward(self, carve) -> None:
        """half_t: (M/2)^T or (L/2)^T, contiguous; right_t: R^T contiguous (low rank)."""
        self.half_t = torch.mul(self.matrix.t(), 0.5, out=carve(*self.matrix.shape[::-1]))
        self.right_t = None if self.right is None else carve(*self.right.shape[::-1]).copy_(self.right.t())
        self.bias_half = self.bias * 0.5

    def prepare_backward(self, carve) -> None:
        self.half = torch.mul(self.matrix, 0.5, out=carve(*self.matrix.shape))


def _round_plan(low_rank: tuple[bool, ...], params: tuple[Tensor, ...] | list[Tensor]) -> list[_Round]:
    rounds, it, versions = [], iter(params), [0, 0]
    for i, lr in enumerate(low_rank, start=1):
        versions[i % 2] += 1
        rounds.append(_Round(i, versions[i % 2], tuple(next(it) for _ in range(3 if lr else 2))))
    return rounds


def _cpp_loops(x: Tensor, c: Tensor):
    """The C++ loops (cpu.cpp) where they apply: CPU, float32, the cell state float32 too, and the
    extension enabled and built; else None (the Python loops run)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or c.dtype != torch.float32:
        return None
    from . import cpu

    return cpu.extension()


def _optional(empty: Tensor):
    """The C++ loops take an empty tensor for None."""
    return lambda t: empty if t is None else t


# -- forward ------------------------------------------------------------------------------------------------


def _forward_buffers(x: Tensor, h0: Tensor, c0: Tensor, mask: Tensor | None, rounds: list[_Round], keep: bool,
                     cpp) -> SimpleNamespace:
    """Every buffer of the forward, carved from one workspace buffer (kept for the backward); without `keep`
    the per-step buffers are one step long and reused."""
    T, B, m = x.shape
    n = h0.shape[1]
    new = dict(device=x.device, dtype=x.dtype)
    x_last = sum(rd.odd for rd in rounds)  # how many new x versions the rounds make
    h_last = len(rounds) - x_last
    steps = T if keep else 1
    out = torch.empty(T, B, n, **new)
    # One workspace buffer for everything else: the shapes of all that is carved from it below.
    pooled_c = c0.dtype == x.dtype
    shapes = [(T + 1, B, n)] * pooled_c + [(steps, B, m + n), (steps, B, 4 * n), (steps, B, n)]
    shapes += [(T, B, n) if keep else (0,)]
    shapes += [(steps, B, m)] * max(x_last - 1, 0) + [(steps, B, n)] * max(h_last - 1, 0)
    shapes += [(steps, B, n)] * (mask is not None and h_last > 0)
    shapes += [(steps, B, m if rd.odd else n) for rd in rounds]
    shapes += [(steps, B, rd.right.shape[0]) for rd in rounds if rd.right is not None]
    shapes += [(m + n, 4 * n)] + [shape for rd in rounds for shape in rd.forward_shapes() if cpp is None]
    carve = Carve(shapes, x.dtype, x.device) if keep else (lambda *shape: torch.empty(shape, **new))
    c_all = carve(T + 1, B, n) if pooled_c else torch.empty(T + 1, B, n, device=x.device, dtype=c0.dtype)
    c_all[0] = c0
    xh = carve(steps, B, m + n)  # [final x | final h]: the input of the gate matmul
    gates = carve(steps, B, 4 * n)  # i, f, g, o
    tanh_c = carve(steps, B, n)
    forget = carve(T, B, n) if keep else None  # (first a temporary)
    # The x and h versions: version 0 is x itself / the previous h (masked: own buffer); each round
    # makes a new version of its target; the last version of each lives in its half of `xh`.
    x_ver = [x] + [carve(steps, B, m) for _ in range(x_last - 1)] + [xh[..., :m]] * (x_last > 0)
    h_ver = [None] + [carve(steps, B, n) for _ in range(h_last - 1)] + [xh[..., m:]] * (h_last > 0)
    if mask is not None:
        h_ver[0] = carve(steps, B, n) if h_last > 0 else xh[..., m:]
    if x_last == 0 and keep:
        xh[..., :m].copy_(x)
    for rd in rounds:
        rd.tanh = carve(steps, B, m if rd.odd else n)
    for rd in rounds:
        rd.low = None if rd.right is None else carve(steps, B, rd.right.shape[0])
    return SimpleNamespace(T=T, B=B, m=m, n=n, steps=steps, carve=carve, out=out, c_all=c_all, xh=xh,
                           gates=gates, tanh_c=tanh_c, forget=forget, x_ver=x_ver, h_ver=h_ver, x_last=x_last,
                           h_last=h_last, copy_x=x_last == 0 and not keep, copy_h=h_last == 0 and mask is None)


def _forward_loop_cpp(cpp, b: SimpleNamespace, rounds: list[_Round], x: Tensor, h0: Tensor, mask: Tensor | None,
                      w_ih: Tensor, w_hh: Tensor, bias: Tensor, keep: bool) -> None:
    """The loop over time in C++ (cpu.cpp), on the same buffers."""
    w = b.carve(4 * b.n, b.m + b.n)  # [W_ih | W_hh]
    w[:, : b.m].copy_(w_ih)
    w[:, b.m :].copy_(w_hh)
    opt = _optional(x.new_empty(0))
    cpp.forward_loop(
        x, h0, b.c_all, b.out, b.xh, b.gates, b.tanh_c, opt(b.forget), w, bias, opt(mask),
        opt(b.h_ver[0] if mask is not None else None),
        [rd.odd for rd in rounds], [rd.matrix for rd in rounds], [opt(rd.right) for rd in rounds],
        [rd.bias for rd in rounds], [rd.tanh for rd in rounds],
        [(b.x_ver if rd.odd else b.h_ver)[rd.version] for rd in rounds], [opt(rd.low) for rd in rounds],
        keep, b.copy_x, b.copy_h,
    )  # fmt: skip


def _forward_loop_python(b: SimpleNamespace, rounds: list[_Round], x: Tensor, h0: Tensor, mask: Tensor | None,
                         w_ih: Tensor, w_hh: Tensor, bias: Tensor, keep: bool) -> None:
    """The loop over time in Python: the readable version of the C++ loop, and what runs elsewhere."""
    T, B, m, n, steps = b.T, b.B, b.m, b.n, b.steps
    w_t = b.carve(m + n, 4 * n)  # [W_ih | W_hh]^T, contiguous: gates = [x | h] @ w_t + bias
    w_t[:m].copy_(w_ih.t())
    w_t[m:].copy_(w_hh.t())
    for rd in rounds:
        rd.prepare_forward(b.carve)
    # Per-step views, made once.
    X, OUT, C, XH, G, TC = (a.unbind(0) for a in (x, b.out, b.c_all, b.xh, b.gates, b.tanh_c))
    H_PREV = (h0, *OUT[:-1])
    G_IF = b.gates[..., : 2 * n].unbind(0)
    G_I, G_F, G_G, G_O = (b.gates.view(steps, B, 4, n)[:, :, k].unbind(0) for k in range(4))
    H_MASKED = None if mask is None else b.h_ver[0].unbind(0)
    XH_X, XH_H = b.xh[..., :m].unbind(0), b.xh[..., m:].unbind(0)
    loop_rounds = [
        (
            rd.odd,
            rd.bias_half,
            rd.half_t,
            rd.right_t,
            rd.tanh.unbind(0),
            (b.x_ver if rd.odd else b.h_ver)[rd.version].unbind(0),
            None if rd.low is None else rd.low.unbind(0),
        )
        for rd in rounds
    ]
    addmm, addcmul, mul, mm, tanh = torch.addmm, torch.addcmul, torch.mul, torch.mm, torch.tanh

    for t in range(T):
        s = t if keep else 0
        h_cur, x_cur = H_PREV[t], X[t]
        if mask is not None:
            h_cur = mul(h_cur, mask, out=H_MASKED[s])
        elif b.copy_h:
            XH_H[s].copy_(h_cur)
        if b.copy_x:
            XH_X[s].copy_(x_cur)
        for odd, b_half, half_t, right_t, U, NEW, LOW in loop_rounds:
            u = U[s]
            src, tgt = (h_cur, x_cur) if odd else (x_cur, h_cur)
            if right_t is None:
                addmm(b_half, src, half_t, out=u)
            else:
                low = LOW[s]
                mm(src, right_t, out=low)
                addmm(b_half, low, half_t, out=u)
            u.tanh_()
            if odd:  # x <- 2 sigmoid(z) x = x + x tanh(z/2)
                x_cur = addcmul(tgt, tgt, u, out=NEW[s])
            else:
                h_cur = addcmul(tgt, tgt, u, out=NEW[s])
        addmm(bias, XH[s], w_t, out=G[s])
        G_IF[s].sigmoid_()
        G_G[s].tanh_()
        G_O[s].sigmoid_()
        c = C[t + 1]
        mul(G_F[s], C[t], out=c)
        c.addcmul_(G_I[s], G_G[s])
        tc = tanh(c, out=TC[s])
        mul(G_O[s], tc, out=OUT[t])


def _gate_backward_factors(b: SimpleNamespace) -> None:
    """Elementwise factors of the gate backward, for all steps at once (the C++ loop writes them itself).
    Afterwards `gates` holds [g i(1-i), c_prev f(1-f), i(1-g^2), tanh(c) o(1-o)]: d gates =
    [dc, dc, dc, dh] * gates; tanh_c holds d c / d h = o (1 - tanh(c)^2); forget holds f."""
    n, gates, tanh_c, forget = b.n, b.gates, b.tanh_c, b.forget
    ig, fg, gg, og = gates[..., :n], gates[..., n : 2 * n], gates[..., 2 * n : 3 * n], gates[..., 3 * n :]
    tmp = torch.mul(og, tanh_c, out=forget)
    torch.addcmul(og, tmp, tanh_c, value=-1, out=tanh_c)
    torch.addcmul(tmp, tmp, og, value=-1, out=og)
    torch.mul(ig, gg, out=tmp)
    torch.addcmul(ig, tmp, gg, value=-1, out=gg)
    torch.addcmul(tmp, tmp, ig, value=-1, out=ig)
    forget.copy_(fg)
    torch.mul(forget, b.c_all[:-1], out=fg)
    fg.addcmul_(fg, forget, value=-1)


# -- backward -----------------------------------------------------------------------------------------------


def _unpack_saved(ctx) -> SimpleNamespace:
    """What the forward saved, with the x and h versions and the rounds rebuilt."""
    saved = list(ctx.saved_tensors)
    out, h0, mask, w_ih, w_hh, xh, gates, forget, dc_dh, x, h_ver0 = saved[:11]
    T, B, n = out.shape
    m = xh.shape[-1] - n
    r = len(ctx.low_rank)
    x_mid, h_mid = max((r + 1) // 2 - 1, 0), max(r // 2 - 1, 0)  # intermediate versions
    rest = saved[11:]
    x_ver = [x, *rest[:x_mid], xh[..., :m]]
    h_ver = [h_ver0, *rest[x_mid : x_mid + h_mid], xh[..., m:]]
    rest = rest[x_mid + h_mid :]
    return SimpleNamespace(T=T, B=B, m=m, n=n, out=out, h0=h0, mask=mask, w_ih=w_ih, w_hh=w_hh, xh=xh,
                           gates=gates, forget=forget, dc_dh=dc_dh, x_ver=x_ver, h_ver=h_ver, tanhs=rest[:r],
                           lows=rest[r : 2 * r], rounds=_round_plan(ctx.low_rank, rest[2 * r :]))


def _backward_buffers(s: SimpleNamespace, ctx, d_out: Tensor, d_ht: Tensor, d_ct: Tensor) -> SimpleNamespace:
    """The backward's buffers, carved from one workspace buffer (the forward's stay intact: retain_graph)."""
    T, B, m, n = s.T, s.B, s.m, s.n
    new = dict(device=s.out.device, dtype=s.out.dtype)
    shapes = [(T, B, n), (T, B, 4 * n), *(u.shape for u in s.tanhs)]
    shapes += [k.shape for k in s.lows if k is not None] + [(4 * n, m + n), (T, B, n)]
    if ctx.cpp is None:  # the Python loop's scratch rows and halved round matrices
        shapes += [(B, m), (B, n)] + [rd.matrix.shape for rd in s.rounds]
    carve = Carve(shapes, s.out.dtype, s.out.device)
    d_h = carve(T, B, n)  # d loss / d h_t, completed step by step
    d_h.copy_(d_out)
    d_h[T - 1] += d_ht
    d_gates = carve(T, B, 4 * n)
    es = [carve(*u.shape) for u in s.tanhs]
    d_lows = [None if k is None else carve(*k.shape) for k in s.lows]
    w = carve(4 * n, m + n)  # [W_ih | W_hh]
    w[:, :m].copy_(s.w_ih)
    w[:, m:].copy_(s.w_hh)
    h_prev = carve(T, B, n)  # the previous h of every step, unmasked (filled if needed)
    d_c = d_ct.to(ctx.c_dtype, copy=True, memory_format=torch.contiguous_format)
    return SimpleNamespace(carve=carve, d_h=d_h, d_gates=d_gates, es=es, d_lows=d_lows, w=w, h_prev=h_prev,
                           d_c=d_c, d_xh=torch.empty(T, B, m + n, **new), d_h0=torch.empty(B, n, **new))


def _backward_loop_cpp(cpp, s: SimpleNamespace, g: SimpleNamespace) -> None:
    """The loop back through time in C++ (cpu.cpp), on the same buffers."""
    opt = _optional(s.out.new_empty(0))
    back = list(reversed(list(enumerate(s.rounds))))
    cpp.backward_loop(
        g.d_h, g.d_c, s.dc_dh, s.forget, s.gates, g.d_gates, g.d_xh, g.w, opt(s.mask), g.d_h0,
        [rd.odd for _, rd in back], [rd.matrix for _, rd in back], [opt(rd.right) for _, rd in back],
        [s.tanhs[i] for i, _ in back], [g.es[i] for i, _ in back],
        [(s.x_ver if rd.odd else s.h_ver)[rd.version] for _, rd in back], [opt(g.d_lows[i]) for i, _ in back],
    )  # fmt: skip


def _backward_loop_python(s: SimpleNamespace, g: SimpleNamespace) -> None:
    """The loop back through time in Python: only the sequential chain of state gradients."""
    T, B, m, n, mask = s.T, s.B, s.m, s.n, s.mask
    scratch_x, scratch_h = g.carve(B, m), g.carve(B, n)
    for rd in s.rounds:
        rd.prepare_backward(g.carve)
    d_c = g.d_c
    d_c3 = d_c.unsqueeze(1)  # a view: broadcasts d c over the i, f, g gates
    # Per-step views, made once.
    D_H, DC_DH, FORGET, D_XH, D_G = (a.unbind(0) for a in (g.d_h, s.dc_dh, s.forget, g.d_xh, g.d_gates))
    F_3 = s.gates.view(T, B, 4, n)[:, :, :3].unbind(0)
    F_O = s.gates[..., 3 * n :].unbind(0)
    D_G3 = g.d_gates.view(T, B, 4, n)[:, :, :3].unbind(0)
    D_GO = g.d_gates[..., 3 * n :].unbind(0)
    D_X, D_HH = g.d_xh[..., :m].unbind(0), g.d_xh[..., m:].unbind(0)
    loop_rounds = [
        (
            rd.odd,
            rd.half,
            rd.right,
            s.tanhs[i].unbind(0),
            g.es[i].unbind(0),
            (s.x_ver if rd.odd else s.h_ver)[rd.version].unbind(0),
            None if g.d_lows[i] is None else g.d_lows[i].unbind(0),
            scratch_x if rd.odd else scratch_h,
        )
        for i, rd in reversed(list(enumerate(s.rounds)))
    ]
    addcmul, mul, mm = torch.addcmul, torch.mul, torch.mm

    for t in range(T - 1, -1, -1):
        dh = D_H[t]
        mul(dh, F_O[t], out=D_GO[t])
        d_c.addcmul_(dh, DC_DH[t])
        mul(d_c3, F_3[t], out=D_G3[t])
        d_c.mul_(FORGET[t])  # now d c_{t-1}
        mm(D_G[t], g.w, out=D_XH[t])
        dx, dhh = D_X[t], D_HH[t]
        for odd, half, right, U, E, NEW, D_LOW, scratch in loop_rounds:
            u, e = U[t], E[t]
            d_tgt, d_src = (dx, dhh) if odd else (dhh, dx)
            mul(d_tgt, NEW[t], out=scratch)
            d_tgt.addcmul_(d_tgt, u)  # d target before = d target after * (1 + u)
            addcmul(scratch, scratch, u, value=-1, out=e)  # d z' = d after * after * (1 - u)
            if right is None:
                d_src.addmm_(e, half)
            else:
                d_low = mm(e, half, out=D_LOW[t])
                d_src.addmm_(d_low, right)
        if t > 0:
            if mask is None:
                D_H[t - 1].add_(dhh)
            else:
                D_H[t - 1].addcmul_(dhh, mask)
        elif mask is None:
            g.d_h0.copy_(dhh)
        else:
            mul(dhh, mask, out=g.d_h0)


def _weight_gradients(s: SimpleNamespace, g: SimpleNamespace) -> list[Tensor]:
    """d W_ih, d W_hh, d bias and each round's gradients: a few matmuls over all T*B rows at once."""
    T, B, m, n = s.T, s.B, s.m, s.n
    TB = T * B
    d_gates = g.d_gates.view(TB, 4 * n)
    d_w = torch.mm(d_gates.t(), s.xh.view(TB, m + n))  # one matmul is faster than two on halves of xh
    grads = [d_w[:, :m].contiguous(), d_w[:, m:].contiguous(), d_gates.sum(0)]
    for i, rd in enumerate(s.rounds):
        e = g.es[i].view(TB, -1)  # d z' = 2 d z  (z' = z / 2)
        if not rd.odd:
            src = s.x_ver[rd.version]
        elif rd.version > 1 or s.mask is not None:
            src = s.h_ver[rd.version - 1]
        else:  # round 1 without mask: the previous h, unmasked
            g.h_prev[0].copy_(s.h0)
            g.h_prev[1:].copy_(s.out[:-1])
            src = g.h_prev
        src = src.reshape(TB, -1)
        if rd.right is None:
            grads += [torch.mm(e.t(), src).mul_(0.5), e.sum(0).mul_(0.5)]
        else:
            d_left = torch.mm(e.t(), s.lows[i].view(TB, -1)).mul_(0.5)
            d_right = torch.mm(g.d_lows[i].view(TB, -1).t(), src)
            grads += [d_left, d_right, e.sum(0).mul_(0.5)]
    return grads


class _MogrifierLSTMFunction(torch.autograd.Function):
    """The whole sequence as one autograd node.

    Non-tensor arguments: low_rank (per round: factored or not) and keep (store what the backward
    needs; False without gradients, then the buffers are one step long and reused).
    """

    @staticmethod
    def forward(ctx, low_rank, keep, x, h0, c0, mask, w_ih, w_hh, bias, *round_params):
        rounds = _round_plan(low_rank, round_params)
        cpp = _cpp_loops(x, c0)  # the C++ loops take the weights as they are (they pack them)
        b = _forward_buffers(x, h0, c0, mask, rounds, keep, cpp)
        ctx.cpp = cpp  # the backward runs the same loops
        if cpp is None:
            _forward_loop_python(b, rounds, x, h0, mask, w_ih, w_hh, bias, keep)
        else:
            _forward_loop_cpp(cpp, b, rounds, x, h0, mask, w_ih, w_hh, bias, keep)
        h_t, c_t = b.out[-1].clone(), b.c_all[-1].clone()
        if not keep:
            return b.out, h_t, c_t
        if cpp is None:
            _gate_backward_factors(b)
        # Everything through save_for_backward: freed after the backward unless retain_graph.
        ctx.low_rank, ctx.c_dtype = low_rank, c0.dtype
        ctx.save_for_backward(
            b.out, h0, mask, w_ih, w_hh, b.xh, b.gates, b.forget, b.tanh_c, x, b.h_ver[0],
            *b.x_ver[1:b.x_last], *b.h_ver[1:b.h_last], *(rd.tanh for rd in rounds), *(rd.low for rd in rounds),
            *round_params,
        )  # fmt: skip
        return b.out, h_t, c_t

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_ht, d_ct):
        s = _unpack_saved(ctx)
        g = _backward_buffers(s, ctx, d_out, d_ht, d_ct)
        if ctx.cpp is None:
            _backward_loop_python(s, g)
        else:
            _backward_loop_cpp(ctx.cpp, s, g)
        return (None, None, g.d_xh[..., : s.m], g.d_h0, g.d_c, None, *_weight_gradients(s, g))


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
