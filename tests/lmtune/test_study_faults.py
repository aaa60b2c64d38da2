"""Faults in a study's own state (issue 25), planted in a copy of one real finished tiny study: damaged result
files, a lost or damaged optuna.db, output paths that cannot be written, `storage` that is not a usable folder,
oversized or hostile --set. Each ends in one message naming the file or field, exit 2, or a resume that says what
it rebuilt; never a traceback or a false "interrupted"."""
from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from lmcore import files
from lmtune.layout import ExperimentFolder
from tests.conftest import process_output, tune_in_process, write_tiny_experiment

RANDOM_BYTES = bytes(range(256))[::-1] * 4  # not UTF-8, not JSON, not YAML, not SQLite


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory, markov_corpus_dir) -> Path:
    """One finished and reported tiny study (2 trials of 1 epoch), run once for this module; tests use copies."""
    tmp = tmp_path_factory.mktemp("finished")
    path = write_tiny_experiment(tmp / "tiny.yaml", markov_corpus_dir, tmp / "results",
                                 scheduler={"type": "fifo", "max_epochs": 1}, trials=2)
    code, out, err = tune_in_process(str(path), "--no-dashboard")
    assert code == 0, process_output(out, err)
    return tmp / "results" / "tiny"


@pytest.fixture
def study(finished, tmp_path) -> Path:
    """A copy of the finished study, moved to this test's storage (its snapshot says so): it can be rerun there, but
    not grown (Ray would write a new trial into the original's folder)."""
    folder = Path(shutil.copytree(finished, tmp_path / "results" / "tiny"))
    snapshot = files.read_yaml(folder / "experiment.yaml")
    snapshot["storage"] = str(folder.parent)
    (folder / "experiment.yaml").write_text(yaml.safe_dump(snapshot, sort_keys=False))
    experiment = yaml.safe_load((finished.parent.parent / "tiny.yaml").read_text())
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**experiment, "storage": str(folder.parent)}))
    return folder


def one_message(code: int, out: str, err: str, names: Path | str) -> None:
    assert code == 2, process_output(out, err)
    assert err.startswith(f"error: {names}") and "Traceback" not in err and err.count("\n") == 1, err


def test_a_damaged_summary_is_named_and_report_rebuilds_it(study, tmp_path):
    summary = ExperimentFolder(study).summary_json
    summary.write_bytes(RANDOM_BYTES)
    for command in (["compare", str(study), "--out", str(tmp_path / "cmp")],
                    ["export-best", str(study), "--out", str(tmp_path / "best.yaml")]):
        code, out, err = tune_in_process(*command)
        one_message(code, out, err, summary)
        assert "tune.py report" in err
    assert not list(tmp_path.glob("cmp*")) and not (tmp_path / "best.yaml").exists()
    code, out, err = tune_in_process("report", str(study), "--no-eval")
    assert code == 0 and f"{summary}: damaged" in out, process_output(out, err)
    assert json.loads(summary.read_text())["trials"] == 2


@pytest.mark.parametrize("damage", ["random bytes", "not Ray's"])
def test_a_damaged_ray_state_is_named(study, tmp_path, damage):
    state = next((study / "ray").glob("experiment_state-*.json"))
    state.write_bytes(RANDOM_BYTES if damage == "random bytes" else b'{"trial_data": 3}')
    for command in (["report", str(study), "--no-eval"], ["export-best", str(study), "--out", str(tmp_path / "b")],
                    ["compare", str(study), "--out", str(tmp_path / "cmp")]):
        one_message(*tune_in_process(*command), state)
    assert not list(tmp_path.glob("cmp*"))  # compare reads everything before it writes


@pytest.mark.parametrize("damage", [RANDOM_BYTES, b"foo: 1\n"], ids=["random bytes", "foreign"])
def test_a_damaged_snapshot_is_named(study, tmp_path, damage):
    snapshot = ExperimentFolder(study).snapshot
    snapshot.write_bytes(damage)
    for command in (["report", str(study), "--no-eval"], ["export-best", str(study), "--out", str(tmp_path / "b")],
                    ["compare", str(study), "--out", str(tmp_path / "cmp")]):
        one_message(*tune_in_process(*command), snapshot)


def test_report_without_evaluation_keeps_the_cached_perplexities(study):
    cached = json.loads(ExperimentFolder(study).final_eval.read_text())
    code, out, err = tune_in_process("report", str(study), "--no-eval")
    assert code == 0, process_output(out, err)
    families = pd.read_csv(study / "best_per_family.csv")
    assert len(families) and families["test_ppl"].notna().all()
    assert sorted(families["test_ppl"]) == sorted(entry["test_ppl"] for entry in cached.values())


def test_output_paths_that_cannot_be_written_are_one_message(study, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine")
    cases = [(["export-best", str(study), "--out", str(folder), "--force"], f"--out {folder} is a folder"),
             (["export-best", str(study), "--out", "/proc/best.yaml"], "--out /proc/best.yaml is inside /proc"),
             (["compare", str(study), "--out", "/proc/cmp"], "--out /proc/cmp.md is inside /proc"),
             (["compare", str(study), "--out", str(tmp_path / "a_file" / "cmp")],
              f"--out {tmp_path / 'a_file' / 'cmp.md'} cannot be made: {tmp_path / 'a_file'} is not a folder")]
    for command, message in cases:
        one_message(*tune_in_process(*command), message)
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and (tmp_path / "a_file").read_text() == "mine"


def test_a_damaged_study_file_is_kept_and_rebuilt_from_rays_trials(study, tmp_path):
    study_db = ExperimentFolder(study).study_db
    study_db.write_bytes(RANDOM_BYTES)
    code, out, err = tune_in_process(str(tmp_path / "tiny.yaml"), "--no-dashboard")
    assert code == 0, process_output(out, err)
    assert f"{study_db}: damaged (not an SQLite database) (kept as optuna.db.damaged-" in out
    assert "rebuilt from the 2 ended trials Ray recorded" in out and "interrupted" not in out + err
    kept = next(study.glob("optuna.db.damaged-*"))
    assert kept.read_bytes() == RANDOM_BYTES  # the user's file, untouched
    rebuilt = optuna.load_study(study_name="tiny", storage=ExperimentFolder(study).study_url)
    ray_trials = pd.read_csv(study / "trials.csv")
    assert [t.state for t in rebuilt.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.user_attrs["ray_trial_id"] for t in rebuilt.trials} == set(ray_trials["trial_id"])


def test_a_lost_study_file_is_rebuilt(study, tmp_path):
    ExperimentFolder(study).study_db.unlink()
    code, out, err = tune_in_process(str(tmp_path / "tiny.yaml"), "--no-dashboard")
    assert code == 0, process_output(out, err)
    assert "optuna.db: missing; rebuilt from the 2 ended trials" in out and "interrupted" not in out + err
    trials = pd.read_csv(study / "trials.csv").set_index("trial_id")
    rebuilt = optuna.load_study(study_name="tiny", storage=ExperimentFolder(study).study_url).trials
    assert {t.user_attrs["ray_trial_id"]: t.value for t in rebuilt} == pytest.approx(
        trials["last_valid_ppl"].to_dict())


# -- without a study -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage, problem", [("/dev/null", "exists and is not a folder"),
                                              ("/proc/results", "is inside /proc, a system folder"),
                                              ("/sys/results", "is inside /sys, a system folder"),
                                              ("A_FILE", "exists and is not a folder")])
def test_storage_that_is_not_a_usable_folder_is_refused_before_anything_starts(tiny_experiment, tmp_path, storage,
                                                                                problem):
    storage = storage.replace("A_FILE", str(tmp_path / "a_file"))
    (tmp_path / "a_file").write_text("mine")
    path = tiny_experiment()
    for command in ("check", "run"):
        code, out, err = tune_in_process(command, str(path), "--set", f"storage={storage}")
        one_message(code, out, err, path)
        assert f": storage: {storage} {problem}" in err
    assert (tmp_path / "a_file").read_text() == "mine" and not (tmp_path / "results").exists()


def test_20000_set_arguments_are_one_short_message_in_little_memory(tiny_experiment):
    path = tiny_experiment()
    overrides = [arg for i in range(20_000) for arg in ("--set", f"fixed.x{i}=1")]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        code, out, err = tune_in_process("check", str(path), *overrides)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - started
    assert code == 2, process_output(out, err)
    assert peak < 200e6, f"{peak / 1e6:.0f} MB"
    assert len(err.splitlines()) <= 21 and len(err) < 5000, err[:2000]
    assert "fixed.x0: unknown setting" in err and "and 19,996 more)" in err
    print(f"20,000 --set: {seconds:.1f} s, peak {peak / 1e6:.1f} MB traced")  # shown with -s


def test_escape_sequences_in_a_set_value_are_echoed_escaped(tiny_experiment):
    code, out, err = tune_in_process("check", str(tiny_experiment()), "--set", "description=\x1b[31mred\x1b[0m",
                                     "--set", "trials=0")
    assert code == 2 and "\x1b" not in out + err
    assert "(with --set description=\\x1b[31mred\\x1b[0m trials=0): trials:" in err


def test_restart_names_a_foreign_snapshot(tiny_experiment, tmp_path):
    folder = tmp_path / "results" / "tiny"
    folder.mkdir(parents=True)
    (folder / "experiment.yaml").write_text("foo: 1\n")
    (folder / "notes.txt").write_text("mine")
    code, out, err = tune_in_process(str(tiny_experiment()), "--restart", "--no-dashboard")
    one_message(code, out, err, folder)
    assert "holds an experiment.yaml that tune.py did not write" in err
    assert sorted(p.name for p in folder.iterdir()) == ["experiment.yaml", "notes.txt"]
