"""lmtune/ray_internals.py: each private Ray or Optuna attribute lmtune reaches, checked on objects built directly (no
Ray started, but where the access is about the Ray this process started). After an upgrade that removes one, its test
fails with InternalsChanged naming the attribute."""
import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from ray import tune
from ray.train._internal.session import _TrainingResult
from ray.train._internal.storage import StorageContext
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from lmtune import ray_internals
from lmtune.ray_internals import InternalsChanged


@pytest.fixture
def searcher() -> OptunaSearch:
    return OptunaSearch(space={"x": FloatDistribution(0.0, 1.0)}, metric="valid_ppl", mode="min",
                        sampler=optuna.samplers.RandomSampler(seed=0))


@pytest.fixture
def scheduler() -> ASHAScheduler:
    return ASHAScheduler(time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2, metric="valid_ppl",
                         mode="min")


def test_optuna_trials_maps_each_ray_trial_to_its_optuna_trial(searcher):
    config = searcher.suggest("ray_1")
    asked = ray_internals.optuna_trials(searcher)
    assert set(asked) == {"ray_1"} and isinstance(asked["ray_1"], optuna.Trial)
    assert asked["ray_1"].params == config


def test_optuna_study_is_the_searchers_study(searcher):
    searcher.suggest("ray_1")
    study = ray_internals.optuna_study(searcher)
    assert isinstance(study, optuna.Study)
    assert [t.number for t in study.trials] == [ray_internals.optuna_trials(searcher)["ray_1"].number]


def test_the_searchers_study_can_be_replaced(searcher):
    searcher.suggest("ray_1")
    fresh = optuna.create_study()
    ray_internals.set_optuna_study(searcher, fresh)
    assert ray_internals.optuna_study(searcher) is fresh
    searcher.suggest("ray_2")  # asked of the new study
    assert [t.number for t in fresh.trials] == [0]


def test_total_samples_can_be_set(searcher):
    generator = SearchGenerator(searcher)
    ray_internals.set_total_samples(generator, 7)
    assert generator.total_samples == 7  # Ray's own (read-only) view of it


def test_a_finished_generator_reopens(searcher):
    generator = SearchGenerator(searcher)
    generator.set_finished()
    assert generator.is_finished()
    ray_internals.set_total_samples(generator, 3)
    ray_internals.reopen(generator)
    assert not generator.is_finished()


def test_asha_rungs_are_live_milestone_records(scheduler):
    rungs = ray_internals.asha_rungs(scheduler)
    assert len(rungs) == 1 and sorted(milestone for milestone, _ in rungs[0]) == [1, 2, 4]
    assert all(isinstance(recorded, dict) and not recorded for _, recorded in rungs[0])
    rungs[0][0][1]["trial_a"] = 12.5  # what lmtune's restore does: update the record in place
    assert ray_internals.asha_rungs(scheduler)[0][0][1] == {"trial_a": 12.5}


def test_asha_stopped_count_reads_and_sets(scheduler):
    assert ray_internals.asha_stopped(scheduler) == 0
    ray_internals.set_asha_stopped(scheduler, 3)
    assert ray_internals.asha_stopped(scheduler) == 3
    assert "num_stopped=3" in scheduler.debug_string()  # the count ASHA itself reports


def test_tune_config_of_a_tuner(searcher, scheduler, tmp_path):
    generator = SearchGenerator(searcher)
    config = tune.TuneConfig(search_alg=generator, scheduler=scheduler, num_samples=2)
    tuner = tune.Tuner(lambda _: None, tune_config=config, run_config=tune.RunConfig(storage_path=str(tmp_path)))
    restored = ray_internals.tune_config(tuner)
    assert restored.search_alg is generator and restored.scheduler is scheduler


class DriverTrial:
    """A Ray trial as the driver holds it, its checkpoints saved in a trial folder under tmp_path; Ray keeps the best
    one (lowest valid_ppl) and the latest."""

    def __init__(self, tmp_path):
        storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="ray", trial_dir_name="trial_a")
        keep_one = tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="valid_ppl",
                                         checkpoint_score_order="min")
        self.trial = Trial("train_lm", config={"x": 1}, trial_id="a", storage=storage, checkpoint_config=keep_one,
                           stub=True)  # stub: no trainable registered
        self.trial.create_placement_group_factory()
        self.folder = Path(storage.trial_fs_path)

    def checkpoint(self, index: int) -> tuple[str, dict]:
        path = self.folder / f"checkpoint_{index:06d}"
        path.mkdir(parents=True)
        return str(path), {"epoch": index + 1, "valid_ppl": [30.0, 20.0, 25.0, 10.0][index]}

    def save(self, index: int) -> None:  # as Ray's driver registers a trial's checkpoint
        path, metrics = self.checkpoint(index)
        self.trial.on_checkpoint(_TrainingResult(checkpoint=tune.Checkpoint(path), metrics=metrics))

    def saved(self) -> list[str]:  # the trial as Ray's experiment state holds it
        self.trial.stub = False
        return list(self.trial.get_json_state())


def test_a_saved_trial_loads_and_dumps_as_ray_saved_it(tmp_path):
    driver = DriverTrial(tmp_path)
    driver.save(0)
    saved = driver.saved()
    loaded = ray_internals.load_trial(saved)
    assert loaded.trial_id == "a" and loaded.checkpoint.path == str(driver.folder / "checkpoint_000000")
    assert [json.loads(part) for part in ray_internals.dump_trial(loaded)] == [json.loads(part) for part in saved]
    assert not json.loads(ray_internals.dump_trial(loaded)[0])["stub"]


def test_trial_checkpoints_are_those_ray_keeps_best_last(tmp_path):
    driver = DriverTrial(tmp_path)
    for index in range(3):
        driver.save(index)
    kept = ray_internals.trial_checkpoints(ray_internals.load_trial(driver.saved()))
    assert [(Path(path).name, metrics["valid_ppl"]) for path, metrics in kept] == \
        [("checkpoint_000002", 25.0), ("checkpoint_000001", 20.0)]  # the latest, and the best
    assert sorted(p.name for p in driver.folder.iterdir()) == ["checkpoint_000001", "checkpoint_000002"]


def test_set_trial_checkpoints_makes_the_last_the_latest_and_deletes_none(tmp_path):
    driver = DriverTrial(tmp_path)
    driver.save(0)
    trial = ray_internals.load_trial(driver.saved())
    ray_internals.set_trial_checkpoints(trial, [driver.checkpoint(1), driver.checkpoint(2)])
    restored = ray_internals.load_trial(ray_internals.dump_trial(trial))  # as Ray restores it
    assert restored.checkpoint.path == str(driver.folder / "checkpoint_000002")
    assert restored.latest_checkpoint_result.metrics == {"epoch": 3, "valid_ppl": 25.0}
    assert {Path(path).name for path, _ in ray_internals.trial_checkpoints(restored)} == \
        {"checkpoint_000001", "checkpoint_000002"}
    assert sorted(p.name for p in driver.folder.iterdir()) == ["checkpoint_000000", "checkpoint_000001",
                                                                "checkpoint_000002"]
    restored.storage.current_checkpoint_index += 1  # what the trial does before it saves its next checkpoint
    assert restored.storage.checkpoint_dir_name == "checkpoint_000003"
    driver.trial = restored
    driver.save(3)  # Ray keeps one again: the best (and latest), and deletes the others it knows
    assert sorted(p.name for p in driver.folder.iterdir()) == ["checkpoint_000000", "checkpoint_000003"]


def test_started_local_ray_tells_a_ray_this_process_started_from_none(ray_session, monkeypatch):
    assert ray_internals.started_local_ray()  # the tests' small Ray, started by this process (a joined one: test_cluster)
    import ray._private.worker

    monkeypatch.setattr(ray._private.worker, "_global_node", None)  # as before ray.init, or after ray.shutdown
    assert not ray_internals.started_local_ray()


def test_a_missing_private_name_is_named():
    with pytest.raises(InternalsChanged, match="ray.train._internal.session._Gone is gone in ray"):
        ray_internals._private("ray.train._internal.session", "_Gone")


@pytest.mark.parametrize(("access", "attribute"), [
    (ray_internals.optuna_trials, "_ot_trials"),
    (ray_internals.optuna_study, "_ot_study"),
    (lambda o: ray_internals.set_total_samples(o, 1), "_total_samples"),
    (ray_internals.reopen, "_finished"),
    (ray_internals.asha_rungs, "_brackets"),
    (ray_internals.asha_stopped, "_num_stopped"),
    (lambda o: ray_internals.set_asha_stopped(o, 1), "_num_stopped"),
    (ray_internals.tune_config, "_local_tuner"),
    (ray_internals.dump_trial, "stub"),
    (ray_internals.trial_checkpoints, "run_metadata"),
    (lambda o: ray_internals.set_trial_checkpoints(o, []), "run_metadata"),
])
def test_a_missing_attribute_is_named_and_never_created(access, attribute):
    class Upgraded:  # stands for a Ray or Optuna object that no longer has the attribute
        pass

    upgraded = Upgraded()
    with pytest.raises(InternalsChanged, match=f"Upgraded.{attribute} is gone in .*lmtune/ray_internals.py"):
        access(upgraded)
    assert not hasattr(upgraded, attribute)
