"""Shared test fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data (the folder holding ptb/ and wikitext-2/): $LMCORE_DATA_DIR, else ../shared/data
    beside the repo; the test is skipped when neither has it."""
    candidates = [Path(os.environ["LMCORE_DATA_DIR"])] if os.environ.get("LMCORE_DATA_DIR") else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for root in candidates:
        if (root / "ptb").is_dir() and (root / "wikitext-2").is_dir():
            return root.resolve()
    pytest.skip(f"real PTB / WikiText-2 data not found in {', '.join(map(str, candidates))} "
                f"(set LMCORE_DATA_DIR to the folder holding ptb/ and wikitext-2/)")


@pytest.fixture
def data_env(monkeypatch, tmp_path) -> Path:
    """No LMCORE_DATA_DIR / LMCORE_OFFLINE from the outside, and a fresh cache dir, which is returned:
    load_corpus then touches neither the real environment's data nor the user's cache."""
    monkeypatch.delenv("LMCORE_DATA_DIR", raising=False)
    monkeypatch.delenv("LMCORE_OFFLINE", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMCORE_CACHE_DIR", str(cache))
    return cache


TINY_CORPUS = {
    "train.txt": " the cat sat on the mat \n the dog sat \n <unk> ran \n",
    "valid.txt": " the cat ran \n a bird sat \n",
    "test.txt": " the dog sat on the cat \n",
}


@pytest.fixture
def tiny_corpus_dir(tmp_path) -> Path:
    """A folder with a tiny train/valid/test.txt corpus (the "text" dataset). Its training split has
    `<unk>`; "a" and "bird" in valid are not in the training vocabulary."""
    folder = tmp_path / "tiny_corpus"
    folder.mkdir()
    for name, text in TINY_CORPUS.items():
        (folder / name).write_text(text)
    return folder


# --- training -----------------------------------------------------------------------------------


def write_markov_corpus(folder: Path, seed: int = 0, lines: tuple[int, int, int] = (600, 60, 60)) -> Path:
    """A small corpus with real structure for training tests: 40 word types whose next word is mostly
    determined by the current one, so a model that learns drives perplexity far below the unigram level."""
    import random

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]

    def line() -> str:
        w = rng.randrange(40)
        out = [words[w]]
        for _ in range(rng.randint(4, 12)):
            w = (w * 7 + 3 + (rng.random() < 0.2)) % 40
            out.append(words[w])
        return " ".join(out)

    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), lines):
        (folder / f"{split}.txt").write_text("\n".join(line() for _ in range(n)) + "\n")
    return folder


@pytest.fixture(scope="session")
def markov_corpus_dir(tmp_path_factory) -> Path:
    """Folder of a learnable "text" dataset (train/valid/test.txt, ~5k training tokens)."""
    return write_markov_corpus(tmp_path_factory.mktemp("markov"))


@pytest.fixture(scope="session", autouse=True)
def _private_corpus_cache(tmp_path_factory):
    """Tests never write into the user's cache: one fresh corpus cache for the whole session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LMCORE_CACHE_DIR", str(tmp_path_factory.mktemp("lmcore-cache")))
    mp.setenv("LMCORE_OFFLINE", "1")  # and never the network
    mp.setenv("WANDB_MODE", "offline")  # W&B too (set before any Ray starts: its logging actors inherit it)
    mp.setenv("WANDB_SILENT", "true")
    yield
    mp.undo()


# --- tuning (Ray) -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session():
    """One small Ray for every in-process tuning test: 2 CPUs, no dashboard."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    yield ray
    ray.shutdown()


def write_tiny_experiment(path: Path, corpus_dir: Path, storage: Path, **changes) -> Path:
    """A search over two tiny RNN families on a "text" corpus: seconds per trial on a CPU.
    `changes` replace top-level keys of the experiment (e.g. trials=3, scheduler={...}); `fixed` is merged."""
    import yaml

    experiment = {
        "name": path.stem,
        "dataset": "text",
        "fixed": {
            "data.dir": str(corpus_dir), "data.batch_size": 8, "data.eval_batch_size": 8, "data.bptt": 16,
            "model.hidden": 16, "model.layers": 1, "train.steps_per_epoch": 10, **changes.pop("fixed", {}),
        },
        "search_space": {"params": {
            "model.family": {"choices": ["mogrifier", "lstm"]},
            "model.rounds": {"type": "int", "low": 1, "high": 3, "when": {"model.family": "mogrifier"}},
            "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        }},
        "searcher": {"sampler": "tpe", "seed": 0, "n_startup_trials": 2},
        "scheduler": {"type": "asha", "max_epochs": 3, "grace_period": 1, "reduction_factor": 2},
        "trials": 4,
        "resources": {"cpus": 1},
        "storage": str(storage),
        **changes,
    }
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


@pytest.fixture
def tiny_experiment(tmp_path, markov_corpus_dir):
    """Writes a tiny experiment file (see write_tiny_experiment) under tmp_path; returns a factory."""
    def make(name: str = "tiny", **changes) -> Path:
        return write_tiny_experiment(tmp_path / f"{name}.yaml", markov_corpus_dir, tmp_path / "results", **changes)
    return make


# --- subprocesses -------------------------------------------------------------------------------

# A busy laptop is a normal place to run the tests: limits are generous and scale with this variable.
TIMEOUT_SCALE = float(os.environ.get("LMCORE_TEST_TIMEOUT_SCALE", "1"))


def scaled(seconds: float) -> float:
    """A time limit of the tests, scaled by $LMCORE_TEST_TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE


# The test files that read the shared `reported_experiment`: one xdist worker runs them all, so that the study runs
# once (tests/test_conftest.py checks that this names every file using it).
SHARED_STUDY_FILES = ("tests/e2e/test_notebook.py", "tests/lmtune/test_export.py", "tests/lmtune/test_plots.py",
                      "tests/lmtune/test_seeds.py")
HEAVY_FIXTURES = {"ray_session", "reported_experiment"}


def file_of_test(nodeid: str) -> str:
    """The file a test's node id names: "tests/x/test_y.py::test_z[a]" -> "tests/x/test_y.py"."""
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(items):
    """A last line of defence (pytest-timeout): a test that hangs fails after 20 minutes, scaled, with every
    thread's stack, instead of holding CI to its own limit. The tests' own waits are shorter and say more.
    The files that start processes or Ray (end-to-end, slow-marked, on the shared Ray) come first, each kept
    together: under pytest-xdist the long ones start early and the short unit tests even out the end."""
    heavy = {file_of_test(item.nodeid) for item in items if item.nodeid.startswith("tests/e2e/")
             or item.get_closest_marker("slow") or HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))}
    for item in items:
        item.add_marker(pytest.mark.timeout(scaled(1200)))
    items.sort(key=lambda item: file_of_test(item.nodeid) not in heavy)  # stable: collection order within each part


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`./dev test` (--dist loadgroup): a file's tests on one worker, so that its module fixtures are made once, and
    SHARED_STUDY_FILES together on one, in the order collected (heavy files first). xdist's own loadgroup reads
    the group from a nodeid suffix that pytest 9 no longer keeps (pytest-xdist issue 1386), so every test would be
    a group of its own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = file_of_test(nodeid)
            return "shared study" if file in SHARED_STUDY_FILES else file

    config.option.loadscopereorder = False  # not by number of tests: the order collected
    return FileGroups(config, log)


def run_process(command: list[str], timeout: float = 900, **kwargs):
    """subprocess.run with captured text output and a generous, scaled time limit; a process that runs past it
    fails the test showing what it printed."""
    import subprocess

    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=scaled(timeout), **kwargs)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(map(str, command))}: still running after {scaled(timeout):.0f} s "
                    f"(scale with LMCORE_TEST_TIMEOUT_SCALE); it printed:\n{process_output(err.stdout, err.stderr)}")


def process_output(stdout, stderr, limit: int = 4000) -> str:
    """The tail of a process's stdout and stderr, for a failure message."""
    def text(x):
        return (x.decode(errors="replace") if isinstance(x, bytes) else x or "")[-limit:]
    return f"--- stdout ---\n{text(stdout)}\n--- stderr ---\n{text(stderr)}"


def wait_for(condition, what: str, timeout: float = 600, poll: float = 0.5, log: Path | None = None):
    """Wait until condition() is truthy (an event: a file appears, a line is printed) and return its value;
    after a generous, scaled limit the test fails, showing `log` (a process's output file) if given."""
    import time

    deadline = time.monotonic() + scaled(timeout)
    while not (value := condition()):
        if time.monotonic() > deadline:
            shown = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            pytest.fail(f"waited {scaled(timeout):.0f} s for {what}" + (f"; the process printed:\n{shown}" * bool(log)))
        time.sleep(poll)
    return value


def tune_in_process(*args: str) -> tuple[int, str, str]:
    """`tune.py ARGS` run in this process, on the shared small Ray (`ray_session`) if a test started it: the exit
    code and what it printed to stdout and stderr. A separate driver process is for tests whose point is a kill,
    a resume or the processes Ray leaves (tests/e2e/test_resume.py, test_ray_lifecycle.py, test_cluster.py)."""
    import contextlib
    import io

    from lmtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def reported_experiment(ray_session, tmp_path_factory, markov_corpus_dir) -> Path:
    """The folder of one finished and reported tiny experiment (run once per session through `tune.py`'s main, on
    the shared small Ray), with
    completed trials, trials ASHA stopped early and diverged ones (Adam at lr 1e6), and each family's best rerun with
    two other seeds (report.seeds): what figures and notebooks read.
    """
    tmp = tmp_path_factory.mktemp("reported")
    path = write_tiny_experiment(
        tmp / "tiny.yaml", markov_corpus_dir, tmp / "results",
        search_space={"params": {
            "model.family": {"choices": ["lstm", "gru"]},
            "model.dropout.output": {"type": "float", "low": 0.0, "high": 0.3, "when": {"model.family": "gru"}},
            "optim.lr": {"choices": [0.01, 0.001, 0.003, 1.0e6]},
        }},
        searcher={"sampler": "random", "seed": 2},
        trials=8,
        report={"seeds": 2},
    )
    code, out, err = tune_in_process(str(path), "--no-dashboard")
    assert code == 0, out[-3000:] + err[-3000:]
    return tmp / "results" / "tiny"


# --- devices ------------------------------------------------------------------------------------


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    """Runs a test on the CPU and, where there is one, on the CUDA device (`benchmarks/gpu_check.sh`)."""
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


# LSTM trials only: for tests that kill trial processes, so that none is killed halfway through building the
# Mogrifier's C++ loops (that leaves no lock behind, test_mogrifier checks, but the next trial builds again).
LSTM_ONLY = {"params": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}}
