"""MOELoRA: LoRA experts that split the rank, mixed by a gate that reads each sample's task id; `task_ids` in forward,
generate (with and without a cache), save/load in a fresh process, and the recipe path."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig
from test_lora_moe import peft_model, tiny_llama, token_ids
from test_recipes import RECIPES, TINY_TRAINING, tiny  # noqa: F401 (the `tiny` fixture)
from torch.testing import assert_close

import hf_moe
from hf_moe.finetune.lora_moe import MoeLoraLinear
from hf_moe.finetune.recipes import run_recipe

MOELORA = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "num_experts": 2, "r": 4, "task_embedding_dim": 8,
           "task_names": ["add", "sort", "upper"]}


@torch.no_grad()
def randomize_(model, std: float = 0.3):
    for name, param in model.named_parameters():
        if "moelora_" in name:
            param.copy_(std * torch.randn_like(param))
    return model


def moelora_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return randomize_(peft_model(hf_moe.MoeLoraConfig(**{**MOELORA, **overrides}), randomize=False))


def test_the_rank_is_split_over_the_experts_and_every_field_is_saved(tmp_path):
    model = moelora_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MoeLoraLinear)
    assert layer.moelora_A["default"].shape == (2, 2, 32) and layer.moelora_B["default"].shape == (2, 32, 2)
    assert layer.moelora_task_embedding["default"].shape == (3, 8) and layer.moelora_gate["default"].shape == (2, 8)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOELORA"
    for name, value in {**MOELORA, "num_tasks": 3, "lora_alpha": 32}.items():
        if name != "task_type":
            assert saved[name] == value, name
    loaded = PeftConfig.from_pretrained(tmp_path).to_dict()
    assert {**loaded, "inference_mode": False} == model.peft_config["default"].to_dict()  # saving sets it


def test_moelora_linear_equals_the_formula_written_out():
    model = moelora_model()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    x, task_ids = torch.randn(3, 5, 64), torch.tensor([2, 0, 2])
    embedding, gate, lora_a, lora_b = (layer.moelora_task_embedding["default"], layer.moelora_gate["default"],
                                       layer.moelora_A["default"], layer.moelora_B["default"])
    expected = F.linear(x, layer.base_layer.weight)
    for b in range(3):
        weights = torch.softmax(gate @ embedding[task_ids[b]], dim=-1)  # [experts]
        for s in range(5):
            for i in range(2):
                expected[b, s] += weights[i] * (32 / 4) * (lora_b[i] @ (lora_a[i] @ x[b, s]))
    layer.task_ids = task_ids
    with torch.no_grad():
        assert_close(layer(x), expected)


def test_the_task_decides_the_output_and_the_same_task_gives_the_same_output():
    model, ids = moelora_model(), token_ids(1, 6).repeat(3, 1)
    with torch.no_grad():
        logits = model(input_ids=ids, task_ids=torch.tensor([0, 1, 0])).logits
        alone = model(input_ids=ids[:1], task_ids=torch.tensor([1])).logits
    assert_close(logits[0], logits[2])
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    assert_close(alone[0], logits[1])


def test_a_forward_without_or_with_wrong_task_ids_names_them():
    model, ids = moelora_model(), token_ids(2, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="pass `task_ids`"):
        model(input_ids=ids)
    with torch.no_grad(), pytest.raises(ValueError, match="one task id per sample"):
        model(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    with torch.no_grad(), pytest.raises(ValueError, match=r"ids must be in \[0, num_tasks=3\)"):
        model(input_ids=ids, task_ids=torch.tensor([0, 3]))


@pytest.mark.parametrize("options, field", [
    ({"r": 6, "num_experts": 4}, "`r`=6"),
    ({"task_names": ["a", "a"]}, "`task_names`"),
    ({"task_names": ["a", "b"], "num_tasks": 3}, "`num_tasks`=3"),
    ({"task_embedding_dim": 0}, "`task_embedding_dim`=0"),
    ({"num_tasks": 0}, "`num_tasks`=0"),
])
def test_invalid_fields_are_named(options, field):
    with pytest.raises(ValueError, match=field):
        hf_moe.MoeLoraConfig(**options)


def test_building_without_num_tasks_or_task_names_names_them():
    with pytest.raises(ValueError, match="`num_tasks` is None and so is `task_names`"):
        peft_model(hf_moe.MoeLoraConfig(task_type="CAUSAL_LM", r=4, num_experts=2))


def test_generate_uses_the_task_ids_for_every_token_with_and_without_cache():
    model, ids, task_ids = moelora_model(), token_ids(2, 5), torch.tensor([2, 0])
    options = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True,
               "pad_token_id": 0}
    cached = model.generate(input_ids=ids, task_ids=task_ids, use_cache=True, **options)
    uncached = model.generate(input_ids=ids, task_ids=task_ids, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    for first, second in zip(cached.scores, uncached.scores):
        assert_close(first, second, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the last step's scores are the forward's logits on the sequence, with the same tasks
        logits = model(input_ids=cached.sequences[:, :-1], task_ids=task_ids).logits[:, -1]
    assert_close(cached.scores[-1], logits, rtol=1e-5, atol=1e-5)
    beams = model.generate(input_ids=ids, task_ids=task_ids, max_new_tokens=2, num_beams=2, num_return_sequences=2,
                           do_sample=False, pad_token_id=0)
    assert beams.shape == (4, 7)


def test_a_saved_adapter_reloads_in_a_fresh_process_with_identical_logits(tmp_path):
    model, ids, task_ids = moelora_model(), token_ids(2, 6), torch.tensor([1, 2])
    tiny_llama().save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.save(model(input_ids=ids, task_ids=task_ids).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, hf_moe
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        assert model.peft_config["default"].task_names == ["add", "sort", "upper"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({ids.tolist()}), task_ids=torch.tensor({task_ids.tolist()})).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_the_recipe_maps_the_task_column_to_ids_and_trains(tiny, tmp_path):  # noqa: F811
    rows = [json.loads(line) for line in Path(tiny["data"]).read_text(encoding="utf-8").splitlines()]
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({**row, "task": ["add", "sort", "upper"][i % 3]}) + "\n"
                            for i, row in enumerate(rows)))
    result = run_recipe(os.path.join(RECIPES, "moelora.yaml"), model=tiny["llama"], output_dir=str(tmp_path / "out"),
                        **{**TINY_TRAINING, "data.train_file": str(data), "training.max_steps": 1,
                           "training.bf16": False, "peft.r": 4, "peft.num_experts": 2})
    assert result.trainer.state.global_step == 1
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["task_names"] == ["add", "sort", "upper"] and saved["num_tasks"] == 3
    with pytest.raises(ValueError, match="`data.task_field`"):
        run_recipe(os.path.join(RECIPES, "moelora.yaml"), model=tiny["llama"], output_dir=str(tmp_path / "other"),
                   **{**TINY_TRAINING, "data.train_file": str(data), "data.task_field": None})
