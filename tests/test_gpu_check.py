"""benchmarks/gpu_check.sh on a machine without a GPU: one line saying so, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VENV": str(Path(sys.executable).parent.parent)}  # no GPU seen
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--skip-install"], env=env,
                          capture_output=True, text=True, timeout=120)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 1
    assert output.splitlines() == [output] and "no CUDA GPU here" in output and "Traceback" not in output
