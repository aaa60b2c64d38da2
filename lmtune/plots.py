"""The figures of an experiment (or several): one function per figure, each returning a matplotlib Figure.

The notebook (notebooks/results.ipynb), `tune.py report` (PNG files beside the tables) and `tune.py compare`
all draw with these. Figures are made without pyplot, so nothing here opens a window or needs a display.

    from lmtune import load_results, plots
    results = load_results("results/ptb_mogrify")
    plots.learning_curves(results).savefig("curves.png")
"""
from __future__ import annotations

import math
import re
import textwrap
import warnings
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lmcore import files
from lmtune import layout
from lmtune.confidence import LEVEL, mean_interval
from lmtune.layout import ExperimentFolder
from lmtune.results import Results, finite, results_frame, seed_runs_frame

# How each trial status is drawn: the trials ASHA stopped early and the diverged ones stand out.
MARKERS = {"completed": "o", "early-stopped": "v", "diverged": "X", "error": "X"}
LINES = {"completed": "-", "early-stopped": ":", "diverged": "--", "error": "--"}
PPL = "valid perplexity"


def learning_curves(results: Results | list[Results], per_family: int = 3) -> Figure:
    """Valid perplexity vs epoch and vs compute time for the `per_family` best trials of each family."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_epoch, by_time = fig.subplots(1, 2, sharey=True)
    for run, prefix in _labelled(results):
        ids = set(run.ranked().groupby("family").head(per_family)["trial_id"])
        ids |= set(run.trials.loc[run.trials["status"] == "diverged", "trial_id"])
        status = run.trials.set_index("trial_id")["status"]
        colors = _family_colors(run)
        for trial_id, curve in run.history[run.history["trial_id"].isin(ids)].groupby("trial_id", sort=False):
            family, how = curve["family"].iloc[0], status[trial_id]
            label = f"{prefix}{family} {trial_id} ({how})"
            for ax, x, scale in ((by_epoch, "epoch", 1), (by_time, "time_total_s", 1 / 60)):
                xs, ys = curve[x] * scale, curve["valid_ppl"].where(curve["valid_ppl"].map(math.isfinite))
                ax.plot(xs, ys, LINES.get(how, "-"), marker=".", color=colors[family], label=label)
                _mark_end(ax, xs.iloc[-1], ys.ffill().iloc[-1], how, colors[family])
    by_epoch.set(title="Learning curves (best trials per family)", xlabel="epoch", ylabel=PPL)
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_time.set(title="... against compute time", xlabel="trial time (minutes)")
    _legend(by_time, note="dotted, v: stopped early by ASHA; X: diverged (at the top: no finite perplexity)")
    return fig


def best_vs_cost(results: Results | list[Results]) -> Figure:
    """Each trial's best valid perplexity against its parameter count and against the compute it used."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_params, by_time = fig.subplots(1, 2, sharey=True)
    for run, prefix in _labelled(results):
        trials = run.trials.loc[run.trials["best_valid_ppl"].map(finite).astype(bool)]
        colors = _family_colors(run)
        for (family, how), group in trials.groupby(["family", "status"], sort=False):
            style = {"marker": MARKERS.get(how, "o"), "color": colors[family], "label": f"{prefix}{family}"
                     f" ({how})", "alpha": 0.8}
            by_params.scatter(group["params"] / 1e6, group["best_valid_ppl"], **style)
            by_time.scatter(group["time_s"] / 3600, group["best_valid_ppl"], **style)
    by_params.set(title="Best valid perplexity vs model size", xlabel="parameters (millions)", ylabel=PPL)
    by_time.set(title="... vs compute spent", xlabel="trial time (hours)")
    _legend(by_time)
    return fig


def param_effects(results: Results) -> Figure:
    """One panel per searched setting: best valid perplexity against its value (scatter, or boxes for choices)."""
    trials = results.trials.loc[results.trials["best_valid_ppl"].map(finite).astype(bool)]
    names = ["family", *results.searched()]
    cols = min(3, len(names))
    fig = Figure(figsize=(4.5 * cols, 3.6 * math.ceil(len(names) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(names) / cols), cols, squeeze=False).ravel()
    colors = _family_colors(results)
    for ax, name in zip(axes, names):
        values = trials[name]
        present = trials[values.notna()]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            for (family, how), group in present.groupby(["family", "status"], sort=False):
                ax.scatter(group[name], group["best_valid_ppl"], marker=MARKERS.get(how, "o"), color=colors[family],
                           label=f"{family} ({how})", alpha=0.8)
            shown = present[name]
            if name.endswith(".lr") or ((shown > 0).all() and shown.max() > 100 * shown.min()):
                ax.set_xscale("log")  # rates and the like: searched on a log scale
        elif len(present):  # a choice: one box per value
            groups = present.groupby(present[name].astype(str), sort=True)["best_valid_ppl"]
            ax.boxplot([g.to_numpy() for _, g in groups], tick_labels=[k for k, _ in groups])
        ax.set(title=name, xlabel=name, ylabel=PPL)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    _legend(axes[0] if len(names) == 1 else axes[1])
    fig.suptitle("Effect of each searched setting on the best valid perplexity (one point per trial)")
    return fig


def param_importances(results: Results) -> Figure:
    """Optuna's parameter importances (fANOVA) for the experiment's study, or a figure saying why there are none."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_param_importances

    folder = ExperimentFolder(results.folder)
    try:
        if not folder.study_db.exists():
            raise ValueError(f"no {folder.study_db.name} in {results.folder}")
        study = optuna.load_study(study_name=results.name, storage=folder.study_url)
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(finished) < 2 or not {k for t in finished for k in t.params}:
            raise ValueError(f"{len(finished)} finished trials; importances need at least two that searched a setting")
        # Optuna draws with pyplot and switches its style globally: keep both to this call.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = plot_param_importances(study)
            plt.close(ax.figure)  # the caller gets the figure; pyplot's list of open ones does not
            if ax.get_legend():
                ax.get_legend().remove()  # Optuna labels its one series "Objective Value": nothing to tell apart
            ax.figure.set_size_inches(8, 4.5)
            ax.set_xlabel("importance (Optuna's fANOVA: the share of the variance explained)")
            ax.figure.tight_layout()
            _fit_title(ax, f"Parameter importances for valid perplexity: {results.name}")
            ax.figure.tight_layout()  # room for the title's lines
    except (ValueError, RuntimeError, KeyError) as err:  # e.g. settings no two trials share (conditional ones)
        print(f"note: no parameter importances for {results.name}: {err}")
        return _note_figure("Parameter importances", f"not available: {err}")
    return ax.figure


def search_progress(results: Results | list[Results]) -> Figure:
    """Best valid perplexity so far against the trial number and against wall-clock time since the start."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_number, by_clock = fig.subplots(1, 2, sharey=True)
    for run, prefix in _labelled(results):
        trials = run.trials.reset_index(drop=True)  # in the order the search started them
        number = trials.index + 1
        hours = (trials["finished_at"] - trials["started_at"].min()) / 3600
        ppl = trials["best_valid_ppl"].where(trials["best_valid_ppl"].map(finite) & ~trials["status"].isin(
            ["diverged", "error"]))
        order = hours.sort_values(kind="stable").index
        by_number.step(number, ppl.cummin().ffill(), where="post", label=f"{prefix}best so far")
        by_clock.step(hours[order], ppl[order].cummin().ffill(), where="post", label=f"{prefix}best so far")
        for how, group in trials.groupby("status", sort=False):
            style = {"marker": MARKERS.get(how, "o"), "alpha": 0.7, "label": f"{prefix}{how}"}
            for ax, x in ((by_number, number), (by_clock, hours)):
                shown = group["best_valid_ppl"].map(finite)
                if shown.any():
                    ax.scatter(x[group.index[shown]], group.loc[shown, "best_valid_ppl"], **style)
                if not shown.all():  # no finite perplexity (diverged): drawn at the top edge
                    ax.scatter(x[group.index[~shown]], [0.97] * (~shown).sum(), transform=ax.get_xaxis_transform(),
                               **{**style, "label": None if shown.any() else style["label"]})
    by_number.set(title="Search progress", xlabel="trial number", ylabel=PPL)
    by_number.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_clock.set(title="... against wall-clock time", xlabel="hours since the first trial started")
    _legend(by_clock, note="v: stopped early by ASHA; X: diverged (at the top: no finite perplexity)")
    return fig


def comparison(results: list[Results]) -> Figure:
    """Valid and test perplexity of each family's best, per experiment (`tune.py compare`): a line for the searched
    trial's best checkpoint and, with report.seeds, a point per seed rerun and their mean with its 95% confidence
    interval. The axis spans the values, not from zero: the seeds' spread is what a reader compares."""
    table = results_frame(results).sort_values(["dataset", "experiment", "family"], kind="stable", ignore_index=True)
    seeds = seed_runs_frame(results)
    colors = {family: f"C{i}" for i, family in enumerate(sorted(table["family"].dropna().unique()))}
    fig = Figure(figsize=(max(10.0, 2.4 * len(table) + 3), 4.5), layout="constrained")
    for ax, column, title in zip(fig.subplots(1, 2, sharey=True), ("valid_ppl", "test_ppl"),
                                 ("Valid perplexity", "Test perplexity")):
        # before `tune.py report` there is no valid_ppl of the best checkpoint: the search's best valid perplexity
        searched = table[column].where(table[column].map(finite), table["best_valid_ppl"] if column == "valid_ppl"
                                       else math.nan)
        for i, row in table.iterrows():
            color = colors.get(row["family"], "C7")
            if finite(searched[i]):  # its value written over the line's left end, the seeds on its right half
                ax.hlines(searched[i], i - 0.4, i + 0.4, color=color, lw=3, label="the searched trial")
                ax.annotate(f"{searched[i]:.1f}", (i - 0.4, searched[i]), textcoords="offset points", xytext=(0, 3),
                            fontsize="x-small", color=color)
            _seed_points(ax, i, seeds, row, column)
        ax.set_xticks(table.index, [f"{f}\n{_wrap_name(e)}" for f, e in zip(table["family"], table["experiment"])],
                      fontsize="small")
        ax.set_xlim(-0.6, len(table) - 0.4)
        ax.set(title=f"{title} of each family's best", xlabel="family, experiment",
               ylabel="perplexity (lower is better)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(labels, handles))  # one entry per kind of mark
        fig.legend(unique.values(), unique.keys(), loc="outside right upper", fontsize="small")
    return fig


def _seed_points(ax, x: int, seeds: pd.DataFrame, row: pd.Series, column: str) -> None:
    """One experiment's family at `x`: its seed reruns' values as points, their mean with its confidence interval."""
    mine = seeds[(seeds["experiment"] == row["experiment"]) & (seeds["family"] == row["family"])]
    values = [float(v) for v in mine[column] if finite(v)]
    if not values:
        return
    offsets = [0.16 * k / max(1, len(values) - 1) for k in range(len(values))]  # side by side, not stacked
    ax.scatter([x + 0.02 + o for o in offsets], values, s=16, color="black", zorder=3, label="a seed rerun")
    mean, half = mean_interval(values)
    if finite(half):
        ax.errorbar([x + 0.32], [mean], yerr=[half], fmt="D", color="black", capsize=4, zorder=3,
                    label=f"mean of the seed reruns, {LEVEL:.0%} interval")


FIGURES = {  # the PNG files `tune.py report` writes, and what draws each
    layout.CURVES_FIGURE: learning_curves,
    layout.PARAMS_FIGURE: param_effects,
    layout.IMPORTANCE_FIGURE: param_importances,
    layout.PROGRESS_FIGURE: search_progress,
}


def save_png(fig: Figure, path: Path) -> None:
    """Write the figure as a PNG file (atomically: a reader never sees half a file)."""
    files.write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _as_list(results: Results | list[Results]) -> list[Results]:
    return results if isinstance(results, list) else [results]


def _labelled(results: Results | list[Results]) -> list[tuple[Results, str]]:
    """Each experiment with the prefix of its labels: its name, when a figure shows several."""
    runs = _as_list(results)
    return [(r, f"{r.name}: " if len(runs) > 1 else "") for r in runs]


def _family_colors(results: Results) -> dict[str, str]:
    families = sorted(results.trials["family"].dropna().unique())
    return {family: f"C{i}" for i, family in enumerate(families)}


def _wrap_name(name: str, width: int = 14) -> str:
    """An experiment's name broken after underscores into lines of about `width` characters, so that the names
    under neighbouring ticks do not run into each other (ptb_2m65_mogrify_local -> ptb_2m65_ / mogrify_local)."""
    lines = [""]
    for part in re.findall(r"[^_]+_*|_+", name):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _mark_end(ax, x: float, y: float, how: str, color: str) -> None:
    """A trial's last point: its status's marker; at the top edge when it never had a finite perplexity."""
    if finite(y):
        ax.plot([x], [y], MARKERS.get(how, "o"), color=color, ms=9)
    else:
        ax.plot([x], [0.97], MARKERS.get(how, "o"), color=color, ms=9, transform=ax.get_xaxis_transform())


def _legend(ax, note: str = "") -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", title=note or None, title_fontsize="x-small")


def _fit_title(ax, text: str) -> None:
    """A left-aligned title, wrapped so that it ends inside the figure (it starts where the axes do, after the
    setting names)."""
    renderer = FigureCanvasAgg(ax.figure).get_renderer()  # to measure text (pyplot's closed figure has none)
    for width in range(len(text), 19, -5):
        title = ax.set_title(textwrap.fill(text, width), loc="left")
        if title.get_window_extent(renderer).x1 <= ax.figure.bbox.x1:
            return


def _note_figure(title: str, text: str) -> Figure:
    fig = Figure(figsize=(8, 2))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    fig.suptitle(title)
    return fig
