"""lmtune/ray_internals.py: each private Ray or Optuna attribute lmtune reaches, checked on objects built directly (no
Ray started). After an upgrade that removes one, its test fails with InternalsChanged naming the attribute."""
import optuna
import pytest
from optuna.distributions import FloatDistribution
from ray import tune
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


@pytest.mark.parametrize(("access", "attribute"), [
    (ray_internals.optuna_trials, "_ot_trials"),
    (ray_internals.optuna_study, "_ot_study"),
    (lambda o: ray_internals.set_total_samples(o, 1), "_total_samples"),
    (ray_internals.reopen, "_finished"),
    (ray_internals.asha_rungs, "_brackets"),
    (ray_internals.asha_stopped, "_num_stopped"),
    (lambda o: ray_internals.set_asha_stopped(o, 1), "_num_stopped"),
    (ray_internals.tune_config, "_local_tuner"),
])
def test_a_missing_attribute_is_named_and_never_created(access, attribute):
    class Upgraded:  # stands for a Ray or Optuna object that no longer has the attribute
        pass

    upgraded = Upgraded()
    with pytest.raises(InternalsChanged, match=f"Upgraded.{attribute} is gone in .*lmtune/ray_internals.py"):
        access(upgraded)
    assert not hasattr(upgraded, attribute)
