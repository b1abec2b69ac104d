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
    ("mod_speed.py", "| layers 1-3 | 0.125 |"), ("auto_choice.py", "deepseek-like | 4 | `sorted_mm` |"),
    ("quality_pretraining.py", "| expert_choice |"),
    pytest.param("quality_lora_moe.py", "| mixture_of_loras |", marks=pytest.mark.slow),
])
def test_benchmark_script_runs_on_tiny_shapes(script, expected, tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--smoke"], check=False,
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout


@pytest.fixture
def quality_lora_moe(monkeypatch):
    """benchmarks/quality_lora_moe.py as a module (it imports its neighbour `common`)."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("quality_lora_moe")


def test_quality_lora_moe_matches_the_newer_methods(quality_lora_moe):
    """PESC's one size knob (adapter width = attention LoRA rank), Mixture-of-LoRAs' rank (experts and routers
    counted) and the sizes of MoCLE, Expert Gate (autoencoders counted) and the task-gate variants land next to plain
    LoRA's 262k trainable parameters on the shipped tiny Llama."""
    from hf_moe.data import tiny_llama_path

    target = quality_lora_moe.trainable_parameters(tiny_llama_path(), "lora", quality_lora_moe.REFERENCE_RANK)
    assert target == 262144
    assert quality_lora_moe.matched_rank(tiny_llama_path(), "pesc", target) == (11, 267264)
    assert quality_lora_moe.matched_rank(tiny_llama_path(), "mixture_of_loras", target) == (2, 245760)
    # MoCLE on q and v; Expert Gate's rank-2 task experts and code-16 autoencoders; the task-gate variants
    assert quality_lora_moe.matched_rank(tiny_llama_path(), "mocle", target) == (13, 269856)
    assert quality_lora_moe.matched_rank(tiny_llama_path(), "expert_gate", target) == (2, 247392)
    assert quality_lora_moe.matched_rank(tiny_llama_path(), "mixlora_task_gates", target) == (3, 291840)
    assert quality_lora_moe.matched_rank(tiny_llama_path(), "moelora_global", target) == (16, 263040)
    assert quality_lora_moe.matched_rank(tiny_llama_path(), "lora_qv", target) == (73, 261632)  # MoCLE's targets


def test_quality_lora_moe_mixture_of_loras_splits_the_step_budget(quality_lora_moe):
    """Stage 1 (task experts) gets 3/4 of the steps, stage 2 (routers, from stage 1's adapter) the rest; the model
    evaluated is stage 2's."""
    from types import SimpleNamespace

    calls = []

    def fit_stage(peft, stage, max_steps, **fields):
        calls.append((peft, stage, max_steps, fields))
        return SimpleNamespace(output_dir=f"out/{stage}", trainer=SimpleNamespace(model=f"model of {stage}"))

    options = quality_lora_moe.method_options("mixture_of_loras", 2)
    model = quality_lora_moe.METHODS["mixture_of_loras"].fit(fit_stage, options, 800)
    assert model == "model of stage2"
    (stage1, name1, steps1, fields1), (stage2, name2, steps2, fields2) = calls
    assert (name1, steps1, fields1) == ("stage1", 600, {})
    assert (name2, steps2, fields2) == ("stage2", 200, {"init_adapter": "out/stage1"})
    assert stage1["stage"] == 1 and "router_input" not in stage1 and stage1["r"] == 2
    assert stage2 == options and stage2["stage"] == 2
    assert not quality_lora_moe.METHODS["mixture_of_loras"].eval_task_ids  # evaluated through its routers
    assert quality_lora_moe.METHODS["moelora"].eval_task_ids  # task ids are an input of MOELoRA's model
    methods = quality_lora_moe.METHODS  # the gate decides at evaluation; task gates read task ids there
    assert not methods["expert_gate"].eval_task_ids and methods["expert_gate"].task_column
    assert methods["mixlora_task_gates"].eval_task_ids and methods["moelora_global"].eval_task_ids


def test_quality_lora_moe_add_keeps_the_rows_of_methods_not_run(quality_lora_moe):
    q = quality_lora_moe
    earlier = q.earlier_rows(
        "800 steps of 32 examples, learning rate 0.003 (cosine, 5% warmup), seed 0; 600 eval examples (6 tasks).\n\n"
        "| method | rank | trainable | exact match | add | answer perplexity |\n|---|---|---|---|---|---|\n"
        "| base model (no fine-tune) | - | 0k | 0.0% | 0% | 1255.862 |\n"
        "| lora | 16 | 262k | 39.2% | 2% | 1.944 |\n| mola | 3 | 287k | 17.3% | 2% | 2.738 |\n\n"
        "| prompt | expected | base model | lora | mola |\n|---|---|---|---|---|\n"
        "| `add: 39 + 70` | `109` | `#` | `110` | `1\\|0` |\n\n"
        "Command: `python benchmarks/quality_lora_moe.py --max-steps 800`  \nMachine: AMD EPYC\n")
    assert earlier.sources == {"python benchmarks/quality_lora_moe.py --max-steps 800": ["lora", "mola"]}
    header = ["method", "rank", "trainable", "seeds", "exact match (mean, per seed)", "add", "answer perplexity",
              "minutes per run"]
    rows = [[q.BASE_ROW, "-", "0k", "1", "0.0%", "0%", "1255.862", "0.1"],
            ["pesc", "11", "267k", "1", "30.0%", "1%", "2.000", "3.0"],
            ["mola", "3", "287k", "1", "18.0%", "3%", "2.700", "3.1"]]
    samples = (["prompt", "expected", "base model", "pesc", "mola"], [["`add: 39 + 70`", "`109`", "`#`", "`9`", "`1`"]])
    rows, samples_header, samples_rows, provenance = q.add_to_earlier(earlier, header, rows, *samples)
    assert rows == [[q.BASE_ROW, "-", "0k", "1", "0.0%", "0%", "1255.862", "0.1"],
                    ["lora", "16", "262k", "-", "39.2%", "2%", "1.944", "-"],
                    ["mola", "3", "287k", "1", "18.0%", "3%", "2.700", "3.1"],
                    ["pesc", "11", "267k", "1", "30.0%", "1%", "2.000", "3.0"]]
    assert samples_header == ["prompt", "expected", "base model", "lora", "mola", "pesc"]
    assert samples_rows == [["`add: 39 + 70`", "`109`", "`#`", "`110`", "`1`", "`9`"]]
    assert provenance.splitlines()[0] == "Rows of lora from `python benchmarks/quality_lora_moe.py --max-steps 800`."
    assert "did not report seeds, minutes per run" in provenance
    # a later --add keeps naming the first command for the rows it still holds
    again = q.earlier_rows("Base: x. settings\n\n" + q.markdown_table(header, rows) + "\n\n" + provenance
                           + "Command: `python benchmarks/quality_lora_moe.py --methods mola pesc --add`  \n")
    assert again.sources == {"python benchmarks/quality_lora_moe.py --max-steps 800": ["lora"],
                             "python benchmarks/quality_lora_moe.py --methods mola pesc --add": ["mola", "pesc"]}


def test_moe_block_rounds_give_one_speed_per_round(tmp_path):
    """`--rounds N`: three more columns, each with one value per round, and a clear error for N < 1."""
    script = str(BENCHMARKS / "moe_block.py")
    result = subprocess.run([sys.executable, script, "--smoke", "--rounds", "2"], check=False, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line.split(" | ") for line in lines if line.startswith("shape | T | pass"))
    # "... vs fair floor" where a fair floor applies (fp32 on x86-64), else "... vs floor"
    assert [name.split(" vs ")[0] for name in header[-3:]] == ["rounds: ours auto", "rounds: transformers",
                                                                 "rounds: ours auto"]
    assert header[-1] == "rounds: ours auto vs best transformers path"
    rows = [line.split(" | ") for line in lines if line.startswith(("mixtral-like |", "deepseek-like |"))]
    assert len(rows) == 8  # two shapes, T = 1 and 16, fwd and fwd+bwd
    for row in rows:
        assert len(row) == len(header)
        assert all(len(cell.split(", ")) == 2 for cell in row[-3:])
    bad = subprocess.run([sys.executable, script, "--smoke", "--rounds", "0"], check=False, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--rounds must be at least 1, got 0" in bad.stderr
