"""Result tables: trial status classification, the Markdown rendering, the table columns and where Ray's files are."""
import math

import pandas as pd

from lmtune.layout import ray_folder
from lmtune.results import COMPARE_COLUMNS, FAMILY_COLUMNS, summary_frame, trial_status
from lmtune.table_files import markdown


def test_trial_status():
    assert trial_status("TERMINATED", {"diverged": False}, 4, 4) == "completed"
    assert trial_status("TERMINATED", {"diverged": False}, 1, 4) == "early-stopped"  # stopped by ASHA
    assert trial_status("TERMINATED", {"diverged": True}, 1, 4) == "diverged"
    assert trial_status("ERROR", {}, 2, 4) == "error"
    assert trial_status("RUNNING", {}, 2, 4) == "running"  # an interrupted or live experiment
    assert trial_status("PENDING", {}, 0, 4) == "pending"


def test_markdown_formats_numbers_for_reading():
    frame = pd.DataFrame({
        "family": ["mogrifier", "lstm"],
        "params": [24_012_345, 2_873],
        "best_valid_ppl": [55.123, math.inf],
        "time_s": [12345.6, math.nan],
        "optim.lr": [0.0012345, 3e-3],
        "model.rank": [None, 32],
        "diverged": [False, True],
    })
    lines = markdown(frame).splitlines()
    assert lines[0] == "| family | params | best_valid_ppl | time_s | optim.lr | model.rank | diverged |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---|"
    assert lines[2] == "| mogrifier | 24.01M | 55.12 | 12,346 | 0.001234 |  | false |"
    assert lines[3] == "| lstm | 2.9k | inf |  | 0.003 | 32 | true |"
    assert markdown(frame.iloc[:0]) == "(no trials)"
    assert markdown(pd.DataFrame({"started_at": [1795953856.7]})).endswith("| 2026-11-29 12:04:16 |")  # UTC


def test_ray_folder_prefers_the_ray_subfolder(tmp_path):
    assert ray_folder(tmp_path) == tmp_path  # an older experiment: Ray's files at the top
    (tmp_path / "ray").mkdir()
    assert ray_folder(tmp_path) == tmp_path / "ray"


def test_summary_frame_columns_are_defined_once():
    summary = {"experiment": "x", "dataset": "ptb", "families": [
        {"family": "lstm", "trial_id": "b", "params": 10, "best_valid_ppl": 90.0, "valid_ppl": 90.0, "test_ppl": 88.0,
         "trials": 2, "compute_h": 0.5},
        {"family": "mogrifier", "trial_id": "a", "params": 10, "best_valid_ppl": 80.0, "valid_ppl": 80.0,
         "test_ppl": 78.0, "trials": 2, "compute_h": 0.5},
    ]}
    table = summary_frame([summary])
    assert list(table.columns) == COMPARE_COLUMNS == ["experiment", "dataset", *FAMILY_COLUMNS]
    assert list(table["family"]) == ["mogrifier", "lstm"]  # best first
