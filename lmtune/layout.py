"""The experiment folder results/NAME/: every file and folder name in it, and the one reader of its snapshot.

    experiment.yaml                  the validated experiment (compared on resume; marks the folder as ours)
    optuna.db                        the Optuna study (`optuna-dashboard sqlite:///<folder>/optuna.db`)
    .lock                            while a driver uses the folder: its pid and host
    ray/                             Ray's experiment: its state files and one folder per trial (older runs: the
                                     folder itself)
    ray/asha_rungs.json              what ASHA recorded at each rung (Ray loses it on a restore)
    ray/trial_ID/checkpoint_N/       a Tune checkpoint: lmcore's model.pt and the epoch's metrics.json
    seeds/TRIALS/                    report.seeds: the Ray experiment rerunning each family's best trial (TRIALS: their
                                     ids) with other seeds; its trial folders as in ray/
    trials.{md,csv,parquet}          `tune.py report`: every trial
    top_k.{md,csv}                   the k best trials
    best_per_family.{md,csv}         each family's best trial, with its valid and test perplexity
    seed_runs.{md,csv}               report.seeds: every seed rerun, with its valid and test perplexity
    history.parquet                  every trial's per-epoch metrics (learning curves)
    final_eval.json                  test-split results, cached per checkpoint (test is evaluated once)
    curves.png, params.png,          the figures of lmtune/plots.py
    importance.png, progress.png
    summary.{json,md}                the above in one place; `tune.py compare` reads summary.json

Nothing here imports Ray or pandas: Ray's trial processes import it (the checkpoint's file names).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmcore import files

SNAPSHOT_FILE = "experiment.yaml"
STUDY_FILE = "optuna.db"
LOCK_FILE = ".lock"
RAY_FOLDER = "ray"
SEEDS_FOLDER = "seeds"
RERUN = "rerun"  # the one key of a seed rerun's trial config: {of_trial, family, seed, settings}
RUNGS_FILE = "asha_rungs.json"
CHECKPOINT_FILE = "model.pt"  # the one file lmcore's save_checkpoint writes, inside each Tune checkpoint
METRICS_FILE = "metrics.json"  # the epoch's metrics, beside it
FINAL_EVAL_FILE = "final_eval.json"
SUMMARY_FILE = "summary.json"
SUMMARY_MARKDOWN = "summary.md"
HISTORY_FILE = "history.parquet"
TRIALS_TABLE, TOP_K_TABLE, FAMILY_TABLE = "trials", "top_k", "best_per_family"  # stems: .md, .csv (.parquet)
SEED_RUNS_TABLE = "seed_runs"
CURVES_FIGURE, PARAMS_FIGURE, IMPORTANCE_FIGURE, PROGRESS_FIGURE = "curves.png", "params.png", "importance.png", \
    "progress.png"
OURS = {SNAPSHOT_FILE, STUDY_FILE, LOCK_FILE}  # all a folder holds if it stopped before Ray's first snapshot


class ExperimentFolder:
    """The paths of one experiment folder's files. Ask it for a path; never spell a name out elsewhere."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ExperimentFolder('{self.path}')"

    @property
    def snapshot(self) -> Path:
        return self.path / SNAPSHOT_FILE

    @property
    def study_db(self) -> Path:
        return self.path / STUDY_FILE

    @property
    def study_url(self) -> str:
        """Optuna's storage URL of the study (what optuna-dashboard takes)."""
        return f"sqlite:///{self.study_db}"

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def ray(self) -> Path:
        """Where Ray keeps the experiment's state and trial folders: ray/, or the folder itself (older runs)."""
        return self.path / RAY_FOLDER if (self.path / RAY_FOLDER).is_dir() else self.path

    @property
    def seeds(self) -> Path:
        """Where the seed reruns' Ray experiments live (report.seeds), one folder per set of trials rerun."""
        return self.path / SEEDS_FOLDER

    @property
    def rungs(self) -> Path:
        return self.ray / RUNGS_FILE

    @property
    def final_eval(self) -> Path:
        return self.path / FINAL_EVAL_FILE

    @property
    def summary_json(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def summary_md(self) -> Path:
        return self.path / SUMMARY_MARKDOWN

    @property
    def history(self) -> Path:
        return self.path / HISTORY_FILE

    def table(self, stem: str) -> Path:
        """A table's path without its suffix (TRIALS_TABLE, TOP_K_TABLE, FAMILY_TABLE): .md, .csv, .parquet."""
        return self.path / stem

    def figure(self, name: str) -> Path:
        return self.path / name

    def read_snapshot(self) -> dict[str, Any] | None:
        """experiment.yaml as written (None when there is none); files.FileError when it is unreadable."""
        if not self.snapshot.exists():
            return None
        return files.read_yaml(self.snapshot)


def ray_folder(folder: str | Path) -> Path:
    """Where Ray keeps an experiment's state and trial folders (see ExperimentFolder.ray)."""
    return ExperimentFolder(folder).ray
