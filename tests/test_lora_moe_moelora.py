"""MOELoRA: LoRA experts that split the rank, mixed by a gate that reads each sample's task id; `task_ids` in forward,
generate (with and without a cache), save/load in a fresh process, and the recipe path; the global gate
(`gate_sharing="global"`, its fresh-process load in test_lora_moe_task_gates.py)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import generate_with_and_without_cache
from peft import PeftConfig
from safetensors.torch import load_file
from test_lora_moe import adapter_state, peft_model, tiny_llama, token_ids, train_one_step
from test_recipes import RECIPES, TINY_TRAINING, tiny  # noqa: F401 (the `tiny` fixture)
from torch.testing import assert_close

import hf_moe
from hf_moe.finetune.lora_moe import MoeLoraLinear, TaskIdsCollator
from hf_moe.finetune.recipes import run_recipe
from hf_moe.finetune.trainer import parameter_groups

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
    ({"gate_sharing": "shared"}, r"`gate_sharing`='shared' is invalid: allowed values: \['per_layer', 'global'\]"),
])
def test_invalid_fields_are_named(options, field):
    with pytest.raises(ValueError, match=field):
        hf_moe.MoeLoraConfig(**options)


def test_building_without_num_tasks_or_task_names_names_them():
    with pytest.raises(ValueError, match="`num_tasks` is None and so is `task_names`"):
        peft_model(hf_moe.MoeLoraConfig(task_type="CAUSAL_LM", r=4, num_experts=2))


@pytest.mark.parametrize("gate_sharing", ["per_layer", "global"])
def test_generate_uses_the_task_ids_for_every_token_with_and_without_cache(gate_sharing):
    model, ids, task_ids = moelora_model(gate_sharing=gate_sharing), token_ids(2, 5), torch.tensor([2, 0])
    cached = generate_with_and_without_cache(model, 6, input_ids=ids, task_ids=task_ids)
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


# ---------------------------------------------------------------------------------------------------------------
# gate_sharing="global": one task embedding and gate for the whole model (the reference's MMOELoraLinearS)


def moelora_layers(model) -> list[MoeLoraLinear]:
    return [module for module in model.modules() if isinstance(module, MoeLoraLinear)]


def test_a_global_gate_exists_once_is_saved_once_and_every_layer_uses_its_weights(tmp_path):
    model, task_ids = moelora_model(gate_sharing="global"), torch.tensor([2, 0, 1])
    owner, *others = layers = moelora_layers(model)
    assert owner is model.base_model.model.model.layers[0].self_attn.q_proj  # the first adapted Linear
    for layer in others:
        assert "default" not in layer.moelora_task_embedding and "default" not in layer.moelora_gate
        assert layer.task_gate_owner["default"] is owner
    with torch.no_grad():
        weights = owner.expert_weights("default", task_ids)
        for layer in layers:
            assert torch.equal(layer.expert_weights("default", task_ids), weights)
    # the formula on the last layer, with the model's one gate
    layer, x = layers[-1], torch.randn(3, 5, 64)
    embedding, gate = owner.moelora_task_embedding["default"], owner.moelora_gate["default"]
    lora_a, lora_b = layer.moelora_A["default"], layer.moelora_B["default"]
    expected = F.linear(x, layer.base_layer.weight)
    for b in range(3):
        w = torch.softmax(gate @ embedding[task_ids[b]], dim=-1)
        expected[b] += sum(w[i] * (32 / 4) * F.linear(F.linear(x[b], lora_a[i]), lora_b[i]) for i in range(2))
    layer.task_ids = task_ids
    with torch.no_grad():
        assert_close(layer(x), expected)
    # trainable parameters: every layer's experts plus one task embedding [3, 8] and one gate [2, 8]
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    experts = sum(layer.moelora_A["default"].numel() + layer.moelora_B["default"].numel() for layer in layers)
    assert trainable == experts + 3 * 8 + 2 * 8
    per_layer = sum(param.numel() for param in moelora_model().parameters() if param.requires_grad)
    assert per_layer - trainable == (len(layers) - 1) * (3 * 8 + 2 * 8)
    assert len([name for name, param in parameter_groups(model)["router"] if param.requires_grad]) == 2
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert [name for name in saved if "task_embedding" in name or "moelora_gate" in name] == [
        "base_model.model.model.layers.0.self_attn.q_proj.moelora_gate",
        "base_model.model.model.layers.0.self_attn.q_proj.moelora_task_embedding"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["gate_sharing"] == "global"


def test_a_global_gate_equals_per_layer_gates_tied_to_one_value():
    """Outputs, and the gate's gradient: the sum of the gradients that tied per-layer gates would get."""
    shared, per_layer = moelora_model(gate_sharing="global"), moelora_model(seed=1)
    owner = moelora_layers(shared)[0]
    with torch.no_grad():
        for source, target in zip(moelora_layers(shared), moelora_layers(per_layer)):
            for name in ("moelora_A", "moelora_B"):
                getattr(target, name)["default"].copy_(getattr(source, name)["default"])
            for name in ("moelora_task_embedding", "moelora_gate"):
                getattr(target, name)["default"].copy_(getattr(owner, name)["default"])
    ids, task_ids = token_ids(3, 6), torch.tensor([1, 2, 0])
    shared_logits = shared(input_ids=ids, task_ids=task_ids).logits
    per_layer_logits = per_layer(input_ids=ids, task_ids=task_ids).logits
    assert_close(shared_logits, per_layer_logits)
    shared_logits.square().sum().backward()
    per_layer_logits.square().sum().backward()
    for name in ("moelora_task_embedding", "moelora_gate"):
        tied = sum(getattr(layer, name)["default"].grad for layer in moelora_layers(per_layer))
        assert_close(getattr(owner, name)["default"].grad, tied, rtol=1e-4, atol=1e-6)


def test_a_global_gate_trains_with_trainer_and_activation_checkpointing(tmp_path):
    tokens = token_ids(1, 8, seed=7)[0].tolist()
    rows = [{"input_ids": tokens, "attention_mask": [1] * 8, "labels": tokens, "task_ids": task} for task in (0, 2)]
    model = moelora_model(gate_sharing="global")
    before = adapter_state(model)
    trainer = train_one_step(model, rows, tmp_path, batch_size=2, accumulation=1, remove_unused_columns=False,
                             data_collator=TaskIdsCollator(column="task_ids"), activation_checkpointing=True)
    after = adapter_state(model)
    gate = "base_model.model.model.layers.0.self_attn.q_proj.moelora_gate.default"
    embedding = gate.replace("moelora_gate", "moelora_task_embedding")
    assert (after[gate] - before[gate]).abs().max() > 0
    assert torch.equal(after[embedding][1], before[embedding][1])  # task 1 was in no row
    assert (after[embedding][[0, 2]] - before[embedding][[0, 2]]).abs().max() > 0
    assert trainer.state.log_history[0]["loss"] > 0


def test_global_gates_of_two_adapters_merging_and_unloading(tmp_path):
    model, ids, task_ids = moelora_model(gate_sharing="global"), token_ids(2, 6), torch.tensor([0, 1])
    model.add_adapter("other", hf_moe.MoeLoraConfig(**{**MOELORA, "gate_sharing": "global"}))
    layers = moelora_layers(model)
    assert layers[1].task_gate_owner == {"default": layers[0], "other": layers[0]}
    with torch.no_grad():
        default = model(input_ids=ids, task_ids=task_ids).logits
        model.set_adapter("other")
        model(input_ids=ids, task_ids=task_ids)
        model.delete_adapter("other")
        assert layers[1].task_gate_owner == {"default": layers[0]} and "other" not in layers[0].moelora_gate
        model.set_adapter("default")
        assert torch.equal(model(input_ids=ids, task_ids=task_ids).logits, default)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)
