"""Experiment folders: locked while a driver uses them, stale locks taken over, and only folders made by tune.py
ever deleted (by --restart)."""
import json
import socket
import subprocess
import sys

import pytest
import yaml

from lmcore import files
from lmtune.cli import main
from lmtune.experiment import load_experiment
from lmtune.folder import FolderLock, check_folder, is_experiment_folder, prepare_folder
from lmtune.layout import LOCK_FILE, SNAPSHOT_FILE, ExperimentFolder
from lmtune.schema import ExperimentError


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_locked_folder_refuses_a_second_driver(tmp_path):
    with FolderLock(tmp_path / "exp"):
        holder = json.loads((tmp_path / "exp" / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname()
        with pytest.raises(ExperimentError) as err:
            FolderLock(tmp_path / "exp").__enter__()
        assert f"in use by process {holder['pid']} on {holder['host']}" in str(err.value)
        assert "wait for it to finish" in str(err.value)
    assert not (tmp_path / "exp" / LOCK_FILE).exists()  # released


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "exp"
    folder.mkdir()
    pid = dead_pid()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "then"}))
    with FolderLock(folder):
        assert f"taking over the lock of process {pid}, which is gone" in capsys.readouterr().out
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] != pid


def test_a_lock_from_another_host_is_respected(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere", "since": "then"}))
    with pytest.raises(ExperimentError, match="on elsewhere"):
        FolderLock(folder).__enter__()


def test_the_second_run_exits_2_naming_the_holder(tiny_experiment, capsys):
    path = tiny_experiment()
    folder = path.parent / "results" / "tiny"
    folder.mkdir(parents=True)
    (folder / SNAPSHOT_FILE).write_text(yaml.safe_dump(load_experiment(path).snapshot()))
    with FolderLock(folder):  # held by this (live) process, as by a driver running now
        assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tiny: in use by process" in err and socket.gethostname() in err
    assert sorted(p.name for p in folder.iterdir()) == [SNAPSHOT_FILE]


def test_restart_deletes_only_our_folders(tiny_experiment, capsys):
    path = tiny_experiment()
    exp = load_experiment(path)
    folder = exp.folder
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work")
    assert not is_experiment_folder(folder)
    with pytest.raises(ExperimentError) as err:
        check_folder(exp, restart=True)
    assert "--restart deletes only experiment folders made by tune.py" in str(err.value)
    assert (folder / "thesis.tex").exists()

    (folder / "thesis.tex").unlink()
    (folder / SNAPSHOT_FILE).write_text(yaml.safe_dump(exp.snapshot()))
    (folder / "ray").mkdir()
    (folder / "ray" / "trial_x").mkdir()
    assert is_experiment_folder(folder)
    check_folder(exp, restart=True)
    with FolderLock(folder):
        plan = prepare_folder(exp, restart=True)
        assert not plan.resume
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE, SNAPSHOT_FILE]
    assert "--restart: removed the previous run" in capsys.readouterr().out


def test_a_snapshot_that_is_not_ours_does_not_make_a_folder_ours(tmp_path):
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / SNAPSHOT_FILE).write_text("just: some yaml\n")
    assert not is_experiment_folder(folder)
    (folder / SNAPSHOT_FILE).write_bytes(b"\xff\xfe binary")
    assert not is_experiment_folder(folder)


def test_the_layout_keeps_the_names_older_folders_have(tmp_path):
    """Folders written before lmtune/layout.py existed must still load: its names are the ones they hold."""
    folder = ExperimentFolder(tmp_path)
    names = {"snapshot": "experiment.yaml", "study_db": "optuna.db", "lock": ".lock", "final_eval": "final_eval.json",
             "summary_json": "summary.json", "summary_md": "summary.md", "history": "history.parquet"}
    assert {attribute: getattr(folder, attribute).relative_to(tmp_path).as_posix() for attribute in names} == names
    assert folder.study_url == f"sqlite:///{tmp_path}/optuna.db"
    assert folder.ray == tmp_path and folder.rungs == tmp_path / "asha_rungs.json"  # before ray/: at the top
    (tmp_path / "ray").mkdir()
    assert folder.ray == tmp_path / "ray" and folder.rungs == tmp_path / "ray" / "asha_rungs.json"


def test_the_snapshot_has_one_reader(tmp_path):
    folder = ExperimentFolder(tmp_path)
    assert folder.read_snapshot() is None  # none yet
    folder.snapshot.write_text("name: x\ntrials: 3\n")
    assert folder.read_snapshot() == {"name": "x", "trials": 3}
    folder.snapshot.write_text("- a list\n")
    with pytest.raises(files.FileError, match="experiment.yaml: expected a mapping"):
        folder.read_snapshot()


def test_a_study_from_before_a_new_setting_resumes_while_it_keeps_its_default(tiny_experiment):
    """Snapshots written before report.seeds, searcher.around_start and train.tf32 existed lack them."""
    from lmtune.folder import check_same_experiment

    exp = load_experiment(tiny_experiment("older"))
    exp.folder.mkdir(parents=True)
    snapshot = exp.snapshot()
    del snapshot["report"]["seeds"], snapshot["searcher"]["around_start"], snapshot["base"]["train.tf32"]
    ExperimentFolder(exp.folder).snapshot.write_text(yaml.safe_dump(snapshot, sort_keys=False))
    assert check_same_experiment(exp, exp.folder) == exp.spec.trials
    changed = load_experiment(tiny_experiment("older"), ["report.seeds=2", "train.tf32=true"])
    with pytest.raises(ExperimentError, match=r"differs .*\(base\.train\.tf32, report\.seeds\)"):
        check_same_experiment(changed, exp.folder)
