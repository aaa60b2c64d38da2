"""The GPU check: what lmcore does on one CUDA GPU, in stages, each with its own time limit, into one report.

Made for a borrowed GPU machine with no network (docs/benchmarks.md, "The GPU check"): it runs with that
machine's python3 and torch, plus the wheels and the PTB files that `prepare` put into .gpu/ here.

    python benchmarks/gpu_check.py prepare               # here: .gpu/wheels (Python 3.12) and .gpu/data/ptb
    ./dev gpu-check OUT                                   # there: installs .gpu/wheels, runs the stages into OUT
    python benchmarks/gpu_check.py run --out OUT --dry-run   # anywhere: tiny shapes on the CPU, seconds

Stages, most decisive first (a stage that fails or runs out of time is reported as such; the next one runs):
  layer  the Mogrifier layer at the paper's shapes against cuDNN's nn.LSTM of the same width, forward + backward,
         float32, TF32 and bf16 autocast: reference, eager fast path, CUDA graphs with and without the Triton
         kernels of the steps' elementwise work; tokens/s and error; and the LSTM with the LSTM family's state
         dropout (W_hh masked per call): whether cuDNN re-packs its weights
  tests  the CUDA tests (device-parametrised model, training and Mogrifier equivalence tests, the Triton kernels)
  train  a short real training of the 24M PTB paper config and of the LSTM at the same size
  pack   N = 1, 2, 4, 8 training processes of the 24M config on the one GPU: total tokens/s
OUT gets report.md and one log per stage (at most 8 files).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = {"layer": 180, "tests": 120, "train": 180, "pack": 150}  # seconds each on the GPU
DRY_LIMIT = 120
WHEELS = ["pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "pooch",
          "platformdirs"]  # what lmcore imports that the GPU machine's python3 lacks (and what they need)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
VOCAB = {"ptb": 10000, "wikitext-2": 33278}
MARK = "@@ "  # a stage's lines for the report start with this


def report(line: str = "") -> None:
    print(MARK + line, flush=True)


# -- prepare (here) ---------------------------------------------------------------------------------------


def pip_download_command(dest: Path, requirements: list[str]) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest), *requirements]


def pinned(names: list[str]) -> list[str]:
    """name==version of each as installed here, so that the wheels match what the tests here ran with."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in names]


def prepare(dest: Path, data_dir: Path, download: bool = True) -> None:
    """Wheels for Python 3.12 and the PTB files, checksums checked, into dest (ignored by git, carried)."""
    (dest / "wheels").mkdir(parents=True, exist_ok=True)
    if download:
        subprocess.run(pip_download_command(dest / "wheels", pinned(WHEELS)), check=True)
    source, target = data_dir / "ptb", dest / "data" / "ptb"
    if not (source / "SHA256SUMS").is_file():
        sys.exit(f"prepare: {source} holds no PTB (SHA256SUMS missing): set --data-dir or LMCORE_DATA_DIR")
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file():
            shutil.copy2(file, target / file.name)
    from lmcore.data import find_files, get_dataset, read_verified

    splits = get_dataset("ptb").splits
    for split, path in find_files("ptb", target.parent).items():
        read_verified(path, splits[split].sha256)  # raises on a wrong or damaged file
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"prepared {dest}: {size / 2**20:.1f} MiB (the GPU machine takes 64 MiB in all)")


# -- run (there): the parent -------------------------------------------------------------------------------


def run(out: Path, stages: list[str], dry: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M')}{' (dry run: tiny shapes)' if dry else ''}", ""]
    lines += ["```", machine(), "```"]
    failed = 0
    for stage in stages:
        limit = DRY_LIMIT if dry else STAGES[stage]
        lines += ["", f"## {stage} (limit {limit} s)", ""]
        command = [sys.executable, __file__, "stage", stage, "--out", str(out)] + ["--dry-run"] * dry
        start = time.time()
        log = out / f"{stage}.log"
        with open(log, "w") as sink:
            try:
                proc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=limit)
                status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                status = f"stopped at its limit of {limit} s"
        text = log.read_text(errors="replace")
        lines += [line[len(MARK):] for line in text.splitlines() if line.startswith(MARK)]
        lines += ["", f"{stage}: {status} after {time.time() - start:.0f} s"]
        if status != "ok":
            failed += 1
            lines += ["", "```", *text.splitlines()[-25:], "```"]
        (out / "report.md").write_text("\n".join(lines) + "\n")  # after every stage: a later one may hang
        print(f"{stage}: {status} after {time.time() - start:.0f} s", flush=True)
    print((out / "report.md").read_text())
    return 1 if failed else 0


def machine() -> str:
    import torch

    text = [f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
            f"python {sys.version.split()[0]}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        text.append(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        text.append("no CUDA device: CPU")
    return "\n".join(text)


# -- stage: the layer ----------------------------------------------------------------------------------------


def paper_layers(dry: bool) -> list[tuple[str, int, int, dict]]:
    """(name, B, T, layer settings) of the paper configs' Mogrifier layers, as our configs build them."""
    if dry:
        return [("tiny", 3, 5, dict(input_size=6, hidden_size=8, rounds=3, rank=2))]
    from lmcore.config import make_config
    from lmcore.files import read_yaml
    from lmcore.models.lm import embedding_width, solve_budget

    found = []
    for name, path in [("PTB", "configs/ptb_mogrifier_paper.yaml"), ("WikiText-2", "configs/wt2_mogrifier_paper.yaml")]:
        config = make_config(read_yaml(REPO / path))
        model = solve_budget(config.model, VOCAB[config.data.name])
        sizes = [embedding_width(model)] + [model.hidden] * model.layers
        for i in range(model.layers):
            if i > 0 and sizes[i] == sizes[i - 1]:
                continue  # the same shape as the layer before
            found.append((f"{name} layer {i + 1}", config.data.batch_size, config.data.bptt,
                          dict(input_size=sizes[i], hidden_size=sizes[i + 1], rounds=model.rounds, rank=model.rank)))
    return found


class Timer:
    """Median milliseconds of a function: CUDA events on the GPU, the wall clock on the CPU."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn, reps: int, warmup: int = 2) -> float:
        import torch

        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)


def precision(name: str, device):
    """A context for float32 (TF32 off), tf32 (matmuls and cuDNN in TF32) or bf16 (autocast)."""
    import torch

    @contextlib.contextmanager
    def context():
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

    return context()


def stage_layer(dry: bool) -> None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    report("Forward + backward of one layer over a whole window, median ms (CUDA events); tokens/s = B*T/time;")
    report("error: largest |difference| from the float32 reference path (output and the gradients of x and W_hh),")
    report("relative to the largest |value|. cuDNN: nn.LSTM of the same input and hidden size.")
    report("")
    report("| layer | B×T | m→n, rounds, rank | precision | path | ms | tokens/s | × cuDNN | error |")
    report("|---|---|---|---|---|---:|---:|---:|---:|")
    repack_warnings = []  # torch's warnings that the masked LSTM's weights are re-packed (once per process)
    for name, B, T, settings in paper_layers(dry):
        repack_warnings += measure_layer(name, B, T, settings, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report("")
    report("cuDNN LSTM, state dropout: W_hh masked per call (lmcore/models/rnn.py); torch "
           + (f"warned that it re-packs the weights: {repack_warnings[0][:160]}" if repack_warnings
              else "gave no warning of re-packing the weights"))


def measure_layer(name: str, B: int, T: int, settings: dict, device) -> list[str]:
    """The report's rows of one layer shape: cuDNN and each path of ours, in each precision; returns torch's
    warnings that the state-dropout LSTM re-packs its weights."""
    import torch
    from torch import nn

    from lmcore.models.mogrifier import MogrifierLSTMLayer, graphs
    from lmcore.models.rnn import FusedRNNStack

    timer = Timer(device)
    layer = MogrifierLSTMLayer(**settings).to(device)
    lstm = nn.LSTM(settings["input_size"], settings["hidden_size"]).to(device)
    x = torch.randn(T, B, settings["input_size"], device=device, requires_grad=True)
    keep = 1 - 0.387  # the PTB paper config's state dropout
    mask = torch.bernoulli(torch.full((B, settings["hidden_size"]), keep, device=device)) / keep
    grad_out = torch.randn(T, B, settings["hidden_size"], device=device)

    def step(fast: bool, use_graphs: bool, triton: bool = False):
        layer.fast_path, layer.cuda_graphs = fast, use_graphs
        x.grad = layer.weight_hh.grad = None
        with environment(LMCORE_MOGRIFIER_TRITON=str(int(triton))):  # fast.py's elementwise steps as Triton kernels
            out, _ = layer(x, None, mask)
            out.float().backward(grad_out)
        return out

    def lstm_step():
        x.grad = None
        out, _ = lstm(x)
        out.float().backward(grad_out)

    # The LSTM family's state dropout: W_hh masked per call through functional_call (lmcore/models/rnn.py).
    dropped = FusedRNNStack("lstm", settings["input_size"], settings["hidden_size"], 1, inter=0.0,
                            state=1 - keep).to(device).train()

    def lstm_dropped_step():
        x.grad = None
        out, _ = dropped.run_layer(dropped.layers[0], x, None, drop_state=True)
        out.float().backward(grad_out)

    repack_warnings: list[str] = []
    with precision("float32", device):
        reference = [step(False, False).detach().float(), x.grad.clone(), layer.weight_hh.grad.clone()]
    paths = [("reference", False, False, False, 3), ("fast, eager", True, False, False, 10)]
    if device.type == "cuda":
        paths += [("fast, CUDA graphs", True, True, False, 20)]
        paths += [("fast, CUDA graphs + Triton", True, True, True, 20)] * triton_available()
    shape = f"{settings['input_size']}→{settings['hidden_size']}, {settings['rounds']}, {settings['rank']}"
    for prec in ["float32", "tf32", "bf16"]:
        with precision(prec, device):
            cudnn_ms = timer(lstm_step, reps=20)
            row = f"| {name} | {B}×{T} | {shape} | {prec}"
            report(f"{row} | cuDNN LSTM | {cudnn_ms:.2f} | {B * T / cudnn_ms * 1000:,.0f} | 1.00 | |")
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                ms = timer(lstm_dropped_step, reps=20)
            repack_warnings += [str(w.message) for w in said if "contiguous chunk of memory" in str(w.message)]
            report(f"{row} | cuDNN LSTM, state dropout | {ms:.2f} | {B * T / ms * 1000:,.0f} | {cudnn_ms / ms:.2f} | |")
            for label, fast, use_graphs, triton, reps in paths:
                try:  # a path that fails (e.g. a Triton kernel that does not compile there) is a row, not the end
                    ms = timer(lambda: step(fast, use_graphs, triton), reps=reps)  # noqa: B023 (called at once)
                    out = step(fast, use_graphs, triton).detach().float()
                except Exception as exc:
                    report(f"{row} | {label} | failed: {type(exc).__name__}: {str(exc)[:200]} | | | |")
                    continue
                error = max(float((a - b).abs().max() / b.abs().max())
                            for a, b in zip([out, x.grad, layer.weight_hh.grad], reference))
                report(f"{row} | {label} | {ms:.2f} | {B * T / ms * 1000:,.0f} | {cudnn_ms / ms:.2f} | "
                       f"{error:.1e} |")
    if device.type == "cuda":
        report(f"({name}: {graphs.captured(layer)} graphs captured)")
    return repack_warnings


@contextlib.contextmanager
def environment(**values: str):
    """These environment variables while inside, then as they were (the later stages' processes inherit them)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@functools.cache  # asked once per layer shape; said once
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        report("(no triton here: the rows with the Triton kernels are left out)")
        return False
    return True


# -- stage: the CUDA tests -----------------------------------------------------------------------------------


def stage_tests(dry: bool) -> int:
    files = ["tests/lmcore/test_models.py", "tests/lmcore/test_mogrifier.py", "tests/lmcore/test_train.py",
             "tests/lmcore/test_transformer.py", "tests/lmcore/test_mogrifier_triton.py"]
    # -k: the tests named cuda, and every test of the Triton kernels' file (there they run on CUDA tensors)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda or triton", *files]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    summary = [line for line in proc.stdout.splitlines() if line.strip()][-1:]
    report(f"`python -m pytest -q -k 'cuda or triton' {' '.join(files)}`: {' '.join(summary)}")
    for line in proc.stdout.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            report(f"    {line}")
    return proc.returncode


# -- stage: short trainings ------------------------------------------------------------------------------------


def tiny_corpus(folder: Path) -> Path:
    """A small text corpus for the dry run (words drawn from 50, a few thousand tokens)."""
    import random

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in [("train", 300), ("valid", 30), ("test", 30)]:
        text = "\n".join(" ".join(f"w{rng.randrange(50)}" for _ in range(12)) for _ in range(lines))
        (folder / f"{split}.txt").write_text(text + "\n")
    return folder


def training_runs(dry: bool, scratch: Path) -> list[tuple[str, list[str]]]:
    paper = ["--config", "configs/ptb_mogrifier_paper.yaml", "--set", "train.amp=true", "--set", "train.epochs=2",
             "--set", "train.steps_per_epoch=150", "--set", "train.log_interval=50",
             "--set", "eval.logit_scale_search=none"]
    if dry:
        paper += ["--set", "data.name=text", "--set", f"data.dir={tiny_corpus(scratch / 'corpus')}",
                  "--set", "model.params_budget=20000", "--set", "data.batch_size=4", "--set", "data.bptt=8",
                  "--set", "train.steps_per_epoch=3", "--set", "data.eval_batch_size=4", "--set", "train.device=cpu"]
    lstm = ["--set", "model.family=lstm", "--set", "model.rounds=0", "--set", "model.rank=none"]
    runs = [("Mogrifier (paper config), CUDA graphs", paper, {}),
            ("Mogrifier (paper config), CUDA graphs + Triton", paper, {"LMCORE_MOGRIFIER_TRITON": "1"}),
            ("Mogrifier (paper config), eager", paper, {"LMCORE_CUDA_GRAPHS": "0"}),
            ("LSTM, same budget", paper + lstm, {})]
    return runs[:1] if dry else runs  # the CPU has no graphs, and one run checks the stage


def stage_train(dry: bool, out: Path) -> None:
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_{os.getpid()}"
    report("`python -m lmcore train --config configs/ptb_mogrifier_paper.yaml --set train.amp=true --set "
           "train.epochs=2 --set train.steps_per_epoch=150 --set eval.logit_scale_search=none` (and the LSTM: "
           "`--set model.family=lstm --set model.rounds=0 --set model.rank=none`; eager: LMCORE_CUDA_GRAPHS=0; "
           "+ Triton: LMCORE_MOGRIFIER_TRITON=1); "
           "tokens/s of epoch 2 (epoch 1 includes start-up and graph capture), bf16")
    report("")
    report("| model | parameters | tokens/s epoch 1 | tokens/s epoch 2 | valid ppl after 300 steps | wall s | "
           "a paper trial (0.9B tokens) at epoch 2's speed |")
    report("|---|---:|---:|---:|---:|---:|---:|")
    for i, (label, args, env) in enumerate(training_runs(dry, scratch)):
        start = time.time()
        command = [sys.executable, "-m", "lmcore", "train", "--run-name", f"run{i}", "--runs-dir",
                   str(scratch / "runs"), *args]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **env})
        print(" ".join(command), "\n", proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
        metrics = scratch / "runs" / f"run{i}" / "metrics.jsonl"
        if proc.returncode != 0 or not metrics.is_file():
            report(f"| {label} | failed (exit {proc.returncode}) | | | | {time.time() - start:.0f} |")
            continue
        epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
        speeds = " | ".join(f"{e['tokens_per_s']:,.0f}" for e in epochs[:2])
        hours = 200 * 1000 * 64 * 70 / epochs[-1]["tokens_per_s"] / 3600
        report(f"| {label} | {epochs[-1].get('params', 0):,} | {speeds} | {epochs[-1]['valid_ppl']:.1f} | "
               f"{time.time() - start:.0f} | {hours:.1f} h |")
    shutil.rmtree(scratch, ignore_errors=True)


# -- stage: packing ------------------------------------------------------------------------------------------


def pack_worker(rank: int, count: int, seconds: float, folder: Path, dry: bool) -> None:
    """Train the 24M config on random tokens: warm up, wait until all `count` workers are ready, then count
    the tokens of `seconds` of steps; prints tokens/s."""
    import torch
    from torch.nn import functional as F

    from lmcore.config import make_config
    from lmcore.files import read_yaml
    from lmcore.models import build_model
    from lmcore.models.rnn import detach_state

    config = make_config(read_yaml(REPO / "configs/ptb_mogrifier_paper.yaml"))
    if dry:
        config = make_config(config, {"model.params_budget": 20000, "data.batch_size": 4, "data.bptt": 8})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = 50 if dry else VOCAB["ptb"]
    model = build_model(config, vocab).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999), fused=device.type == "cuda")
    B, T = config.data.batch_size, config.data.bptt
    tokens = torch.randint(vocab, (T + 1, B), device=device)
    state = None

    def train_step():
        nonlocal state
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, state = model(tokens[:-1], state)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tokens[1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state = detach_state(state)

    for _ in range(3):
        train_step()
    (folder / f"ready{rank}").touch()
    deadline = time.time() + 120
    while len(list(folder.glob("ready*"))) < count and time.time() < deadline:
        time.sleep(0.05)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        train_step()
        steps += 1
        if device.type == "cuda" and steps % 5 == 0:
            torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({"tokens_per_s": steps * B * T / (time.perf_counter() - start)}), flush=True)


def pack_speeds(count: int, seconds: float, dry: bool, env: dict[str, str]) -> list[float]:
    """tokens/s of each of `count` pack workers run at once (fewer where a worker failed)."""
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_pack_{os.getpid()}_{count}"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "pack-worker", "--count", str(count), "--seconds", str(seconds),
               "--folder", str(folder)] + ["--dry-run"] * dry
    procs = [subprocess.Popen(command + ["--rank", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env}) for i in range(count)]
    speeds = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            print(stderr[-2000:], flush=True)
        else:
            speeds.append(json.loads(lines[-1])["tokens_per_s"])
    shutil.rmtree(folder, ignore_errors=True)
    return speeds


@contextlib.contextmanager
def mps_daemon():
    """NVIDIA's multi-process service while inside (processes' kernels may then run side by side); yields the
    environment its clients need, or None where it cannot be started."""
    control = shutil.which("nvidia-cuda-mps-control")
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_mps_{os.getpid()}"
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    started = control is not None and subprocess.run([control, "-d"], env={**os.environ, **env}).returncode == 0
    try:
        yield env if started else None
    finally:
        if started:
            subprocess.run([control], input="quit\n", text=True, env={**os.environ, **env})
        shutil.rmtree(folder, ignore_errors=True)


def stage_pack(dry: bool, out: Path) -> None:
    seconds = 0.2 if dry else 5.0
    report(f"N processes each training the 24M PTB config (bf16, fused Adam, random tokens) on the one GPU, "
           f"{seconds:g} s measured after all are warm: total and per-process tokens/s; then with NVIDIA's MPS")
    report("")
    report("| N | MPS | total tokens/s | per process | × N=1 |")
    report("|---:|---|---:|---:|---:|")
    single = None
    for count in ([2] if dry else [1, 2, 4, 8]):
        speeds = pack_speeds(count, seconds, dry, {})
        if len(speeds) < count:
            report(f"| {count} | no | {count - len(speeds)} of {count} processes failed | | |")
            continue
        single = single or sum(speeds)
        report(f"| {count} | no | {sum(speeds):,.0f} | {sum(speeds) / count:,.0f} | {sum(speeds) / single:.2f} |")
    if dry or single is None:
        return
    with mps_daemon() as env:
        if env is None:
            report("(MPS: nvidia-cuda-mps-control is missing or did not start)")
            return
        for count in [4, 8]:
            speeds = pack_speeds(count, seconds, dry, env)
            failed = f" ({count - len(speeds)} failed)" if len(speeds) < count else ""
            report(f"| {count} | yes | {sum(speeds):,.0f} | {sum(speeds) / max(len(speeds), 1):,.0f} | "
                   f"{sum(speeds) / single:.2f} |{failed}")


# -- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: wheels for Python 3.12 and the PTB files into .gpu/")
    prep.add_argument("--dest", type=Path, default=REPO / ".gpu")
    prep.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LMCORE_DATA_DIR", REPO.parent / "shared" /
                                                                              "data")))
    prep.add_argument("--no-download", action="store_true", help="copy the data only")
    go = sub.add_parser("run", help="the stages, into --out")
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    go.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU if there is no GPU: seconds")
    one = sub.add_parser("stage")
    one.add_argument("name", choices=list(STAGES))
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--dry-run", action="store_true")
    worker = sub.add_parser("pack-worker")
    for flag, kind in [("--rank", int), ("--count", int), ("--seconds", float), ("--folder", Path)]:
        worker.add_argument(flag, type=kind, required=True)
    worker.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.dest, args.data_dir, download=not args.no_download)
    elif args.command == "run":
        return run(args.out, args.stages, args.dry_run)
    elif args.command == "stage":
        if args.name == "layer":
            stage_layer(args.dry_run)
        elif args.name == "tests":
            return stage_tests(args.dry_run)
        elif args.name == "train":
            stage_train(args.dry_run, args.out)
        else:
            stage_pack(args.dry_run, args.out)
    else:
        pack_worker(args.rank, args.count, args.seconds, args.folder, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
