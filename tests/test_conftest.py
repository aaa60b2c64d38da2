"""tests/conftest.py's own machinery: how `./dev test` spreads the tests over pytest-xdist's workers."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, SHARED_STUDY_FILES, process_output, scaled

RECORDING_TESTS = """import os
import pytest

@pytest.mark.parametrize("i", range(6))
def test_records_its_worker(i):
    with open(os.environ["WORKERS_LOG"], "a") as log:
        log.write(f"{__file__} {os.environ['PYTEST_XDIST_WORKER']}\\n")
"""


def test_every_file_using_the_shared_study_runs_on_its_worker():
    fixture = "reported_" + "experiment"  # spelled apart: this file does not use it
    using = {str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "tests").rglob("test_*.py")
             if fixture in path.read_text()}
    assert using == set(SHARED_STUDY_FILES)


def test_a_files_tests_share_a_worker_and_so_do_the_shared_studys_files(tmp_path):
    """Under `--dist loadgroup`, as `./dev test` runs: each of two files on one worker, and two of
    SHARED_STUDY_FILES on one worker together (before, pytest 9 and xdist scattered every test on its own)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    tests = tmp_path / "tests"
    (tests / "lmtune").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "tests" / "conftest.py", tests)
    files = ["tests/lmtune/test_one.py", "tests/lmtune/test_two.py", *SHARED_STUDY_FILES[-2:]]
    for name in files:
        (tmp_path / name).write_text(RECORDING_TESTS)
    log = tmp_path / "workers.log"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                          "no:cacheprovider", "tests"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=scaled(300), env={**os.environ, "WORKERS_LOG": str(log)})
    assert run.returncode == 0, process_output(run.stdout, run.stderr)
    workers: dict[str, set[str]] = {}
    for line in log.read_text().splitlines():
        path, worker = line.split()
        workers.setdefault(str(Path(path).relative_to(tmp_path)), set()).add(worker)
    assert set(workers) == set(files)
    assert all(len(w) == 1 for w in workers.values()), workers
    assert workers[files[2]] == workers[files[3]], workers
