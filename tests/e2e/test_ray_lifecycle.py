"""The Ray a driver starts: its dashboard on a free port, nothing bound with --no-dashboard, and nothing of it
left alive after the driver is SIGKILLed mid-study."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtune import driver
from tests.conftest import LSTM_ONLY, write_tiny_experiment

REPO = Path(__file__).resolve().parents[2]
LIMIT_S = 600 * float(os.environ.get("LMTUNE_TEST_TIME_SCALE", "1"))  # generous: a loaded laptop is fine


def wait_for(what: str, condition, log: Path | None = None, limit: float = LIMIT_S):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    said = log.read_text()[-5000:] if log and log.exists() else ""
    pytest.fail(f"waited {limit:.0f} s for {what}; the driver said:\n{said}")


def session_pids(sid: int) -> set[int]:
    """Live (not zombie) processes of session `sid`."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True).stdout
    return {int(p) for p, s, stat in (line.split() for line in out.splitlines()) if int(s) == sid and stat[0] != "Z"}


def guard_pids(driver: int) -> set[int]:
    # -ww: whole command lines; ps otherwise cuts them at $COLUMNS (80 under pytest), losing the driver's pid.
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()
            if "ray_guard.py" in line and f" {driver} " in f"{line} " and line.split()[1][0] != "Z"}


def listening(pids: set[int]) -> list[str]:
    """The local addresses (host:port) on which `pids` listen for TCP connections."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines()
            if any(int(part.split(",")[0]) in pids for part in line.split("pid=")[1:])]


def kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_sigkilled_driver_leaves_no_ray_process(tmp_path, markov_corpus_dir):
    path = write_tiny_experiment(tmp_path / "killed.yaml", markov_corpus_dir, tmp_path / "results",
                                 family="lstm", search_space=LSTM_ONLY, trials=2,
                                 scheduler={"type": "fifo", "max_epochs": 50}, fixed={"train.steps_per_epoch": 20})
    busy = socket.socket()  # another process holds the dashboard port we ask for
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, str(REPO / "tune.py"), str(path), "--num-cpus", "2", "--dashboard-port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,  # its session: Ray's too
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    ray_pids: set[int] = set()
    try:
        folder = tmp_path / "results" / "killed"
        wait_for("a trial's first epoch", lambda: any(p.stat().st_size for p in folder.rglob("trial_*/result.json")), log)
        said = log.read_text()
        assert f"port {port} on 127.0.0.1 is busy" in said and "Ray dashboard: http://127.0.0.1:" in said
        assert f"127.0.0.1:{port}" not in said.split("Ray dashboard: http://")[1].split()[0]
        ray_pids = session_pids(driver.pid) - {driver.pid}
        assert len(ray_pids) >= 3, "Ray's processes (gcs_server, raylet, workers...) share the driver's session"
        assert guard_pids(driver.pid), "the guard runs beside the driver"
        # Network exposure: the dashboard on 127.0.0.1 only; no per-node Prometheus endpoint.
        # (Ray's gRPC servers listen on every interface, behind its auth token: docs/tuning.md.)
        if shutil.which("ss"):
            addresses = listening(ray_pids)
            dashboard = said.split("Ray dashboard: http://")[1].split()[0]  # 127.0.0.1:PORT
            on_its_port = [a for a in addresses if a.rsplit(":", 1)[1] == dashboard.rsplit(":", 1)[1]]
            assert on_its_port == [dashboard], addresses
            # The only ones on all interfaces: the autoscaler's and the dashboard head's fixed metrics ports
            # (Ray binds them so on every head node; documented), not the per-node metrics agent.
            open_to_all = {a for a in addresses if a.startswith("0.0.0.0:")}
            assert open_to_all <= {"0.0.0.0:44217", "0.0.0.0:44227"}, addresses

        driver.kill()  # SIGKILL: no chance to shut Ray down
        driver.wait()
        wait_for("every Ray process of the killed driver to end",
                 lambda: not session_pids(driver.pid) and not guard_pids(driver.pid), log)
    finally:
        busy.close()
        driver.kill()
        driver.wait()
        kill(session_pids(driver.pid) | ray_pids_alive(ray_pids) | guard_pids(driver.pid))


def ray_pids_alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists()}


def test_no_dashboard_passes_no_port(monkeypatch):
    """--no-dashboard: Ray is asked for no dashboard and given no port, so a busy 8265 cannot matter."""
    import ray

    class Started(Exception):
        pass

    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(driver.ray_guard, "protect", lambda: None)
    with pytest.raises(Started):
        driver.start_ray(None, 1, False, "127.0.0.1", 8265)
    assert seen["include_dashboard"] is False
    assert "dashboard_port" not in seen and "dashboard_host" not in seen


def test_a_busy_port_is_replaced_by_a_free_one(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        free = driver.free_port("127.0.0.1", port, "Ray dashboard")
        assert free != port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", free))  # it is free
    said = capsys.readouterr().out
    assert f"Ray dashboard: port {port} on 127.0.0.1 is busy (another Ray?), using port {free}" in said
