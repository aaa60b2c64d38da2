"""The searcher and the scheduler: Optuna (TPE, study in SQLite) chooses configs, ASHA stops weak trials."""
from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from lmcore import files
from lmtune import ray_internals
from lmtune.experiment import Experiment
from lmtune.layout import RUNGS_FILE, ExperimentFolder
from lmtune.schema import SearcherSpec
from lmtune.space import trial_settings

RAY_TRIAL_ID = "ray_trial_id"  # the user attribute of each Optuna trial naming its Ray trial
REBUILT = "rebuilt_from_ray"  # the user attribute of a study rebuilt from Ray's trials (its file was lost)
SQLITE_HEADER = b"SQLite format 3\x00"


class StudySearch(OptunaSearch):
    """OptunaSearch whose SQLite study stays consistent when the driver is killed and the run restored.

    Ray snapshots the searcher (and with it which Optuna trial belongs to which Ray trial) every few seconds,
    but Optuna writes each `ask` to SQLite at once. Trials asked after the last snapshot belong to no Ray trial
    after a restore; they are closed as FAIL so the study does not show them running forever.
    """

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        asked = ray_internals.optuna_trials(self)
        if trial_id in asked:  # so optuna-dashboard's trials can be matched to the tables' rows
            asked[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # Ray replays epochs of a trial that Optuna saw finish just before the driver was killed

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        study = ray_internals.optuna_study(self)
        url = getattr(self, "study_url", None)  # None in a searcher pickled before it was kept
        if url and optuna.load_study(study_name=study.study_name, storage=url).user_attrs.get(REBUILT):
            # The pickled study caches the lost file's trials: read the rebuilt one afresh.
            study = optuna.load_study(study_name=study.study_name, storage=url, sampler=study.sampler)
            ray_internals.set_optuna_study(self, study)
            self._ask_again_for_unfinished(study)
        owned = {t.number for t in ray_internals.optuna_trials(self).values()}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in owned:
                study.tell(trial.number, state=TrialState.FAIL)


    def _ask_again_for_unfinished(self, study: optuna.Study) -> None:
        """In a study rebuilt from Ray's ended trials (lmtune.search.repair_study), each Ray trial that owns no
        Optuna trial (it was unfinished) gets a running one with its own settings, to be told its result."""
        asked = ray_internals.optuna_trials(self)
        owners = {t.user_attrs.get(RAY_TRIAL_ID) for t in study.get_trials(deepcopy=False)}
        for trial_id, lost in asked.items():
            if trial_id not in owners:
                study.enqueue_trial(lost.params)
                asked[trial_id] = study.ask(fixed_distributions=lost.distributions)
                asked[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)


class StudyTrials(SearchGenerator):
    """Ray's trial generator, with the study's number of trials settable on restore, so a study can grow.

    Ray keeps `num_samples` in its snapshot and restores it as it was; here `trials` decides. An interrupted run's
    generator is saved as finished; our Optuna search never finishes by itself, so a restore reopens it.
    """

    def __init__(self, searcher, trials: int):
        super().__init__(searcher)
        self.trials = trials

    def add_configurations(self, experiments) -> None:
        super().add_configurations(experiments)
        ray_internals.set_total_samples(self, self.trials)

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        ray_internals.set_total_samples(self, self.trials)
        ray_internals.reopen(self)


def make_searcher(exp: Experiment, folder: Path, max_concurrent: int) -> StudyTrials:
    """Optuna's study in `folder`, asked for at most `max_concurrent` trials at once, `exp.spec.trials` in all."""
    return StudyTrials(ConcurrencyLimiter(make_study(exp, folder), max_concurrent=max_concurrent), exp.spec.trials)


def make_study(exp: Experiment, folder: Path) -> StudySearch:
    """The searcher itself: Optuna's sampler over the experiment's space, its study in SQLite in `folder`."""
    sampler = make_sampler(exp.spec.searcher)
    storage = optuna.storages.RDBStorage(ExperimentFolder(folder).study_url)
    # OptunaSearch has no pruner: ASHA does the early stopping. metric/mode go here as well as to Tune.
    search = StudySearch(
        space=exp.space,
        metric=exp.spec.metric,
        mode=exp.spec.mode,
        sampler=sampler,
        study_name=exp.name,
        storage=storage,
        points_to_evaluate=exp.start_points or None,  # start_from: enqueued as the study's first trials
    )
    search.study_url = ExperimentFolder(folder).study_url  # pickled with it: a restore may reload the study
    return search


def make_sampler(s: SearcherSpec) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for the experiment's `searcher:` settings (benchmarks/searcher_benchmark.py compares them)."""
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group` is "experimental"
        if s.sampler == "gp":
            # A Gaussian process over the settings every trial has (others are drawn at random); noisy objective.
            return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
        # multivariate + group: the parameters that exist together (one family's) are modelled jointly;
        # constant_liar: trials running in parallel count as bad until they finish, so they differ.
        return optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True, group=True, constant_liar=True
        )


def make_scheduler(exp: Experiment) -> TrialScheduler:
    s = exp.spec.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    return StudyScheduler(
        time_attr="epoch",  # not Ray's training_iteration, which a trial resumed from a checkpoint counts afresh
        max_t=s.max_epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


class StudyScheduler(ASHAScheduler):
    """ASHA whose rungs survive a restore. Ray restores the scheduler as it was pickled when the study started
    (ray-project/ray#30838): its rungs would be empty, and every trial still to run would pass them unjudged, to
    the last epoch. So the rungs are saved with Ray's state after every result and read back on a restore."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save_rungs(trial)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save_rungs(trial)

    def _save_rungs(self, trial) -> None:
        # Into the folder where Ray stages its own state: Ray copies it into the experiment folder with each of its
        # snapshots, so the two agree after a kill (and a file written there directly, the copy would overwrite).
        brackets = [[[milestone, recorded] for milestone, recorded in rungs]
                    for rungs in ray_internals.asha_rungs(self)]
        files.write_text(Path(trial.storage.experiment_driver_staging_path) / RUNGS_FILE,
                         json.dumps({"brackets": brackets, "stopped": ray_internals.asha_stopped(self)}))

    def resume(self, rungs_file: Path) -> None:
        """Take back the rungs saved in `rungs_file` (none if no trial had reported yet)."""
        if not rungs_file.is_file():
            return
        try:
            saved = json.loads(rungs_file.read_text())
            brackets = [{float(m): {str(t): float(v) for t, v in recorded.items()} for m, recorded in rungs}
                        for rungs in saved["brackets"]]
            stopped = int(saved["stopped"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            print(f"{rungs_file}: unreadable ({type(err).__name__}); ASHA judges the remaining trials among themselves")
            return
        for rungs, saved_rungs in zip(ray_internals.asha_rungs(self), brackets):
            for milestone, recorded in rungs:
                recorded.update(saved_rungs.get(float(milestone), {}))
        ray_internals.set_asha_stopped(self, stopped)


def repair_study(exp: Experiment) -> None:
    """Before a resume: a study file (optuna.db) that is missing or damaged is rebuilt from the trials Ray recorded
    (each ended trial with its settings and result), saying so; a damaged file is kept beside it, renamed. Ray's
    state is the study's record; Optuna's file is what the sampler learns from."""
    layout = ExperimentFolder(exp.folder)
    problem = _study_problem(layout.study_db, layout.study_url, exp.name)
    if problem is None:
        return
    kept = ""
    if layout.study_db.exists():
        damaged = layout.study_db.with_name(f"{layout.study_db.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        layout.study_db.rename(damaged)
        kept = f" (kept as {damaged.name})"
    direction = "minimize" if exp.spec.mode == "min" else "maximize"
    study = optuna.create_study(storage=layout.study_url, study_name=exp.name, direction=direction)
    study.set_user_attr(REBUILT, True)
    rebuilt = _add_ended_trials(study, exp)
    print(f"{layout.study_db}: {problem}{kept}; rebuilt from the {rebuilt} ended trials Ray recorded: the search "
          "continues from them")


def _study_problem(path: Path, url: str, name: str) -> str | None:
    """What is wrong with the study file (missing, damaged, without the study), or None."""
    if not path.is_file():
        return "missing" if not path.exists() else "not a file"
    with open(path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            return "damaged (not an SQLite database)"
    try:
        optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return f"holds no study named {name}"
    except Exception as err:  # sqlalchemy's DatabaseError and the like: a file SQLite cannot read
        return f"damaged ({type(err).__name__})"
    return None


def _add_ended_trials(study: optuna.Study, exp: Experiment) -> int:
    """Each ended Ray trial as an Optuna trial: its settings asked again through the space, its last result told."""
    from lmtune.results import ray_analysis

    ended = 0
    for trial in ray_analysis(ExperimentFolder(exp.folder).ray).trials:
        if trial.status not in ("TERMINATED", "ERROR"):
            continue  # unfinished: it gets a running Optuna trial when the searcher is restored
        settings = trial_settings(trial.config or {})
        study.enqueue_trial({p.key: settings[p.name] for p in exp.space.params if p.name in settings})
        asked = study.ask()
        exp.space(asked)
        asked.set_user_attr(RAY_TRIAL_ID, trial.trial_id)
        value = (trial.last_result or {}).get(exp.spec.metric)
        if trial.status == "ERROR" or value is None or not math.isfinite(value):
            study.tell(asked, state=TrialState.FAIL)
        else:
            study.tell(asked, value)
        ended += 1
    return ended


def restore_study(tuner, trials: int, folder: Path) -> None:
    """A restored Tuner's study gets its new trial count and its ASHA rungs back.

    Ray restores the searcher and the scheduler as pickled when the study began, and has no public way to reach
    them: lmtune/ray_internals.py does.
    """
    config = ray_internals.tune_config(tuner)
    if isinstance(config.search_alg, StudyTrials):
        config.search_alg.trials = trials
    else:  # a run started before StudyTrials: its bare searcher, which Ray wraps in a SearchGenerator
        config.search_alg = StudyTrials(config.search_alg, trials)
    if isinstance(config.scheduler, StudyScheduler):
        config.scheduler.resume(ExperimentFolder(folder).rungs)
