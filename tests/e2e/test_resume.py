"""Resume and grow: SIGKILL the driver (and its Ray) mid-experiment, run the same command again (in this process, on
the shared small Ray: the driver that is killed or interrupted is the one that needs a process): completed trials
are kept, unfinished ones continue, the total is as configured and the Optuna study stays consistent. Ctrl-C
exits 130, and a finished or interrupted study grows with a larger `--set trials=N`, keeping every trial. ASHA
keeps what it recorded at its rungs across a restore."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
from ray.tune.schedulers import TrialScheduler

from lmcore.checkpoint import read_file
from lmtune import load_experiment, load_results, ray_internals, run_experiment
from lmtune.layout import CHECKPOINT_FILE, METRICS_FILE, RUNGS_FILE, ray_folder
from lmtune.search import make_scheduler
from tests.conftest import process_output, tune_in_process, wait_for

REPO = Path(__file__).resolve().parents[2]
# Ray saves its experiment state at most every 10 s by default; every second here, so that a test sees a trial end in
# it (and stops the driver) soon after. Tiny trials take about a second each, so the tests that stop a driver once a
# trial has completed give it 8: several are still to run however loaded the machine is.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TUNE_GLOBAL_CHECKPOINT_S": "1"}


def snapshot_statuses(folder: Path) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Ray has written to the folder."""
    states = sorted((folder / "ray").glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        trial_data = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):  # caught mid-write
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(state) for state, _ in trial_data)}


def start(command: list[str], log: Path) -> subprocess.Popen:
    """The driver in its own process group (a kill takes the Ray processes it started), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def a_trial_completed(process: subprocess.Popen, folder: Path, log: Path):
    def check():
        assert process.poll() is None, "the run ended before it could be stopped:\n" + log.read_text()[-4000:]
        return "TERMINATED" in snapshot_statuses(folder).values()
    return check


def driver_with_a_completed_trial(path: Path, log: Path) -> tuple[list[str], subprocess.Popen]:
    """`tune.py PATH` started as its own driver process, once a trial of its study has completed: (the command,
    the process). A process that fails the wait is killed, with the Ray it started."""
    command = [sys.executable, str(REPO / "tune.py"), str(path), "--num-cpus", "2", "--no-dashboard"]
    process = start(command, log)
    try:
        wait_for(a_trial_completed(process, path.parent / "results" / path.stem, log), "a completed trial", log=log)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return command, process


def test_killed_driver_resumes_with_the_same_command(ray_session, tiny_experiment, tmp_path):
    path = tiny_experiment(
        "resume",
        fixed={"train.steps_per_epoch": 25},
        scheduler={"type": "fifo", "max_epochs": 4},
        trials=8,
    )
    folder = path.parent / "results" / "resume"
    command, first = driver_with_a_completed_trial(path, tmp_path / "first.log")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = snapshot_statuses(folder)
    completed_before = {t for t, s in before.items() if s == "TERMINATED"}
    assert len(completed_before) < 8, "killed too late to test resuming"

    code, out, err = tune_in_process(*command[2:])  # the same command; on the shared Ray, in this process
    assert code == 0, process_output(out, err)
    assert "Resuming resume" in out
    assert "taking over the lock" in out  # the killed driver's lock was stale

    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 8  # the number configured, not 8 more
    assert completed_before <= set(trials["trial_id"])  # no completed trial lost
    assert (trials["status"] == "completed").all() and (trials["epochs"] == 4).all()

    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{folder / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 8
    # Trials Optuna handed out after Ray's last snapshot were closed, not left running.
    assert optuna.trial.TrialState.RUNNING not in states


def test_a_trial_whose_saved_checkpoint_is_gone_resumes_from_the_newest_left(ray_session, tiny_experiment, capsys):
    # What a driver killed between Ray deleting a checkpoint and Ray saving its state leaves: a running trial whose
    # saved latest checkpoint is gone, a newer one that the saved state does not know, and the checkpoint the trial
    # was writing when it was killed, half written.
    path = tiny_experiment("lagging", scheduler={"type": "fifo", "max_epochs": 3}, checkpoints={"keep": 2}, trials=1)
    exp = load_experiment(path)
    assert run_experiment(exp) is True
    state_file = max(ray_folder(exp.folder).glob("experiment_state-*.json"))
    state = json.loads(state_file.read_text())
    trial = ray_internals.load_trial(state["trial_data"][0])
    folder = ray_folder(exp.folder) / Path(trial.path).name
    results = (folder / "result.json").read_text().splitlines()
    first = json.loads(results[0])
    trial.status, trial.run_metadata.last_result = "RUNNING", first  # as Ray saved it after epoch 1
    ray_internals.set_trial_checkpoints(trial, [(f"{trial.path}/checkpoint_000000", first)])
    state["trial_data"][0] = ray_internals.dump_trial(trial)
    state_file.write_text(json.dumps(state))
    shutil.rmtree(folder / "checkpoint_000000", ignore_errors=True)  # Ray deleted it, unless it was among the best
    model = folder / "checkpoint_000002" / CHECKPOINT_FILE
    model.write_bytes(model.read_bytes()[:1000])  # the trial was killed as it wrote epoch 3's
    # Read before any resume (`tune.py report` of a study killed for good): the best checkpoint is one that exists.
    assert load_results(exp.folder).best_checkpoint(trial.trial_id) == folder / "checkpoint_000001"
    capsys.readouterr()

    assert run_experiment(exp) is True  # the same command again
    trials = load_results(exp.folder).trials
    assert (trials["status"] == "completed").all() and (trials["epochs"] == 3).all()
    assert f"trial {trial.trial_id}: Ray's saved state named checkpoints" in capsys.readouterr().out
    # It went on from checkpoint_000001 (epoch 2), not from scratch: one epoch more (Ray's count carried on), saved
    # whole as checkpoint_000002.
    added = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()[len(results):]]
    assert [(r["epoch"], r["training_iteration"], r["checkpoint_dir_name"]) for r in added] == \
        [(3, 3, "checkpoint_000002")]
    assert json.loads((folder / "checkpoint_000002" / METRICS_FILE).read_text())["epoch"] == 3
    read_file(model)


def rung_records(folder: Path) -> set[tuple[int, str]]:
    """(milestone, trial id) of every result ASHA has recorded, as saved in the experiment folder."""
    saved = json.loads((ray_folder(folder) / RUNGS_FILE).read_text())
    return {(m, t) for rungs in saved["brackets"] for m, recorded in rungs for t in recorded}


def test_ctrl_c_exits_130_and_the_interrupted_study_grows(ray_session, tiny_experiment, tmp_path):
    path = tiny_experiment("interrupt", fixed={"train.steps_per_epoch": 25},
                           scheduler={"type": "asha", "max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
                           trials=8)
    folder = path.parent / "results" / "interrupt"
    log = tmp_path / "first.log"
    command, first = driver_with_a_completed_trial(path, log)
    try:
        first.send_signal(signal.SIGINT)  # the driver only, as Ray's own Ctrl-C handling expects
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, log.read_text()[-4000:]
    assert "run the same command again to resume" in log.read_text(), log.read_text()[-4000:]
    recorded = rung_records(folder)

    code, out, err = tune_in_process(*command[2:], "--set", "trials=10")
    assert code == 0, process_output(out, err)
    assert "Growing interrupt from 8 to 10 trials" in out, process_output(out, err)
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 10 and trials["status"].isin(["completed", "early-stopped"]).all(), trials.to_string()
    # The resumed ASHA started from what it had recorded, not from empty rungs that it then saved over.
    assert recorded and recorded < rung_records(folder), (sorted(recorded), sorted(rung_records(folder)))


def test_asha_judges_a_resumed_studys_trials_by_what_it_recorded_before(tiny_experiment, tmp_path):
    exp = load_experiment(tiny_experiment(
        "rungs", scheduler={"type": "asha", "max_epochs": 4, "grace_period": 1, "reduction_factor": 2}))
    started = make_scheduler(exp)
    pickled = pickle.dumps(started)  # what Ray keeps when the study starts, and restores

    def judge(scheduler, trial_id: str, valid_ppl: float) -> str:
        trial = SimpleNamespace(trial_id=trial_id,  # what ASHA reads of a Ray trial
                                storage=SimpleNamespace(experiment_driver_staging_path=str(tmp_path)))
        scheduler.set_search_properties(exp.spec.metric, exp.spec.mode)
        scheduler.on_trial_add(None, trial)
        return scheduler.on_trial_result(None, trial, {"epoch": 1, exp.spec.metric: valid_ppl})

    for i, valid_ppl in enumerate([100.0, 110.0, 120.0, 130.0]):
        judge(started, f"t{i}", valid_ppl)
    restored = pickle.loads(pickled)
    restored.resume(tmp_path / RUNGS_FILE)
    assert judge(restored, "late", 125.0) == TrialScheduler.STOP  # behind the median of the four before
    assert judge(pickle.loads(pickled), "late", 125.0) == TrialScheduler.CONTINUE  # as Ray restores it: no rungs


def test_a_finished_study_grows_and_keeps_every_trial(ray_session, tiny_experiment):
    path = tiny_experiment("grow", scheduler={"type": "fifo", "max_epochs": 1}, trials=2)
    exp = load_experiment(path)
    assert run_experiment(exp) is True
    first = load_results(exp.folder).trials

    grown = load_experiment(path, ["trials=3"])
    assert run_experiment(grown) is True
    trials = load_results(exp.folder).trials
    assert len(trials) == 3 and set(first["trial_id"]) < set(trials["trial_id"])
    kept = trials.set_index("trial_id").loc[first["trial_id"], "best_valid_ppl"]
    assert list(kept) == list(first["best_valid_ppl"])  # not re-run
    study = optuna.load_study(study_name="grow", storage=f"sqlite:///{exp.folder / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert load_experiment(path, ["trials=3"]).spec.trials == 3  # the snapshot now says 3: resumable as such


def test_a_damaged_rungs_file_is_named_and_the_rungs_start_empty(tiny_experiment, tmp_path, capsys):
    exp = load_experiment(tiny_experiment("rungs", scheduler={"type": "asha", "max_epochs": 4}))
    for text in ["{", '{"brackets": [[[1.0, {"t0": "x"}]]], "stopped": 0}', '{"brackets": [[[1.0, [1]]]]}']:
        (tmp_path / RUNGS_FILE).write_text(text)
        scheduler = make_scheduler(exp)
        scheduler.resume(tmp_path / RUNGS_FILE)
        assert f"{tmp_path / RUNGS_FILE}: unreadable" in capsys.readouterr().out
        assert all(not recorded for bracket in scheduler._brackets for _, recorded in bracket._rungs)
