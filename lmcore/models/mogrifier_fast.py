"""Fast path of the Mogrifier LSTM layer: one autograd node per sequence, backward through time by hand.

`MogrifierLSTMLayer.forward` (lmcore/models/mogrifier.py) calls `mogrifier_lstm` here; the step-by-step
autograd version, `forward_reference`, is what this is tested against. What makes it fast:

* One `torch.autograd.Function` for the whole sequence. The forward loop writes every intermediate
  into preallocated [T, B, ...] buffers with `out=` ops (no per-step allocation, no autograd graph).
  The backward loop runs only the truly sequential chain (state gradients); the weight gradients of
  all time steps are then a few large matrix products over T*B rows (what cuDNN does for the LSTM).
* A round  t <- 2*sigmoid(M s + b) * t  is computed as  t + t*tanh((M/2) s + b/2)  (the same
  function, 2*sigmoid(z) = 1 + tanh(z/2)): one addmm, one tanh, one addcmul, and its backward
  needs only the round's output and the tanh.
* The LSTM gate matmul of x and h is one addmm against [W_ih | W_hh] pre-transposed and contiguous
  (a transposed view is 2-3x slower on the CPU). The final x and h of the mogrifier are written
  straight into the two halves of that matmul's input. The gate rows are reordered internally to
  (g, i, f, o) so that one tanh and one sigmoid cover them; the backward's elementwise factors are
  precomputed for all steps at once after the forward loop, so that per step the gate backward is
  four elementwise ops.

Works on any device and dtype (float64 for gradcheck); under autocast the matmuls and activations run
in the autocast dtype while the cell state stays in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class _Round:
    odd: bool  # odd rounds (1, 3, ...) update x from h; even rounds update h from x
    low_rank: bool
    x_version: int  # index of the x version this round reads/writes (see _Plan)
    h_version: int


def _plan(num_rounds: int) -> tuple[list[_Round], int, int]:
    """Versions of x and h: version 0 is the step's input x / (masked) h, each round makes a new one."""
    rounds, xv, hv = [], 0, 0
    for i in range(1, num_rounds + 1):
        if i % 2 == 1:
            xv += 1
        else:
            hv += 1
        rounds.append((i % 2 == 1, xv, hv))
    return rounds, xv, hv


class _MogrifierLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, low_rank, keep, x, h0, c0, mask, w_ih, w_hh, bias, *round_params):  # noqa: C901
        T, B, m = x.shape
        n = h0.shape[1]
        r = len(low_rank)
        dtype, cdtype = x.dtype, c0.dtype
        new = dict(device=x.device, dtype=dtype)
        # The gate rows in internal order (g, i, f, o): one tanh and one sigmoid cover all gates.
        perm = torch.cat([torch.arange(2 * n, 3 * n), torch.arange(0, 2 * n), torch.arange(3 * n, 4 * n)]).to(x.device)
        w = torch.cat([w_ih, w_hh], 1).index_select(0, perm)  # [4n, m+n]
        w_t = w.t().contiguous()  # [m+n, 4n]
        b = bias.index_select(0, perm)
        # Rounds, with weights and bias halved (exact in floating point): t <- t + t*tanh(M/2 s + b/2).
        mats, rounds, it = [], [], iter(round_params)
        for i, lr in enumerate(low_rank, start=1):
            if lr:
                left, right, rb = next(it), next(it), next(it)
                # z/2 = (s @ R^T) @ (L/2)^T + b/2
                mats.append((right.t().contiguous(), (left * 0.5).t().contiguous(), left * 0.5, right, rb * 0.5))
            else:
                weight, rb = next(it), next(it)
                half = weight * 0.5
                mats.append((None, half.t().contiguous(), half, None, rb * 0.5))
        plan, x_last, h_last = _plan(r)

        steps = T if keep else 1  # without gradients, per-step scratch instead of per-sequence buffers
        out = torch.empty(T, B, n, **new)
        c_all = torch.empty(T + 1, B, n, device=x.device, dtype=cdtype)
        c_all[0] = c0
        xh = torch.empty(steps, B, m + n, **new)  # final x | final h: the input of the gate matmul
        gates = torch.empty(steps, B, 4 * n, **new)
        tanh_c = torch.empty(steps, B, n, **new)
        h_masked = torch.empty(steps, B, n, **new) if mask is not None and h_last > 0 else None
        # versions[k]: buffer of the k-th x (or h) version; version 0 is x itself (h: see the loop)
        x_versions = [x] + [torch.empty(steps, B, m, **new) for _ in range(x_last - 1)] + ([xh[..., :m]] if x_last else [])
        h_versions = [h_masked] + [torch.empty(steps, B, n, **new) for _ in range(h_last - 1)] + ([xh[..., m:]] if h_last else [])
        if x_last == 0:
            if keep:
                xh[..., :m].copy_(x)
        if h_last == 0 and mask is not None:
            h_versions[0] = xh[..., m:]
        tanhs = [torch.empty(steps, B, m if odd else n, **new) for odd, _, _ in plan]
        lowr = [torch.empty(steps, B, mats[i][0].shape[1], **new) if low_rank[i] else None for i in range(r)]

        for t in range(T):
            s = t if keep else 0
            h_prev = h0 if t == 0 else out[t - 1]
            if x_last == 0 and not keep:
                xh[0, :, :m].copy_(x[t])
            if mask is not None:
                h_cur = torch.mul(h_prev, mask, out=h_versions[0][s])
            else:
                h_cur = h_prev
                if h_last == 0:
                    xh[s, :, m:].copy_(h_prev)
            x_cur = x[t]
            for i, (odd, xv, hv) in enumerate(plan):
                right_t, left_t, _, _, rb = mats[i]
                u = tanhs[i][s]
                src, tgt = (h_cur, x_cur) if odd else (x_cur, h_cur)
                if right_t is None:
                    torch.addmm(rb, src, left_t, out=u)
                else:
                    k = lowr[i][s]
                    torch.mm(src, right_t, out=k)
                    torch.addmm(rb, k, left_t, out=u)
                u.tanh_()
                if odd:
                    x_cur = torch.addcmul(tgt, tgt, u, out=x_versions[xv][s])
                else:
                    h_cur = torch.addcmul(tgt, tgt, u, out=h_versions[hv][s])
            g = gates[s]
            torch.addmm(b, xh[s], w_t, out=g)
            g[:, :n].tanh_()
            g[:, n:].sigmoid_()
            c = c_all[t + 1]
            torch.mul(g[:, 2 * n : 3 * n], c_all[t], out=c)
            c.addcmul_(g[:, n : 2 * n], g[:, :n])
            tc = tanh_c[s]
            torch.tanh(c, out=tc)
            torch.mul(g[:, 3 * n :], tc, out=out[t])

        h_t, c_t = out[T - 1].clone(), c_all[T].clone()
        if not keep:
            return out, h_t, c_t

        # Elementwise factors of the gate backward, for all steps at once. Afterwards `gates` holds
        # [i(1-g^2), g i(1-i), c_prev f(1-f), tanh(c) o(1-o)], so that dgates = [dc, dc, dc, dh] * gates.
        gg, ig, fg, og = gates[..., :n], gates[..., n : 2 * n], gates[..., 2 * n : 3 * n], gates[..., 3 * n :]
        forget = fg.clone()
        d_c_from_h = tanh_c.square().neg_().add_(1).mul_(og)  # dc += dh * o (1 - tanh(c)^2)
        new_g = ig * (1 - gg.square())
        ig.mul_(1 - ig).mul_(gg)
        gg.copy_(new_g)
        fg.mul_(1 - fg).mul_(c_all[:-1])
        og.mul_(1 - og).mul_(tanh_c)
        del new_g
        ctx.save_for_backward(out, h0, mask)
        ctx.stuff = (plan, mats, x_versions, h_versions, tanhs, lowr, xh, gates, forget, d_c_from_h, c_all, w, perm)
        ctx.shapes = (T, B, m, n, r, x_last, h_last)
        return out, h_t, c_t

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_ht, d_ct):  # noqa: C901
        out, h0, mask = ctx.saved_tensors
        plan, mats, x_versions, h_versions, tanhs, lowr, xh, gates, forget, d_c_from_h, c_all, w, perm = ctx.stuff
        del ctx.stuff
        T, B, m, n, r, x_last, h_last = ctx.shapes
        dtype = out.dtype
        new = dict(device=out.device, dtype=dtype)
        d_h = d_out.clone(memory_format=torch.contiguous_format) if d_out is not None else torch.zeros(T, B, n, **new)
        if d_ht is not None:
            d_h[T - 1] += d_ht
        d_c = d_ct.clone() if d_ct is not None else torch.zeros(B, n, device=out.device, dtype=c_all.dtype)
        d_xh = torch.empty(T, B, m + n, **new)
        d_h0 = torch.empty(B, n, **new)
        scratch_x = torch.empty(B, m, **new)
        scratch_h = torch.empty(B, n, **new)
        d_lowr = [torch.empty_like(k) if k is not None else None for k in lowr]

        for t in range(T - 1, -1, -1):
            g = gates[t]  # elementwise factors; overwritten with the gate gradients
            dh = d_h[t]
            torch.mul(dh, g[:, 3 * n :], out=g[:, 3 * n :])
            d_c.addcmul_(dh, d_c_from_h[t])
            g3 = g[:, : 3 * n].view(B, 3, n)
            torch.mul(d_c.unsqueeze(1), g3, out=g3)
            d_c.mul_(forget[t])
            dxh = d_xh[t]
            torch.mm(g, w, out=dxh)
            dx, dhh = dxh[:, :m], dxh[:, m:]
            for i in range(r - 1, -1, -1):
                odd, xv, hv = plan[i]
                _, _, left_h, right, _ = mats[i]
                u = tanhs[i][t]
                if odd:
                    dtgt, dsrc, tgt_out, scratch = dx, dhh, x_versions[xv][t], scratch_x
                else:
                    dtgt, dsrc, tgt_out, scratch = dhh, dx, h_versions[hv][t], scratch_h
                torch.mul(dtgt, tgt_out, out=scratch)
                dtgt.addcmul_(dtgt, u)  # d target_before = d target_after * (1 + u)
                torch.addcmul(scratch, scratch, u, value=-1, out=u)  # u <- dz' = d target_after * target_after * (1 - u)
                if right is None:
                    dsrc.addmm_(u, left_h)
                else:
                    dk = d_lowr[i][t]
                    torch.mm(u, left_h, out=dk)
                    dsrc.addmm_(dk, right)
            if t > 0:
                if mask is None:
                    d_h[t - 1].add_(dhh)
                else:
                    d_h[t - 1].addcmul_(dhh, mask)
            else:
                if mask is None:
                    d_h0.copy_(dhh)
                else:
                    torch.mul(dhh, mask, out=d_h0)

        # Weight gradients of all steps at once.
        TB = T * B
        d_gates = gates.view(TB, 4 * n)
        d_w_int = torch.mm(d_gates.t().contiguous(), xh.reshape(TB, m + n))  # [4n, m+n], internal gate order
        d_b_int = d_gates.sum(0)
        inv = torch.argsort(perm)
        d_w = d_w_int.index_select(0, inv)
        d_w_ih, d_w_hh = d_w[:, :m], d_w[:, m:]
        d_bias = d_b_int.index_select(0, inv)

        # Sources of each round: h versions (version 0 unmasked is the previous output) and x versions.
        if mask is None:
            h_prev_all = torch.cat([h0.unsqueeze(0), out[:-1]], 0)
        round_grads = []
        for i, (odd, xv, hv) in enumerate(plan):
            e = tanhs[i].reshape(TB, -1)  # dz' = 2 dz  (z' = z/2)
            if odd:
                src = h_versions[hv][...] if (hv > 0 or mask is not None) else h_prev_all
            else:
                src = x_versions[xv]
            src = src.reshape(TB, -1)
            e_t = e.t().contiguous()
            if mats[i][3] is None:
                d_m = torch.mm(e_t, src).mul_(0.5)
                round_grads += [d_m, e.sum(0).mul_(0.5)]
            else:
                left_h, right = mats[i][2], mats[i][3]
                k = lowr[i].reshape(TB, -1)
                d_left = torch.mm(e_t, k).mul_(0.5)
                d_right = torch.mm(d_lowr[i].reshape(TB, -1).t().contiguous(), src)
                round_grads += [d_left, d_right, e.sum(0).mul_(0.5)]
        d_x = d_xh[..., :m]
        return (None, None, d_x, d_h0, d_c, None, d_w_ih, d_w_hh, d_bias, *round_grads)


def mogrifier_lstm(
    x: Tensor,
    state: tuple[Tensor, Tensor] | None,
    state_mask: Tensor | None,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor,
    round_params: list[tuple[Tensor, ...]],
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The Mogrifier LSTM over a sequence; same contract as `MogrifierLSTMLayer.forward_reference`.

    round_params: per round (weight, bias) for a full-rank round or (left, right, bias) for a low-rank one.
    """
    T, B, _ = x.shape
    n = weight_hh.shape[1]
    if state is None:
        h0 = c0 = x.new_zeros(B, n)
    else:
        h0, c0 = state
    low_rank = tuple(len(p) == 3 for p in round_params)
    flat = [p for ps in round_params for p in ps]
    tensors = [x, h0, c0, weight_ih, weight_hh, bias, *flat]
    if state_mask is not None:
        tensors.append(state_mask)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Matmuls and activations in the autocast dtype; the cell state stays in float32.
        dtype = torch.get_autocast_dtype(device_type)
        cast = lambda t: t if t is None else t.to(dtype)  # noqa: E731
        x, h0, state_mask, weight_ih, weight_hh, bias = map(cast, (x, h0, state_mask, weight_ih, weight_hh, bias))
        flat = [cast(p) for p in flat]
        c0 = c0.float()
        with torch.autocast(device_type, enabled=False):
            out, h_t, c_t = _MogrifierLSTMFunction.apply(
                low_rank, keep, x.contiguous(), h0, c0, state_mask, weight_ih, weight_hh, bias, *flat
            )
    else:
        if state_mask is not None:
            state_mask = state_mask.to(x.dtype)
        out, h_t, c_t = _MogrifierLSTMFunction.apply(
            low_rank, keep, x.contiguous(), h0, c0, state_mask, weight_ih, weight_hh, bias, *flat
        )
    return out, (h_t, c_t)
