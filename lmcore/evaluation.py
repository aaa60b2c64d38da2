"""Scoring a model: `evaluate(model, tokens)` gives the loss and perplexity of a split, window by window.

Perplexity is exp(mean cross-entropy over every token of the split). Training (validation after each epoch),
dynamic evaluation and the final evaluation of a checkpoint (lmcore/final.py) all score through this module.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .batching import eval_batches
from .config import Config
from .models import LanguageModel


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPU (no loss scaling needed, unlike fp16); a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def evaluate(model: LanguageModel, tokens: Tensor, *, eos_id: int, batch_size: int = 10, bptt: int = 35,
             device: torch.device | str | None = None, amp: bool = False, dynamic=None,
             logit_scale: float = 1.0) -> dict[str, float]:
    """Score every token of `tokens` exactly once, carrying the state across the whole split, with the logits
    multiplied by `logit_scale` (see `choose_logit_scale`).
    `dynamic` (a lmcore.dynamic.DynamicEval) scores with dynamic evaluation instead, in its own windows and
    batch size (eval.dynamic_bptt, eval.dynamic_batch_size); the model's weights are restored afterwards."""
    before, model.logit_scale = model.logit_scale, logit_scale
    try:
        return _evaluate(model, tokens, eos_id=eos_id, batch_size=batch_size, bptt=bptt, device=device, amp=amp,
                         dynamic=dynamic)
    finally:
        model.logit_scale = before


def _evaluate(model: LanguageModel, tokens: Tensor, *, eos_id: int, batch_size: int, bptt: int,
              device: torch.device | str | None, amp: bool, dynamic) -> dict[str, float]:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if dynamic is not None:
        return dynamic.evaluate(model, tokens, eos_id=eos_id, device=device, amp=amp)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    state = None
    for inputs, targets in eval_batches(tokens, batch_size, bptt, eos_id):
        loss, scored, state = score_window(model, inputs, targets, state, device, amp)
        total += loss
        count += scored
    model.train(was_training)
    return loss_and_ppl(total, count)


def choose_logit_scale(model: LanguageModel, valid: Tensor, config: Config, *, eos_id: int,
                       device: torch.device | str | None = None) -> float:
    """eval.logit_scale, or with eval.logit_scale_search lamb's search (lamb/evaluation.py): the scales 1.06,
    1.04, ... down to eval.logit_scale_search, each scored on the first eval.logit_scale_tokens validation tokens
    at the training batch size, stopping once the best is two scales old. Returns the best scale."""
    settings = config.eval
    if settings.logit_scale_search is None:
        return settings.logit_scale
    tokens = valid[: settings.logit_scale_tokens]
    best, best_i, best_loss = 1.0, 0, math.inf
    for i in range(50):
        scale = 1.06 - 0.02 * i
        if scale < settings.logit_scale_search - 1e-4:
            break
        loss = evaluate(model, tokens, eos_id=eos_id, batch_size=config.data.batch_size, bptt=config.data.bptt,
                        device=device, amp=config.train.amp, logit_scale=scale)["loss"]
        if loss < best_loss:
            best, best_i, best_loss = scale, i, loss
        if best_i + 1 < i:
            break
    return best


def score_window(model: LanguageModel, inputs: Tensor, targets: Tensor, state, device: torch.device,
                 amp: bool) -> tuple[Tensor, int, object]:
    """(summed cross-entropy of the window's scored targets, how many were scored, the new state)."""
    targets = targets.to(device)
    with autocast(device, amp):
        logits, state = model(inputs.to(device), state)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                       reduction="sum")
    return loss, int((targets != -100).sum()), state


def loss_and_ppl(total: Tensor, count: int) -> dict[str, float]:
    loss = total.item() / count
    return {"loss": loss, "ppl": safe_exp(loss), "tokens": count}


def safe_exp(loss: float) -> float:
    """exp that saturates to inf instead of raising OverflowError; NaN also gives inf."""
    return math.exp(loss) if loss < 700 else math.inf
