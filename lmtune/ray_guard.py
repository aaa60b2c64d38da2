"""Nothing the driver starts outlives it, even when it is SIGKILLed.

Ray started by `ray.init` leaves some of its processes (the dashboard agent, the runtime-env agent) running
when the driver dies without shutting it down. So the driver starts this guard first: a small process in a
session of its own that learns, every two seconds, which processes the driver started since (Ray's: its servers,
agents and workers), and holds a pipe the driver never writes to. When the pipe closes (the driver released
it after `ray.shutdown()`, or died) it kills those of them still alive, and their children, then exits.
Linux only (it reads /proc); elsewhere nothing is guarded.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

REFRESH_S = 2.0  # a /proc scan costs ~20 ms on a loaded 2-core VM: ~1% of a core


def protect() -> subprocess.Popen | None:
    """Start the guard of this process; keep the returned handle (and call `release`) until Ray is shut down."""
    if not Path("/proc/self/stat").exists():
        return None
    before = [str(pid) for pid in descendants({os.getpid()})]  # not Ray's: never touched
    # Run as a script, not `-m lmtune...`: the package's imports (torch, pandas) would cost seconds and memory.
    return subprocess.Popen([sys.executable, __file__, str(os.getpid()), *before],
                            stdin=subprocess.PIPE, start_new_session=True)


def release(guard: subprocess.Popen | None, timeout: float = 60) -> None:
    """The driver is done with Ray: the guard kills whatever of it is left, and exits."""
    if guard is None:
        return
    guard.stdin.close()
    try:
        guard.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"warning: Ray's process guard (pid {guard.pid}) has not finished after {timeout:.0f} s",
              file=sys.stderr)


def main(argv: list[str]) -> None:
    driver, before = int(argv[0]), {int(p) for p in argv[1:]}
    ignore = before | {os.getpid()}
    started = {}  # pid -> start time (a pid may be reused once its process is gone)
    while True:
        started.update({pid: _start_time(pid) for pid in descendants({driver}) - ignore if pid not in started})
        ready, _, _ = select.select([sys.stdin], [], [], REFRESH_S)
        if ready and not os.read(sys.stdin.fileno(), 1):
            break  # EOF: released, or the driver died
    kill_all({pid for pid, start in started.items() if _alive(pid, start)}, ignore)


def kill_all(pids: set[int], ignore: set[int]) -> None:
    """SIGKILL `pids` and their descendants until none is alive (a dying raylet may still be forking)."""
    targets = {pid: _start_time(pid) for pid in pids}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        targets.update({pid: _start_time(pid) for pid in descendants(set(targets)) - ignore if pid not in targets})
        alive = [pid for pid, start in targets.items() if _alive(pid, start)]
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def descendants(roots: set[int]) -> set[int]:
    """Every live process below `roots` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, stat in _stats():
        children.setdefault(int(stat[1]), []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _stats():
    """(pid, [state, ppid, ..., starttime, ...]) of every live process: /proc/PID/stat after the name."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat and stat[0] != "Z":
                yield int(entry.name), stat


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # the name may hold spaces and parentheses


def _start_time(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[19] if stat else None


def _alive(pid: int, start: str | None) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and stat[19] == start


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the driver's to handle; we wait for its end
    main(sys.argv[1:])
