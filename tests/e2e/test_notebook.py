"""notebooks/results.ipynb runs top to bottom (nbclient, no GPU, no network) against a real tiny experiment,
and every figure it lists appears."""
import nbformat
import pytest

from tests.conftest import REPO_ROOT

nbclient = pytest.importorskip("nbclient")
NOTEBOOK = REPO_ROOT / "notebooks" / "results.ipynb"


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_notebook_runs_and_shows_every_figure(reported_experiment, monkeypatch):
    monkeypatch.setenv("LMTUNE_RESULTS", str(reported_experiment))
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # the kernel imports this checkout's lmtune
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    def text(cell) -> str:
        return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    figures = [cell for cell in code if "figure" in cell.metadata.get("tags", [])]
    assert len(figures) == 6  # comparison, curves, cost, settings, importances, progress
    for cell in figures:
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(images) == 1, cell.source  # one experiment: one figure per cell
    assert "tiny" in text(code[1]) and "8 trials" in text(code[1])  # the Results it loaded
    table = next(cell for cell in code if cell.source.startswith("results_frame"))
    assert "best_valid_ppl" in text(table) and "lstm" in text(table) and "gru" in text(table)
    seeds = next(cell for cell in code if "seed_runs_frame(runs)" in cell.source)  # report.seeds: 2 per family
    assert "of_trial" in text(seeds) and "excludes_zero" in text(seeds) and "tiny/gru" in text(seeds)
    assert any("stopped early or diverged" in text(cell) for cell in code)
