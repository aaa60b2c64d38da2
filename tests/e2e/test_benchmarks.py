"""The GPU check (benchmarks/gpu_check.py) as CI can run it: its dry run, tiny shapes on the CPU, through the same
entry point the GPU machine uses (`./dev gpu-check OUT`), and the data part of its prepare step."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_dry_run_writes_every_stage_into_its_report(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([str(REPO / "dev"), "gpu-check", str(out), "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "VENV": str(Path(sys.executable).parents[1])})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = (out / "report.md").read_text()
    for stage in gpu_check.STAGES:
        assert f"{stage}: ok" in report, report
    assert "| tiny | 3×5 | 6→8, 3, 2 | bf16 | fast, eager |" in report  # a measured row of each stage
    assert re.search(r"\| Mogrifier \(paper config\), CUDA graphs \| [0-9,]+ \|", report), report
    assert "| 2 |" in report.split("## pack")[1]
    assert len(list(out.iterdir())) <= 8  # what comes back from the GPU machine


def test_a_stage_that_fails_is_reported_and_the_next_still_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DRY_LIMIT", 0.01)  # every stage is stopped at once
    assert gpu_check.run(tmp_path, ["layer", "tests"], dry=True) == 1
    report = (tmp_path / "report.md").read_text()
    assert "layer: stopped at its limit" in report and "tests: stopped at its limit" in report


def test_prepare_copies_and_checks_the_ptb_files(tmp_path, data_root):
    gpu_check.prepare(tmp_path / "gpu", data_root, download=False)
    assert sorted(p.name for p in (tmp_path / "gpu" / "data" / "ptb").glob("*.gz")) == [
        "ptb.test.txt.gz", "ptb.train.txt.gz", "ptb.valid.txt.gz"]
    command = gpu_check.pip_download_command(tmp_path, gpu_check.pinned(["pydantic"]))
    assert "--python-version" in command and command[command.index("--python-version") + 1] == "3.12"
