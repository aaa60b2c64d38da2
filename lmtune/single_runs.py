"""Single runs of `python -m lmcore train` (runs/NAME/) as pandas tables, e.g. one config rerun with several seeds.

    from lmtune.single_runs import load_runs, seed_groups
    runs = load_runs(["runs/ptb_lstm_seed1", "runs/ptb_lstm_seed2", "runs/ptb_lstm_seed3"])   # one row per run
    seed_groups(runs)      # per config: mean and standard deviation over its seeds

Every file is read as data (JSON, YAML through lmcore's safe reader); a damaged one is named with its field.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from lmcore import files
from lmcore.config import error_lines, error_message, make_config
from lmcore.run_folder import RunFolder
from lmtune.schema import ExperimentError

# Settings that say where and how a run ran, not what it trained: runs differing only in these (and the seed)
# rerun one config.
NOT_THE_RECIPE = ("train.seed", "train.threads", "train.device", "train.progress", "train.log_interval", "data.dir")
RUN_COLUMNS = ["run", "family", "seed", "params", "epochs", "valid_ppl", "test_ppl", "status", "compute_h"]
GROUP_COLUMNS = ["family", "runs", "seeds", "valid_ppl_mean", "valid_ppl_sd", "test_ppl_mean", "test_ppl_sd",
                 "mean_compute_h"]


def load_runs(paths: list[str | Path]) -> pd.DataFrame:
    """One row per run folder: RUN_COLUMNS, then `recipe` (the config without NOT_THE_RECIPE, for grouping).

    valid_ppl and test_ppl are final.json's (the best checkpoint, scored after training); a run without one
    (unfinished, or stopped) shows its best valid perplexity so far and no test perplexity."""
    first: dict[Path, str] = {}
    for path in map(str, paths):  # a run counted twice would shrink its config's standard deviation
        if (folder := Path(path).resolve()) in first:
            raise ExperimentError(f"{path}: given twice (also as {first[folder]}); each run counts once")
        first[folder] = path
    return pd.DataFrame([read_run(Path(p)) for p in paths], columns=[*RUN_COLUMNS, "recipe"])


def read_run(path: Path) -> dict[str, Any]:
    run = RunFolder(path)
    config_file, metrics_file, final_file = run.config, run.metrics, run.final
    if not (config_file.is_file() and metrics_file.is_file()):
        raise ExperimentError(f"{path}: not a run folder of `python -m lmcore train` (no {config_file.name} and "
                              f"{metrics_file.name} in it)")
    try:
        config = make_config(files.read_yaml(config_file))
    except files.FileError as err:
        raise ExperimentError(str(err)) from None
    except ValidationError as err:
        raise ExperimentError(error_message(error_lines(err, str(config_file)))) from None
    epochs = _json_lines(metrics_file)
    last = epochs[-1]
    row = {"run": path.name, "family": config.model.family, "seed": config.train.seed, "params": last["params"],
           "epochs": last["epoch"], "valid_ppl": last["best_valid_ppl"], "test_ppl": math.nan, "status": "unfinished",
           "compute_h": last["elapsed_s"] / 3600}
    if final_file.is_file():
        final = _json(final_file)
        row |= {"valid_ppl": _number(final, final_file, "valid", "ppl"),
                "test_ppl": _number(final, final_file, "test", "ppl"), "status": final.get("status", "completed")}
    recipe = {k: v for k, v in config.flat().items() if k not in NOT_THE_RECIPE}
    return row | {"recipe": json.dumps(recipe, sort_keys=True, default=str)}


def seed_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """Per config (runs equal apart from NOT_THE_RECIPE): how many finished runs, their seeds, and the mean and
    sample standard deviation of their valid and test perplexity (sd empty for a single run)."""
    finished = runs[runs["test_ppl"].notna()]
    rows = []
    for _, group in finished.groupby("recipe", sort=False):
        ppl = group[["valid_ppl", "test_ppl"]].astype(float)
        rows.append({"family": group["family"].iloc[0], "runs": len(group),
                     "seeds": " ".join(str(s) for s in group["seed"]),
                     "valid_ppl_mean": ppl["valid_ppl"].mean(), "valid_ppl_sd": ppl["valid_ppl"].std(),
                     "test_ppl_mean": ppl["test_ppl"].mean(), "test_ppl_sd": ppl["test_ppl"].std(),
                     "mean_compute_h": group["compute_h"].mean()})
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            row = _parse(line, f"{path}: line {number}")
            for field in ("epoch", "best_valid_ppl", "elapsed_s", "params"):
                _number(row, f"{path}: line {number}", field)
            rows.append(row)
    if not rows:
        raise ExperimentError(f"{path}: no epoch recorded yet")
    return rows


def _json(path: Path) -> dict[str, Any]:
    return _parse(path.read_text(errors="replace"), str(path))


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ExperimentError(f"{where}: not valid JSON") from None
    if not isinstance(value, dict):
        raise ExperimentError(f"{where}: expected a JSON object")
    return value


def _number(tree: dict[str, Any], where: str | Path, *keys: str) -> float:
    value = tree
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExperimentError(f"{where}: field {'.'.join(keys)}: expected a number (got {files.short_repr(value)})")
    return value
