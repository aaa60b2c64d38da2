"""SIGTERM (what `timeout`, a job scheduler, systemd or Kubernetes send) ends both command lines as Ctrl-C does
(issue 25): exit 130, one line saying how to resume, nothing lost. Each through a real process of its own."""
import os
import signal
import subprocess
import sys

import optuna
import pandas as pd

from tests.conftest import process_output, tune_in_process, wait_for
from tests.e2e.test_resume import REPO, snapshot_statuses, start


def test_sigterm_to_the_driver_ends_it_as_ctrl_c_and_a_lost_study_file_is_rebuilt(ray_session, tiny_experiment,
                                                                                    tmp_path):
    path = tiny_experiment("term", fixed={"train.steps_per_epoch": 25}, scheduler={"type": "fifo", "max_epochs": 3},
                           trials=4)
    folder = path.parent / "results" / "term"
    log = tmp_path / "driver.log"
    command = [sys.executable, str(REPO / "tune.py"), str(path), "--num-cpus", "2", "--no-dashboard"]
    driver = start(command, log)
    try:
        wait_for(lambda: "RUNNING" in snapshot_statuses(folder).values(), "a running trial", log=log)
        driver.send_signal(signal.SIGTERM)  # the driver only, as `timeout` sends it
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    printed = log.read_text()
    assert driver.returncode == 130, printed[-4000:]
    assert "term was interrupted: run the same command again to resume it." in printed
    assert "SIGTERM received" not in printed and "Traceback" not in printed
    assert set(snapshot_statuses(folder).values()) - {"TERMINATED"}, "nothing was left to resume"

    (folder / "optuna.db").unlink()  # and the study file is lost: rebuilt, the unfinished trials still told
    code, out, err = tune_in_process(*command[2:])
    assert code == 0, process_output(out, err)
    assert "optuna.db: missing; rebuilt from the" in out and "Resuming term" in out
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "completed").all()
    study = optuna.load_study(study_name="term", storage=f"sqlite:///{folder / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.user_attrs["ray_trial_id"] for t in complete} == set(trials["trial_id"])
    assert optuna.trial.TrialState.RUNNING not in [t.state for t in study.trials]


def test_sigterm_to_a_single_run_ends_it_as_ctrl_c(markov_corpus_dir, tmp_path):
    runs = tmp_path / "runs"
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "lmcore", "train", "--run-name", "term", "--runs-dir", str(runs),
               "--data.name", "text", "--data.dir", str(markov_corpus_dir), "--train.epochs", "1000",
               "--model.hidden", "16", "--data.batch_size", "8", "--data.bptt", "16"]
    with open(log, "w") as out:
        run = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (runs / "term" / "last.pt").is_file(), "the first epoch's checkpoint", log=log)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, log.read_text()[-4000:]
    assert f"interrupted: run the same command with --resume to continue from {runs / 'term' / 'last.pt'}" in \
        log.read_text()
