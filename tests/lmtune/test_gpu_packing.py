"""Fractional GPUs: with Ray's logical GPUs on this CPU machine (ray.init(num_gpus=2)) and the test-only
device override, an experiment asking `resources.gpus: 0.5` runs two trials per GPU at once, four in all, each
seeing its own GPU in CUDA_VISIBLE_DEVICES and selecting `cuda`: only the computation is on the CPU."""
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from lmtune.layout import ray_folder
from lmtune.trainable import DEVICE_OVERRIDE
from tests.conftest import LSTM_ONLY, write_tiny_experiment

REPO = Path(__file__).resolve().parents[2]
LIMIT_S = 900 * float(os.environ.get("LMTUNE_TEST_TIME_SCALE", "1"))

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent("""
    import sys, ray
    from lmtune import load_experiment, run_experiment
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False)  # 2 logical GPUs, no CUDA needed
    sys.exit(0 if run_experiment(load_experiment(sys.argv[1])) else 1)
""")


def test_half_gpu_trials_pack_two_per_gpu(tmp_path, markov_corpus_dir):
    path = write_tiny_experiment(tmp_path / "packed.yaml", markov_corpus_dir, tmp_path / "results", trials=4,
                                 family="lstm", search_space=LSTM_ONLY,
                                 resources={"cpus": 1, "gpus": 0.5}, scheduler={"type": "fifo", "max_epochs": 3},
                                 fixed={"train.steps_per_epoch": 60})  # seconds per trial: they overlap
    run = subprocess.run([sys.executable, "-c", DRIVER, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=LIMIT_S, env={**os.environ, "PYTHONPATH": str(REPO), DEVICE_OVERRIDE: "cpu"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    reports = [[json.loads(line) for line in f.read_text().splitlines()]
               for f in ray_folder(tmp_path / "results" / "packed").glob("trial_*/result.json")]
    assert len(reports) == 4 and all(len(r) == 3 for r in reports)
    assert all(r["device"] == "cuda" for trial in reports for r in trial), "each trial selects cuda"
    gpus = [{r["cuda_visible_devices"] for r in trial} for trial in reports]
    assert all(len(g) == 1 for g in gpus), "one GPU per trial, for its whole life"
    assert Counter(g.pop() for g in gpus) == {"0": 2, "1": 2}, "two trials on each GPU"
    starts = [trial[0]["started_at"] for trial in reports]
    ends = [trial[-1]["reported_at"] for trial in reports]
    assert max(starts) < min(ends), f"all four ran at once: starts {starts}, ends {ends}"
