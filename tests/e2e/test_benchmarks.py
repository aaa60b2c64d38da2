"""benchmarks/gpu_check.sh on a machine without CUDA: it says so, runs nothing, writes nothing, exits 0."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs everything (minutes)")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHON": sys.executable,
                                           "GPU_CHECK_DIR": str(tmp_path / "report")})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "gpu_check: no CUDA device here" in run.stdout
    assert not (tmp_path / "report").exists()
