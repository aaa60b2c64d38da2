"""The Triton kernels of the fast path's elementwise steps (lmcore/models/mogrifier/triton_steps.py): each against
the torch ops of fast.py's loops that it replaces, and the layer with them against the reference path. Without a
GPU they run in Triton's CPU interpreter; on a GPU (the GPU check's tests stage) on CUDA."""
from __future__ import annotations

import os

import pytest
import torch

from lmcore.models.mogrifier import cpu as mogrifier_cpu
from lmcore.models.mogrifier import fast as mogrifier_fast
from lmcore.models.mogrifier import graphs as mogrifier_graphs
from tests.lmcore.test_mogrifier import grads, make_inputs, make_layer, simulated_capture, training_steps

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are made: they then run on CPU tensors
kernels = pytest.importorskip("lmcore.models.mogrifier.triton_steps", reason="triton is not installed")
DEVICE = torch.device("cuda" if CUDA else "cpu")
B, W, N = 3, 10, 6


def rows(width: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A [B, width] view with strided rows and an offset, as the loops' views of [x | h] are."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, width + 7, generator=g).mul(scale).to(dtype).to(DEVICE)
    return base[:, 3: 3 + width]


def copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def assert_same(fused: list[torch.Tensor], loops: list[torch.Tensor], dtype: torch.dtype) -> None:
    # float32: the activations' last bits. bf16: a GPU rounds to nearest as torch does, so one step (2^-8 relative)
    # at most; Triton's interpreter truncates to bf16 instead, so on the CPU up to two steps and more near zero.
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else \
        {"rtol": 8e-3, "atol": 1e-5} if CUDA else {"rtol": 1.6e-2, "atol": 1e-2}
    for a, b in zip(fused, loops):
        torch.testing.assert_close(a.float(), b.float(), **tol)


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])


@DTYPES
def test_round_forward_is_the_loops_tanh_and_addcmul(dtype):
    u, target, after = rows(W, dtype, 3.0), rows(W, dtype, seed=1), rows(W, dtype, seed=2)
    u2, after2 = copies(u, after)
    torch.addcmul(target, target, u2.tanh_(), out=after2)
    assert kernels.round_forward(u, target, after) is after
    assert_same([u, after], [u2, after2], dtype)


@DTYPES
@pytest.mark.parametrize("autocast", [False, True])
def test_cell_forward_is_the_loops_seven_ops(dtype, autocast):
    c_dtype = torch.float32 if autocast else dtype  # under autocast the cell state is float32
    gates, h, tanh_c = rows(4 * N, dtype, 3.0), rows(N, dtype, seed=1), rows(N, dtype, seed=2)
    c_prev, c = rows(N, c_dtype, 2.0, seed=3), rows(N, c_dtype, seed=4)
    g2, h2, tc2, c2 = copies(gates, h, tanh_c, c)
    g2[:, : 2 * N].sigmoid_()
    g2[:, 2 * N: 3 * N].tanh_()
    g2[:, 3 * N:].sigmoid_()
    torch.mul(g2[:, N: 2 * N], c_prev, out=c2)
    c2.addcmul_(g2[:, :N], g2[:, 2 * N: 3 * N])
    torch.tanh(c2, out=tc2)
    torch.mul(g2[:, 3 * N:], tc2, out=h2)
    kernels.cell_forward(gates, c_prev, c, tanh_c, h)
    assert_same([gates, c, tanh_c, h], [g2, c2, tc2, h2], dtype)


@DTYPES
def test_gate_backward_is_the_loops_four_ops(dtype):
    d_h, dc_dh, forget = rows(N, dtype), rows(N, dtype, seed=1), rows(N, dtype, seed=2)
    factors, d_gates = rows(4 * N, dtype, seed=3), rows(4 * N, dtype, seed=4)
    d_c = rows(N, torch.float32, seed=5)
    d_c2, d_gates2 = copies(d_c, d_gates)
    torch.mul(d_h, factors[:, 3 * N:], out=d_gates2[:, 3 * N:])
    d_c2.addcmul_(d_h, dc_dh)
    torch.mul(d_c2.unsqueeze(1), factors[:, : 3 * N].view(B, 3, N), out=d_gates2[:, : 3 * N].view(B, 3, N))
    d_c2.mul_(forget)
    kernels.gate_backward(d_h, d_c, dc_dh, forget, factors, d_gates)
    assert_same([d_c, d_gates], [d_c2, d_gates2], dtype)


@DTYPES
def test_round_backward_is_the_loops_three_ops(dtype):
    d_target, after, u, d_z = rows(W, dtype), rows(W, dtype, seed=1), rows(W, dtype, 0.5, seed=2), rows(W, dtype)
    d_target2, d_z2 = copies(d_target, d_z)
    scratch = torch.mul(d_target2, after)
    d_target2.addcmul_(d_target2, u)
    torch.addcmul(scratch, scratch, u, value=-1, out=d_z2)
    kernels.round_backward(d_target, after, u, d_z)
    assert_same([d_target, d_z], [d_target2, d_z2], dtype)


@pytest.fixture
def triton_loops(monkeypatch):
    """The layer's Python loops with the Triton kernels (not the C++ loops, which have their own)."""
    monkeypatch.setenv("LMCORE_MOGRIFIER_TRITON", "1")
    monkeypatch.setattr(mogrifier_cpu, "enabled", False)


@pytest.mark.parametrize("rounds,rank,mask", [(5, None, True), (4, 2, False), (1, None, False), (0, None, True)])
def test_fast_path_with_the_kernels_equals_the_reference(triton_loops, rounds, rank, mask):
    layer = make_layer(rounds, rank, torch.float32).to(DEVICE)
    x, state, state_mask = make_inputs(torch.float32, mask=mask)
    x, state = x.detach().to(DEVICE).requires_grad_(), tuple(s.detach().to(DEVICE).requires_grad_() for s in state)
    state_mask = None if state_mask is None else state_mask.to(DEVICE)
    assert mogrifier_fast._triton_steps(x) is kernels
    fast = grads(layer, layer.forward, x, state, state_mask)
    ref = grads(layer, layer.forward_reference, x, state, state_mask)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-3 if CUDA else 1e-4, atol=1e-4 if CUDA else 1e-5)  # CUDA: TF32


def test_without_gradients_the_kernels_run_on_one_step_buffers(triton_loops):
    layer = make_layer(5, 2, torch.float32).to(DEVICE)
    x, (h0, c0), state_mask = make_inputs(torch.float32, mask=True)
    x, state, state_mask = x.to(DEVICE), (h0.to(DEVICE), c0.to(DEVICE)), state_mask.to(DEVICE)
    with torch.no_grad():  # evaluation: the forward keeps no step, its buffers are one step long
        out, (h, c) = layer(x, state, state_mask)
        out_r, (h_r, c_r) = layer.forward_reference(x, state, state_mask)
    for a, b in zip((out, h, c), (out_r, h_r, c_r)):
        torch.testing.assert_close(a, b, rtol=1e-3 if CUDA else 1e-4, atol=1e-4 if CUDA else 1e-5)


def test_bf16_autocast_with_the_kernels_follows_the_loops_ops(monkeypatch, triton_loops):
    """The kernels round what the loops store to bf16 as the loops do: a few steps of training stay close."""
    layer = make_layer(5, 2, torch.float32).to(DEVICE)
    with_kernels = training_steps(layer, mask=True, amp=True)
    monkeypatch.setenv("LMCORE_MOGRIFIER_TRITON", "0")
    without = training_steps(make_layer(5, 2, torch.float32).to(DEVICE), mask=True, amp=True)
    for a, b in zip(with_kernels, without):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_the_kernels_apply_only_where_asked_and_able(monkeypatch):
    x = torch.zeros(2, 3, device=DEVICE)
    monkeypatch.delenv("LMCORE_MOGRIFIER_TRITON", raising=False)
    assert mogrifier_fast._triton_steps(x) is None  # opt-in
    monkeypatch.setenv("LMCORE_MOGRIFIER_TRITON", "1")
    assert mogrifier_fast._triton_steps(x) is kernels
    assert mogrifier_fast._triton_steps(x.double()) is None  # float64 (gradcheck) keeps the torch ops
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert mogrifier_fast._triton_steps(x) is None  # a CPU tensor outside the interpreter


def test_a_graph_captured_with_torch_ops_is_not_replayed_with_the_kernels(monkeypatch):
    monkeypatch.setattr(mogrifier_graphs.Captured, "_capture", simulated_capture)
    monkeypatch.setattr(mogrifier_graphs, "applies", lambda x: torch.is_grad_enabled())
    layer = make_layer(3, None, torch.float32)
    training_steps(layer, mask=False, amp=False, steps=2)
    monkeypatch.setenv("LMCORE_MOGRIFIER_TRITON", "1")
    training_steps(layer, mask=False, amp=False, steps=2)
    assert mogrifier_graphs.captured(layer) == 2


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_graphs_with_the_kernels_equal_the_eager_fast_path(triton_loops):
    graphed, eager = make_layer(5, 2, torch.float32).cuda(), make_layer(5, 2, torch.float32).cuda()
    eager.cuda_graphs = False
    replayed = training_steps(graphed, mask=True, amp=True)
    assert mogrifier_graphs.captured(graphed) == 1
    for a, b in zip(replayed, training_steps(eager, mask=True, amp=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
