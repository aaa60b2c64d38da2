"""Resume: SIGKILL the driver (and its Ray) mid-experiment, run the same command again: completed trials are
kept, unfinished ones continue, the total is as configured and the Optuna study stays consistent."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def snapshot_statuses(folder: Path) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Ray has written to the folder."""
    states = sorted(folder.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):  # caught mid-write
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(state) for state, _ in trial_data)}


def test_killed_driver_resumes_with_the_same_command(tiny_experiment):
    path = tiny_experiment(
        "resume",
        fixed={"train.steps_per_epoch": 40},
        scheduler={"type": "fifo", "max_epochs": 4},
        trials=5,
    )
    folder = path.parent / "results" / "resume"
    command = [sys.executable, str(REPO / "tune.py"), str(path), "--num-cpus", "2", "--no-dashboard"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    # Own process group: the kill takes the driver and the Ray processes it started.
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while "TERMINATED" not in snapshot_statuses(folder).values():
            assert first.poll() is None, "the first run ended before it could be killed"
            assert time.monotonic() < deadline, "no trial completed in time"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = snapshot_statuses(folder)
    completed_before = {t for t, s in before.items() if s == "TERMINATED"}
    assert len(completed_before) < 5, "killed too late to test resuming"

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Resuming resume" in second.stdout

    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 5  # the number configured, not 5 more
    assert completed_before <= set(trials["trial_id"])  # no completed trial lost
    assert (trials["status"] == "completed").all() and (trials["epochs"] == 4).all()

    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{folder / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 5
    # Trials Optuna handed out after Ray's last snapshot were closed, not left running.
    assert optuna.trial.TrialState.RUNNING not in states
