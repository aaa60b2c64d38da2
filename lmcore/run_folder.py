"""runs/NAME/, the folder of one `python -m lmcore train` run: what its files are called, whether a folder
holds a run, and how a new run's folder is made (undone if the run fails before its first epoch ends).

    config.yaml    the run's settings
    train.log      its log
    metrics.jsonl  one line of lmcore.train.EpochMetrics per epoch
    last.pt        the checkpoint after the latest epoch (what --resume continues)
    best.pt        the checkpoint of the best validation loss so far
    final.json     best.pt's valid and test scores, written when training ends
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CONFIG, LOG, METRICS = "config.yaml", "train.log", "metrics.jsonl"
LAST, BEST, FINAL = "last.pt", "best.pt", "final.json"
RUN_FILES = (LAST, METRICS, LOG)  # beside config.yaml, any of these makes a folder an lmcore run


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder, named by what they are."""

    path: Path

    config = property(lambda self: self.path / CONFIG)
    log = property(lambda self: self.path / LOG)
    metrics = property(lambda self: self.path / METRICS)
    last = property(lambda self: self.path / LAST)
    best = property(lambda self: self.path / BEST)
    final = property(lambda self: self.path / FINAL)

    def holds_a_run(self) -> bool:
        """Recognisably an lmcore run (config.yaml with one of RUN_FILES): what --overwrite may remove."""
        return (self.path.is_dir() and not self.path.is_symlink() and self.config.is_file()
                and any((self.path / name).is_file() for name in RUN_FILES))


class NewRunFolder:
    """runs/NAME/ for a new run: created when the run starts; with --overwrite the old folder is set aside
    and deleted only once the new run has finished an epoch. `abandon` undoes both."""

    def __init__(self, path: Path):
        self.path, self.old, self.created = path, None, []

    def create(self) -> None:
        if self.path.exists():  # --overwrite of a checked run folder
            self.old = self.path.with_name(f".{self.path.name}.replaced-{os.getpid()}")
            self.path.rename(self.old)
        for folder in reversed([self.path, *self.path.parents]):
            if not folder.exists():
                folder.mkdir()
                self.created.append(folder)

    def started(self) -> None:
        if self.old is not None:
            shutil.rmtree(self.old)
        self.old, self.created = None, []

    def abandon(self) -> None:
        for folder in reversed(self.created):
            shutil.rmtree(folder, ignore_errors=True)
        if self.old is not None:
            self.old.rename(self.path)
        self.old, self.created = None, []
