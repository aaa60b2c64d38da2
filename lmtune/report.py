"""The end of an experiment: evaluate the best checkpoints once on the test split, write the tables and summary.

Written to the experiment folder (the files are listed in lmtune/layout.py): the tables of every trial, the top k
and each family's best (.md, .csv), the learning curves (history.parquet), the cached test evaluation
(final_eval.json), the figures of lmtune/plots.py, and summary.{json,md}, which shows them in one place. With
report.seeds, each seed rerun's best checkpoint is evaluated too (seed_runs.{md,csv}), and each family's best gets
the mean ± sample sd over its reruns (lmtune/confidence.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from lmcore import files
from lmcore.config import Config
from lmtune.confidence import PAIR_COLUMNS, mean_sd_text, seed_pairs, seed_statistics
from lmtune.layout import CHECKPOINT_FILE, FAMILY_TABLE, SEED_RUNS_TABLE, TOP_K_TABLE, TRIALS_TABLE, ExperimentFolder
from lmtune.results import (
    COMPARE_COLUMNS,
    DYNAMIC_COLUMN,
    FAMILY_COLUMNS,
    Results,
    compare_frame,
    config_yaml,
    load_results,
    with_columns,
)
from lmtune.schema import ReportSpec
from lmtune.table_files import markdown, write_table


def report(folder: str | Path, evaluate: bool = True) -> dict[str, Any]:
    """Write all tables and the summary for one experiment folder; returns the summary."""
    results = load_results(folder, rebuild=True)  # a damaged summary.json is rewritten below
    folder = results.folder
    top_k = (results.experiment.report if results.experiment else ReportSpec()).top_k
    families = results.best_per_family()
    dynamic = results.experiment.report.dynamic if results.experiment else False  # adds DYNAMIC_COLUMN
    evals = final_evaluation(results, families["trial_id"].tolist(), dynamic, evaluate=evaluate)
    for column in ["valid_ppl", "test_ppl"] + [DYNAMIC_COLUMN] * dynamic:
        families[column] = families["trial_id"].map(lambda t, c=column: evals.get(t, {}).get(c, math.nan))
    seed_runs = evaluated_seed_runs(results) if evaluate else results.seed_runs  # else as last reported
    if len(seed_runs):
        families = families.join(seed_statistics(seed_runs), on="trial_id")
    families = with_columns(families, FAMILY_COLUMNS)

    layout = ExperimentFolder(folder)
    write_table(results.trials, layout.table(TRIALS_TABLE))
    write_table(results.top(top_k), layout.table(TOP_K_TABLE), parquet=False)
    write_table(families, layout.table(FAMILY_TABLE), parquet=False)
    if len(seed_runs):
        write_table(seed_runs, layout.table(SEED_RUNS_TABLE), parquet=False)
    files.write_atomically(layout.history, lambda f: results.history.to_parquet(f, index=False))
    figures = write_figures(results)
    built = results.built_config(families["trial_id"].iloc[0]) if len(families) else None  # the best trial's
    summary = _summary(results, families, evals, built)
    summary["seed_runs"] = seed_runs.to_dict(orient="records")
    files.write_text(layout.summary_json, json.dumps(summary, indent=2, default=_json_value) + "\n")
    files.write_text(layout.summary_md, _summary_markdown(summary, results, families, top_k, figures, built))
    return summary


def write_figures(results: Results) -> list[str]:
    """The PNG figures of lmtune/plots.py, beside the tables; returns their file names."""
    from lmtune.plots import FIGURES, save_png

    for name, draw in FIGURES.items():
        save_png(draw(results), ExperimentFolder(results.folder).figure(name))
    return list(FIGURES)


def evaluated_seed_runs(results: Results) -> pd.DataFrame:
    """results.seed_runs with the valid and test perplexity of each rerun's best checkpoint (cached like the
    search's)."""
    runs = results.seed_runs.copy()
    evals = final_evaluation(results, runs["trial_id"].tolist(), checkpoint_of=results.seed_checkpoint)
    for column in ("valid_ppl", "test_ppl"):
        runs[column] = runs["trial_id"].map(lambda t, c=column: evals.get(t, {}).get(c, math.nan))
    return runs


def final_evaluation(results: Results, trial_ids: list[str], dynamic: bool = False,
                     checkpoint_of=None, evaluate: bool = True) -> dict[str, dict[str, Any]]:
    """Valid and test perplexity of each trial's best checkpoint (`checkpoint_of(trial_id)`, by default the search
    trial's); each checkpoint meets the test split once. `evaluate=False`: only what the cache already holds."""
    cache_file = ExperimentFolder(results.folder).final_eval
    cache = _read_cache(cache_file)
    evals = {}
    for trial_id in trial_ids:
        checkpoint = (checkpoint_of or results.best_checkpoint)(trial_id)
        if checkpoint is None:
            continue
        key = str(checkpoint.relative_to(results.folder))
        if key not in cache and not evaluate:
            continue
        if key not in cache:
            print(f"Evaluating the best checkpoint of trial {trial_id} on valid and test: {key}")
            cache[key] = evaluate_checkpoint(checkpoint / CHECKPOINT_FILE)
            files.write_text(cache_file, json.dumps(cache, indent=2) + "\n")
        if dynamic and evaluate and DYNAMIC_COLUMN not in cache[key]:
            from lmcore.final import choose_and_test

            print(f"Dynamic evaluation of trial {trial_id} (lr and decay chosen on valid, then test once): {key}")
            cache[key].update(choose_and_test(checkpoint / CHECKPOINT_FILE))
            files.write_text(cache_file, json.dumps(cache, indent=2) + "\n")
        evals[trial_id] = {**cache[key], "checkpoint": key}
    return evals


def _read_cache(path: Path) -> dict[str, Any]:
    """final_eval.json; a damaged one is named and read as empty: its checkpoints are evaluated again."""
    try:
        cache = files.read_json(path) if path.exists() else {}
    except files.FileError as err:
        cache = None
        print(f"{err}: evaluating its checkpoints again")
    return cache if isinstance(cache, dict) else {}


def evaluate_checkpoint(path: Path) -> dict[str, Any]:
    import lmcore

    scores, config = lmcore.evaluate_checkpoint(path, ("valid", "test"))  # the only use of the test split
    valid, test = scores["valid"], scores["test"]
    return {
        "valid_ppl": valid["ppl"], "valid_loss": valid["loss"], "test_ppl": test["ppl"], "test_loss": test["loss"],
        "test_tokens": test["tokens"], "config": config.flat(),
    }


def compare(folders: list[str | Path]) -> pd.DataFrame:
    """The Mogrifier-vs-LSTM-vs-Transformer table over several experiment folders (reporting any not yet reported)."""
    for folder in folders:
        if not ExperimentFolder(folder).summary_json.exists():
            report(folder)
    return with_columns(compare_frame(folders), COMPARE_COLUMNS)


def pairs_file(out: Path) -> Path:
    """`tune.py compare`'s table of pairs (report.seeds), beside its out.csv: out_pairs.csv."""
    return out.with_name(f"{out.with_suffix('').name}_pairs.csv")


def comparison_markdown(table: pd.DataFrame, pairs: pd.DataFrame) -> str:
    """`tune.py compare`'s Markdown: the table, then (with seed reruns) each pair's difference with Welch's interval."""
    text = markdown(table) + "\n"
    if len(pairs):
        text += ("\nDifference of mean test perplexity over the seed reruns (second - first) with its 95% confidence "
                 "interval (Welch); excludes_zero: larger than the seeds' noise\n\n" + markdown(pairs) + "\n")
    return text


def _summary(results: Results, families: pd.DataFrame, evals: dict[str, dict[str, Any]],
             built: tuple[Config, int | None] | None) -> dict[str, Any]:
    exp, trials = results.experiment, results.trials
    best_id = families["trial_id"].iloc[0] if len(families) else None
    best_row = results.trials.set_index("trial_id").loc[best_id] if best_id else None
    return {
        "experiment": results.name,
        "dataset": exp.dataset if exp else None,
        "metric": exp.metric if exp else None,
        "mode": exp.mode if exp else None,
        "trials_configured": exp.trials if exp else None,
        "trials": len(trials),
        "status": trials["status"].value_counts().to_dict() if len(trials) else {},
        "compute_h": float(trials["time_s"].sum() / 3600) if len(trials) else 0.0,
        "best": None if best_row is None else {
            "trial_id": best_id,
            "family": best_row["family"],
            "params": best_row["params"],
            "epochs": best_row["epochs"],
            "best_valid_ppl": best_row["best_valid_ppl"],
            **{k: v for k, v in evals.get(best_id, {}).items() if k != "config"},
            "config": built[0].flat(),  # the model as built: its width solved from any params_budget
        },
        "families": families.to_dict(orient="records"),
    }


def _summary_markdown(summary: dict[str, Any], results: Results, families: pd.DataFrame, top_k: int,
                      figures: list[str], built: tuple[Config, int | None] | None) -> str:
    best = summary["best"] or {}
    status = ", ".join(f"{n} {s}" for s, n in summary["status"].items())
    lines = [
        f"# {summary['experiment']} ({summary['dataset']})",
        "",
        f"{summary['trials']} of {summary['trials_configured']} trials ({status}); "
        f"{summary['compute_h']:.2f} trial-hours.",
        "",
    ]
    if best:
        lines += [
            f"Best: trial {best['trial_id']} ({best['family']}), valid ppl {best.get('valid_ppl', math.nan):.2f}, "
            f"test ppl {best.get('test_ppl', math.nan):.2f}, checkpoint `{best.get('checkpoint')}`.",
            "",
        ]
    lines += ["## Best per family", "", markdown(families), ""]
    lines += _seeds_markdown(summary, families)
    lines += [f"## Top {top_k}", "", markdown(results.top(top_k)), ""]
    lines += ["## Figures", ""] + [f"![{Path(name).stem}]({name})" for name in figures] + [""]
    if built:
        lines += ["## Best configuration", "", "```yaml", config_yaml(*built).strip(), "```", ""]
    return "\n".join(lines)


def _seeds_markdown(summary: dict[str, Any], families: pd.DataFrame) -> list[str]:
    """report.seeds: each family's best as mean ± sample sd (per-seed values) and, for two families or more, Welch's
    interval of each difference."""
    if "seeds" not in families or not families["seeds"].notna().any():
        return []
    lines = ["## Seed reruns", "", "Each family's best config rerun with other seeds (`seed_runs.md`): mean ± sample "
             "standard deviation (the values, seed by seed).", ""]
    for row in families[families["seeds"].notna()].itertuples():
        lines.append(f"- {row.family} (trial {row.trial_id}, {int(row.seeds)} seeds): valid "
                     f"{mean_sd_text(row.valid_ppl_mean, row.valid_ppl_sd, row.valid_ppl_per_seed)}, test "
                     f"{mean_sd_text(row.test_ppl_mean, row.test_ppl_sd, row.test_ppl_per_seed)}")
    runs = pd.DataFrame(summary["seed_runs"]).assign(experiment=summary["experiment"], dataset=summary["dataset"])
    pairs = seed_pairs(runs)
    if len(pairs):
        lines += ["", "Difference of mean test perplexity (second - first) with its 95% confidence interval "
                  "(Welch):", "", markdown(pairs[PAIR_COLUMNS])]
    return lines + [""]


def _json_value(value: Any) -> Any:
    """numpy scalars and the like, for json.dumps."""
    return value.item() if hasattr(value, "item") else str(value)
