"""The Mogrifier LSTM layer: its equations, and the fast path (mogrifier/fast.py) against the reference.

`paper_step` below is the paper's equations written out with plain tensor maths on the layer's
parameters, independent of lmcore; `forward_reference` is checked against it, and the fast path
(`forward`, what the trainer runs) against `forward_reference`: outputs, final state and the gradients
of every parameter, the input and the initial state.
"""
from __future__ import annotations

import itertools
import os
import shutil
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lmcore.models.mogrifier import MogrifierLSTMLayer
from lmcore.models.mogrifier import cpu as mogrifier_cpu
from lmcore.models.mogrifier import fast as mogrifier_fast
from lmcore.models.mogrifier import graphs as mogrifier_graphs
from tests.conftest import REPO_ROOT, process_output, run_process

T, B, M, N = 5, 3, 6, 4  # input size != hidden size, so that transposed shapes cannot pass by accident
ROUNDS = range(7)
RANKS = [None, 2]


def make_layer(rounds, rank, dtype=torch.float64, seed=0, m=M, n=N):
    torch.manual_seed(seed)
    layer = MogrifierLSTMLayer(m, n, rounds, rank).to(dtype)
    with torch.no_grad():  # larger than the default init, and non-zero round biases: every term matters
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def make_inputs(dtype=torch.float64, seed=1, t=T, b=B, m=M, n=N, mask=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, b, m, generator=g, dtype=dtype).requires_grad_()
    h0 = torch.randn(b, n, generator=g, dtype=dtype).mul(0.5).requires_grad_()
    c0 = torch.randn(b, n, generator=g, dtype=dtype).requires_grad_()
    state_mask = (torch.rand(b, n, generator=g) > 0.3).to(dtype) / 0.7 if mask else None
    return x, (h0, c0), state_mask


def paper_step(layer, x, h, c):
    """One step from the paper's equations (Melis et al. 2020, eq. 1-2), plain tensor maths."""
    for i, rnd in enumerate(layer.mogrify_rounds, start=1):
        mat = rnd.weight if rnd.rank is None else rnd.left @ rnd.right
        if i % 2 == 1:  # x^i = 2 sigma(Q^i h^{i-1}) * x^{i-2}
            x = 2 * torch.sigmoid(h @ mat.T + rnd.bias) * x
        else:  # h^i = 2 sigma(R^i x^{i-1}) * h^{i-2}
            h = 2 * torch.sigmoid(x @ mat.T + rnd.bias) * h
    n = layer.hidden_size
    z = x @ layer.weight_ih.T + h @ layer.weight_hh.T + layer.bias
    i, f, g, o = z[:, :n], z[:, n : 2 * n], z[:, 2 * n : 3 * n], z[:, 3 * n :]
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def paper_forward(layer, x, state, state_mask):
    h, c = state
    outputs = []
    for x_t in x:
        h, c = paper_step(layer, x_t, h if state_mask is None else h * state_mask, c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def loss_of(out, h, c):
    """A loss that weighs every output, the final h and the final c differently."""
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return (out * w).sum() + (h * h).sum() + (c.sin()).sum()


def grads(layer, fn, x, state, state_mask):
    out, (h, c) = fn(x, state, state_mask)
    inputs = [x, *state, *layer.parameters()]
    return [out, h, c, *torch.autograd.grad(loss_of(out, h, c), inputs)]


@pytest.mark.parametrize("rounds,rank,mask", list(itertools.product(ROUNDS, RANKS, [False, True])))
def test_reference_follows_the_paper_equations(rounds, rank, mask):
    layer = make_layer(rounds, rank)
    x, state, state_mask = make_inputs(mask=mask)
    out, (h, c) = layer.forward_reference(x, state, state_mask)
    out_p, (h_p, c_p) = paper_forward(layer, x, state, state_mask)
    torch.testing.assert_close(out, out_p)
    torch.testing.assert_close(h, h_p)
    torch.testing.assert_close(c, c_p)


@pytest.mark.parametrize("loops", ["cpp", "python"])
@pytest.mark.parametrize("rounds,rank,mask", list(itertools.product(ROUNDS, RANKS, [False, True])))
def test_fast_path_equals_reference_forward_and_gradients_float32(monkeypatch, rounds, rank, mask, loops):
    """On the CPU in float32 the fast path runs its per-step loops in C++ where it can, else in Python."""
    if loops == "cpp" and mogrifier_cpu.extension() is None:
        pytest.skip(f"C++ loops unavailable ({mogrifier_cpu.unsupported_reason()})")
    monkeypatch.setattr(mogrifier_cpu, "enabled", loops == "cpp")
    layer = make_layer(rounds, rank, torch.float32)
    x, state, state_mask = make_inputs(torch.float32, mask=mask)
    fast = grads(layer, layer.forward, x, state, state_mask)
    ref = grads(layer, layer.forward_reference, x, state, state_mask)
    names = ["out", "h_T", "c_T", "d x", "d h0", "d c0", *(f"d {n}" for n, _ in layer.named_parameters())]
    assert len(fast) == len(names)
    for name, a, b in zip(names, fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("rounds,rank,mask", list(itertools.product(ROUNDS, RANKS, [False, True])))
def test_fast_path_gradcheck_float64(rounds, rank, mask):
    layer = make_layer(rounds, rank, m=3, n=2)
    x, (h0, c0), state_mask = make_inputs(t=3, b=2, m=3, n=2, mask=mask)

    def fn(x, h0, c0, *params):  # the parameters are perturbed in place by gradcheck
        out, (h, c) = layer.forward_fast(x, (h0, c0), state_mask)
        return out, h, c

    slow = rounds in (0, 5) and rank is None  # the full Jacobian on two cases, fast mode on the rest
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *layer.parameters()), fast_mode=not slow)


@pytest.mark.parametrize("fast", [True, False])
def test_zero_rounds_is_exactly_torch_lstm(fast):
    layer = make_layer(0, None, torch.float32)
    layer.fast_path = fast
    lstm = nn.LSTM(M, N)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(layer.weight_ih)
        lstm.weight_hh_l0.copy_(layer.weight_hh)
        lstm.bias_ih_l0.copy_(layer.bias)
        lstm.bias_hh_l0.zero_()
    x, (h0, c0), _ = make_inputs(torch.float32)
    out, (h, c) = layer(x, (h0, c0))
    out_l, (h_l, c_l) = lstm(x, (h0[None], c0[None]))
    torch.testing.assert_close(out, out_l)
    torch.testing.assert_close(h, h_l[0])
    torch.testing.assert_close(c, c_l[0])
    g = torch.autograd.grad(out.sum(), [x, layer.weight_ih, layer.weight_hh])
    g_l = torch.autograd.grad(out_l.sum(), [x, lstm.weight_ih_l0, lstm.weight_hh_l0])
    for a, b in zip(g, g_l):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("rounds,rank", list(itertools.product(ROUNDS, [None, 3])))
def test_shapes_and_parameter_count(rounds, rank):
    m, n = 7, 5
    layer = MogrifierLSTMLayer(m, n, rounds, rank)
    shapes = dict((name, tuple(p.shape)) for name, p in layer.named_parameters())
    assert shapes.pop("weight_ih") == (4 * n, m)
    assert shapes.pop("weight_hh") == (4 * n, n)
    assert shapes.pop("bias") == (4 * n,)
    for i in range(1, rounds + 1):  # odd rounds: Q^i [m, n]; even rounds: R^i [n, m]
        out_size, in_size = (m, n) if i % 2 == 1 else (n, m)
        prefix = f"mogrify_rounds.{i - 1}."
        if rank is None:
            assert shapes.pop(prefix + "weight") == (out_size, in_size)
        else:
            assert shapes.pop(prefix + "left") == (out_size, rank)
            assert shapes.pop(prefix + "right") == (rank, in_size)
        assert shapes.pop(prefix + "bias") == (out_size,)
    assert not shapes
    matrix = m * n if rank is None else rank * (m + n)
    per_round = [matrix + (m if i % 2 == 1 else n) for i in range(1, rounds + 1)]
    assert sum(p.numel() for p in layer.parameters()) == 4 * n * (m + n) + 4 * n + sum(per_round)


@pytest.mark.parametrize("rank", RANKS)
def test_gradient_reaches_every_parameter(rank):
    layer = make_layer(6, rank, torch.float32)
    x, state, state_mask = make_inputs(torch.float32, mask=True)
    out, (h, c) = layer(x, state, state_mask)
    loss_of(out, h, c).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0 and state[0].grad.abs().sum() > 0 and state[1].grad.abs().sum() > 0


def test_default_forward_is_the_fast_path(monkeypatch):
    layer = make_layer(5, None, torch.float32)
    x, state, state_mask = make_inputs(torch.float32, mask=True)
    out, _ = layer(x, state, state_mask)
    # one autograd node for the whole sequence, not the reference's per-step graph
    assert type(out.grad_fn).__name__ == "_MogrifierLSTMFunctionBackward"

    def no_reference(*args, **kwargs):
        raise AssertionError("forward_reference called")

    monkeypatch.setattr(MogrifierLSTMLayer, "forward_reference", no_reference)
    layer(x, state, state_mask)[0].sum().backward()  # training
    layer.eval()
    with torch.no_grad():
        layer(x, state)  # evaluation
    monkeypatch.undo()

    layer.fast_path = False  # the per-instance escape hatch
    assert type(layer(x, state, state_mask)[0].grad_fn).__name__ == "StackBackward0"
    del layer.fast_path
    monkeypatch.setattr(MogrifierLSTMLayer, "fast_path", False)  # and the class-wide one
    assert type(layer(x, state, state_mask)[0].grad_fn).__name__ == "StackBackward0"


def test_no_grad_and_eval_give_the_same_outputs():
    layer = make_layer(5, 2, torch.float32)
    x, state, state_mask = make_inputs(torch.float32, mask=True)
    out, (h, c) = layer(x, state, state_mask)
    with torch.no_grad():
        out2, (h2, c2) = layer(x, state, state_mask)
        out_r, _ = layer.forward_reference(x, state, state_mask)
    assert out2.grad_fn is None
    torch.testing.assert_close(out2, out.detach())
    torch.testing.assert_close(h2, h.detach())
    torch.testing.assert_close(c2, c.detach())
    torch.testing.assert_close(out2, out_r, rtol=1e-4, atol=1e-5)
    out3, _ = layer(x.detach(), None)  # no input requires grad, but the parameters do
    assert out3.requires_grad


def test_retain_graph_and_overlapping_graphs_give_the_same_gradients():
    """The backward must not destroy what a second backward needs, and buffers reused across calls
    (the CPU workspace) must not be shared by graphs that are alive at the same time."""
    layer = make_layer(5, None, torch.float32)
    params = list(layer.parameters())
    x, state, state_mask = make_inputs(torch.float32, mask=True)
    x2, state2, _ = make_inputs(torch.float32, seed=7, t=T + 2)
    ref1 = torch.autograd.grad(loss_of(*flat(layer.forward_reference(x, state, state_mask))), params)
    ref2 = torch.autograd.grad(loss_of(*flat(layer.forward_reference(x2, state2, None))), params)
    loss1 = loss_of(*flat(layer(x, state, state_mask)))
    loss2 = loss_of(*flat(layer(x2, state2, None)))  # both graphs alive
    for _ in range(2):
        g2 = torch.autograd.grad(loss2, params, retain_graph=True)
        g1 = torch.autograd.grad(loss1, params, retain_graph=True)
        for a, b in zip(g1 + g2, ref1 + ref2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    del loss1, loss2
    for t in (T + 2, T - 2, 1):  # new graphs of other lengths, after the first ones were freed
        xs, st, mk = (x2[:t], state2, None) if t > T else (x[:t], state, state_mask)
        got = torch.autograd.grad(loss_of(*flat(layer(xs, st, mk))), params)
        want = torch.autograd.grad(loss_of(*flat(layer.forward_reference(xs, st, mk))), params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def flat(result):
    out, (h, c) = result
    return out, h, c


def test_state_mask_with_gradient_falls_back_to_the_reference():
    layer = make_layer(3, None, torch.float32)
    x, state, state_mask = make_inputs(torch.float32, mask=True)
    state_mask.requires_grad_()
    out, _ = layer(x, state, state_mask)
    out.sum().backward()
    assert state_mask.grad is not None


def test_non_contiguous_input_and_no_initial_state():
    layer = make_layer(4, None, torch.float32)
    x = torch.randn(B, T, M).transpose(0, 1).requires_grad_()
    fast = grads_no_state(layer, layer.forward, x)
    ref = grads_no_state(layer, layer.forward_reference, x)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def grads_no_state(layer, fn, x):
    out, (h, c) = fn(x)
    return [out, h, c, *torch.autograd.grad(loss_of(out, h, c), [x, *layer.parameters()])]


def test_bf16_autocast_on_cpu_runs_close_to_the_reference():
    layer = make_layer(5, None, torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(0.5)
    x, state, state_mask = make_inputs(torch.float32, mask=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = layer(x, state, state_mask)
        out_r, (h_r, c_r) = layer.forward_reference(x, state, state_mask)
    assert out.dtype == torch.bfloat16 and c.dtype == torch.float32  # the cell state stays in float32
    torch.testing.assert_close(out.float(), out_r.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(c, c_r.float(), rtol=0.05, atol=0.05)
    g = torch.autograd.grad(out.float().sum(), [x, layer.weight_hh])
    g_r = torch.autograd.grad(out_r.float().sum(), [x, layer.weight_hh])
    assert all(a.dtype == torch.float32 for a in g)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1)


def test_release_workspace():
    layer = make_layer(2, None, torch.float32)
    x, state, _ = make_inputs(torch.float32)
    layer(x, state)[0].sum().backward()
    mogrifier_fast.release_workspace()
    layer(x, state)[0].sum().backward()  # and it still works afterwards


class _CountingExtension:
    """Wraps the C++ extension (or nothing) and counts the loops it runs."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def __getattr__(self, name):
        return getattr(self.ext, name)

    def forward_loop(self, *args):
        self.calls.append("forward")
        return self.ext.forward_loop(*args)

    def backward_loop(self, *args):
        self.calls.append("backward")
        return self.ext.backward_loop(*args)


CPP = mogrifier_cpu.extension()  # built here on first use (cached in torch's extensions directory)
needs_cpp = pytest.mark.skipif(CPP is None, reason=f"C++ loops unavailable ({mogrifier_cpu.unsupported_reason()})")


@needs_cpp
def test_a_process_killed_while_loading_never_blocks_the_next(tmp_path):
    """A trial killed while loading the extension leaves torch's lock file behind (a SIGKILL skips every cleanup);
    the next process still loads it instead of waiting on that file forever."""
    extensions = tmp_path / "torch_extensions"
    shutil.copytree(mogrifier_cpu.build_directory(), extensions / mogrifier_cpu.build_directory().name)
    (extensions / mogrifier_cpu.build_directory().name / "lock").touch()  # as the killed process left it
    load = "from lmcore.models.mogrifier import cpu; assert cpu.extension() is not None, 'not loaded'"
    loaded = run_process([sys.executable, "-c", load], timeout=300, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert loaded.returncode == 0, process_output(loaded.stdout, loaded.stderr)


@needs_cpp
def test_cpu_float32_runs_the_cpp_loops_by_default(monkeypatch):
    spy = _CountingExtension(CPP)
    monkeypatch.setattr(mogrifier_cpu, "extension", lambda: spy)
    layer = make_layer(5, None, torch.float32)
    x, state, state_mask = make_inputs(torch.float32, mask=True)
    grads(layer, layer.forward, x, state, state_mask)
    assert spy.calls == ["forward", "backward"]
    layer64 = make_layer(5, None, torch.float64)
    grads(layer64, layer64.forward, *make_inputs(torch.float64, mask=True))
    assert spy.calls == ["forward", "backward"]  # unchanged: float64 (gradcheck) takes the Python loops


@needs_cpp
@pytest.mark.parametrize("rounds,rank,mask", [(5, None, True), (5, None, False), (4, 3, True), (1, 3, False), (0, None, True)])
def test_cpp_loops_vectorised_and_batch_chunked_equal_the_reference(monkeypatch, rounds, rank, mask):
    # Sizes that take every code path: 20 and 12 features = two and one 8-wide vectors plus a scalar tail;
    # 19 rows over two threads = chunks of 9 and 10 rows, each running its own recurrence.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert CPP.chunk_count(19) == 2 and CPP.chunk_count(15) == 1
        layer = make_layer(rounds, rank, torch.float32, m=12, n=20)
        with torch.no_grad():
            for p in layer.parameters():
                p.mul_(0.6)  # (smaller weights: float32 errors are not amplified over the steps)
        x, state, state_mask = make_inputs(torch.float32, t=6, b=19, m=12, n=20, mask=mask)
        fast = grads(layer, layer.forward, x, state, state_mask)
        ref = grads(layer, layer.forward_reference, x, state, state_mask)
        with torch.no_grad():  # inference: one step of buffers, reused
            out_no_grad, (h_no_grad, _) = layer(x, state, state_mask)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out_no_grad, fast[0].detach())
    torch.testing.assert_close(h_no_grad, fast[1].detach())
    names = ["out", "h_T", "c_T", "d x", "d h0", "d c0", *(f"d {n}" for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@needs_cpp
@pytest.mark.parametrize("products", ["mkl", "avx512"])
def test_cpp_products_on_mkl_and_on_the_avx512_kernel_equal_the_reference(products):
    """The per-step products run on MKL's packed GEMM on Intel CPUs and on a plain AVX-512 kernel on other CPUs
    with AVX-512 (cpu.cpp); each is checked wherever the CPU allows it. 20 and 84 features = partial 32-column
    panels; on 2 threads 19 rows = chunks of 9 and 10 rows (kernel calls of 8 rows and a tail), 5 rows = one chunk
    whose products the threads share."""
    default, threads = CPP.products(), torch.get_num_threads()
    try:
        CPP.set_products(products)
    except RuntimeError:
        pytest.skip(f"{products}: not on this CPU")
    torch.set_num_threads(2)
    try:
        assert CPP.products() == products
        for m, n, rounds, rank, b in [(12, 20, 5, None, 19), (40, 84, 4, 7, 5)]:
            layer = make_layer(rounds, rank, torch.float32, m=m, n=n)
            with torch.no_grad():
                for p in layer.parameters():
                    p.mul_(0.6)  # (smaller weights: float32 errors are not amplified over the steps)
            x, state, state_mask = make_inputs(torch.float32, t=6, b=b, m=m, n=n, mask=True)
            fast = grads(layer, layer.forward, x, state, state_mask)
            ref = grads(layer, layer.forward_reference, x, state, state_mask)
            for a, r in zip(fast, ref):  # (gradients up to ~60 here: the tolerance scales with each tensor)
                torch.testing.assert_close(a, r, rtol=1e-4, atol=2e-5 * r.abs().max().item())
    finally:
        CPP.set_products(default)
        torch.set_num_threads(threads)


@needs_cpp
def test_cpp_tanh_is_accurate_to_float_precision_and_keeps_nan():
    z = torch.cat([torch.linspace(-20, 20, 400_003), torch.tensor([0.0, -0.0, 1e-30, -3e-4, 5e-4, 1e30, -1e30])])
    z = torch.cat([z, torch.tensor([float("inf"), float("-inf"), float("nan")])])
    got = z.clone()
    CPP.tanh_(got)
    want = torch.tanh(z.double())
    err = (got.double() - want).abs()[:-1]
    assert err.max().item() < 3e-7  # a few float32 ulp (torch.tanh: 0.5); a float32 product rounds more
    rel = err / want[:-1].abs().clamp_min(1e-30)
    assert rel[z[:-1].abs() < 1].max().item() < 5e-7  # also relative: tiny inputs keep their digits
    assert torch.isnan(got[-1])


def test_disabled_cpp_loops_fall_back_to_the_python_loops(monkeypatch):
    monkeypatch.setattr(mogrifier_cpu, "enabled", False)
    assert mogrifier_cpu.extension() is None
    layer = make_layer(3, 2, torch.float32)
    x, state, state_mask = make_inputs(torch.float32, mask=True)
    fast = grads(layer, layer.forward, x, state, state_mask)
    ref = grads(layer, layer.forward_reference, x, state, state_mask)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_failed_cpp_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def broken_load(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(mogrifier_cpu, "_module", None)
    monkeypatch.setattr(mogrifier_cpu, "_failed", False)
    monkeypatch.setattr(mogrifier_cpu, "enabled", True)
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    layer = make_layer(2, None, torch.float32)
    x, state, _ = make_inputs(torch.float32)
    with pytest.warns(RuntimeWarning, match="Python fast path"):
        out, _ = layer(x, state)
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning
        layer(x, state)[0].sum().backward()
    out_r, _ = layer.forward_reference(x, state)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("rounds,rank,mask", [(5, None, True), (4, 2, False), (0, None, True)])
def test_cuda_fast_path_equals_reference(rounds, rank, mask):
    layer = make_layer(rounds, rank, torch.float32).cuda()
    x, state, state_mask = make_inputs(torch.float32, mask=mask)
    x, state = x.detach().cuda().requires_grad_(), tuple(s.detach().cuda().requires_grad_() for s in state)
    state_mask = None if state_mask is None else state_mask.cuda()
    fast = grads(layer, layer.forward, x, state, state_mask)
    ref = grads(layer, layer.forward_reference, x, state, state_mask)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # TF32 may be on
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, (h, c) = layer(x, state, state_mask)
        out_r, _ = layer.forward_reference(x, state, state_mask)
    torch.testing.assert_close(out.float(), out_r.float(), rtol=0.05, atol=0.05)
    out.float().sum().backward()


def test_no_cuda_graphs_on_the_cpu():
    layer = make_layer(3, 2, torch.float32)
    x, state, _ = make_inputs(torch.float32)
    for _ in range(3):
        layer(x, state)[0].sum().backward()
    assert mogrifier_graphs.captured(layer) == 0


def simulated_capture(self):
    """Captured._capture without a GPU: "replaying" runs the same forward and backward again into the same static
    buffers, as a graph replay does."""
    self.outputs = self._forward()
    self.grad_outputs = [torch.zeros_like(o) for o in self.outputs]
    self.grads = self._backward()

    def into(statics, fresh):
        for static, new in zip(statics, fresh):
            if static is not None:
                static.copy_(new)

    self.forward_graph = SimpleNamespace(replay=lambda: into(self.outputs, self._forward()))
    self.backward_graph = SimpleNamespace(replay=lambda: into(self.grads, self._backward()))


def training_steps(layer, mask: bool, amp: bool, steps: int = 4) -> list[torch.Tensor]:
    """Outputs and gradients of a few SGD steps, new inputs each step, the state carried over."""
    state, outputs = None, []
    device = next(layer.parameters()).device
    for step in range(steps):
        x, _, state_mask = make_inputs(torch.float32, seed=step, mask=mask)
        x = x.detach().to(device).requires_grad_()
        state_mask = None if state_mask is None else state_mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out, state = layer(x, state, state_mask)
        out.float().pow(2).sum().backward()
        outputs += [out.detach().float(), x.grad, *(p.grad.clone() for p in layer.parameters())]
        with torch.no_grad():
            for p in layer.parameters():
                p -= 0.01 * p.grad
                p.grad = None
        state = tuple(s.detach() for s in state)
    return outputs


@pytest.mark.parametrize("rank,mask,amp", [(None, True, False), (2, False, False), (2, True, True)])
def test_graph_replays_equal_the_eager_fast_path(monkeypatch, rank, mask, amp):
    """The graphs' bookkeeping (static buffers, casts, which gradients go where, the weights read in place),
    with the capture simulated on the CPU: the GPU check runs the real capture (test_cuda_graphs_...)."""
    monkeypatch.setattr(mogrifier_graphs.Captured, "_capture", simulated_capture)
    monkeypatch.setattr(mogrifier_graphs, "applies", lambda x: torch.is_grad_enabled())
    graphed, eager = make_layer(5, rank, torch.float32), make_layer(5, rank, torch.float32)
    eager.cuda_graphs = False
    replayed = training_steps(graphed, mask, amp)
    assert mogrifier_graphs.captured(graphed) == 1
    for a, b in zip(replayed, training_steps(eager, mask, amp)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_second_forward_before_the_backward_runs_eagerly(monkeypatch):
    """Replaying a key again before its backward would overwrite what that backward reads."""
    monkeypatch.setattr(mogrifier_graphs.Captured, "_capture", simulated_capture)
    monkeypatch.setattr(mogrifier_graphs, "applies", lambda x: torch.is_grad_enabled())
    layer = make_layer(3, None, torch.float32)
    x, state, _ = make_inputs(torch.float32)
    layer(x, state)[0].sum().backward()  # seen once: eager
    first, _ = layer(x, state)  # captured and replayed
    second, _ = layer(x * 2, state)  # the first's backward is pending: eager
    expected = torch.autograd.grad(layer.forward_reference(x, state)[0].sum(), layer.weight_hh)[0]
    torch.testing.assert_close(torch.autograd.grad(first.sum(), layer.weight_hh)[0], expected)
    del second
    assert not mogrifier_graphs._graphs[layer][next(iter(mogrifier_graphs._graphs[layer]))].busy()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("rank,mask,amp", [(None, True, False), (2, False, False), (2, True, True)])
def test_cuda_graphs_replay_the_eager_fast_path(rank, mask, amp):
    """Several training steps through graphs (captured at the second) equal the eager fast path's, with the
    weights changing between steps, new inputs each step, and the state carried over."""
    graphed, eager = make_layer(5, rank, torch.float32).cuda(), make_layer(5, rank, torch.float32).cuda()
    eager.cuda_graphs = False
    replayed = training_steps(graphed, mask, amp)
    assert mogrifier_graphs.captured(graphed) == 1
    for a, b in zip(replayed, training_steps(eager, mask, amp)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
