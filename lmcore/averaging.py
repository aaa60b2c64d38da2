"""Weight averaging (`optim.average`): validation and checkpoints use the averaged weights.

    ema   an exponential moving average of the weights after every step: decay `optim.ema_decay`, warmed up
          as TensorFlow's ExponentialMovingAverage does, min(decay, (1 + t) / (10 + t)) at update t, so
          that a short run's average covers its last steps rather than its initial weights
    asgd  AWD-LSTM's non-monotonically triggered averaging (Merity et al., 2018): once the validation loss
          is worse than the best of all but the last `optim.asgd_nonmono` epochs, keep the uniform average
          of every later iterate; with `optim.asgd_trigger` stale, once the best validation loss is
          `asgd_nonmono` epochs old (lamb's trigger_averaging_turns); and after epoch `optim.asgd_latest`
          at the latest (lamb's trigger_averaging_at_the_latest)

The trainer calls `update` after each optimiser step (an optimiser hook), `end_epoch` after validating,
and `applied(model)` around validation and checkpoint writing: inside it the model holds the average.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import OptimConfig


class Averager:
    def __init__(self, config: OptimConfig, model: nn.Module):
        self.method, self.decay, self.nonmono = config.average, config.ema_decay, config.asgd_nonmono
        self.trigger, self.latest = config.asgd_trigger, config.asgd_latest
        self.parameters = dict(model.named_parameters())
        self.average: dict[str, torch.Tensor] | None = None  # None: the average is the weights themselves
        self.count = 0  # iterates averaged (asgd)
        self.history: list[float] = []  # validation losses (asgd's trigger)
        if self.method == "ema":
            self.start()

    def hook(self, optimizer: torch.optim.Optimizer) -> None:
        """Update the average after every step of `optimizer`."""
        if self.method != "none":
            optimizer.register_step_post_hook(lambda *_: self.update())

    def start(self) -> None:
        self.average = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.count = 1

    @torch.no_grad()
    def update(self) -> None:
        if self.average is None:
            return
        self.count += 1
        t = self.count - 1  # updates so far, this one included
        weight = 1 - min(self.decay, (1 + t) / (10 + t)) if self.method == "ema" else 1 / self.count
        for name, p in self.parameters.items():
            self.average[name].lerp_(p.detach(), weight)

    def end_epoch(self, valid_loss: float) -> None:
        """asgd: start averaging when validation stops improving (the trigger `optim.asgd_trigger` names)."""
        if self.method == "asgd" and self.average is None and self.stopped_improving(valid_loss):
            self.start()
        self.history.append(valid_loss)

    def stopped_improving(self, valid_loss: float) -> bool:
        """Whether asgd starts after this epoch, whose validation loss is `valid_loss`."""
        history = self.history + [valid_loss]
        epoch = len(history)
        if self.latest is not None and epoch >= self.latest:
            return True
        if self.trigger == "stale":  # lamb: the first epoch of the best loss is nonmono epochs old
            return epoch - (history.index(min(history)) + 1) >= self.nonmono
        return len(self.history) > self.nonmono and valid_loss > min(self.history[:-self.nonmono])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[dict[str, Any]]:
        """Inside: the model holds the averaged weights. Yields this averager's state, with the training
        weights under "weights" (a checkpoint saves it beside the model, see `load`)."""
        if self.average is None:
            yield self.state(None)
            return
        weights = {name: p.detach().clone() for name, p in self.parameters.items()}
        with torch.no_grad():
            for name, p in self.parameters.items():
                p.copy_(self.average[name])
        try:
            yield self.state(weights)
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.copy_(weights[name])

    def state(self, weights: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        return {"method": self.method, "count": self.count, "history": list(self.history), "weights": weights}

    @torch.no_grad()
    def load(self, state: dict[str, Any] | None) -> None:
        """Resume from a checkpoint whose model weights were written inside `applied`: they are the average;
        the training weights come back from state["weights"]."""
        if state is None and self.method == "none":
            return
        if state is None or state["method"] != self.method:
            raise ValueError(f"the checkpoint was written with optim.average={state and state['method']!r}, "
                             f"this run has {self.method!r}")
        self.count, self.history = state["count"], list(state["history"])
        if state["weights"] is None:
            self.average = None
            return
        self.average = {name: p.detach().clone() for name, p in self.parameters.items()}
        for name, p in self.parameters.items():
            p.copy_(state["weights"][name])
