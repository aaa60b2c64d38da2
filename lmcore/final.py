"""The final evaluation of a trained run: its checkpoint scored with the run's own data and settings, plainly
(`evaluate_checkpoint`, test only when asked) or with dynamic evaluation tuned on valid (`choose_and_test`).

It builds on scoring (lmcore/evaluation.py) and dynamic evaluation (lmcore/dynamic.py), which know nothing of
checkpoints or files.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from . import checkpoint
from .config import Config, SettingError
from .data import Corpus, DataError, Vocab, load_corpus
from .dynamic import choose, prepare
from .evaluation import choose_logit_scale, evaluate
from .models import LanguageModel
from .train import resolve_device, reuse_freed_memory

log = logging.getLogger("lmcore")


def evaluate_checkpoint(path: str | Path, splits: tuple[str, ...] = ("valid", "test"), *,
                        batch_size: int | None = None, data_dir: str | None = None,
                        device: str = "auto", dynamic: dict[str, Any] | None = None
                        ) -> tuple[dict[str, dict[str, float]], Config]:
    """The final evaluation: a checkpoint's loss and perplexity on the asked splits (test only when asked),
    with the run's own data, bptt and (by default) evaluation batch size. Returns ({split: result}, config).
    `dynamic`: dynamic evaluation, with these `eval.*` settings over the run's own (e.g. {} for the run's)."""
    model, vocab, config, corpus = load_for_evaluation(path, data_dir, device)
    reuse_freed_memory()
    scoring = dict(eos_id=vocab.eos_id, batch_size=batch_size or config.data.eval_batch_size,
                   bptt=config.data.bptt, amp=config.train.amp)
    for split in splits:
        if scoring["batch_size"] > getattr(corpus, split).numel():
            raise SettingError(f"batch size: {scoring['batch_size']} is more than the "
                               f"{getattr(corpus, split).numel():,} tokens of the {split} split")
    if dynamic is not None:
        config = config.updated(dynamic)
        scoring["dynamic"] = prepare(model, corpus.train, config.eval, amp=config.train.amp)
    scoring["logit_scale"] = choose_logit_scale(model, corpus.valid, config, eos_id=vocab.eos_id)
    scores = {}
    for split in splits:  # a long evaluation says what it is doing
        started = time.perf_counter()
        how = (f"dynamic, batch size {config.eval.dynamic_batch_size}, a step every {config.eval.dynamic_bptt} tokens"
               if dynamic is not None else f"batch size {scoring['batch_size']}")
        log.info("evaluating %s on %s (%s tokens, %s) ...", path, split, f"{getattr(corpus, split).numel():,}", how)
        scores[split] = evaluate(model, getattr(corpus, split), **scoring)
        log.info("%s: loss %.4f, ppl %.2f (%.1fs)", split, scores[split]["loss"], scores[split]["ppl"],
                 time.perf_counter() - started)
    return scores, config


def choose_and_test(path: str | Path, data_dir: str | None = None, device: str = "auto",
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """For a checkpoint: choose lr and decay on valid (see lmcore.dynamic.choose, starting from the run's eval.*
    settings with `overrides`), then score test once with them."""
    model, vocab, config, corpus = load_for_evaluation(path, data_dir, device)
    config = config.updated(overrides or {})
    dynamic = prepare(model, corpus.train, config.eval, amp=config.train.amp)
    best, valid = choose(model, corpus.valid, dynamic, eos_id=vocab.eos_id, amp=config.train.amp)
    test = best.evaluate(model, corpus.test, eos_id=vocab.eos_id, device=next(model.parameters()).device,
                         amp=config.train.amp)
    return {"dynamic_valid_ppl": valid["ppl"], "dynamic_test_ppl": test["ppl"],
            "dynamic_lr": best.settings.dynamic_lr, "dynamic_decay": best.settings.dynamic_decay}


def load_for_evaluation(path: str | Path, data_dir: str | None,
                        device: str) -> tuple[LanguageModel, Vocab, Config, Corpus]:
    """A checkpoint's (model, vocab, config) and its corpus, checked to share the vocabulary."""
    model, vocab, config = checkpoint.load_checkpoint(path, resolve_device(device))
    corpus = load_corpus(config.data.name, data_dir or config.data.dir)
    if corpus.vocab != vocab:
        raise DataError(f"{path}: the checkpoint's vocabulary does not match {config.data.name}'s")
    return model, vocab, config, corpus
