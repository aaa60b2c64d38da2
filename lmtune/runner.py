"""Run, resume or grow one experiment: Ray up, corpus warm, a Tuner with OptunaSearch + ASHA fitted (or restored).

The folder (lmtune/folder.py) is checked and locked first; Ray's experiment lives in results/NAME/ray/."""
from __future__ import annotations

import os
import socket

from lmtune.folder import STUDY_FILE, FolderLock, Plan, check_folder, prepare_folder
from lmtune.results import RAY_FOLDER, ray_folder
from lmtune.schema import Experiment
from lmtune.search import make_scheduler, make_searcher, set_trials


def run_experiment(
    exp: Experiment,
    *,
    restart: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool = True,
    dashboard_host: str = "127.0.0.1",
    dashboard_port: int = 8265,
) -> bool:
    """Run `exp` (resuming it if its folder holds an interrupted run, growing it if `trials` grew). True when
    every trial has finished; False when the run was interrupted (Ctrl-C): the same command resumes it."""
    import ray

    import lmcore

    data = exp.base.data
    lmcore.load_corpus(data.name, data.dir)  # tokenised (and cached) on this node; missing data fails here
    check_folder(exp, restart)
    with FolderLock(exp.folder):
        plan = prepare_folder(exp, restart)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter, trimmed to our columns
        started = not ray.is_initialized()  # a caller (notebook, test) may have started Ray already
        if started:
            start_ray(address, num_cpus, dashboard, dashboard_host, dashboard_port)
        try:
            return _fit(exp, plan)
        finally:
            if started:
                ray.shutdown()


def _fit(exp: Experiment, plan: Plan) -> bool:
    from ray import tune

    from lmtune.trainable import train_lm

    folder = exp.folder
    print(f"Experiment folder: {folder}")
    print(f"  TensorBoard:      tensorboard --logdir {folder}")
    print(f"  Optuna dashboard: optuna-dashboard sqlite:///{folder / STUDY_FILE}")
    warm_other_nodes(exp.base.data.name, exp.base.data.dir)

    resources = {"cpu": exp.spec.resources.cpus, "gpu": exp.spec.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(train_lm, base=exp.base.model_dump()), resources)
    if plan.resume:
        if plan.grow_from is not None:
            print(f"Growing {exp.name} from {plan.grow_from} to {exp.spec.trials} trials: every trial is kept.")
        else:
            print(f"Resuming {exp.name}: finished trials are kept, unfinished ones continue from their checkpoints.")
        tuner = tune.Tuner.restore(str(ray_folder(folder)), trainable, resume_unfinished=True, resume_errored=False)
        set_trials(tuner, exp.spec.trials)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=exp.spec.metric,
                mode=exp.spec.mode,
                search_alg=make_searcher(exp, folder),
                scheduler=make_scheduler(exp),
                num_samples=exp.spec.trials,
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
            ),
            run_config=tune.RunConfig(
                name=RAY_FOLDER,
                storage_path=str(folder),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=exp.spec.checkpoints.keep,  # Ray also keeps the latest, to resume from
                    checkpoint_score_attribute="valid_ppl",
                    checkpoint_score_order="min",
                ),
                failure_config=tune.FailureConfig(max_failures=exp.spec.failure.max_failures),
                progress_reporter=make_reporter(exp),
                callbacks=make_loggers(exp),
                verbose=1,
            ),
        )
    results = tuner.fit()
    return results.num_terminated + results.num_errors >= exp.spec.trials


def start_ray(address: str | None, num_cpus: int | None, dashboard: bool, host: str, port: int) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster: its own resources and dashboard
        context = ray.init(address=address)
    else:
        context = ray.init(
            address="local",  # a new Ray on this machine, never some other local cluster found by chance
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host=host,
            dashboard_port=port,
            logging_config=ray.LoggingConfig(log_level="WARNING"),  # no "checkpoint created" line per epoch
        )
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}")
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            print("  it asks for Ray's auth token: print it with `ray get-auth-token`")
        if host == "127.0.0.1" and not address:
            print(f"  from another machine: ssh -L {port}:127.0.0.1:{port} {socket.gethostname()}")


def warm_other_nodes(name: str, data_dir: str | None) -> None:
    """Tokenise the corpus once on every other node of the cluster (lmcore caches it on disk), not per trial."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here and n["Resources"].get("CPU")]
    load = ray.remote(num_cpus=1)(_load_corpus)
    ray.get([
        load.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(name, data_dir)
        for node in others
    ])


def _load_corpus(name: str, data_dir: str | None) -> None:
    import lmcore

    lmcore.load_corpus(name, data_dir)


def make_loggers(exp: Experiment) -> list:
    """Ray Tune's logger callbacks for the trackers named in the experiment's `loggers` (installed as extras).
    MLflow logs where $MLFLOW_TRACKING_URI says; W&B to the project named after the experiment ($WANDB_MODE)."""
    callbacks = []
    if "mlflow" in exp.spec.loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(experiment_name=exp.name))
    if "wandb" in exp.spec.loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=exp.name, dir=str(exp.folder)))  # W&B's run files: in it
    return callbacks


def make_reporter(exp: Experiment):
    """Ray's terminal table, trimmed to: trial, status, family, key params, epoch, valid ppl."""
    from ray import tune

    # Only settings every trial has: Ray's reporter fails on a trial lacking a column (a conditional one).
    always = [name for name in exp.space.always_present() if name != "model.family"]
    params = {"model.family": "family"}
    params.update({name: name.split(".", 1)[1].replace("dropout.", "drop.") for name in always[:6]})
    return tune.CLIReporter(
        parameter_columns=params,
        metric_columns={"training_iteration": "epoch", "valid_ppl": "valid ppl", "best_valid_ppl": "best ppl"},
        sort_by_metric=True,  # metric and mode come from TuneConfig
        max_progress_rows=20,
        max_report_frequency=30,
    )
