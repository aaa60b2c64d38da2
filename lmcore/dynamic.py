"""Dynamic evaluation (Krause et al., 2018; their code: benkrause/dynamic-evaluation).

The model keeps learning while it is scored: after each window has been scored, one gradient step on that
window, pulled back toward the trained weights θ0, before the next window is scored:

    rms:  θ += decay * r * (θ0 - θ) - lr * g / (RMS + epsilon)
    sgd:  θ += decay * (θ0 - θ) - lr * g

RMS is the root mean square of each weight's gradient over training data, and r = RMS / (mean RMS of the
parameter tensors), clipped at 1 / decay: weights whose gradients are large move and decay faster.

    dyn = prepare(model, corpus.train, config.eval)             # the gradient RMS (method rms)
    lmcore.evaluate(model, corpus.test, eos_id=..., dynamic=dyn)  # weights restored afterwards
    settings, valid = choose(model, corpus.valid, dyn, eos_id=...)  # lr and decay searched on valid

For a checkpoint, lmcore.final.choose_and_test does all three.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .batching import batchify, bptt_windows, eval_batches
from .config import EvalConfig
from .evaluation import loss_and_ppl, score_window
from .models import detach_state


@dataclass
class DynamicEval:
    """Dynamic-evaluation settings and, for method rms, each parameter's training-gradient RMS."""

    settings: EvalConfig
    rms: dict[str, Tensor] | None

    def with_settings(self, **changes: Any) -> DynamicEval:
        return replace(self, settings=self.settings.model_copy(update=changes))

    def evaluate(self, model: nn.Module, tokens: Tensor, *, eos_id: int, device: torch.device,
                 amp: bool = False) -> dict[str, float]:
        """Score every token once (as lmcore.evaluate does), adapting after each window; restore the weights."""
        s = self.settings
        params = dict(model.named_parameters())
        trained = {name: p.detach().clone() for name, p in params.items()}
        decay, step = self.rates(trained)
        total = torch.zeros((), dtype=torch.float64, device=device)
        count, state = 0, None
        with adapting(model, trained):
            for inputs, targets in eval_batches(tokens, s.dynamic_batch_size, s.dynamic_bptt, eos_id):
                with torch.enable_grad():
                    loss, scored, state = score_window(model, inputs, targets, detach_state(state), device, amp)
                    model.zero_grad(set_to_none=True)
                    (loss / max(scored, 1)).backward()
                total += loss.detach()
                count += scored
                with torch.no_grad():  # in place, no temporaries: this runs once per few tokens
                    for name, p in params.items():
                        p.lerp_(trained[name], decay[name])  # p += decay * (θ0 - p)
                        if p.grad is not None:
                            p.addcmul_(p.grad, step[name], value=-1)
        return loss_and_ppl(total, count)

    def rates(self, trained: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per-parameter (decay rate, gradient step scale) of the update rule."""
        s = self.settings
        if s.dynamic_method == "sgd":  # 0-d tensors: the update's in-place ops take a tensor weight
            return ({n: p.new_tensor(s.dynamic_decay) for n, p in trained.items()},
                    {n: p.new_tensor(s.dynamic_lr) for n, p in trained.items()})
        if s.dynamic_decay_mean == "elements":  # lamb's dyneval.py: the mean over every weight
            mean = sum(r.sum() for r in self.rms.values()) / sum(r.numel() for r in self.rms.values())
        else:  # Krause et al.: the mean of the tensors' means
            mean = sum(r.mean() for r in self.rms.values()) / len(self.rms)
        cap = 1 / s.dynamic_decay if s.dynamic_decay > 0 else math.inf  # else a decay could overshoot θ0
        decay = {n: s.dynamic_decay * (r / mean).clamp(max=cap) for n, r in self.rms.items()}
        step = {n: s.dynamic_lr / (r + s.dynamic_epsilon) for n, r in self.rms.items()}
        return decay, step


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: gradients of the model that is scored); afterwards no gradients left behind and the
    mode as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


@contextmanager
def adapting(model: nn.Module, trained: dict[str, Tensor]) -> Iterator[None]:
    """The model in eval mode, as it adapts; afterwards its trained weights back, bit for bit."""
    embedding = getattr(model, "embedding", None)
    decoder = getattr(model, "decoder", None)
    # Tied: the decoder's gradient is dense anyway, and a sparse one from the embedding saves zero-filling
    # and adding a vocabulary-sized matrix after every window (a fifth of the time on a CPU).
    tied = embedding is not None and decoder is not None and decoder.weight is embedding.weight
    was_sparse = tied and embedding.sparse
    with _eval_mode(model):
        if tied:
            embedding.sparse = True
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(trained[name])
            if tied:
                embedding.sparse = was_sparse


def gradient_rms(model: nn.Module, train_tokens: Tensor, settings: EvalConfig, device: torch.device,
                 amp: bool = False) -> dict[str, Tensor]:
    """Each parameter's root-mean-square gradient over training windows (model in eval mode, state carried)."""
    params = dict(model.named_parameters())
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    data = batchify(train_tokens, settings.dynamic_stat_batch_size).to(device)
    windows, state = 0, None
    with _eval_mode(model):
        for _, inputs, targets in bptt_windows(data, settings.dynamic_bptt, False, None):
            with torch.enable_grad():
                loss, scored, state = score_window(model, inputs, targets, detach_state(state), device, amp)
                model.zero_grad(set_to_none=True)
                (loss / scored).backward()
            with torch.no_grad():
                for name, p in params.items():
                    if p.grad is not None:
                        squares[name] += p.grad.square()
            windows += 1
            if settings.dynamic_stat_windows and windows >= settings.dynamic_stat_windows:
                break
    return {name: (sq / windows).sqrt() for name, sq in squares.items()}


def prepare(model: nn.Module, train_tokens: Tensor, settings: EvalConfig, device: torch.device | None = None,
            amp: bool = False) -> DynamicEval:
    """A DynamicEval for `model`: with method rms, one pass over training data for the gradient RMS."""
    device = device or next(model.parameters()).device
    rms = gradient_rms(model, train_tokens, settings, device, amp) if settings.dynamic_method == "rms" else None
    return DynamicEval(settings, rms)


def choose(model: nn.Module, valid: Tensor, dynamic: DynamicEval, *, eos_id: int, amp: bool = False,
           factors: tuple[float, ...] = (0.5, 1.0, 2.0)) -> tuple[DynamicEval, dict[str, float]]:
    """A small search on the validation split: the learning rate times each of `factors` (decay fixed), then
    the decay times each factor (best learning rate). Returns (the best DynamicEval, its valid result)."""
    s = dynamic.settings
    device = next(model.parameters()).device
    tried: dict[tuple[float, float], dict[str, float]] = {}

    def score(lr: float, decay: float) -> float:
        if (lr, decay) not in tried:
            candidate = dynamic.with_settings(dynamic_lr=lr, dynamic_decay=decay)
            tried[lr, decay] = candidate.evaluate(model, valid, eos_id=eos_id, device=device, amp=amp)
        return tried[lr, decay]["loss"]

    lr = min((s.dynamic_lr * f for f in factors), key=lambda x: score(x, s.dynamic_decay))
    decay = min((s.dynamic_decay * f for f in factors), key=lambda d: score(lr, d))
    return dynamic.with_settings(dynamic_lr=lr, dynamic_decay=decay), tried[lr, decay]

