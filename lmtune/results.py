"""An experiment's results as pandas DataFrames: the API the tables, figures, reports and notebooks read.

    results = load_results("results/ptb_mogrify")
    results                 # Results('results/ptb_mogrify': 8 trials (5 completed, 3 early-stopped), best ...)
    results.trials          # one row per trial: status, epochs, best_valid_ppl, params, tokens/s, time, settings
    results.history         # one row per trial and epoch (learning curves), with the trial's family and settings
    results.top(5); results.best_per_family(); results.config(trial_id); results.summary  # after `tune.py report`
    results.seed_runs       # report.seeds: each family's best trial rerun with other seeds, one row per rerun
    print(config_yaml(*results.built_config(trial_id)))   # the model as built, the settings its family reads
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import ValidationError

from lmcore import files
from lmcore.checkpoint import load_checkpoint
from lmcore.config import Config, make_config, set_dotted
from lmcore.models.families import applies_to, width_setting
from lmcore.train import EpochMetrics
from lmtune.confidence import SEED_COLUMNS
from lmtune.layout import CHECKPOINT_FILE, RERUN, SUMMARY_FILE, ExperimentFolder
from lmtune.schema import ExperimentError, ExperimentSpec
from lmtune.space import trial_settings

HISTORY_COLUMNS = [*(k for k in EpochMetrics.__annotations__ if k != "params"), "time_total_s", "timestamp"]
RANKED = ("completed", "early-stopped", "running", "paused", "pending")  # not diverged, not error
ENDED = ("completed", "early-stopped", "diverged", "error")  # a trial in any other state will run again on resume
# The tables' columns, defined once: each family's best trial, and the same over several experiments.
FAMILY_COLUMNS = ["family", "trial_id", "params", "best_valid_ppl", "valid_ppl", "test_ppl", "trials", "compute_h"]
COMPARE_COLUMNS = ["experiment", "dataset", *FAMILY_COLUMNS]
DYNAMIC_COLUMN = "dynamic_test_ppl"  # with report.dynamic: each family's best under dynamic evaluation
# With report.seeds: one row per rerun (each family's best over its reruns: confidence.SEED_COLUMNS).
SEED_RUN_COLUMNS = ["family", "of_trial", "seed", "trial_id", "status", "epochs", "best_valid_ppl", "valid_ppl",
                    "test_ppl", "compute_h"]
MANAGED_PER_TRIAL = ("train.threads", "train.device", "train.progress")  # the tuner's choices, not the recipe's


@dataclass(repr=False)
class Results:
    folder: Path
    trials: pd.DataFrame
    history: pd.DataFrame
    experiment: ExperimentSpec | None = None  # the experiment.yaml snapshot (None for a folder without one)
    base: dict[str, Any] = field(default_factory=dict)  # the lmcore settings every trial shared (dotted names)
    summary: dict[str, Any] = field(default_factory=dict)
    analysis: Any = None  # Ray's ExperimentAnalysis, for checkpoints
    # report.seeds: the reruns of each family's best trial (valid and test perplexity once reported), SEED_RUN_COLUMNS
    seed_runs: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SEED_RUN_COLUMNS))
    seed_analyses: list = field(default_factory=list)  # Ray's ExperimentAnalysis of each seeds/ experiment

    @property
    def name(self) -> str:
        return self.experiment.name if self.experiment else self.folder.name

    def __repr__(self) -> str:
        counts = self.trials["status"].value_counts() if len(self.trials) else pd.Series(dtype=int)
        status = ", ".join(f"{n} {s}" for s, n in counts.items())
        text = f"Results('{self.folder}': {len(self.trials)} trials ({status or 'none'})"
        best = self.top(1)
        if len(best):
            row = best.iloc[0]
            text += f", best valid ppl {row['best_valid_ppl']:.2f}: trial {row['trial_id']} ({row['family']})"
        return text + ")"

    def ranked(self) -> pd.DataFrame:
        """Trials with a usable best valid perplexity, best first (diverged and errored ones excluded)."""
        ok = self.trials[self.trials["status"].isin(RANKED) & self.trials["best_valid_ppl"].map(finite)]
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

    def family_table(self) -> pd.DataFrame:
        """FAMILY_COLUMNS (and DYNAMIC_COLUMN, SEED_COLUMNS if reported): the reported table (with test perplexity)
        once `tune.py report` ran, else one without."""
        if self.summary.get("families"):
            return with_columns(pd.DataFrame(self.summary["families"]), FAMILY_COLUMNS)
        return self.best_per_family().reindex(columns=FAMILY_COLUMNS)

    def config(self, trial_id: str) -> Config:
        """The trial's full lmcore config: the experiment's shared settings plus what Optuna chose."""
        trial = next(t for t in self.analysis.trials if t.trial_id == trial_id)
        return make_config({}, {**self.base, **trial_settings(trial.config or {})})

    def built_config(self, trial_id: str) -> tuple[Config, int | None]:
        """The trial's config with the model as it was built (a params_budget solved into its width), read from
        its best checkpoint, and that model's parameter count; without a checkpoint, the config and None."""
        checkpoint = self.best_checkpoint(trial_id)
        return built_config(checkpoint / CHECKPOINT_FILE) if checkpoint else (self.config(trial_id), None)

    def searched(self) -> list[str]:
        """The settings the search chose (the trials' dotted columns), model.family excluded."""
        return [c for c in self.trials.columns if "." in c]

    def best_checkpoint(self, trial_id: str) -> Path | None:
        """The folder of the trial's checkpoint with the lowest valid perplexity."""
        trial = next(t for t in self.analysis.trials if t.trial_id == trial_id)
        checkpoint = self.analysis.get_best_checkpoint(trial, metric="valid_ppl", mode="min")
        return Path(checkpoint.path) if checkpoint else None

    def seed_checkpoint(self, trial_id: str) -> Path | None:
        """The folder of a seed rerun's checkpoint with the lowest valid perplexity."""
        for analysis in self.seed_analyses:
            for trial in analysis.trials:
                if trial.trial_id == trial_id:
                    checkpoint = analysis.get_best_checkpoint(trial, metric="valid_ppl", mode="min")
                    return Path(checkpoint.path) if checkpoint else None
        return None


def read_snapshot(folder: str | Path) -> tuple[ExperimentSpec | None, dict[str, Any]]:
    """The experiment.yaml snapshot back through the schema: (the experiment's spec, its shared lmcore settings).
    ExperimentError naming the file when it is damaged or not one tune.py wrote."""
    layout = ExperimentFolder(folder)
    try:
        raw = layout.read_snapshot()
        if raw is None:
            return None, {}
        base = raw.pop("base", {}) or {}
        # The snapshot keeps the search space as its description (lines of text), not the file it came from.
        raw["search_space"] = "\n".join(raw.pop("space", None) or [])
        return ExperimentSpec.model_validate(raw), dict(base)
    except files.FileError as err:
        problem = str(err)
    except (ValidationError, AttributeError, TypeError, ValueError):  # YAML, but not the snapshot we write
        problem = f"{layout.snapshot}: not the experiment snapshot tune.py writes"
    raise ExperimentError(f"{problem}; it names the experiment this folder holds: restore it from a backup, or "
                          f"copy the experiment file that made the folder to {layout.snapshot}") from None


def read_summary(folder: str | Path, rebuild: bool = False) -> dict[str, Any]:
    """summary.json as `tune.py report` wrote it ({} before the first report). Damaged: ExperimentError naming it,
    or with `rebuild` (the report, about to rewrite it) {} and a line saying so."""
    path = ExperimentFolder(folder).summary_json
    try:
        summary = files.read_json(path) if path.exists() else {}
        problem = None if isinstance(summary, dict) else f"{path}: damaged (not a summary)"
    except files.FileError as err:
        problem = str(err)
    if problem is None:
        return summary
    if rebuild:
        print(f"{problem}: rebuilding it")
        return {}
    raise ExperimentError(f"{problem}; `python tune.py report {Path(folder)}` rebuilds it")


def ray_analysis(ray: Path):
    """Ray's ExperimentAnalysis of one Ray experiment (the search's ray/ or a seeds/ folder: its newest
    experiment_state-*.json), each trial naming only checkpoints that exist (lmtune/repair.py, in memory);
    ExperimentError naming that file when it is damaged."""
    from ray.tune import ExperimentAnalysis

    from lmtune.repair import repair_trial

    try:
        analysis = ExperimentAnalysis(str(ray))
    except (ValueError, KeyError, TypeError) as err:  # not JSON (UnicodeDecodeError, JSONDecodeError), or not Ray's
        states = sorted(ray.glob("experiment_state-*.json"))
        raise ExperimentError(
            f"{states[-1] if states else ray}: damaged ({type(err).__name__}): Ray's record of the study cannot be "
            f"read; each trial's results remain in {ray}/trial_*/. Restore the file from a backup to report or "
            "resume the study") from None
    for trial in analysis.trials:  # a killed driver's state may name checkpoints Ray deleted: read as a resume would
        repair_trial(trial, ray)
    return analysis


def built_config(checkpoint_file: Path) -> tuple[Config, int]:
    """A checkpoint's config with the model as built (its width solved from any params_budget), and its parameter
    count."""
    model, _, config = load_checkpoint(checkpoint_file)
    return config.model_copy(update={"model": model.config}), model.num_parameters()


def config_yaml(config: Config, params: int | None) -> str:
    """What summary.md, `tune.py export-best` and the notebook show of a trial's config: the settings its family
    reads (not the tuner's per-trial ones), as YAML that `python -m lmcore train --config` reads, after a comment
    line on the model built."""
    family = config.model.family
    tree: dict[str, Any] = {}
    for name, value in config.flat().items():
        if applies_to(family, name) and name not in MANAGED_PER_TRIAL:
            set_dotted(tree, name, value)
    return f"# {model_line(config, params)}\n" + yaml.safe_dump(tree, sort_keys=False)


def model_line(config: Config, params: int | None) -> str:
    """E.g. "the model built: mogrifier, model.hidden 203 (solved from model.params_budget 2,000,000), 1,999,412
    parameters"."""
    model, width = config.model, width_setting(config.model.family)
    if params is None and model.params_budget:  # no checkpoint to read the solved width from
        return f"the model: {model.family}, {width} solved from model.params_budget {model.params_budget:,} when built"
    line = f"the model built: {model.family}, {width} {config.flat()[width]}"
    if model.params_budget:
        line += f" (solved from model.params_budget {model.params_budget:,})"
    return line + (f", {params:,} parameters" if params is not None else "")


def load_results(folder: str | Path, rebuild: bool = False) -> Results:
    """Read an experiment folder (finished or not) into DataFrames. Needs no running Ray. A damaged file is an
    ExperimentError naming it; with `rebuild` (the report) a damaged summary.json is read as none."""
    folder = Path(folder).resolve()
    experiment, base = read_snapshot(folder)
    max_epochs = experiment.scheduler.max_epochs if experiment else None
    analysis = ray_analysis(ExperimentFolder(folder).ray)
    frames = analysis.trial_dataframes
    rows, curves = [], []
    for trial in analysis.trials:
        history = _history(frames.get(trial.trial_id), trial.trial_id)
        row = _trial_row(trial, history, max_epochs)
        rows.append(row)
        settings = {k: v for k, v in row.items() if "." in k}
        curves.append(history.assign(family=row["family"], **settings))
    trials = pd.DataFrame(rows, columns=_columns(rows))
    trials = trials.sort_values("started_at", kind="stable", ignore_index=True)  # the order the search made them
    history = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["trial_id", *HISTORY_COLUMNS])
    summary = read_summary(folder, rebuild)
    results = Results(folder, trials, history, experiment, base, summary, analysis)
    results.seed_runs, results.seed_analyses = _seed_runs(results, max_epochs)
    return results


def _seed_runs(results: Results, max_epochs: int | None) -> tuple[pd.DataFrame, list]:
    """The seed reruns (SEED_RUN_COLUMNS) of the trials that are now each family's best, from every Ray experiment
    under seeds/ (a study grown since may have rerun other trials before), and those experiments."""
    seeds = ExperimentFolder(results.folder).seeds
    folders = sorted(p for p in seeds.iterdir() if any(p.glob("experiment_state-*.json"))) if seeds.is_dir() else []
    analyses = [ray_analysis(p) for p in folders]
    best = set(results.best_per_family()["trial_id"])
    reported = {r.get("trial_id"): r for r in results.summary.get("seed_runs", []) if isinstance(r, dict)}
    rows = []
    for trial in (t for analysis in analyses for t in analysis.trials):
        rerun, last = (trial.config or {}).get(RERUN), trial.last_result or {}
        if not isinstance(rerun, dict) or rerun.get("of_trial") not in best:
            continue
        epochs = int(last.get("epoch", 0) or 0)
        rows.append({"family": rerun["family"], "of_trial": rerun["of_trial"], "seed": rerun["seed"],
                     "trial_id": trial.trial_id, "status": trial_status(trial.status, last, epochs, max_epochs),
                     "epochs": epochs, "best_valid_ppl": float(last.get("best_valid_ppl", math.nan)),
                     "valid_ppl": reported.get(trial.trial_id, {}).get("valid_ppl", math.nan),
                     "test_ppl": reported.get(trial.trial_id, {}).get("test_ppl", math.nan),
                     "compute_h": float(last.get("time_total_s", 0.0)) / 3600})
    runs = pd.DataFrame(rows, columns=SEED_RUN_COLUMNS)
    # A seed is counted once: a rerun begun in one folder, interrupted, and then run in a grown study's folder shows
    # up twice; its ended run wins.
    runs = runs.sort_values("status", key=lambda status: ~status.isin(ENDED), kind="stable")
    runs = runs.drop_duplicates(["of_trial", "seed"]).sort_values(["family", "seed"], kind="stable")
    return runs.reset_index(drop=True), analyses


def results_frame(runs: list[Results]) -> pd.DataFrame:
    """The cross-experiment table (COMPARE_COLUMNS, and DYNAMIC_COLUMN where reported) from loaded results,
    reported or not (then without test ppl)."""
    labels = experiment_labels([r.name for r in runs], [r.folder for r in runs])
    tables = [r.family_table().assign(experiment=label, dataset=r.experiment.dataset if r.experiment else None)
              for r, label in zip(runs, labels)]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=COMPARE_COLUMNS)
    return with_columns(table, COMPARE_COLUMNS).sort_values(["dataset", "best_valid_ppl"], kind="stable",
                                                            ignore_index=True)


def with_columns(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`table`'s `columns` in order, then its dynamic-evaluation and seed columns if it has them."""
    return table.reindex(columns=columns + [c for c in [DYNAMIC_COLUMN, *SEED_COLUMNS] if c in table])


def seed_runs_frame(runs: list[Results]) -> pd.DataFrame:
    """The seed reruns of several experiments, with each one's experiment and dataset (SEED_RUN_COLUMNS after)."""
    labels = experiment_labels([r.name for r in runs], [r.folder for r in runs])
    frames = [r.seed_runs.assign(experiment=label, dataset=r.experiment.dataset if r.experiment else None)
              for r, label in zip(runs, labels) if len(r.seed_runs)]
    columns = ["experiment", "dataset", *SEED_RUN_COLUMNS]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def summary_frame(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """The cross-experiment table (COMPARE_COLUMNS, then any extra): one row per experiment and family."""
    rows = [{"experiment": s["experiment"], "dataset": s["dataset"], **row} for s in summaries for row in s["families"]]
    table = pd.DataFrame(rows, columns=list(dict.fromkeys([*COMPARE_COLUMNS, *(k for row in rows for k in row)])))
    return table.sort_values(["dataset", "best_valid_ppl"], kind="stable", ignore_index=True)


def compare_frame(folders: list[str | Path]) -> pd.DataFrame:
    """summary_frame over experiment folders (needs each folder's summary.json, written by `tune.py report`)."""
    return summary_frame(_summaries(folders))


def pairs_frame(folders: list[str | Path]) -> pd.DataFrame:
    """report.seeds over experiment folders: each pair of families of a dataset, the difference of their mean test
    perplexities with Welch's 95% interval (lmtune/confidence.py's PAIR_COLUMNS; empty without seed reruns)."""
    from lmtune.confidence import seed_pairs

    summaries = _summaries(folders)
    labels = experiment_labels([s["experiment"] for s in summaries], folders)
    rows = [{"experiment": label, "dataset": s["dataset"], **run} for s, label in zip(summaries, labels)
            for run in s.get("seed_runs", [])]
    return seed_pairs(pd.DataFrame(rows, columns=["experiment", "dataset", *SEED_RUN_COLUMNS]))


def experiment_labels(names: list[str], folders: list[str | Path]) -> list[str]:
    """Each experiment's name, or its folder where two compared experiments share a name (their seed reruns are
    then never pooled)."""
    return [name if names.count(name) == 1 else str(folder) for name, folder in zip(names, folders)]


def _summaries(folders: list[str | Path]) -> list[dict[str, Any]]:
    summaries = []
    for folder in folders:
        summary = read_summary(folder)
        if not summary:
            raise FileNotFoundError(f"{folder}: no {SUMMARY_FILE}; run `python tune.py report {folder}` first")
        summaries.append(summary)
    return summaries


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
        "started_at": _started_at(history),
        "finished_at": float(last.get("timestamp", math.nan)),
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


def _started_at(history: pd.DataFrame) -> float:
    """Unix time the trial started: its first report's time less the training time before it."""
    if not {"timestamp", "time_total_s"} <= set(history.columns) or history.empty:
        return math.nan
    first = history.iloc[0]
    return float(first["timestamp"] - first["time_total_s"])


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row if k != "error"))
    return columns + ["error"] if columns else ["trial_id", "family", "status", "epochs", "best_valid_ppl", "time_s",
                                                "started_at", "finished_at", "error"]


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


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
