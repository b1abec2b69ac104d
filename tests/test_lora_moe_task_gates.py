"""MMoE gates (`task_gates`) of MixLoRA, LoRAMoE and MoLA: one router per task over the shared LoRA experts. The
forward against the formula, per-sample gate selection, save / fresh-process load, generate, gradient accumulation,
errors, materialize's refusal and the recipe path (MOELoRA's task-id plumbing, reused)."""

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
from test_lora_moe import (
    MIXLORA,
    adapter_state,
    naive_mixlora_block,
    peft_model,
    tiny_llama,
    token_ids,
    train_one_step,
)
from test_recipes import TINY_TRAINING
from torch.testing import assert_close
from transformers import LlamaForCausalLM

import hf_moe
from hf_moe.data import tasks_path, tiny_llama_path
from hf_moe.finetune.lora_moe import LoraMoeLinear, MixLoraFeedForward, MolaLinear, TaskIdsCollator
from hf_moe.finetune.recipes import run_recipe

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes",
                      "mixlora_task_gates.yaml")
TASKS = {"task_gates": True, "task_names": ["add", "sort", "upper"]}
CONFIGS = {  # each method with task gates, small enough to write out
    "mixlora": lambda **options: hf_moe.MixLoraConfig(**{**MIXLORA, **TASKS, **options}),
    "loramoe": lambda **options: hf_moe.LoraMoeConfig(**{"task_type": "CAUSAL_LM", "lora_dropout": 0.0,
                                                         "num_experts": 4, "r": 2, **TASKS, **options}),
    "mola": lambda **options: hf_moe.MolaConfig(**{"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "num_experts": 4,
                                                   "top_k": 2, "r": 2, **TASKS, **options}),
}
ROUTED_LAYERS = (MixLoraFeedForward, LoraMoeLinear, MolaLinear)


def task_gated_model(method: str, seed: int = 0, **options):
    return peft_model(CONFIGS[method](**options), seed=seed)


def routers(model) -> list[torch.Tensor]:
    """The router [num_tasks, E, in] of every routed layer."""
    return [layer.adapter_tensors("default")["router"] for layer in model.modules() if isinstance(layer, ROUTED_LAYERS)]


# ---------------------------------------------------------------------------------------------------------------
# The forward


def routed_lora_written_out(layer, x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """LoRAMoE / MoLA on the tokens x [S, in] of one sample with the router [E, in], token by token: W x + s *
    sum_e g_e B_e A_e x, g the dense softmax (LoRAMoE) or its top-k renormalised (MoLA)."""
    weights, top_k = layer.adapter_tensors("default"), layer.top_k["default"]
    rows = []
    for token in x:
        gates = torch.softmax(router @ token, dim=-1)
        if top_k is not None:
            top = gates.topk(top_k)
            gates = torch.zeros_like(gates).scatter(0, top.indices, top.values / top.values.sum())
        delta = sum(gates[e] * (weights["B"][e] @ (weights["A"][e] @ token)) for e in range(len(gates)))
        rows.append(F.linear(token, layer.base_layer.weight) + layer.scaling["default"] * delta)
    return torch.stack(rows)


@pytest.mark.parametrize("method", CONFIGS)
def test_each_sample_is_routed_by_its_tasks_router_as_the_formula_says(method):
    """logits[b, s] = W_{g, task_ids[b]} x[b, s]; the rest of the method unchanged."""
    model = task_gated_model(method)
    layer = next(module for module in model.modules() if isinstance(module, ROUTED_LAYERS))
    router = layer.adapter_tensors("default")["router"]
    assert router.shape[0] == 3 and router.dim() == 3  # [num_tasks, E, in]
    x, task_ids = torch.randn(3, 5, router.shape[-1]), torch.tensor([2, 0, 2])
    layer.task_ids = task_ids
    with torch.no_grad():
        output = layer(x)
        for b, task in enumerate(task_ids):
            if method == "mixlora":
                expected = naive_mixlora_block(layer, x[b], router=router[task])
            else:
                expected = routed_lora_written_out(layer, x[b], router[task])
            assert_close(output[b], expected)


@pytest.mark.parametrize("method", CONFIGS)
def test_changing_one_tasks_router_changes_only_that_tasks_samples(method):
    model, ids, task_ids = task_gated_model(method), token_ids(4, 6), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        before = model(input_ids=ids, task_ids=task_ids).logits
        for router in routers(model):
            router[1] += torch.randn_like(router[1])
        after = model(input_ids=ids, task_ids=task_ids).logits
    # (close, not bit-equal: MixLoRA groups the batch's rows by expert, and the groups' sizes change)
    assert_close(after[task_ids != 1], before[task_ids != 1], rtol=1e-5, atol=1e-6)
    assert (after[task_ids == 1] - before[task_ids == 1]).abs().amax(dim=(1, 2)).min() > 1e-4
    with torch.no_grad():  # a sample's output does not depend on the other samples' tasks
        alone = model(input_ids=ids[1:2], task_ids=task_ids[1:2]).logits
    assert_close(alone[0], after[1])


def test_the_records_hold_each_tokens_logits_and_the_switch_loss_pools_the_whole_batch():
    """Each recorded router call holds logits [T, E], every token's from its task's router; the Switch loss is
    computed over all of them together, whatever their tasks (as without task gates)."""
    from hf_moe.finetune.lora_moe.losses import switch_loss

    model, ids, task_ids = task_gated_model("mixlora", router_aux_loss_coef=1.0), token_ids(2, 6), torch.tensor([0, 2])
    calls = []
    handles = [module.register_forward_hook(lambda block, args, out: calls.append((block, args[0], block.last_record)))
               for module in model.modules() if isinstance(module, MixLoraFeedForward)]
    with torch.no_grad():
        out = model(input_ids=ids, task_ids=task_ids)
    for handle in handles:
        handle.remove()
    assert len(calls) == 2
    for block, hidden, record in calls:
        router = block.adapter_tensors("default")["router"]  # [3, E, H]
        expected = torch.stack([hidden[b] @ router[task].T for b, task in enumerate(task_ids)])  # [B, S, E]
        assert_close(record.logits, expected.view(12, 4))
    assert_close(out.aux_losses["router_aux_loss"], switch_loss([record for _, _, record in calls], None))


# ---------------------------------------------------------------------------------------------------------------
# Generation, save / load


@pytest.mark.parametrize("method", CONFIGS)
def test_generate_with_cache_equals_without_with_the_task_ids_given_once(method):
    model, ids, task_ids = task_gated_model(method), token_ids(2, 5), torch.tensor([2, 0])
    cached = generate_with_and_without_cache(model, 5, rtol=1e-4, input_ids=ids, task_ids=task_ids)
    with torch.no_grad():  # the last step's scores are the forward's logits on the sequence, with the same tasks
        logits = model(input_ids=cached.sequences[:, :-1], task_ids=task_ids).logits[:, -1]
    assert_close(cached.scores[-1], logits, rtol=1e-4, atol=1e-5)


FRESH_PROCESS_CHECK = textwrap.dedent("""
    import sys, torch
    import hf_moe
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = sys.argv[1]
    ids, task_ids = torch.load(f"{folder}/ids.pt"), torch.load(f"{folder}/task_ids.pt")
    for method in sys.argv[2:]:
        expected = torch.load(f"{folder}/{method}_logits.pt")
        base = AutoModelForCausalLM.from_pretrained(f"{folder}/base")
        model = PeftModel.from_pretrained(base, f"{folder}/{method}").eval()
        assert model.peft_config["default"].uses_task_ids, method
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, task_ids=task_ids).logits, expected), method
            low_memory = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{folder}/base"),
                                                   f"{folder}/{method}", low_cpu_mem_usage=True).eval()
            assert torch.equal(low_memory(input_ids=ids, task_ids=task_ids).logits, expected), method
            plain = AutoModelForCausalLM.from_pretrained(f"{folder}/base")  # transformers' own adapter loading
            plain.load_adapter(f"{folder}/{method}")
            assert torch.equal(plain.eval()(input_ids=ids, task_ids=task_ids).logits, expected), method
    print("OK")
""")


def test_saved_adapters_reload_in_a_fresh_process_with_identical_logits(tmp_path):
    """The three task-gated methods, and MOELoRA with one global gate (test_lora_moe_moelora.py), in one process."""
    tiny_llama().save_pretrained(tmp_path / "base")
    ids, task_ids = token_ids(3, 7), torch.tensor([1, 0, 2])
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(task_ids, tmp_path / "task_ids.pt")
    configs = {method: make() for method, make in CONFIGS.items()}
    configs["moelora_global"] = hf_moe.MoeLoraConfig(task_type="CAUSAL_LM", r=4, num_experts=2, task_embedding_dim=8,
                                                     task_names=TASKS["task_names"], gate_sharing="global")
    for method, config in configs.items():
        model = peft_model(config, base=LlamaForCausalLM.from_pretrained(tmp_path / "base"))
        with torch.no_grad():
            for name, param in model.named_parameters():  # MOELoRA's B starts at zero too
                if "moelora_" in name:
                    param.copy_(0.3 * torch.randn_like(param))
            torch.save(model(input_ids=ids, task_ids=task_ids).logits, tmp_path / f"{method}_logits.pt")
        model.save_pretrained(tmp_path / method)
        saved = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert saved["num_tasks"] == 3 and saved["task_names"] == TASKS["task_names"]
        assert saved.get("task_gates", True) and saved.get("gate_sharing", "global") == "global"
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(tmp_path), *configs],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("method", ["mixlora", "mola"])
def test_gradient_accumulation_gives_the_same_aux_contribution(method, tmp_path):
    """One SGD step on 4 identical rows of task 2: batch 4 vs batch 1 with 4 accumulation steps (and activation
    checkpointing, whose recomputation must see the same task ids) give the same update. Only task 2's routers
    move: the other tasks' routers take no part in the forward."""
    tokens = token_ids(1, 8, seed=7)[0].tolist()
    rows = [{"input_ids": tokens, "attention_mask": [1] * 8, "labels": tokens, "task_ids": 2}] * 4
    collator = TaskIdsCollator(column="task_ids")

    def step(batch_size, accumulation, **options):
        model = task_gated_model(method, router_aux_loss_coef=1.0)
        before = adapter_state(model)
        trainer = train_one_step(model, rows, tmp_path, batch_size, accumulation, data_collator=collator,
                                 remove_unused_columns=False, **options)
        return before, adapter_state(model), trainer.state.log_history[0]

    before, full, full_log = step(4, 1)
    _, accumulated, accumulated_log = step(1, 4, activation_checkpointing=True)
    for name in full:
        assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)
    assert_close(accumulated_log["lora_moe/aux_loss"], full_log["lora_moe/aux_loss"], rtol=1e-5, atol=1e-6)
    assert full_log["lora_moe/router_aux_loss"] > 0
    router_names = [name for name in full if "_router" in name]
    assert router_names
    for name in router_names:
        assert torch.equal(full[name][:2], before[name][:2]), name
        assert (full[name][2] - before[name][2]).abs().max() > 0, name


def test_the_recipe_maps_the_task_column_to_ids_and_trains(tmp_path):
    """recipes/mixlora_task_gates.yaml on the shipped tiny Llama and 24 rows of the shipped tasks data: the task
    column becomes `task_names` and the collator's `task_ids`, the Trainer steps, the card's expert load is measured
    with the eval rows' task ids, and the saved adapter reloads with identical logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "tasks.jsonl"
    data.write_text("".join((tasks_path() / "train.jsonl").read_text().splitlines(keepends=True)[:24]))
    overrides = {**TINY_TRAINING, "data.train_file": str(data), "data.eval_split": 0.25, "training.max_steps": 1,
                 "training.per_device_train_batch_size": 4, "peft.num_experts": 4}
    result = run_recipe(RECIPE, model=str(tiny_llama_path()), output_dir=str(tmp_path / "out"), **overrides)
    assert result.trainer.state.global_step == 1
    out = tmp_path / "out"
    saved = json.loads((out / "adapter_config.json").read_text())
    names = sorted({json.loads(line)["task"] for line in data.read_text().splitlines()})
    assert saved["task_gates"] is True and saved["task_names"] == names and saved["num_tasks"] == len(names)
    assert (out / "expert_load.png").is_file()
    assert f"one router per task ({len(names)} tasks, MMoE gates)" in (out / "README.md").read_text()
    assert PeftConfig.from_pretrained(out).uses_task_ids
    trained = result.trainer.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path()), out).eval()
    ids, task_ids = torch.tensor([[4, 9, 12, 20, 21, 3]] * len(names)), torch.arange(len(names))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, task_ids=task_ids).logits,
                           trained(input_ids=ids, task_ids=task_ids).logits)


@pytest.mark.parametrize("overrides, message", [
    ({"peft.task_gates": None}, "`data.task_field`='task' is invalid: the task column: only with methods"),
    ({"data.task_field": None}, "method 'mixlora' with peft.task_gates needs the name of the data's task column"),
])
def test_a_recipe_needs_the_task_column_exactly_with_task_gates(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_recipe(RECIPE, model=str(tiny_llama_path()), output_dir=str(tmp_path / "out"), **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("options, field", [
    ({"task_gates": "yes"}, "`task_gates`='yes' is invalid: must be true or false"),
    ({"task_gates": False, "num_tasks": 3, "task_names": None}, "`num_tasks`=3 is invalid: tasks are only read"),
    ({"task_gates": False}, "`task_names`=\\['add', 'sort', 'upper'\\] is invalid: tasks are only read"),
    ({"task_names": ["a", "a"]}, "`task_names`"),
    ({"num_tasks": 0, "task_names": None}, "`num_tasks`=0"),
])
@pytest.mark.parametrize("method", CONFIGS)
def test_invalid_task_gate_fields_are_named(method, options, field):
    with pytest.raises(ValueError, match=field):
        CONFIGS[method](**options)


@pytest.mark.parametrize("method", CONFIGS)
def test_building_without_tasks_and_forwards_without_or_with_wrong_task_ids_are_refused(method):
    with pytest.raises(ValueError, match="`task_gates`=True .*: `num_tasks` is None and so is `task_names`"):
        task_gated_model(method, task_names=None)
    model, ids = task_gated_model(method), token_ids(2, 6)
    with torch.no_grad():
        with pytest.raises(ValueError, match="MMoE task gates .* pass `task_ids`"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="one task id per sample"):
            model(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match=r"ids must be in \[0, num_tasks=3\)"):
            model(input_ids=ids, task_ids=torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="1-D integer tensor"):
            model(input_ids=ids, task_ids=torch.tensor([0.0, 1.0]))
    plain = task_gated_model(method, task_gates=False, task_names=None)  # without task gates nothing reads them
    assert not plain.peft_config["default"].uses_task_ids
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, task_ids=torch.tensor([0, 1])).logits, plain(input_ids=ids).logits)


def test_materialize_refuses_task_gates(tmp_path):
    from hf_moe.finetune.lora_moe.materialize import materialize

    tiny_llama().save_pretrained(tmp_path / "base")
    model = peft_model(CONFIGS["mixlora"](), base=LlamaForCausalLM.from_pretrained(tmp_path / "base"))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="`task_gates`=True: its routers are one per task"):
        materialize(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert Path(tmp_path / "adapter" / "adapter_model.safetensors").is_file()
