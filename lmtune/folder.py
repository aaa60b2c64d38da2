"""The experiment folder, results/NAME/ (its files: lmtune/layout.py): recognised, locked, prepared, and checked
against its snapshot.

Nothing here deletes a folder that is not recognisably one of ours, and only `--restart` deletes a run.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel

from lmcore import files
from lmcore.config import Config, flatten
from lmtune.experiment import Experiment
from lmtune.layout import LOCK_FILE, OURS, SNAPSHOT_FILE, ExperimentFolder
from lmtune.schema import ExperimentError, ExperimentSpec

GROWABLE = "trials"  # the one setting a resumed study may change (upwards)


def is_experiment_folder(folder: Path) -> bool:
    """Whether `folder` is recognisably one that tune.py made: it holds our snapshot of an experiment."""
    snapshot = _read_snapshot(folder)
    return bool(snapshot) and {"name", "dataset", "trials", "base"} <= set(snapshot)


@dataclass
class Plan:
    """What a run does with its folder: start afresh, resume, or resume and grow the study."""

    resume: bool
    grow_from: int | None = None  # the trials configured before, when the study grows


# -- locking ------------------------------------------------------------------------------------------


class FolderLock:
    """An exclusive lock on an experiment folder while a driver uses it: `.lock` holds the owner's pid and host.
    A lock left by a process that is gone (on this host) is taken over, with a message."""

    def __init__(self, folder: Path):
        self.file = ExperimentFolder(folder).lock

    def __enter__(self) -> FolderLock:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # a stale lock is removed and creation retried; a rival may win the retry
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            return self
        raise ExperimentError(f"{self.file}: cannot take the lock of this experiment folder")

    def __exit__(self, *exc) -> None:
        self.file.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        holder = _read_lock(self.file)
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            print(f"{self.file}: taking over the lock of process {pid}, which is gone")
            self.file.unlink(missing_ok=True)
            return
        if not holder:
            raise ExperimentError(f"{self.file}: is being written or unreadable; if no tune.py uses "
                                  f"{self.file.parent}, delete the lock file")
        raise ExperimentError(
            f"{self.file.parent}: in use by process {pid} on {host} since {holder.get('since')}; wait for it to "
            f"finish (or stop it). If that process is gone, delete {self.file}"
        )


def _read_lock(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


# -- preparing ----------------------------------------------------------------------------------------


def check_folder(exp: Experiment, restart: bool) -> None:
    """Before anything is written or locked: an existing folder must be one of ours."""
    folder = exp.folder
    if not folder.exists() or is_experiment_folder(folder):
        return
    if not folder.is_dir():
        raise ExperimentError(f"{folder}: exists and is not a folder; choose another name or storage")
    if not any(p.name != LOCK_FILE for p in folder.iterdir()):
        return  # empty (or only a lock): a run that stopped at once
    what = "--restart deletes only experiment folders made by tune.py" if restart else "it is not an experiment folder"
    holds = (f"holds an {SNAPSHOT_FILE} that tune.py did not write (or a damaged one)"
             if ExperimentFolder(folder).snapshot.exists() else f"holds no {SNAPSHOT_FILE}")
    raise ExperimentError(f"{folder}: exists and {holds}: {what}; choose another name or storage, or move the "
                          "folder away")


def prepare_folder(exp: Experiment, restart: bool) -> Plan:
    """Start, resume or grow the experiment in its folder (locked by the caller). A fresh run never writes over
    a run unless `restart` says so."""
    from ray import tune

    from lmtune.search import repair_study

    folder = exp.folder
    if restart and is_experiment_folder(folder):
        _empty(folder)
        print(f"--restart: removed the previous run in {folder}")
    if {p.name for p in folder.iterdir()} <= OURS:
        _empty(folder)  # stopped before Ray ran anything: only our own files, nothing to keep
        _write_snapshot(exp)
        return Plan(resume=False)
    if not tune.Tuner.can_restore(str(ExperimentFolder(folder).ray)):
        raise ExperimentError(
            f"{folder}: holds a run that cannot be resumed (stopped before Ray's first snapshot?); "
            "pass --restart to start it afresh"
        )
    saved = check_same_experiment(exp, folder)
    repair_study(exp)  # a lost or damaged optuna.db, rebuilt from Ray's trials
    if exp.spec.trials > saved:
        _write_snapshot(exp)
        return Plan(resume=True, grow_from=saved)
    return Plan(resume=True)


def check_same_experiment(exp: Experiment, folder: Path) -> int:
    """Refuse a resume whose settings differ from the saved snapshot, except more `trials`; returns the saved
    number of trials."""
    saved = flatten(_read_snapshot(folder))
    now = flatten(files.parse_yaml(yaml.safe_dump(exp.snapshot()), "snapshot"))  # the types YAML reads back
    saved = {k: v for k, v in saved.items() if not k.startswith("fixed.")}  # older snapshots: `base` has them
    # A setting added since the snapshot was written is unchanged while it keeps its default.
    added_at_default = {k for k in set(now) - set(saved) if now[k] == default_of(k)}
    changed = sorted(k for k in (set(saved) | set(now)) - added_at_default
                     if k != GROWABLE and saved.get(k) != now.get(k))
    if changed:
        raise ExperimentError(
            f"{exp.source}: differs from the run being resumed in {folder} ({', '.join(changed)}); "
            "resume with the original settings (only trials may grow), or pass --restart to start afresh"
        )
    before = saved.get(GROWABLE)
    before = before if isinstance(before, int) else exp.spec.trials
    if exp.spec.trials < before:
        raise ExperimentError(
            f"{exp.source}: trials: the study in {folder} has {before} trials configured; a study can grow but not "
            f"shrink: pass --set trials={before} (or more)"
        )
    return before


_NO_DEFAULT = object()


def default_of(key: str):
    """The default of a snapshot's key (`report.seeds`, `base.train.tf32`), or a marker equal to nothing."""
    if key.startswith("base."):
        return Config().flat().get(key.removeprefix("base."), _NO_DEFAULT)
    top, _, rest = key.partition(".")
    field = ExperimentSpec.model_fields.get(top)
    if field is None or field.is_required():
        return _NO_DEFAULT
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return flatten(value.model_dump(mode="json")).get(rest, _NO_DEFAULT) if rest else _NO_DEFAULT
    return _NO_DEFAULT if rest else value


def _read_snapshot(folder: Path) -> dict:
    """The snapshot as written; {} when there is none or it is unreadable (the folder is then not ours)."""
    try:
        return ExperimentFolder(folder).read_snapshot() or {}
    except files.FileError:
        return {}


def _write_snapshot(exp: Experiment) -> None:
    files.write_text(ExperimentFolder(exp.folder).snapshot, yaml.safe_dump(exp.snapshot(), sort_keys=False))


def _empty(folder: Path) -> None:
    """Delete what the folder holds, except the lock (held by this process)."""
    for entry in folder.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
