"""Training speed of the Mogrifier LSTM layer against its peers: forward + backward, tokens per second.

    python benchmarks/mogrifier_speed.py                   # CPU, all shapes (several minutes)
    python benchmarks/mogrifier_speed.py --quick           # CPU, the target shape and one low-rank shape
    python benchmarks/mogrifier_speed.py --device cuda     # GPU, all shapes (add --amp for bf16 autocast)

Implementations, each timed on the same input (one sequence [T, B, input], random initial state,
loss = sum of the outputs, parameter gradients cleared between iterations):

* ours         `lmcore.models.MogrifierLSTMLayer` as the trainer uses it (the fast path).
* ours (py)    the same, with the C++ per-step loops (lmcore/models/mogrifier/cpu.cpp) switched off: the
               Python loops of the fast path (what runs where the extension cannot be built).
* reference    the same layer's `forward_reference`: the straightforward per-step, per-round loop.
* peer         the PyPI `mogrifier` package (0.0.5, `pip install mogrifier==0.0.5`) used as its README
               says: `Mogrifier(dim, iters=rounds, dim_hidden, factorize_k=rank)` on (x_t, h) before
               an `nn.LSTMCell` at every step. It shares one Q and one R matrix between all rounds
               (fewer parameters, same FLOPs), has a bias in both factors of a low-rank matrix, and
               needs rounds >= 2.
* nn.LSTM      PyTorch's fused LSTM, same input and hidden size: a ceiling, not a peer (the Mogrifier
               does ~1.6x its FLOPs at 5 rounds and cannot use the fused kernel).

Implementations are interleaved (one iteration of each in turn) and the median time per iteration is
reported, so the ratios are measured side by side. Peak memory: on CUDA the allocator's peak during one
iteration minus what was allocated before it; on the CPU the growth of the process's peak resident
memory (VmHWM, reset before the iteration) over its resident memory before it, Linux only, with the
fast path's reusable CPU workspace emptied first (so it is counted); both include the parameter
gradients.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmcore.exitcodes import quiet_when_output_closes  # noqa: E402
from lmcore.models.mogrifier import MogrifierLSTMLayer  # noqa: E402
from lmcore.models.mogrifier import cpu as mogrifier_cpu  # noqa: E402
from lmcore.models.mogrifier import fast as mogrifier_fast  # noqa: E402

try:
    from mogrifier import Mogrifier
except ImportError:  # the peer is a benchmark-only dependency
    Mogrifier = None


@dataclass(frozen=True)
class Shape:
    batch: int
    bptt: int
    hidden: int
    rounds: int
    rank: int | None = None
    tag: str = ""

    def __str__(self) -> str:
        rank = "full" if self.rank is None else f"k={self.rank}"
        return f"B={self.batch} T={self.bptt} n={self.hidden} r={self.rounds} {rank}"


TARGET = Shape(32, 35, 256, 5, None, "target")


def shapes(quick: bool) -> list[Shape]:
    if quick:
        return [TARGET, Shape(32, 35, 256, 5, 32, "low rank")]
    out = [TARGET]
    out += [Shape(32, 35, 256, 5, k, "low rank") for k in (32, 84)]
    out += [Shape(32, 35, 256, r, None, "rounds") for r in (1, 2, 3, 4, 6)]
    out += [Shape(32, 35, n, 5, None, "hidden") for n in (650, 900)]
    out += [Shape(64, 70, n, 5, None, "paper") for n in (650, 900)]
    return out


# ----------------------------------------------------------------------------------------------------
# The implementations: build(shape, device) -> (modules, step), step(x, h0, c0) -> loss


class PeerLayer(nn.Module):
    """The PyPI mogrifier package used as its README intends: mogrify, then an nn.LSTMCell, per step."""

    def __init__(self, input_size: int, hidden_size: int, rounds: int, rank: int | None):
        super().__init__()
        self.mogrifier = Mogrifier(dim=input_size, iters=rounds, dim_hidden=hidden_size, factorize_k=rank)
        self.cell = nn.LSTMCell(input_size, hidden_size)

    def forward(self, x, state):
        h, c = state
        outputs = []
        for x_t in x:
            x_t, h = self.mogrifier(x_t, h)
            h, c = self.cell(x_t, (h, c))
            outputs.append(h)
        return torch.stack(outputs), (h, c)


def build(impl: str, shape: Shape, device: str):
    n = shape.hidden
    if impl in ("ours", "ours (py)"):
        if impl == "ours (py)" and (device != "cpu" or not CPP_LOOPS):
            return None  # the same as "ours" there
        layer = MogrifierLSTMLayer(n, n, shape.rounds, shape.rank).to(device)
        cpp = impl == "ours"

        def step(x, h, c):
            mogrifier_cpu.enabled = cpp  # (read by the forward; the backward runs the same loops)
            return layer(x, (h, c))[0].sum()

        return layer, step
    if impl == "reference":
        layer = MogrifierLSTMLayer(n, n, shape.rounds, shape.rank).to(device)
        return layer, lambda x, h, c: layer.forward_reference(x, (h, c))[0].sum()
    if impl == "peer":
        if Mogrifier is None or shape.rounds < 2:
            return None
        layer = PeerLayer(n, n, shape.rounds, shape.rank).to(device)
        return layer, lambda x, h, c: layer(x, (h, c))[0].sum()
    if impl == "nn.LSTM":
        layer = nn.LSTM(n, n).to(device)
        return layer, lambda x, h, c: layer(x, (h[None], c[None]))[0].sum()
    raise ValueError(impl)


IMPLS = ["ours", "ours (py)", "reference", "peer", "nn.LSTM"]
CPP_LOOPS = False  # whether the C++ loops are available (set by main)

# ----------------------------------------------------------------------------------------------------
# Measuring


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def iteration(module: nn.Module, step, inputs, amp: bool, device: str) -> None:
    module.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        loss = step(*inputs)
    loss.backward()


def _status_bytes(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_memory(module, step, inputs, amp: bool, device: str) -> float | None:
    """Extra memory at the peak of one iteration, MiB (None where it cannot be measured)."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        iteration(module, step, inputs, amp, device)
        sync(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    mogrifier_fast.release_workspace()  # so that the fast path's reused CPU buffers are counted too
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap memory back, so RSS ~ live memory
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident memory (VmHWM)
        before = _status_bytes("VmRSS")
        iteration(module, step, inputs, amp, device)
        return (_status_bytes("VmHWM") - before) / 2**20
    except (OSError, AttributeError):
        return None


def measure(shape: Shape, device: str, repeats: int | None, budget_s: float, amp: bool) -> dict[str, dict]:
    torch.manual_seed(0)
    n = shape.hidden
    x = torch.randn(shape.bptt, shape.batch, n, device=device, requires_grad=True)
    h0 = torch.randn(shape.batch, n, device=device) * 0.5
    c0 = torch.randn(shape.batch, n, device=device) * 0.5
    built = {impl: build(impl, shape, device) for impl in IMPLS}
    built = {k: v for k, v in built.items() if v is not None}
    results = {}
    for impl, (module, step) in built.items():
        t0 = time.perf_counter()
        iteration(module, step, (x, h0, c0), amp, device)  # first call (includes any one-off cost)
        sync(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        iteration(module, step, (x, h0, c0), amp, device)  # warm-up
        sync(device)
        warm = time.perf_counter() - t0
        results[impl] = {"first_s": first, "warm_s": warm, "times": [],
                         "mem": peak_memory(module, step, (x, h0, c0), amp, device)}
    if repeats is None:  # as many rounds of all implementations as fit in the budget, 5 to 30
        repeats = max(5, min(30, int(budget_s / sum(r["warm_s"] for r in results.values()))))
    for _ in range(repeats):
        for impl, (module, step) in built.items():
            sync(device)
            t0 = time.perf_counter()
            iteration(module, step, (x, h0, c0), amp, device)
            sync(device)
            results[impl]["times"].append(time.perf_counter() - t0)
    tokens = shape.bptt * shape.batch
    for r in results.values():
        r["tok_s"] = tokens / statistics.median(r["times"])
    return results


@quiet_when_output_closes
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="the target shape and one low-rank shape only")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations per implementation "
                        "(default: as many as fit in --budget seconds per shape, 5 to 30)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per shape")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (all implementations)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")

    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"# torch {torch.__version__}, {args.device} ({where}), {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}, amp={'bf16' if args.amp else 'off'}, "
          f"peer: {'mogrifier 0.0.5' if Mogrifier else 'not installed (pip install mogrifier==0.0.5)'}")
    if args.device == "cpu":
        t0 = time.perf_counter()
        ext = mogrifier_cpu.extension()  # compiled here on first use (cached in torch's extensions dir)
        global CPP_LOOPS
        CPP_LOOPS = ext is not None
        loaded = f"loaded (products: {ext.products()})" if ext else "UNAVAILABLE (Python loops)"
        print(f"# ours: C++ per-step loops {loaded} in {time.perf_counter() - t0:.1f} s")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# command: python benchmarks/mogrifier_speed.py {command}".rstrip())
    print(f"# load average at start: {load()}")
    header = (f"| {'shape':<32} | {'implementation':<14} | {'tokens/s':>9} | {'x peer':>6} | {'x nn.LSTM':>9} | "
              f"{'peak MiB':>8} | {'1st call s':>10} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    summary = None
    for shape in shapes(args.quick):
        res = measure(shape, args.device, args.repeats, args.budget, args.amp)
        peer, lstm = res.get("peer", {}).get("tok_s"), res["nn.LSTM"]["tok_s"]
        for impl in IMPLS:
            if impl not in res:
                print(f"| {str(shape):<32} | {impl:<14} | {'n/a':>9} | {'':>6} | {'':>9} | {'':>8} | {'':>10} |")
                continue
            r = res[impl]
            vs_peer = f"{r['tok_s'] / peer:.2f}" if peer else "n/a"
            mem = "n/a" if r["mem"] is None else f"{r['mem']:.0f}"
            print(f"| {str(shape):<32} | {impl:<14} | {r['tok_s']:>9.0f} | {vs_peer:>6} | "
                  f"{r['tok_s'] / lstm:>9.2f} | {mem:>8} | {r['first_s']:>10.2f} |", flush=True)
        if shape == TARGET and peer:
            ours = res["ours"]["tok_s"]
            summary = (f"# target shape: ours {ours:.0f} tok/s = {ours / peer:.2f}x the peer (target >= 2.5), "
                       f"{ours / lstm:.2f}x nn.LSTM (target >= 0.55)")
    if summary:
        print(summary)
    print(f"# load average at end: {load()}")
    return 0


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1)
        return f"{model}, {os.cpu_count()} cores"
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg()) + " (1, 5, 15 min)"
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
