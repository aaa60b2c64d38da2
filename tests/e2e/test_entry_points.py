"""The installed entry points: console scripts, `python -m`, and both command lines and the benchmarks ending
quietly (exit 141, no traceback) when the reader of their output goes away, as with `| head`."""
import importlib
import os
import subprocess
import sys
import tomllib

import pytest

from lmcore.cli import main
from lmcore.exitcodes import ExitCode
from tests.conftest import REPO_ROOT
from tests.lmcore.test_cli import TINY


def test_console_scripts_and_python_m_lmtune():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lmcore": "lmcore.cli:main", "lmtune": "lmtune.cli:main"}
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name))
    for module in ("lmcore", "lmtune"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "usage:" in done.stdout


BUFFERED = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout written when flushed


def closed_pipe_run(*args: str) -> tuple[int, str]:
    """Run a command as `... | head` does once head has gone: every write to stdout fails with EPIPE.
    Returns the exit code and what the command wrote to stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the only reader
    try:
        done = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=600, env=BUFFERED)
    finally:
        os.close(write_end)
    return done.returncode, done.stderr


@pytest.mark.parametrize("command", [["tune.py"], ["-m", "lmtune"]])
def test_tune_output_into_a_closed_pipe_ends_quietly(command):
    code, err = closed_pipe_run(*command, "check", "experiments/quickstart.yaml")
    assert code == ExitCode.CLOSED_PIPE, err
    assert "Traceback" not in err and "Error" not in err, err


def test_lmcore_output_into_a_closed_pipe_ends_quietly(markov_corpus_dir, tmp_path):
    argv = ["train", "--run-name", "r", "--runs-dir", str(tmp_path), "--data.dir", str(markov_corpus_dir), *TINY]
    assert main(argv) == 0
    code, err = closed_pipe_run("-m", "lmcore", "evaluate", "--run-name", "r", "--runs-dir", str(tmp_path))
    assert code == ExitCode.CLOSED_PIPE, err
    assert "Traceback" not in err and "Error" not in err, err


@pytest.mark.parametrize("script", ["family_speed.py", "mogrifier_speed.py", "tuner_overhead.py"])
def test_benchmark_output_into_a_closed_pipe_ends_quietly(script):
    code, err = closed_pipe_run(f"benchmarks/{script}", "--help")
    assert code == ExitCode.CLOSED_PIPE, err
    assert "Traceback" not in err and "Error" not in err, err


# A main that prints, then ends as `how` says; lmcore/exitcodes.py is imported alone (no torch: fast).
GUARDED_MAIN = """import sys; sys.path.insert(0, "lmcore"); from exitcodes import quiet_when_output_closes
@quiet_when_output_closes
def main():
    print("a line")
    {how}
sys.exit(main())
"""


@pytest.mark.parametrize("how,closed,code,message", [
    ("return 3", True, 3, None),  # its own failure code, not CLOSED_PIPE
    ("raise RuntimeError('a bug')", True, None, "RuntimeError: a bug"),  # a real error is never hidden
    ("raise BrokenPipeError('a socket')", False, 1, "BrokenPipeError: a socket"),  # not stdout's: raised
    ("return 0", None, 0, None),  # started with stdout closed (`>&-`): nothing to flush, success
])
def test_only_a_reader_going_away_is_quiet(how, closed, code, message):
    script = GUARDED_MAIN.format(how=how)
    if closed:
        returncode, err = closed_pipe_run("-c", script)
    else:  # a reader that stays, or (None) no stdout at all
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=600, env=BUFFERED,
                              preexec_fn=None if closed is False else (lambda: os.close(1)))
        returncode, err = done.returncode, done.stderr
    if code is None:  # a failure: 1, or 120 when Python's own last flush into the closed pipe fails too
        assert returncode not in (0, ExitCode.CLOSED_PIPE), err
    else:
        assert returncode == code, err
    assert (message in err) if message else ("Traceback" not in err), err
