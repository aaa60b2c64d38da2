"""Run, resume or grow one experiment: Ray up, corpus warm, a Tuner with OptunaSearch + ASHA fitted (or restored).

The folder (lmtune/folder.py) is checked and locked first; Ray's experiment lives in results/NAME/ray/."""
from __future__ import annotations

import os
import signal
import socket

from lmcore.exitcodes import reclaim_sigterm
from lmtune import ray_guard, ray_internals
from lmtune.experiment import Experiment
from lmtune.folder import FolderLock, Plan, check_folder, prepare_folder
from lmtune.layout import RAY_FOLDER, ExperimentFolder
from lmtune.repair import repair_experiment_state
from lmtune.schema import ExperimentError
from lmtune.search import make_scheduler, make_searcher, restore_study
from lmtune.trackers import tracker_callbacks

_guard = None  # the process that kills what is left of the Ray we started, when we exit however we exit


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
            sigterm = signal.getsignal(signal.SIGTERM)
            start_ray(address, num_cpus, dashboard, dashboard_host, dashboard_port)
            reclaim_sigterm(sigterm)  # ray.init makes SIGTERM exit(15); tune.py's handler ends the fit as Ctrl-C does
        try:
            return _fit(exp, plan)
        finally:
            if started:
                stop_ray()


def _fit(exp: Experiment, plan: Plan) -> bool:
    from ray import tune

    from lmtune.trainable import train_lm

    folder = exp.folder
    print(f"Experiment folder: {folder}")
    print(f"  TensorBoard:      tensorboard --logdir {folder}")
    print(f"  Optuna dashboard: optuna-dashboard {ExperimentFolder(folder).study_url}")
    warm_nodes(exp.base.data.name, exp.base.data.dir)

    resources = {"cpu": exp.spec.resources.cpus, "gpu": exp.spec.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(train_lm, base=exp.base.model_dump()), resources)
    if plan.resume:
        if plan.grow_from is not None:
            print(f"Growing {exp.name} from {plan.grow_from} to {exp.spec.trials} trials: every trial is kept.")
        else:
            print(f"Resuming {exp.name}: finished trials are kept, unfinished ones continue from their checkpoints.")
        repair_experiment_state(ExperimentFolder(folder).ray)
        tuner = tune.Tuner.restore(str(ExperimentFolder(folder).ray), trainable, resume_unfinished=True,
                                   resume_errored=False)
        restore_study(tuner, exp.spec.trials, folder)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=exp.spec.metric,
                mode=exp.spec.mode,
                search_alg=make_searcher(exp, folder, exp.spec.max_concurrent or trials_that_fit(exp)),
                scheduler=make_scheduler(exp),
                num_samples=exp.spec.trials,
                trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
                reuse_actors=True,  # a trial's process serves the next: no worker start, torch import, corpus load
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
                callbacks=tracker_callbacks(exp),
                verbose=1,
            ),
        )
    tuner.fit()
    if not study_ended(exp):
        return False
    if exp.spec.report.seeds:  # each family's best rerun with other seeds, on this Ray (lmtune/seeds.py)
        from lmtune.seeds import run_seeds

        return run_seeds(exp)
    return True


def study_ended(exp: Experiment) -> bool:
    """Whether every trial of the study has ended, as Ray saved it: after a Ctrl-C, trials that were running are
    saved as unfinished (Tune's own counts may call them terminated when their processes are reused)."""
    from lmtune.results import ENDED, load_results

    trials = load_results(exp.folder).trials
    return len(trials) >= exp.spec.trials and bool(trials["status"].isin(ENDED).all())


def trials_that_fit(exp: Experiment) -> int:
    """How many trials the cluster's CPUs and GPUs hold at once. Tune, given a searcher but no concurrency
    limit, creates one trial at a time and waits for its process to start before the next: a wave of N
    trials then starts in N process start-ups instead of one."""
    import ray

    total = ray.cluster_resources()
    per_trial = {"CPU": exp.spec.resources.cpus, "GPU": exp.spec.resources.gpus}
    return max(1, min(int(total.get(name, 0) / need + 1e-9) for name, need in per_trial.items() if need))


def start_ray(address: str | None, num_cpus: int | None, dashboard: bool, host: str, port: int) -> None:
    """Connect to the cluster at `address` (or $RAY_ADDRESS), else start a Ray of our own on this machine."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster: its own resources and dashboard
        connect_ray(address)
        return
    global _guard
    _guard = ray_guard.protect()  # first: it must see every process ray.init starts
    # Ray's Prometheus endpoint listens on all interfaces, without the token, and nothing here reads it.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    dashboard_settings = {}
    if dashboard:  # without it, no port is passed: --no-dashboard never binds one
        port = free_port(host, port, "Ray dashboard")
        dashboard_settings = {"dashboard_host": host, "dashboard_port": port}
    context = ray.init(
        address="local",  # a new Ray on this machine, never some other local cluster found by chance
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        **dashboard_settings,
        logging_config=ray.LoggingConfig(log_level="WARNING"),  # no "checkpoint created" line per epoch
    )
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}")
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
            print("  it asks for Ray's auth token: print it with `ray get-auth-token`")
        if host == "127.0.0.1":
            print(f"  from another machine: ssh -L {port}:127.0.0.1:{port} {socket.gethostname()}")


def stop_ray() -> None:
    import ray

    ray.shutdown()
    ray_guard.release(_guard)


def connect_ray(address: str) -> None:
    """Join an existing cluster; refused (e.g. for its auth token): an ExperimentError saying what to do."""
    import ray
    from ray.exceptions import AuthenticationError

    try:
        ray.init(address=address, logging_config=ray.LoggingConfig(log_level="WARNING"))
    except ConnectionError as err:
        cause, refused = err, False
        while cause is not None and not refused:
            # An AuthenticationError, or (a token of the wrong cluster) its traceback inside a RuntimeError.
            refused = isinstance(cause, AuthenticationError) or "InvalidAuthToken" in str(cause)
            cause = cause.__cause__ or cause.__context__
        if not refused:
            raise ExperimentError(f"--address {address}: cannot connect to a Ray cluster there ({err})") from None
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        raise ExperimentError(
            f"--address {address}: the Ray cluster refused this driver's auth token (RAY_AUTH_MODE is {mode}). "
            "Its nodes use Ray's token authentication: run tune.py with their token, e.g. "
            "`export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/path/to/the/cluster/token` (or RAY_AUTH_TOKEN=...); "
            "scripts/local_cluster.sh writes these to its cluster.env. See docs/tuning.md, the cluster section."
        ) from None


def free_port(host: str, port: int, what: str) -> int:
    """`port` if nothing holds it on `host`, else a free one (printed)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
            return port
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind((host, 0))
        free = probe.getsockname()[1]
    print(f"{what}: port {port} on {host} is busy (another Ray?), using port {free}")
    return free


def warm_nodes(name: str, data_dir: str | None) -> None:
    """Tokenise the corpus once on every node of the cluster (lmcore caches it on disk), not per trial. The node
    this process started (its own Ray, a notebook's, a test's) is skipped: its workers have our environment, and so
    the cache run_experiment has just filled; a worker process started only to find that costs a torch import."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id() if ray_internals.started_local_ray() else None
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here and n["Resources"].get("CPU")]
    load = ray.remote(num_cpus=1)(_load_corpus)
    ray.get([
        load.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(name, data_dir)
        for node in nodes
    ])


def _load_corpus(name: str, data_dir: str | None) -> None:
    import lmcore

    lmcore.load_corpus(name, data_dir)


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
