"""The elementwise work of a fast-path step as four Triton kernels, for the Python loops on CUDA (fast.py).

Replayed as CUDA graphs (graphs.py) the layer no longer pays for launches from Python, but each of a step's ~60
small kernels still costs a few microseconds of GPU time, and most of them are elementwise. Each kernel here is
the elementwise work between two matrix products of a step, reading and writing the loops' own buffers:

  round_forward   u <- tanh(u); after = target (1 + u)                                  (2 ops -> 1 kernel)
  cell_forward    the gates' activations, c = f c_prev + i g, tanh(c), h = o tanh(c)     (7 -> 1)
  gate_backward   d o, d c += d h dc/dh, d i, d f, d g, d c *= f                         (4 -> 1)
  round_backward  d z' = d after * after (1 - u); d target *= 1 + u                     (3 -> 1)

They compute in float32 and round each intermediate that the loops' ops store to the buffer's dtype, so they
follow the torch ops they replace up to the activations' last bits (bf16: within its rounding). Every argument
is a [B, width] view whose rows may be strided (e.g. x's half of [x | h]); its columns must be contiguous.
Opt-in (LMCORE_MOGRIFIER_TRITON=1, fast.py) until a GPU check has measured them; with TRITON_INTERPRET=1 they
run on CPU tensors (numpy), which is how the tests hold them to the loops' ops.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _tanh(x):
    # tanh from exp (tl has no tanh; libdevice's is not in Triton's interpreter): |error| ~1e-7 in float32
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _stored(x, ptr):
    """x as the buffer at ptr stores it, back in float32: what the next op of the loops reads."""
    return x.to(ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _round_forward(u_ptr, target_ptr, after_ptr, u_row, target_row, after_row, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    u_at, target_at = u_ptr + row * u_row + cols, target_ptr + row * target_row + cols
    u = _stored(_tanh(tl.load(u_at, mask=inside).to(tl.float32)), u_ptr)
    target = tl.load(target_at, mask=inside).to(tl.float32)
    tl.store(u_at, u, mask=inside)
    tl.store(after_ptr + row * after_row + cols, target + target * u, mask=inside)


@triton.jit
def _cell_forward(gates_ptr, c_prev_ptr, c_ptr, tanh_c_ptr, h_ptr, gates_row, c_prev_row, c_row, tanh_c_row,
                  h_row, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n
    gate_at = gates_ptr + row * gates_row + cols  # i, f, g, o at columns 0, n, 2n, 3n
    i = _stored(tl.sigmoid(tl.load(gate_at, mask=inside).to(tl.float32)), gates_ptr)
    f = _stored(tl.sigmoid(tl.load(gate_at + n, mask=inside).to(tl.float32)), gates_ptr)
    g = _stored(_tanh(tl.load(gate_at + 2 * n, mask=inside).to(tl.float32)), gates_ptr)
    o = _stored(tl.sigmoid(tl.load(gate_at + 3 * n, mask=inside).to(tl.float32)), gates_ptr)
    tl.store(gate_at, i, mask=inside)
    tl.store(gate_at + n, f, mask=inside)
    tl.store(gate_at + 2 * n, g, mask=inside)
    tl.store(gate_at + 3 * n, o, mask=inside)
    c_prev = tl.load(c_prev_ptr + row * c_prev_row + cols, mask=inside).to(tl.float32)
    c = _stored(_stored(f * c_prev, c_ptr) + i * g, c_ptr)
    tanh_c = _stored(_tanh(c), tanh_c_ptr)
    tl.store(c_ptr + row * c_row + cols, c, mask=inside)
    tl.store(tanh_c_ptr + row * tanh_c_row + cols, tanh_c, mask=inside)
    tl.store(h_ptr + row * h_row + cols, o * tanh_c, mask=inside)


@triton.jit
def _gate_backward(d_h_ptr, d_c_ptr, dc_dh_ptr, forget_ptr, factors_ptr, d_gates_ptr, d_h_row, d_c_row, dc_dh_row,
                   forget_row, factors_row, d_gates_row, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n
    factor_at, d_gate_at = factors_ptr + row * factors_row + cols, d_gates_ptr + row * d_gates_row + cols
    d_c_at = d_c_ptr + row * d_c_row + cols
    d_h = tl.load(d_h_ptr + row * d_h_row + cols, mask=inside).to(tl.float32)
    o_factor = tl.load(factor_at + 3 * n, mask=inside).to(tl.float32)
    tl.store(d_gate_at + 3 * n, d_h * o_factor, mask=inside)
    dc_dh = tl.load(dc_dh_ptr + row * dc_dh_row + cols, mask=inside).to(tl.float32)
    d_c = _stored(tl.load(d_c_at, mask=inside).to(tl.float32) + d_h * dc_dh, d_c_ptr)
    for k in tl.static_range(3):  # i, f, g: d c times their factors
        factor = tl.load(factor_at + k * n, mask=inside).to(tl.float32)
        tl.store(d_gate_at + k * n, d_c * factor, mask=inside)
    forget = tl.load(forget_ptr + row * forget_row + cols, mask=inside).to(tl.float32)
    tl.store(d_c_at, d_c * forget, mask=inside)


@triton.jit
def _round_backward(d_target_ptr, after_ptr, u_ptr, d_z_ptr, d_target_row, after_row, u_row, d_z_row, width,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    d_target_at = d_target_ptr + row * d_target_row + cols
    d_target = tl.load(d_target_at, mask=inside).to(tl.float32)
    after = tl.load(after_ptr + row * after_row + cols, mask=inside).to(tl.float32)
    u = tl.load(u_ptr + row * u_row + cols, mask=inside).to(tl.float32)
    scaled = _stored(d_target * after, d_target_ptr)  # the loops' scratch has the target's dtype
    tl.store(d_z_ptr + row * d_z_row + cols, scaled - scaled * u, mask=inside)
    tl.store(d_target_at, d_target + d_target * u, mask=inside)


def _launch(width: int, rows: int) -> tuple[tuple[int, int], int]:
    """The grid (a program per row and block of columns) and the block width."""
    block = min(triton.next_power_of_2(width), 1024)
    return (rows, triton.cdiv(width, block)), block


def round_forward(u: Tensor, target: Tensor, after: Tensor) -> Tensor:
    """u [B, w] holds z / 2 and becomes tanh(z / 2); after = target (1 + u) = 2 sigmoid(z) target. Returns after."""
    grid, block = _launch(u.shape[1], u.shape[0])
    _round_forward[grid](u, target, after, u.stride(0), target.stride(0), after.stride(0), u.shape[1], BLOCK=block)
    return after


def cell_forward(gates: Tensor, c_prev: Tensor, c: Tensor, tanh_c: Tensor, h: Tensor) -> None:
    """gates [B, 4n] (pre-activations) become sigmoid(i), sigmoid(f), tanh(g), sigmoid(o); c = f c_prev + i g;
    tanh_c = tanh(c); h = o tanh(c)."""
    grid, block = _launch(c.shape[1], c.shape[0])
    _cell_forward[grid](gates, c_prev, c, tanh_c, h, gates.stride(0), c_prev.stride(0), c.stride(0),
                        tanh_c.stride(0), h.stride(0), c.shape[1], BLOCK=block)


def gate_backward(d_h: Tensor, d_c: Tensor, dc_dh: Tensor, forget: Tensor, factors: Tensor, d_gates: Tensor) -> None:
    """A step's gate gradients from fast.py's `_gate_backward_factors`: d o = d h * its factor; d c += d h * dc/dh;
    d i, d f, d g = d c * their factors; then d c *= f (d c of the step before). factors, d_gates: [B, 4n]."""
    grid, block = _launch(d_c.shape[1], d_c.shape[0])
    _gate_backward[grid](d_h, d_c, dc_dh, forget, factors, d_gates, d_h.stride(0), d_c.stride(0), dc_dh.stride(0),
                         forget.stride(0), factors.stride(0), d_gates.stride(0), d_c.shape[1], BLOCK=block)


def round_backward(d_target: Tensor, after: Tensor, u: Tensor, d_z: Tensor) -> None:
    """A round's elementwise backward: d z' = d after * after * (1 - u) (z' = z / 2); d target (d after, in place)
    becomes d target before the round = d after * (1 + u)."""
    grid, block = _launch(u.shape[1], u.shape[0])
    _round_backward[grid](d_target, after, u, d_z, d_target.stride(0), after.stride(0), u.stride(0), d_z.stride(0),
                          u.shape[1], BLOCK=block)
