"""The results API and the figures, on one real tiny experiment (completed, early-stopped and diverged trials):
`tune.py` writes the figures beside the tables and summary.md shows them; `compare` draws one over experiments."""
import shutil

import optuna
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from lmtune import load_results, plots
from lmtune.cli import main
from lmtune.layout import ray_folder
from lmtune.results import HISTORY_COLUMNS, Results, _columns
from lmtune.schema import ExperimentSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(reported_experiment) -> Results:
    return load_results(reported_experiment)


def test_the_experiment_has_every_kind_of_trial(results):
    assert {"completed", "early-stopped", "diverged"} <= set(results.trials["status"])
    assert set(results.trials["family"]) == {"lstm", "gru"}


def test_report_writes_the_figures_and_summary_shows_them(reported_experiment):
    summary = (reported_experiment / "summary.md").read_text()
    for name in ("curves.png", "params.png", "importance.png", "progress.png"):
        data = (reported_experiment / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name
        assert f"]({name})" in summary  # a relative link: GitHub shows it beside the tables


def test_results_repr_history_and_config(results, reported_experiment):
    text = repr(results)
    assert str(reported_experiment) in text and "8 trials (" in text and "early-stopped" in text
    assert f"best valid ppl {results.top(1)['best_valid_ppl'].iloc[0]:.2f}" in text
    assert isinstance(results.experiment, ExperimentSpec) and results.experiment.trials == 8
    # every curve row carries its trial's family and searched settings: no merge needed to plot by family
    merged = results.history.merge(results.trials[["trial_id", "family", "optim.lr"]], on="trial_id")
    assert (merged["family_x"] == merged["family_y"]).all() and (merged["optim.lr_x"] == merged["optim.lr_y"]).all()
    best = results.top(1).iloc[0]
    config = results.config(best["trial_id"])
    assert config.model.family == best["family"] and config.optim.lr == best["optim.lr"]
    assert config.train.epochs == 3 and config.data.name == "text"


def test_each_figure_has_titles_and_labels(results):
    for draw in (plots.learning_curves, plots.best_vs_cost, plots.param_effects, plots.param_importances,
                 plots.search_progress, lambda r: plots.comparison([r])):
        fig = draw(results)
        assert isinstance(fig, Figure)
        shown = [ax for ax in fig.axes if ax.get_visible()]
        assert shown and all(ax.get_title(loc="center") or ax.get_title(loc="left") for ax in shown)
        assert all(ax.get_xlabel() and ax.get_ylabel() for ax in shown[:1])


def test_early_stopped_and_diverged_trials_are_marked(results):
    labels = plots.learning_curves(results).axes[1].get_legend_handles_labels()[1]
    assert any("(early-stopped)" in label for label in labels) and any("(diverged)" in label for label in labels)
    progress = plots.search_progress(results).axes[1].get_legend_handles_labels()[1]
    assert {"early-stopped", "diverged", "completed"} <= set(progress)


def test_best_so_far_ends_at_the_best_trial(results):
    by_number = plots.search_progress(results).axes[0]
    best_so_far = by_number.get_lines()[0].get_ydata()
    assert best_so_far[-1] == pytest.approx(results.top(1)["best_valid_ppl"].iloc[0])
    assert list(best_so_far) == sorted(best_so_far, reverse=True)  # never gets worse


def test_importances_of_the_real_study(results):
    fig = plots.param_importances(results)
    assert "Parameter importances" in fig.axes[0].get_title(loc="left")
    names = {label.get_text() for label in fig.axes[0].get_yticklabels()}
    assert "optim.lr" in names


@pytest.mark.parametrize("name", ["tiny", "ptb_2m65_mogrify_with_a_name_longer_than_any_so_far"])
def test_the_importance_figure_shows_its_whole_title_and_no_legend(results, reported_experiment, tmp_path, name):
    """Its title was cut off at the right ("... (Optuna, fANOV") and a legend said "Objective Value"."""
    folder = tmp_path / name
    folder.mkdir()
    optuna.copy_study(from_study_name="tiny", from_storage=f"sqlite:///{reported_experiment / 'optuna.db'}",
                      to_storage=f"sqlite:///{folder / 'optuna.db'}", to_study_name=name)
    fig = plots.param_importances(Results(folder, results.trials, results.history))
    plots.save_png(fig, tmp_path / "importance.png")  # laid out as written
    ax = fig.axes[0]
    assert name in ax.get_title(loc="left").replace("\n", " ")
    title = next(t for t in fig.findobj(Text) if t.get_text() == ax.get_title(loc="left"))
    assert title.get_window_extent().x1 <= fig.bbox.x1 and ax.xaxis.label.get_window_extent().x1 <= fig.bbox.x1
    assert ax.get_legend() is None


def test_importances_without_enough_trials_is_a_note(results, tmp_path, capsys):
    study = optuna.create_study(study_name=results.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.enqueue_trial({"x": 1.0})
    study.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
    few = Results(tmp_path, results.trials, results.history, results.experiment)
    fig = plots.param_importances(few)
    assert "1 finished trials" in capsys.readouterr().out
    assert "not available" in fig.texts[0].get_text()
    plots.param_importances(Results(tmp_path / "none", results.trials, results.history, results.experiment))
    assert "no optuna.db" in capsys.readouterr().out


def test_the_study_names_each_ray_trial(results, reported_experiment):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{reported_experiment / 'optuna.db'}")
    assert {t.user_attrs.get("ray_trial_id") for t in study.trials} == set(results.trials["trial_id"])


def test_compare_writes_a_figure(reported_experiment, tmp_path):
    assert main(["compare", str(reported_experiment), "--out", str(tmp_path / "table")]) == 0
    assert (tmp_path / "table.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (tmp_path / "table.md").read_text().startswith("| experiment |")


def test_the_comparison_names_each_experiment_without_running_into_its_neighbour(results, tmp_path):
    """docs/results.md's three studies: their names ran into each other under the ticks."""
    names = ["ptb_2m65_mogrify_local", "ptb_2m65_lstm_local", "ptb_2m65_transformer_local"]
    runs = [Results(tmp_path / name, results.trials, results.history,
                    results.experiment.model_copy(update={"name": name})) for name in names]
    fig = plots.comparison(runs)
    plots.save_png(fig, tmp_path / "comparison.png")  # laid out as written
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert {t.get_text().split("\n", 1)[1].replace("\n", "") for t in labels} == set(names)  # wrapped, not cut
        boxes = sorted((t.get_window_extent() for t in labels), key=lambda box: box.x0)
        assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:])), [b.bounds for b in boxes]


def test_compare_keeps_a_file_the_user_named_unless_force(reported_experiment, tmp_path, capsys):
    (tmp_path / "table.csv").write_text("mine")
    assert main(["compare", str(reported_experiment), "--out", str(tmp_path / "table")]) == 2
    assert "table.csv: exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"] and (tmp_path / "table.csv").read_text() == "mine"
    assert main(["compare", str(reported_experiment), "--out", str(tmp_path / "table"), "--force"]) == 0
    assert (tmp_path / "table.csv").read_text().startswith("experiment,")
    # the default stem, beside the experiments, is the command's own and is rewritten each time
    copy = shutil.copytree(reported_experiment, tmp_path / "results" / "tiny")
    for _ in range(2):
        assert main(["compare", str(copy)]) == 0
    assert (copy.parent / "comparison.png").read_bytes().startswith(PNG_SIGNATURE)


def test_ray_files_live_in_a_ray_subfolder_and_older_folders_still_load(reported_experiment, tmp_path):
    """The layout: Ray's state and trial folders in NAME/ray/; folders written before it keep them at the top."""
    assert ray_folder(reported_experiment) == reported_experiment / "ray"
    assert not any(p.name.startswith("trial_") for p in reported_experiment.iterdir())
    older = tmp_path / "tiny"
    shutil.copytree(reported_experiment, older)
    for path in (older / "ray").iterdir():
        path.rename(older / path.name)
    (older / "ray").rmdir()
    assert ray_folder(older) == older
    moved = load_results(older)
    assert moved.trials["trial_id"].tolist() == load_results(reported_experiment).trials["trial_id"].tolist()
    assert moved.best_checkpoint(moved.top(1)["trial_id"].iloc[0]).is_relative_to(older)


def test_an_experiment_without_results_yet_still_draws(tmp_path, capsys):
    """`tune.py report` on a run interrupted before any trial reported: empty figures, no exception."""
    empty = Results(tmp_path, pd.DataFrame(columns=_columns([])), pd.DataFrame(columns=["trial_id", *HISTORY_COLUMNS]))
    assert repr(empty) == f"Results('{tmp_path}': 0 trials (none))"
    for draw in (*plots.FIGURES.values(), plots.best_vs_cost):
        assert isinstance(draw(empty), Figure)
