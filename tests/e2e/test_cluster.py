"""tune.py --address against a real two-node Ray cluster on this machine (scripts/local_cluster.sh: a head and a
worker node, token authentication, a corpus cache per node): trials run on both nodes, the corpus is tokenised
once per node, everything lands in the shared storage, and losing the worker node mid-study loses nothing."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from lmtune.layout import ray_folder
from tests.conftest import LSTM_ONLY, write_tiny_experiment

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "local_cluster.sh"
LIMIT_S = 900 * float(os.environ.get("LMTUNE_TEST_TIME_SCALE", "1"))  # generous: a loaded laptop is fine
MAX_EPOCHS = 5

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc").is_dir() or not shutil.which("setsid"),
                                                   reason="the local cluster script needs Linux (setsid, ps)")]


class Cluster:
    def __init__(self, folder: Path):
        self.dir = folder
        # Ray notices a lost node after a few failed health checks: check every second, and give up after 10
        # (with 3, a busy machine - CI's two test workers - had the live worker node declared dead).
        self.env = {**os.environ, "LMCORE_CLUSTER_DIR": str(folder), "PYTHON": sys.executable,
                    "PYTHONPATH": str(REPO), "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "10"}

    def script(self, command: str) -> str:
        run = subprocess.run([str(SCRIPT), command], env=self.env, capture_output=True, text=True,
                             timeout=LIMIT_S)
        assert run.returncode == 0, f"local_cluster.sh {command}:\n{run.stdout}\n{run.stderr}"
        return run.stdout

    def settings(self) -> dict[str, str]:
        """cluster.env: RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_ADDRESS."""
        lines = (self.dir / "cluster.env").read_text().split("\n")
        return dict(line.removeprefix("export ").split("=", 1) for line in lines if line)

    def node_ids(self) -> dict[str, str]:
        """{"head": node id, "worker": node id}, told apart by their temp dirs."""
        code = ("import json, ray; ray.init(); print(json.dumps({n['NodeID']: n['RayletSocketName'] "
                "for n in ray.nodes() if n['Alive']}))")
        run = subprocess.run([sys.executable, "-c", code], env={**self.env, **self.settings()}, capture_output=True,
                             text=True, timeout=LIMIT_S)
        assert run.returncode == 0, run.stderr
        sockets = json.loads(run.stdout.strip().splitlines()[-1])
        return {name: node for node, socket in sockets.items() for name in ("head", "worker")
                if socket.startswith(str(self.dir / name) + "/")}

    def pids(self) -> set[int]:
        sids = {int(f.read_text()) for f in self.dir.glob("*.sid")}
        out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
        return {int(p) for p, s, stat in (line.split() for line in out.splitlines())
                if int(s) in sids and stat[0] != "Z"}


@pytest.fixture(scope="module")
def cluster():
    folder = Path(tempfile.mkdtemp(prefix="lmc-", dir="/tmp"))  # short: Ray's socket paths are limited
    cluster = Cluster(folder)
    try:
        cluster.script("start")
        yield cluster
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=cluster.env, capture_output=True, timeout=LIMIT_S)
        for pid in cluster.pids():  # whatever the script missed (it never should)
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def trial_results(folder: Path) -> dict[str, list[dict]]:
    """Every trial's reports (result.json), by trial folder name."""
    return {f.parent.name: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in ray_folder(folder).glob("trial_*/result.json")}


def wait_for(what: str, condition, driver: subprocess.Popen, log: Path):
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline and driver.poll() is None:
        if condition():
            return
        time.sleep(0.5)
    pytest.fail(f"{what}: not seen (driver exit code {driver.poll()}); the driver said:\n{log.read_text()[-6000:]}")


def test_a_driver_without_the_token_is_refused_with_a_clear_message(cluster, tmp_path, markov_corpus_dir):
    path = write_tiny_experiment(tmp_path / "refused.yaml", markov_corpus_dir, tmp_path / "shared")
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_AUTH")}
    # Ray retries a refused connection 20 times, seconds apart, before giving up; 3 show the same message.
    env.update(PYTHONPATH=str(REPO), RAY_NUM_REDIS_GET_RETRIES="3")
    run = subprocess.run([sys.executable, str(REPO / "tune.py"), str(path), "--address",
                          cluster.settings()["RAY_ADDRESS"]], cwd=REPO, capture_output=True, text=True,
                         timeout=LIMIT_S, env=env)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert "refused this driver's auth token" in run.stderr and "RAY_AUTH_TOKEN_PATH" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_study_on_two_nodes_survives_losing_one(cluster, tmp_path, markov_corpus_dir):
    nodes = cluster.node_ids()
    assert set(nodes) == {"head", "worker"}
    path = write_tiny_experiment(
        tmp_path / "cluster.yaml", markov_corpus_dir, tmp_path / "shared", trials=4, family="lstm",
        search_space=LSTM_ONLY,
        scheduler={"type": "fifo", "max_epochs": MAX_EPOCHS}, failure={"max_failures": 3},
        fixed={"train.steps_per_epoch": 600})  # seconds per epoch: the worker node starts its trial process
    # (slow on a busy machine) before the head node has run every trial
    folder = tmp_path / "shared" / "cluster"
    log = tmp_path / "driver.log"
    settings = cluster.settings()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "LMCORE_CACHE_DIR": str(tmp_path / "c"),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": settings["RAY_AUTH_TOKEN_PATH"]}
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, str(REPO / "tune.py"), str(path), "--address",
                                   settings["RAY_ADDRESS"]], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    try:
        def worker_checkpointed() -> bool:  # a trial on the worker node has reported (and checkpointed) an epoch
            return any(r["node_id"] == nodes["worker"] for rs in trial_results(folder).values() for r in rs)

        wait_for("a trial's epoch on the worker node", worker_checkpointed, driver, log)
        cluster.script("kill-worker")  # the machine is lost: all its processes, by pid
        driver.wait(LIMIT_S)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    said = log.read_text()
    assert driver.returncode == 0, said[-6000:]

    # Every trial finished, all its epochs, none lost or errored; the tables are in the shared storage.
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 4 and set(trials["status"]) == {"completed"}, trials.to_string()
    assert (trials["epochs"] == MAX_EPOCHS).all()
    for table in ("trials.md", "best_per_family.md", "summary.json", "history.parquet"):
        assert (folder / table).is_file(), table

    results = trial_results(folder)
    assert len(results) == 4
    ran_on = {r["node_id"] for rs in results.values() for r in rs}
    assert ran_on == set(nodes.values()), "trials ran on both nodes"
    moved = 0
    for name, reports in results.items():
        epochs = [r["epoch"] for r in reports]
        where = [r["node_id"] for r in reports]
        seen = sorted(set(epochs))
        assert seen[0] == 1 and seen[-1] == MAX_EPOCHS, (name, epochs)
        # The report of the epoch in flight when its node died may be lost with the node (Ray's result stream),
        # while its checkpoint, already in the shared storage, is not: the trial then resumes after that epoch.
        in_flight = len(set(range(1, MAX_EPOCHS + 1)) - set(seen))
        lost_with_worker = nodes["worker"] in where and where[-1] == nodes["head"]
        assert in_flight == 0 or (lost_with_worker and in_flight == 1), (name, epochs, where)
        if lost_with_worker:  # lost with the worker, finished on the head
            moved += 1
            first_on_head = epochs[where.index(nodes["head"])]
            last_on_worker = max(e for e, n in zip(epochs, where) if n == nodes["worker"])
            assert 1 < first_on_head <= last_on_worker + 1 + in_flight, \
                f"{name} resumed from its checkpoint: {epochs} {where}"
        # Every trial's checkpoints are in the shared storage.
        assert list((ray_folder(folder) / name).glob("checkpoint_*/model.pt")), name
    assert moved >= 1, "the worker's running trial was retried on the head"
    assert all(r["node_id"] == nodes["head"] for rs in results.values() for r in rs
               if r["timestamp"] > max(r["timestamp"] for rs in results.values() for r in rs
                                       if r["node_id"] == nodes["worker"]))

    # The corpus was tokenised once per node, before any trial started: never again by a trial.
    first_start = min(rs[0]["timestamp"] - rs[0]["time_total_s"] for rs in results.values())
    for node in ("head", "worker"):
        cached = list((cluster.dir / node / "cache" / "corpora").glob("*.pt"))
        assert len(cached) == 1, (node, cached)
        assert cached[0].stat().st_mtime < first_start + 1, f"{node}: tokenised again after trials started"
