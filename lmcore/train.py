"""Training: `train(config, report)` runs one configuration and reports after every epoch.

Validation (lmcore/evaluation.py) runs after each epoch; the test split is only scored when a caller asks for
it (the final evaluation, lmcore/final.py), never here.
"""
from __future__ import annotations

import ctypes
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from . import checkpoint
from .averaging import Averager
from .batching import batchify, bptt_windows, pass_start
from .config import Config, OptimConfig, SettingError, make_config
from .data import Corpus, load_corpus
from .evaluation import autocast, choose_logit_scale, evaluate, safe_exp
from .models import LanguageModel, build_model, detach_state, solve_budget

log = logging.getLogger("lmcore")

# A loss above this many nats per token (perplexity e^100; guessing uniformly over WikiText-2's vocabulary
# costs 10.4) can only come from a run that blew up: it counts as diverged, like NaN or inf.
DIVERGED_LOSS = 100.0


def diverged(loss: float) -> bool:
    return not loss < DIVERGED_LOSS  # also true for NaN


class EpochMetrics(TypedDict):
    """What `train` reports after every epoch: the columns of learning curves and the metrics a study may rank by."""

    epoch: int
    train_loss: float
    valid_loss: float  # inf once the run diverged
    valid_ppl: float
    best_valid_ppl: float  # the best valid perplexity so far
    lr: float
    tokens_per_s: float
    elapsed_s: float  # training and validation time so far, over resumes
    params: int
    diverged: bool


# report(metrics, save_checkpoint): called once per epoch; save_checkpoint(path) writes a resumable file.
Report = Callable[[EpochMetrics, Callable[[Path], None]], None]


def resolve_device(name: str) -> torch.device:
    """`train.device` on this machine; SettingError for a GPU it does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"train.device: {name!r} but no CUDA device is available here (use cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingError(f"train.device: {name!r} but this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def check_fits(config: Config, corpus: Corpus, eval_batch_size: int | None = None) -> None:
    """SettingError (naming the field) when the settings cannot run on this corpus: batches larger than a
    split, or a parameter budget below the smallest model. Cheap: no model is built."""
    data = config.data
    need = data.batch_size * (data.bptt + 1)
    if corpus.train.numel() < need:
        raise SettingError(f"data.batch_size: {data.batch_size} columns of data.bptt {data.bptt} (+1) tokens need "
                           f"{need:,} training tokens; {config.data.name} has {corpus.train.numel():,} "
                           f"(lower data.batch_size or data.bptt)")
    for field, size in (("data.eval_batch_size", data.eval_batch_size), ("test batch size", eval_batch_size)):
        for split in ("valid", "test"):
            tokens = getattr(corpus, split).numel()
            if size is not None and size > tokens:
                raise SettingError(f"{field}: {size} is more than the {tokens:,} tokens of {data.name}'s {split} "
                                   f"split")
    try:
        solve_budget(config.model, len(corpus.vocab))
    except ValueError as err:
        raise SettingError(str(err)) from None


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "adam":
        # On CUDA, fused: one kernel for all the parameters instead of several per tensor (the CPU keeps its own).
        fused = True if all(p.is_cuda for p in model.parameters()) else None
        return torch.optim.Adam(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                fused=fused)
    return torch.optim.SGD(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def reuse_freed_memory() -> None:
    """Keep glibc from giving large freed blocks back to the kernel, so that the next step reuses them.

    glibc serves each block above its mmap threshold (32 MiB at most) with a fresh mmap and unmaps it when it is
    freed, so every training step's logits and their gradients page-fault anew as the kernel zeroes them: at
    batch 20 x BPTT 35 over WikiText-2's 33k words that is 93 MB a tensor, and a third of a run's CPU time went
    to the kernel. From the heap, kept, they are reused. A no-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, Windows)
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    mallopt(m_mmap_max, 0)  # large blocks come from the heap ...
    mallopt(m_trim_threshold, 2**31 - 1)  # ... which keeps up to 2 GiB of free space instead of trimming it


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def train(config: Config | dict, report: Report | None = None, resume_from: str | Path | None = None,
          corpus: Corpus | None = None) -> dict[str, Any]:
    """Train one configuration; report after every epoch; return a summary.

    A run whose loss blows up (see `diverged`) stops, makes one last report with `diverged=True` and returns
    `status="diverged"`: it never raises for that. Settings that cannot run here raise SettingError, and an
    unusable `resume_from` a CheckpointError, before the first step.
    """
    config = config if isinstance(config, Config) else make_config(config)
    data, optim, run = config.data, config.optim, config.train
    device = resolve_device(run.device)
    if device.type == "cuda":  # float32 products in TF32 only where the user allows it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = run.tf32
    corpus = corpus or load_corpus(data.name, data.dir)
    check_fits(config, corpus)
    if run.threads:
        torch.set_num_threads(run.threads)
    reuse_freed_memory()
    seed_everything(run.seed)
    windows = torch.Generator().manual_seed(run.seed)  # draws the random BPTT lengths

    model = build_model(config, len(corpus.vocab)).to(device)
    optimizer = make_optimizer(config, model)
    averager = Averager(optim, model)  # optim.average: validation and checkpoints see the averaged weights
    averager.hook(optimizer)
    train_data = batchify(corpus.train, data.batch_size).to(device)
    params = model.num_parameters()
    loop = {"epoch": 0, "position": 0, "lr": optim.lr, "best_valid_loss": math.inf, "elapsed_s": 0.0}
    if resume_from is not None:
        loop = checkpoint.restore(resume_from, model=model, optimizer=optimizer, windows=windows, vocab=corpus.vocab,
                                  averager=averager)
        log.info("resumed from %s after epoch %d", resume_from, loop["epoch"])

    def save_checkpoint(path: Path) -> None:
        with averager.applied(model) as averaging:  # the checkpoint's model holds the averaged weights
            checkpoint.save(path, config=config, model=model, optimizer=optimizer, vocab=corpus.vocab, loop=loop,
                            windows=windows, averaging=averaging)

    if run.progress:
        log.info("%s: %s parameters, %d training tokens, device %s", model.config.family, f"{params:,}",
                 corpus.train.numel(), device)
    summary = {"status": "completed", "params": params}
    for epoch in range(loop["epoch"] + 1, run.epochs + 1):
        started = time.perf_counter()
        train_loss, tokens = train_epoch(model, optimizer, train_data, config, loop, windows, device, epoch)
        seconds = time.perf_counter() - started
        with averager.applied(model):
            valid = evaluate(model, corpus.valid, eos_id=corpus.vocab.eos_id, batch_size=data.eval_batch_size,
                             bptt=data.bptt, device=device, amp=run.amp,
                             logit_scale=choose_logit_scale(model, corpus.valid, config, eos_id=corpus.vocab.eos_id,
                                                            device=device)) if not diverged(train_loss) else None
        blew_up = valid is None or diverged(valid["loss"])
        if not blew_up:
            averager.end_epoch(valid["loss"])
        loop["epoch"] = epoch
        loop["elapsed_s"] += time.perf_counter() - started
        if not blew_up:
            if valid["loss"] < loop["best_valid_loss"]:
                loop["best_valid_loss"] = valid["loss"]
            else:  # plateau: decay the learning rate (pytorch/examples' recipe)
                loop["lr"] *= optim.lr_decay
        metrics: EpochMetrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "valid_loss": math.inf if blew_up else valid["loss"],
            "valid_ppl": math.inf if blew_up else valid["ppl"],
            "best_valid_ppl": safe_exp(loop["best_valid_loss"]),
            "lr": loop["lr"],
            "tokens_per_s": tokens / seconds,
            "elapsed_s": loop["elapsed_s"],
            "params": params,
            "diverged": blew_up,
        }
        if run.progress:
            log.info("| end of epoch %d/%d | %.1fs | valid loss %.3f | valid ppl %.2f | lr %.3g | run ETA %s",
                     epoch, run.epochs, seconds, metrics["valid_loss"], metrics["valid_ppl"], loop["lr"],
                     duration((run.epochs - epoch) * (time.perf_counter() - started)))
        if report is not None:
            report(metrics, save_checkpoint)
        if blew_up:
            log.warning("epoch %d: the loss blew up (NaN, inf or > %g nats); the run diverged and stops here",
                        epoch, DIVERGED_LOSS)
            summary["status"] = "diverged"
            break
    summary.update(epochs=loop["epoch"], best_valid_ppl=safe_exp(loop["best_valid_loss"]),
                   elapsed_s=loop["elapsed_s"])
    return summary


def train_epoch(model: LanguageModel, optimizer: torch.optim.Optimizer, train_data: Tensor, config: Config,
                loop: dict[str, Any], windows: torch.Generator, device: torch.device, epoch: int) -> tuple[float, int]:
    """One epoch (the whole split, or `train.steps_per_epoch` steps continuing from the last position).
    Returns (mean training loss, tokens trained on); see `diverged` for a run that blew up."""
    data, run = config.data, config.train
    model.train()
    steps_wanted = run.steps_per_epoch
    position = loop["position"] if loop["position"] < train_data.shape[0] - 1 else 0
    total = steps_wanted or expected_steps(train_data.shape[0] - 1 - position, data.bptt, data.variable_bptt)
    about = "~" * (not steps_wanted and data.variable_bptt)  # random window lengths: an estimate
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
    steps = tokens = 0
    epoch_start = interval_start = time.perf_counter()
    interval_tokens = 0

    def mean_loss() -> float:
        return loss_sum.item() / max(tokens, 1)

    while True:
        if loop["position"] == 0 or loop["position"] >= train_data.shape[0] - 1:  # a new pass over the data
            loop["position"] = pass_start(data.bptt, data.random_offset, windows)
        state = None  # the state is reset at the start of every pass over the data
        for start, inputs, targets in bptt_windows(train_data, data.bptt, data.variable_bptt, windows,
                                                   start=loop["position"]):
            # AWD-LSTM: a shorter window takes a proportionally smaller step.
            scale = inputs.shape[0] / data.bptt if data.variable_bptt else 1.0
            for group in optimizer.param_groups:
                group["lr"] = loop["lr"] * scale
            state = detach_state(state)
            with autocast(device, run.amp):
                logits, state = model(inputs, state)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model, config.optim, inputs.shape[0])
            optimizer.step()
            loss_sum += loss.detach() * targets.numel()
            loop["position"] = start + inputs.shape[0]
            steps += 1
            tokens += targets.numel()
            interval_tokens += targets.numel()
            if steps % run.log_interval == 0:
                if diverged(mean_loss()):
                    return mean_loss(), tokens  # diverged: stop now rather than at the end of the epoch
                if run.progress:
                    now = time.perf_counter()
                    eta = (now - epoch_start) / steps * max(total - steps, 0)
                    log.info("| epoch %d/%d | step %d/%s%d | lr %.3g | %.0f tok/s | loss %.3f | ppl %.1f | "
                             "epoch ETA %s", epoch, run.epochs, steps, about, total, loop["lr"],
                             interval_tokens / (now - interval_start), mean_loss(), safe_exp(mean_loss()),
                             duration(eta))
                    interval_start, interval_tokens = now, 0
            if steps_wanted and steps >= steps_wanted:
                return mean_loss(), tokens
        if not steps_wanted:
            return mean_loss(), tokens
        loop["position"] = 0  # wrap around and keep going until steps_per_epoch steps


def clip_gradients(model: nn.Module, optim: OptimConfig, window_length: int) -> None:
    """Clip the gradient's norm at optim.clip. Ours is the gradient of the per-token mean loss; lamb's
    (clip_unit window) is that of the loss summed over the window's steps, window_length times larger, so
    its bound on ours is clip / window_length."""
    if optim.clip > 0:
        bound = optim.clip / window_length if optim.clip_unit == "window" else optim.clip
        nn.utils.clip_grad_norm_(model.parameters(), bound)


def expected_steps(rows: int, bptt: int, variable: bool) -> int:
    """How many windows cover `rows` rows: exact for a fixed bptt; for variable lengths (mostly bptt, one in
    twenty about bptt / 2) an estimate."""
    mean = 0.975 * bptt if variable else bptt
    return max(1, math.ceil(rows / mean))


def duration(seconds: float) -> str:
    """3725 -> '1h02m', 192 -> '3m12s', 7.2 -> '7s'."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

