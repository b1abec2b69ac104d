"""Each benchmark script runs on tiny shapes (the real runs are not part of the test suite)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["moe_block.py", "train_step.py", "decode.py"])
def test_benchmark_script_runs_on_tiny_shapes(script, tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sorted_mm" in result.stdout
