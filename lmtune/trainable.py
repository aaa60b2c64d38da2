"""The Tune function trainable: one trial = one `lmcore.train` run, reporting and checkpointing every epoch."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

import lmcore
from lmcore.checkpoint import CheckpointError, read_file
from lmcore.config import make_config
from lmtune.layout import CHECKPOINT_FILE, METRICS_FILE
from lmtune.space import trial_settings

# Test-only: the device a trial computes on whatever Ray gave it (e.g. "cpu" for trials holding Ray's logical
# GPUs on a machine without CUDA). Everything else (resources, CUDA_VISIBLE_DEVICES, the device the trial
# selects and reports) is as on a real GPU. Never set it for real runs.
DEVICE_OVERRIDE = "LMTUNE_TEST_DEVICE"

_corpora: dict[tuple[str, str | None], lmcore.Corpus] = {}  # per worker process: Tune reuses trial actors


def train_lm(config: dict[str, Any], base: dict[str, Any]) -> None:
    """`config` is what Optuna chose (dotted lmcore names); `base` the experiment's fixed settings."""
    started_at = time.time()
    cpus, gpus = _trial_resources()
    device = "cuda" if gpus > 0 else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to our share
    settings = {
        **trial_settings(config),
        "train.threads": max(1, int(cpus)),  # torch threads = the CPUs Ray gave this trial
        "train.device": os.environ.get(DEVICE_OVERRIDE) or device,
        "train.progress": False,
    }
    run_config = make_config(base, settings)
    corpus = _corpus(run_config.data.name, run_config.data.dir)
    # Where and when the trial ran, with every report: the tables ignore it; the cluster and GPU tests and
    # benchmarks/tuner_overhead.py read it.
    placement = {"node_id": ray.get_runtime_context().get_node_id(), "device": device,
                 "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "started_at": started_at}

    def report(metrics: dict[str, Any], save_checkpoint) -> None:
        metrics = {**metrics, **placement, "reported_at": time.time()}
        if metrics.get("diverged"):
            tune.report(metrics)  # recorded as diverged; no checkpoint of a NaN model
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / CHECKPOINT_FILE)
            (Path(tmp) / METRICS_FILE).write_text(json.dumps(metrics))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))  # persisted before returning

    checkpoint = tune.get_checkpoint()  # set when Tune resumes or retries this trial
    if checkpoint is None:
        lmcore.train(run_config, report=report, corpus=corpus)
        return
    with checkpoint.as_directory() as folder:
        last = _last_good(Path(folder))
        if last is not None and last["epoch"] >= run_config.train.epochs:
            # Resumed from its final checkpoint (the driver died as it finished): report the end again.
            tune.report(last)
            return
        if last is not None:
            lmcore.train(run_config, report=report, resume_from=Path(folder) / CHECKPOINT_FILE, corpus=corpus)
            return
    lmcore.train(run_config, report=report, corpus=corpus)  # its checkpoint was unreadable: from scratch


def _last_good(folder: Path) -> dict[str, Any] | None:
    """The metrics of a Tune checkpoint whose model file is readable; None, with a warning, otherwise."""
    try:
        last = json.loads((folder / METRICS_FILE).read_text())
        read_file(folder / CHECKPOINT_FILE)  # restore checks the rest
        return last if isinstance(last, dict) and isinstance(last.get("epoch"), int) else None
    except (CheckpointError, OSError, ValueError) as err:
        logging.getLogger("lmtune").warning("%s: unreadable checkpoint (%s); the trial starts again from scratch",
                                            folder, err)
        return None


def _corpus(name: str, data_dir: str | None) -> lmcore.Corpus:
    """The tokenised corpus, loaded once per worker process (from lmcore's on-disk cache, warmed per node)."""
    key = (name, data_dir)
    if key not in _corpora:
        _corpora.clear()  # one corpus held at a time
        _corpora[key] = lmcore.load_corpus(name, data_dir)
    return _corpora[key]


def _trial_resources() -> tuple[float, float]:
    bundles = tune.get_context().get_trial_resources().required_resources
    return bundles.get("CPU", 1.0), bundles.get("GPU", 0.0)
