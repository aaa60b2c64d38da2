"""An experiment's results as pandas DataFrames: the API the tables, the reports and notebooks read.

    results = load_results("results/ptb_mogrify")
    results.trials          # one row per trial: status, epochs, best_valid_ppl, params, tokens/s, time, config
    results.history         # one row per trial and epoch: learning curves
    results.top(5); results.best_per_family(); results.summary   # summary: after `tune.py report`
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lmcore.train import EpochMetrics
from lmtune.space import trial_settings

SUMMARY_FILE = "summary.json"
HISTORY_COLUMNS = [*(k for k in EpochMetrics.__annotations__ if k != "params"), "time_total_s"]
RANKED = ("completed", "early-stopped", "running", "paused", "pending")  # not diverged, not error


@dataclass
class Results:
    folder: Path
    trials: pd.DataFrame
    history: pd.DataFrame
    experiment: dict[str, Any] = field(default_factory=dict)  # the experiment.yaml snapshot
    summary: dict[str, Any] = field(default_factory=dict)
    analysis: Any = field(default=None, repr=False)  # Ray's ExperimentAnalysis, for checkpoints

    def ranked(self) -> pd.DataFrame:
        """Trials with a usable best valid perplexity, best first (diverged and errored ones excluded)."""
        ok = self.trials[self.trials["status"].isin(RANKED) & self.trials["best_valid_ppl"].map(_finite)]
        return ok.sort_values("best_valid_ppl", kind="stable")

    def top(self, k: int = 5) -> pd.DataFrame:
        return self.ranked().head(k)

    def best_per_family(self) -> pd.DataFrame:
        """The best trial of each model family, with the family's trial count and compute time."""
        ranked = self.ranked()
        best = ranked.groupby("family", sort=False).head(1).set_index("family")
        per_family = self.trials.groupby("family").agg(trials=("trial_id", "size"), compute_h=("time_s", "sum"))
        per_family["compute_h"] /= 3600
        best = best.join(per_family, how="left").reset_index()
        return best.sort_values("best_valid_ppl", kind="stable")

    def best_checkpoint(self, trial_id: str) -> Path | None:
        """The folder of the trial's checkpoint with the lowest valid perplexity."""
        trial = next(t for t in self.analysis.trials if t.trial_id == trial_id)
        checkpoint = self.analysis.get_best_checkpoint(trial, metric="valid_ppl", mode="min")
        return Path(checkpoint.path) if checkpoint else None


def load_results(folder: str | Path) -> Results:
    """Read an experiment folder (finished or not) into DataFrames. Needs no running Ray."""
    from ray.tune import ExperimentAnalysis

    folder = Path(folder).resolve()
    snapshot_file = folder / "experiment.yaml"
    experiment = yaml.safe_load(snapshot_file.read_text()) if snapshot_file.exists() else {}
    max_epochs = experiment.get("scheduler", {}).get("max_epochs")
    analysis = ExperimentAnalysis(str(ray_folder(folder)))
    frames = analysis.trial_dataframes
    rows, curves = [], []
    for trial in analysis.trials:
        history = _history(frames.get(trial.trial_id), trial.trial_id)
        rows.append(_trial_row(trial, history, max_epochs))
        curves.append(history)
    trials = pd.DataFrame(rows, columns=_columns(rows))
    history = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["trial_id", *HISTORY_COLUMNS])
    summary_file = folder / SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return Results(folder, trials, history, experiment, summary, analysis)


def ray_folder(folder: str | Path) -> Path:
    """Where Ray's experiment lives: folder/ray, or the folder itself for results written before that layout."""
    folder = Path(folder)
    return folder / "ray" if (folder / "ray").is_dir() else folder


def compare_frame(folders: list[str | Path]) -> pd.DataFrame:
    """The cross-experiment table: one row per experiment and family (needs each folder's summary.json)."""
    rows = []
    for folder in folders:
        summary_file = Path(folder) / SUMMARY_FILE
        if not summary_file.exists():
            raise FileNotFoundError(f"{folder}: no {SUMMARY_FILE}; run `python tune.py report {folder}` first")
        summary = json.loads(summary_file.read_text())
        for row in summary["families"]:
            rows.append({"experiment": summary["experiment"], "dataset": summary["dataset"], **row})
    columns = ["experiment", "dataset", "family", "trial_id", "params", "best_valid_ppl", "valid_ppl", "test_ppl",
               "trials", "compute_h"]
    table = pd.DataFrame(rows, columns=list(dict.fromkeys([*columns, *(k for row in rows for k in row)])))
    return table.sort_values(["dataset", "best_valid_ppl"], kind="stable", ignore_index=True)


def _history(frame: pd.DataFrame | None, trial_id: str) -> pd.DataFrame:
    if frame is None or frame.empty:
        return pd.DataFrame(columns=["trial_id", *HISTORY_COLUMNS])
    history = frame[[c for c in HISTORY_COLUMNS if c in frame.columns]].copy()
    if "epoch" in history:  # epochs replayed after a resume appear twice: keep the latest
        history = history.drop_duplicates("epoch", keep="last")
    history.insert(0, "trial_id", trial_id)
    return history


def _trial_row(trial, history: pd.DataFrame, max_epochs: int | None) -> dict[str, Any]:
    last = trial.last_result or {}
    epochs = int(last.get("epoch", last.get("training_iteration", 0)) or 0)
    ppl = history["valid_ppl"] if "valid_ppl" in history else pd.Series(dtype=float)
    best = last.get("best_valid_ppl", ppl.min() if len(ppl) else math.nan)
    config = trial_settings(trial.config or {})
    return {
        "trial_id": trial.trial_id,
        "family": config.get("model.family"),
        "status": trial_status(trial.status, last, epochs, max_epochs),
        "epochs": epochs,
        "best_valid_ppl": float(best) if best is not None else math.nan,
        "last_valid_ppl": float(last.get("valid_ppl", math.nan)),
        "params": last.get("params"),
        "tokens_per_s": _median(history, "tokens_per_s"),
        "time_s": float(last.get("time_total_s", 0.0)),
        **{k: v for k, v in config.items() if k != "model.family"},
        "error": _error_message(trial) if trial.status == "ERROR" else "",
    }


def trial_status(ray_status: str, last: dict[str, Any], epochs: int, max_epochs: int | None) -> str:
    """completed | early-stopped (by ASHA) | diverged | error, or Ray's own state for unfinished trials."""
    if ray_status == "ERROR":
        return "error"
    if last.get("diverged"):
        return "diverged"
    if ray_status == "TERMINATED":
        return "completed" if max_epochs is None or epochs >= max_epochs else "early-stopped"
    return ray_status.lower()


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row if k != "error"))
    return columns + ["error"] if columns else ["trial_id", "family", "status", "epochs", "best_valid_ppl", "time_s",
                                                "error"]


def _error_message(trial) -> str:
    """The last line of the trial's traceback (the exception itself)."""
    try:
        text = Path(trial.storage.trial_fs_path, trial.run_metadata.error_filename).read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1][:200] if lines else "error"
    except (OSError, TypeError):
        return "error"


def _median(frame: pd.DataFrame, column: str) -> float:
    return float(frame[column].median()) if column in frame and len(frame) else math.nan


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
