"""Each benchmark and quality script runs on tiny shapes or a few steps (the real runs are not part of the test
suite)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(("script", "expected"), [
    ("moe_block.py", "sorted_mm"), ("train_step.py", "sorted_mm"), ("decode.py", "sorted_mm"),
    ("lora_step.py", "MixLoRA"), ("expert_gemm.py", "block gate/up"),
    ("decode_gemv.py", "shared-expert gate"), ("onednn_ab.py", "sorted_mm, oneDNN forward only"),
    ("onednn_shapes.py", "mixtral-like | prefill | bucketed"),
    ("page_faults.py", "deepseek-like | one layer fwd+bwd, T=8 | ours sorted_mm"),
    ("quality_pretraining.py", "| expert_choice |"),
    pytest.param("quality_lora_moe.py", "| mola |", marks=pytest.mark.slow),
])
def test_benchmark_script_runs_on_tiny_shapes(script, expected, tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
