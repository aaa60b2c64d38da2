"""runs/NAME/: the names of its files, which folders count as an lmcore run, and a new run's folder undone."""
import pytest

from lmcore.run_folder import NewRunFolder, RunFolder


def test_each_file_has_the_name_users_and_docs_know(tmp_path):
    run = RunFolder(tmp_path / "r")
    named = {"config.yaml": run.config, "train.log": run.log, "metrics.jsonl": run.metrics, "last.pt": run.last,
             "best.pt": run.best, "final.json": run.final}
    assert {name: tmp_path / "r" / name for name in named} == named


@pytest.mark.parametrize("files, is_a_run", [
    ([], False),
    (["config.yaml"], False),
    (["last.pt", "metrics.jsonl", "train.log"], False),  # no config.yaml
    (["config.yaml", "best.pt", "final.json"], False),  # none of last.pt, metrics.jsonl, train.log
    (["config.yaml", "last.pt"], True),
    (["config.yaml", "metrics.jsonl"], True),
    (["config.yaml", "train.log"], True),
])
def test_a_run_is_config_yaml_with_a_checkpoint_metrics_or_log(tmp_path, files, is_a_run):
    for name in files:
        (tmp_path / name).write_text("x")
    assert RunFolder(tmp_path).holds_a_run() is is_a_run


def test_links_files_and_missing_folders_are_not_runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "last.pt"):
        (run / name).write_text("x")
    (tmp_path / "link").symlink_to(run)
    (tmp_path / "dirs").mkdir()
    (tmp_path / "dirs" / "config.yaml").mkdir()  # folders named like the files
    (tmp_path / "dirs" / "last.pt").mkdir()
    assert RunFolder(run).holds_a_run()
    assert not RunFolder(tmp_path / "link").holds_a_run()
    assert not RunFolder(run / "config.yaml").holds_a_run()
    assert not RunFolder(tmp_path / "missing").holds_a_run()
    assert not RunFolder(tmp_path / "dirs").holds_a_run()


def test_abandoning_a_new_run_removes_what_it_made_and_restores_the_old_run(tmp_path):
    old = tmp_path / "runs" / "r"
    old.mkdir(parents=True)
    (old / "config.yaml").write_text("old")
    new = NewRunFolder(old)
    new.create()
    assert old.is_dir() and not any(old.iterdir())
    new.abandon()
    assert (old / "config.yaml").read_text() == "old" and [p.name for p in (tmp_path / "runs").iterdir()] == ["r"]

    fresh = NewRunFolder(tmp_path / "more" / "deep")
    fresh.create()
    assert (tmp_path / "more" / "deep").is_dir()
    fresh.abandon()
    assert not (tmp_path / "more").exists()


def test_a_started_run_deletes_the_old_one_and_keeps_its_own(tmp_path):
    old = tmp_path / "r"
    old.mkdir()
    (old / "config.yaml").write_text("old")
    new = NewRunFolder(old)
    new.create()
    (old / "config.yaml").write_text("new")
    new.started()
    new.abandon()  # after an epoch: nothing to undo
    assert (old / "config.yaml").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["r"]
