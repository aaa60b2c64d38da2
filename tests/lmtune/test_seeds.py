"""`report: {seeds: N}`: each family's best config rerun with N other seeds as trials on Ray, the tables' mean ± sd
over them, Welch's interval of each difference in `tune.py compare`, the figure's points, and an interrupted seed
phase resumed without losing or repeating a rerun."""
import contextlib
import io
import math
import os
import shutil
import signal
import statistics
import threading
import time

import pandas as pd
import pytest

from lmcore.checkpoint import load_checkpoint
from lmtune import load_results, plots
from lmtune.cli import main
from lmtune.confidence import mean_interval, seed_pairs, t_quantile, welch
from lmtune.experiment import load_experiment
from lmtune.layout import CHECKPOINT_FILE
from lmtune.report import report
from lmtune.results import SEED_RUN_COLUMNS, experiment_labels
from lmtune.seeds import run_seeds
from tests.conftest import scaled, write_tiny_experiment

# -- the statistics ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 4, 2.776445), (0.975, 5, 2.570582), (0.975, 10, 2.228139),
    (0.975, 30, 2.042272), (0.995, 3, 5.840909), (0.9, 7, 1.414924), (0.975, 1e7, 1.959964),  # printed t tables
    (0.025, 4, -2.776445), (0.5, 3, 0.0),
])
def test_t_quantile_matches_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_matches_the_closed_forms_of_one_and_two_degrees_of_freedom(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # the Cauchy distribution
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_welch_interval_by_hand():
    # Equal sizes and variances: df = 2 (n - 1) = 4, standard error sqrt(1/3 + 1/3); t(0.975, 4) = 2.776445.
    w = welch([1.0, 2.0, 3.0], [5.0, 6.0, 7.0])
    half = 2.776445 * math.sqrt(2 / 3)
    assert w.df == pytest.approx(4)
    assert (w.difference, w.low, w.high) == pytest.approx((-4, -4 - half, -4 + half), abs=1e-5)
    assert w.excludes_zero
    # Unequal sizes and variances: the Welch-Satterthwaite df is fractional.
    a, b = [100.1, 101.9, 101.7], [97.2, 98.9, 98.0, 97.5]
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    w = welch(a, b)
    assert w.df == pytest.approx(df) and df == pytest.approx(3.62922, abs=1e-5)
    difference = statistics.mean(a) - statistics.mean(b)
    half = 2.891972 * math.sqrt(va + vb)  # t(0.975, 3.629) = 2.891972 (scipy.stats.t.ppf), between df 3's 3.182 and df 4's 2.776
    assert (w.difference, w.low, w.high) == pytest.approx((difference, difference - half, difference + half), abs=1e-5)
    assert welch([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]).excludes_zero is False
    assert math.isnan(welch([1.0], [2.0, 3.0]).low)  # one value has no spread


def test_pairs_rank_by_mean_and_keep_datasets_apart():
    runs = pd.DataFrame({
        "experiment": ["a", "a", "b", "b", "c", "c", "d"],
        "dataset": ["ptb", "ptb", "ptb", "ptb", "wikitext-2", "wikitext-2", "ptb"],
        "family": ["lstm", "lstm", "mogrifier", "mogrifier", "lstm", "lstm", "transformer"],
        "test_ppl": [105.0, 107.0, 101.0, 102.0, 120.0, 121.0, 90.0],  # d has one rerun: no pair
    })
    pairs = seed_pairs(runs)
    assert len(pairs) == 1
    row = pairs.iloc[0]
    assert (row["first"], row["second"]) == ("b/mogrifier", "a/lstm")
    assert row["difference"] == pytest.approx(106 - 101.5) and row["ci_low"] < row["difference"] < row["ci_high"]


def test_experiments_of_one_name_are_told_apart_by_their_folders():
    assert experiment_labels(["a", "b", "a"], ["x/a", "y/b", "z/a"]) == ["x/a", "b", "z/a"]  # never pooled


def test_one_seed_is_refused(tmp_path, markov_corpus_dir, capsys):
    path = write_tiny_experiment(tmp_path / "one.yaml", markov_corpus_dir, tmp_path / "results")
    assert main(["check", str(path), "--set", "report.seeds=1"]) == 2
    assert "report.seeds: 0 (no reruns) or at least 2" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


# -- a reported study with seed reruns (tests/conftest.py's shared one: lstm and gru, 2 seeds each) ------------


@pytest.fixture(scope="module")
def seeded(reported_experiment):
    return load_results(reported_experiment)


def test_each_family_best_is_rerun_with_other_seeds_on_the_search_resources(seeded, reported_experiment):
    families = pd.read_csv(reported_experiment / "best_per_family.csv")
    runs = pd.read_csv(reported_experiment / "seed_runs.csv")
    base_seed = seeded.config(families["trial_id"].iloc[0]).train.seed  # every search trial's seed
    assert sorted(runs["of_trial"].unique()) == sorted(families["trial_id"])
    for _, group in runs.groupby("of_trial"):
        assert sorted(group["seed"]) == [base_seed + 1, base_seed + 2]  # never the seed the search chose it with
        assert (group["status"] == "completed").all() and (group["epochs"] == 3).all()
        assert group["test_ppl"].nunique() == 2  # other seeds, other models
    for trial in (t for analysis in seeded.seed_analyses for t in analysis.trials):
        seed = trial.config["rerun"]["seed"]
        _, _, config = load_checkpoint(seeded.seed_checkpoint(trial.trial_id) / CHECKPOINT_FILE)
        assert config.train.seed == seed and config.optim.lr == seeded.config(trial.config["rerun"]["of_trial"]).optim.lr
        assert trial.placement_group_factory.required_resources == {"CPU": 1.0}  # resources: {cpus: 1}
    # Whether two reruns then overlap in time is Ray's scheduling and the machine's load (a tiny rerun can end
    # before a second process has started): the resources per rerun, asserted above, are what we set.
    pd.testing.assert_frame_equal(seeded.seed_runs.reset_index(drop=True), runs, check_dtype=False)


def test_the_family_table_shows_mean_and_sd_of_the_per_seed_values(reported_experiment):
    families = pd.read_csv(reported_experiment / "best_per_family.csv")
    runs = pd.read_csv(reported_experiment / "seed_runs.csv")
    for row in families.itertuples():
        mine = runs[runs["of_trial"] == row.trial_id].sort_values("seed")
        assert row.seeds == len(mine) == 2
        for split in ("valid", "test"):
            values = mine[f"{split}_ppl"].tolist()
            assert getattr(row, f"{split}_ppl_mean") == pytest.approx(statistics.mean(values))
            assert getattr(row, f"{split}_ppl_sd") == pytest.approx(statistics.stdev(values))
            assert getattr(row, f"{split}_ppl_per_seed") == " ".join(f"{v:.2f}" for v in values)
    summary = (reported_experiment / "summary.md").read_text()
    assert "## Seed reruns" in summary and " ± " in summary and "excludes_zero" in summary


def test_compare_adds_welch_pair_rows(reported_experiment, tmp_path):
    assert main(["compare", str(reported_experiment), "--out", str(tmp_path / "table")]) == 0
    runs = pd.read_csv(reported_experiment / "seed_runs.csv")
    table = pd.read_csv(tmp_path / "table.csv")
    assert {"test_ppl_mean", "test_ppl_sd", "test_ppl_per_seed"} <= set(table.columns)
    pairs = pd.read_csv(tmp_path / "table_pairs.csv")
    assert len(pairs) == 1  # lstm and gru
    row = pairs.iloc[0]
    samples = {f"tiny/{f}": g["test_ppl"].tolist() for f, g in runs.groupby("family")}
    first, second = sorted(samples, key=lambda k: statistics.mean(samples[k]))
    assert (row["first"], row["second"]) == (first, second)
    a, b = samples[second], samples[first]
    va, vb = statistics.variance(a) / 2, statistics.variance(b) / 2
    df = (va + vb) ** 2 / (va ** 2 + vb ** 2)  # Welch-Satterthwaite with n - 1 = 1 on both sides
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    difference = statistics.mean(a) - statistics.mean(b)
    assert (row["difference"], row["ci_low"], row["ci_high"], row["welch_df"]) == pytest.approx(
        (difference, difference - half, difference + half, df))
    assert bool(row["excludes_zero"]) == (difference - half > 0)
    assert "excludes_zero" in (tmp_path / "table.md").read_text()


def test_the_comparison_figure_shows_each_seed_and_the_mean_interval(seeded):
    test_axis = plots.comparison([seeded]).axes[1]
    points = sorted(y for c in test_axis.collections if c.get_label() == "a seed rerun" for _, y in c.get_offsets())
    assert points == pytest.approx(sorted(seeded.seed_runs["test_ppl"]))
    assert "mean of the seed reruns, 95% interval" in test_axis.get_legend_handles_labels()[1]
    intervals = sorted((min(y0, y1), max(y0, y1)) for c in test_axis.collections if hasattr(c, "get_segments")
                       for (x0, y0), (x1, y1) in c.get_segments() if x0 == x1)  # the error bars: vertical segments
    expected = []
    for _, group in seeded.seed_runs.groupby("family"):
        mean, half = mean_interval(group["test_ppl"].tolist())  # t(0.975, 1) * sd / sqrt(2)
        expected.append((mean - half, mean + half))
    assert [y for pair in intervals for y in pair] == pytest.approx([y for pair in sorted(expected) for y in pair])


def test_the_searched_value_is_written_clear_of_the_seed_points(seeded, tmp_path):
    """docs/results.md's figure: a seed rerun's point sat on the searched trial's value ("108.9") above its line."""
    fig = plots.comparison([seeded])
    plots.save_png(fig, tmp_path / "comparison.png")  # laid out as written
    for ax in fig.axes:
        labels = {round(t.xy[0]): t.get_window_extent() for t in ax.texts}
        seeds = [c for c in ax.collections if c.get_label() == "a seed rerun"]
        assert labels and seeds
        for collection in seeds:
            column = round(collection.get_offsets()[0][0])
            radius = 0.5 * max(collection.get_sizes()) ** 0.5 * fig.dpi / 72  # sizes: points squared; in pixels
            leftmost = min(ax.transData.transform(collection.get_offsets())[:, 0]) - radius
            assert labels[column].x1 < leftmost, (column, labels[column].bounds, leftmost)


# -- an interrupted seed phase ----------------------------------------------------------------------------------


def _interrupt_when_a_rerun_ends(folder, slots: int, done: threading.Event, fired: list) -> None:
    """Ctrl-C (SIGINT to this process, which Ray Tune catches) as soon as a seed rerun has ended: when a rerun beyond
    the first `slots` (the trials the CPUs hold at once) has begun, Tune has freed a slot by ending one. (The last
    epoch's checkpoint comes too early: Tune may not have seen the trial end yet.)"""
    deadline = time.monotonic() + scaled(300)
    while not done.is_set() and time.monotonic() < deadline:
        if len(list(folder.glob("seeds/*/trial_*/params.json"))) > slots and not done.is_set():
            fired.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)
            return
        time.sleep(0.02)


def _seed_trials(folder) -> dict[str, tuple[str, str]]:
    from ray.tune import ExperimentAnalysis

    (where,) = (folder / "seeds").iterdir()
    results = {t.trial_id: where / f"trial_{t.trial_id}" / "result.json" for t in ExperimentAnalysis(str(where)).trials}
    statuses = {t.trial_id: t.status for t in ExperimentAnalysis(str(where)).trials}
    return {t: (statuses[t], path.read_text() if path.exists() else "") for t, path in results.items()}  # "": not begun


@pytest.fixture(scope="module")
def interrupted(reported_experiment, tmp_path_factory):
    """The shared study's seed phase once more, in a copy of its folder without its reruns: Ctrl-C once the first
    rerun has ended, then run_seeds again (what the same `tune.py` command does after restoring the ended search)."""
    copy = shutil.copytree(reported_experiment, tmp_path_factory.mktemp("interrupted") / "tiny")
    shutil.rmtree(copy / "seeds")
    exp = load_experiment(reported_experiment.parent.parent / "tiny.yaml", [f"storage={copy.parent}"])
    done, fired = threading.Event(), []
    watcher = threading.Thread(target=_interrupt_when_a_rerun_ends, args=(copy, 2, done, fired), daemon=True)
    watcher.start()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ended = run_seeds(exp)
        done.set()
        watcher.join()
        assert fired and not ended, out.getvalue()[-3000:]
        before = _seed_trials(copy)
        ended = run_seeds(exp)
        assert ended, out.getvalue()[-3000:]
        report(copy)
    return copy, before, _seed_trials(copy), out.getvalue()


def test_an_interrupted_seed_phase_resumes_losing_nothing(interrupted, reported_experiment):
    folder, before, after, out = interrupted
    finished = {t for t, (status, _) in before.items() if status == "TERMINATED"}
    assert len(before) == 4 and finished and len(finished) < 4, before  # interrupted in the middle of the reruns
    assert "Resuming the seed reruns" in out
    assert set(after) == set(before) and all(status == "TERMINATED" for status, _ in after.values())  # none added
    for trial_id in finished:  # kept as they were: not run again
        assert after[trial_id][1] == before[trial_id][1]
    runs = load_results(folder).seed_runs
    original = load_results(reported_experiment).seed_runs
    assert len(runs) == 4 and (runs["epochs"] == 3).all() and runs["test_ppl"].map(math.isfinite).all()
    assert runs[["of_trial", "seed"]].values.tolist() == original[["of_trial", "seed"]].values.tolist()
    families = pd.read_csv(folder / "best_per_family.csv")
    assert (families["seeds"] == 2).all()


def test_no_seed_runs_make_no_pairs():
    """compare over studies without report.seeds (an empty mask once picked columns, not rows: KeyError)."""
    assert seed_pairs(pd.DataFrame([], columns=["experiment", "dataset", *SEED_RUN_COLUMNS])).empty
