"""Mixture-of-LoRAs: one LoRA expert per task; stage 1 selects it by the sample's task id, stage 2 by a router's top-1
choice on the prompt, kept for every generated token. Forward against the formula, what each stage trains, the router
loss under gradient accumulation, generate with and without a cache, save/load in a fresh process, the two recipes."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import generate_with_and_without_cache
from peft import PeftConfig, PeftModel
from test_lora_moe import VOCAB, causal_lm_loss, peft_model, tiny_llama, token_ids, train_one_step
from test_recipes import RECIPES
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe.data import tasks_path, tiny_llama_path
from hf_moe.finetune.lora_moe import MixtureOfLorasLinear, TaskIdsCollator
from hf_moe.finetune.lora_moe.mixture_of_loras import MixtureOfLorasSettings
from hf_moe.finetune.lora_moe.prompt_routing import PromptRouting
from hf_moe.finetune.recipes import run_recipe

TASKS = ["add", "sort", "upper"]
MOL = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "r": 4, "task_names": TASKS}
PROMPT = 3  # prompt tokens of the rows below: their labels are -100


@torch.no_grad()
def randomize_(model, std: float = 0.3):
    for name, param in model.named_parameters():
        if "mixture_of_loras_" in name:
            param.copy_(std * torch.randn_like(param))
    return model


def mol_model(stage: int = 1, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = hf_moe.MixtureOfLorasConfig(**{**MOL, "stage": stage, **overrides})
    return randomize_(peft_model(config, randomize=False))


def layers(model) -> dict[str, MixtureOfLorasLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MixtureOfLorasLinear)}


def all_parameters(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def prompt_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return labels


def rows(ids: torch.Tensor, tasks: list[int]) -> list[dict]:
    """Training rows of equal length: PROMPT prompt tokens (label -100), the rest response; `task` is the task id."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * len(row),
             "labels": prompt_labels(row[None])[0].tolist(), "task": task} for row, task in zip(ids, tasks)]


def one_step(model, train_rows, tmp_path, batch_size: int, accumulation: int = 1, **overrides):
    return train_one_step(model.train(), train_rows, tmp_path, batch_size, accumulation,
                          data_collator=TaskIdsCollator(column="task"), remove_unused_columns=False, **overrides)


def expert_formula(layer, x, experts, adapter="default"):
    """W x + b + (alpha / r) B_e A_e x, one expert e per sequence, written out token by token."""
    lora_a, lora_b = layer.mixture_of_loras_A[adapter], layer.mixture_of_loras_B[adapter]
    expected = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            expected[b, s] += (16 / 4) * (lora_b[experts[b]] @ (lora_a[experts[b]] @ x[b, s]))
    return expected


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_importing_hf_moe_registers_mixture_of_loras():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    peft_type = PeftType("MIXTURE_OF_LORAS")
    assert peft_type is PeftType["MIXTURE_OF_LORAS"] and peft_type in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is hf_moe.MixtureOfLorasConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == "mixture_of_loras_" == PEFT_TYPE_TO_TUNER_MAPPING[peft_type].prefix
    assert hf_moe.MixtureOfLorasConfig().peft_type is peft_type


def test_one_expert_per_task_and_every_field_is_saved(tmp_path):
    model = mol_model(stage=2, router_input="prompt_last", router_loss_coef=0.5, stage2_routing="router",
                      stage2_train_experts=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MixtureOfLorasLinear)
    assert layer.mixture_of_loras_A["default"].shape == (3, 4, 32)
    assert layer.mixture_of_loras_B["default"].shape == (3, 32, 4)
    assert layer.mixture_of_loras_router["default"].shape == (3, 32)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {**MOL, "peft_type": "MIXTURE_OF_LORAS", "num_tasks": 3, "lora_alpha": 16, "stage": 2,
                "router_input": "prompt_last", "router_loss_coef": 0.5, "stage2_routing": "router",
                "stage2_train_experts": False}
    for name, value in expected.items():
        assert saved[name] == value, name
    assert sorted(saved["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"])
    loaded = PeftConfig.from_pretrained(tmp_path).to_dict()
    assert {**loaded, "inference_mode": False} == model.peft_config["default"].to_dict()


@pytest.mark.parametrize("options, field", [
    ({"stage": 3}, r"`stage`=3 is invalid: allowed values: \[1, 2\]"),
    ({"stage": True}, "`stage`=True"),
    ({"router_input": "mean"}, r"`router_input`='mean' is invalid: allowed values: \['prompt_mean', 'prompt_last'\]"),
    ({"router_loss_coef": -1.0}, "`router_loss_coef`=-1.0"),
    ({"stage2_routing": "soft"}, r"`stage2_routing`='soft' is invalid: allowed values: \['label', 'router'\]"),
    ({"stage2_train_experts": "yes"}, "`stage2_train_experts`='yes'"),
    ({"task_names": ["a", "a"]}, "`task_names`"),
    ({"task_names": ["a", "b"], "num_tasks": 3}, "`num_tasks`=3"),
    ({"r": 0}, "`r`=0"),
])
def test_invalid_fields_are_named_with_what_is_allowed(options, field):
    with pytest.raises(ValueError, match=field):
        hf_moe.MixtureOfLorasConfig(**{**MOL, **options})


def test_building_without_tasks_names_them():
    with pytest.raises(ValueError, match="`num_tasks` is None and so is `task_names`"):
        peft_model(hf_moe.MixtureOfLorasConfig(task_type="CAUSAL_LM", r=4))


# ---------------------------------------------------------------------------------------------------------------
# Forward = the formula


def test_stage1_applies_each_samples_task_expert():
    layer = layers(mol_model(stage=1))["base_model.model.model.layers.1.mlp.down_proj"]
    x, task_ids = torch.randn(3, 5, 64), torch.tensor([2, 0, 2])
    layer.task_ids = task_ids
    with torch.no_grad():
        assert_close(layer(x), expert_formula(layer, x, task_ids))


@pytest.mark.parametrize("router_input", ["prompt_mean", "prompt_last"])
def test_stage2_applies_the_routers_top1_choice_on_the_prompt(router_input):
    layer = layers(mol_model(stage=2, router_input=router_input))["base_model.model.model.layers.0.self_attn.o_proj"]
    x = torch.randn(4, 6, 32)
    prompt = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]).bool()
    router = layer.mixture_of_loras_router["default"]
    if router_input == "prompt_mean":
        pooled = torch.stack([x[b, prompt[b]].mean(dim=0) for b in range(4)])
    else:
        pooled = torch.stack([x[b, prompt[b].nonzero().max()] for b in range(4)])
    chosen = (pooled @ router.T).argmax(dim=-1)
    assert len(set(chosen.tolist())) > 1  # the sequences do get different experts
    layer.prompt_routing = PromptRouting(prompt, choices={})
    with torch.no_grad():
        assert_close(layer(x), expert_formula(layer, x, chosen))
    # a stage-2 training forward with task ids applies each sample's own expert ("label"), or still the router's
    task_ids = (chosen + 1) % 3
    layer.task_ids = task_ids
    for routing, experts in (("label", task_ids), ("router", chosen)):
        layer.settings["default"] = MixtureOfLorasSettings(2, router_input, routing)
        layer.prompt_routing = PromptRouting(prompt, choices={})
        with torch.no_grad():
            assert_close(layer.train()(x), expert_formula(layer, x, experts))


def test_the_model_routes_from_the_prompt_only_and_adds_the_router_loss(monkeypatch):
    model, ids, task_ids = mol_model(stage=2), token_ids(2, 7), torch.tensor([1, 2])
    router_logits, original = [], MixtureOfLorasLinear.router_logits

    def recorded(self, tokens, adapter_name):
        router_logits.append(original(self, tokens, adapter_name))
        return router_logits[-1]

    monkeypatch.setattr(MixtureOfLorasLinear, "router_logits", recorded)
    changed = ids.clone()
    changed[:, PROMPT:] = (changed[:, PROMPT:] + 5) % VOCAB  # another response: the same experts
    with torch.no_grad():
        out = model(input_ids=ids, labels=prompt_labels(ids), task_ids=task_ids)
        expected = torch.stack([F.cross_entropy(logits, task_ids) for logits in router_logits]).mean()
        assert len(router_logits) == len(layers(model)) and set(out.aux_losses) == {"router_loss"}
        assert_close(out.aux_losses["router_loss"], expected)
        assert_close(out.loss, causal_lm_loss(out.logits, prompt_labels(ids)) + 1.0 * expected)
        choices = {name: layer.prompt_routing.choices[(id(layer), "default")] for name, layer in layers(model).items()}
        model(input_ids=changed, labels=prompt_labels(changed), task_ids=task_ids)
        for name, layer in layers(model).items():
            assert torch.equal(layer.prompt_routing.choices[(id(layer), "default")], choices[name]), name
    with torch.no_grad():  # without labels every token is the prompt: the whole sequence decides
        model(input_ids=ids[:, :PROMPT])
        for name, layer in layers(model).items():
            assert torch.equal(layer.prompt_routing.choices[(id(layer), "default")], choices[name]), name


def test_a_forward_without_or_with_wrong_task_ids_names_them():
    model, ids = mol_model(stage=1), token_ids(2, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="pass `task_ids`"):
        model(input_ids=ids)
    with torch.no_grad(), pytest.raises(ValueError, match="one task id per sample"):
        model(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    with torch.no_grad(), pytest.raises(ValueError, match=r"ids must be in \[0, num_tasks=3\)"):
        model(input_ids=ids, task_ids=torch.tensor([0, 3]))
    stage2 = mol_model(stage=2)
    with torch.no_grad(), pytest.raises(ValueError, match="sequences \\[0, 1\\] have none"):
        stage2(input_ids=ids, labels=ids)  # every token labelled: no prompt to route from
    with pytest.raises(ValueError, match="cannot be merged"):
        stage2.merge_and_unload()


# ---------------------------------------------------------------------------------------------------------------
# What each stage trains


def test_stage1_trains_only_each_examples_task_expert(tmp_path):
    model = mol_model(stage=1)
    for layer in layers(model).values():
        assert not layer.mixture_of_loras_router["default"].requires_grad
        assert layer.mixture_of_loras_A["default"].requires_grad and layer.mixture_of_loras_B["default"].requires_grad
    before = all_parameters(model)
    one_step(model, rows(token_ids(2, 8, seed=3), tasks=[0, 2]), tmp_path, batch_size=2)
    after = all_parameters(model)
    for name, value in before.items():
        if name.endswith(("mixture_of_loras_A.default", "mixture_of_loras_B.default")):
            assert torch.equal(after[name][1], value[1]), name  # task 1 had no example: bit-identical
            assert not torch.equal(after[name][0], value[0]) and not torch.equal(after[name][2], value[2]), name
        else:  # base weights and routers
            assert torch.equal(after[name], value), name


@pytest.mark.parametrize("train_experts", [True, False])
def test_stage2_trains_the_routers_and_the_experts_unless_told_not_to(train_experts, tmp_path):
    model = mol_model(stage=2, stage2_train_experts=train_experts)
    for layer in layers(model).values():
        assert layer.mixture_of_loras_router["default"].requires_grad
        assert layer.mixture_of_loras_A["default"].requires_grad is train_experts
        assert layer.mixture_of_loras_B["default"].requires_grad is train_experts
    before = all_parameters(model)
    trainer = one_step(model, rows(token_ids(3, 8, seed=4), tasks=[0, 1, 2]), tmp_path, batch_size=3)
    after = all_parameters(model)
    assert trainer.state.log_history[0]["lora_moe/router_loss"] > 0
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        if "mixture_of_loras_router" in name:
            assert moved, name
        elif "mixture_of_loras_" in name:
            assert moved is train_experts, name
        else:
            assert not moved, name


def test_gradient_accumulation_gives_the_same_router_loss_contribution(tmp_path):
    """One SGD step on 4 rows (3 tasks, equal label counts): batch 4 vs batch 1 with 4 accumulation steps (and
    activation checkpointing). Each micro-batch's router loss is weighted by its share of the label tokens, so the
    step is the same."""
    train_rows = rows(token_ids(4, 8, seed=5), tasks=[0, 1, 2, 1])

    def step(batch_size, accumulation, coef, **options):
        model = mol_model(stage=2, router_loss_coef=coef)
        trainer = one_step(model, train_rows, tmp_path, batch_size, accumulation, **options)
        return all_parameters(model), trainer.state.log_history[0]

    full, full_log = step(4, 1, coef=1.0)
    accumulated, accumulated_log = step(1, 4, coef=1.0, activation_checkpointing=True)
    without, _ = step(4, 1, coef=0.0)
    router = "base_model.model.model.layers.0.self_attn.q_proj.mixture_of_loras_router.default"
    assert (full[router] - without[router]).abs().max() > 1e-3  # the router loss moves the router
    for name in full:  # float sums in another order, after an SGD step of learning rate 0.5
        assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-5)
    assert_close(accumulated_log["loss"], full_log["loss"], rtol=1e-5, atol=1e-6)
    assert_close(accumulated_log["lora_moe/router_loss"], full_log["lora_moe/router_loss"], rtol=1e-5, atol=1e-6)
    assert full_log["lora_moe/aux_loss"] == full_log["lora_moe/router_loss"]


# ---------------------------------------------------------------------------------------------------------------
# Generation


def spy_on_choices(monkeypatch) -> list[dict]:
    """Every call of `choose_experts`: {(layer, adapter): experts}, in call order."""
    calls, original = [], MixtureOfLorasLinear.choose_experts

    def choose(self, tokens, adapter_name):
        experts = original(self, tokens, adapter_name)
        calls.append((id(self), experts.clone()))
        return experts

    monkeypatch.setattr(MixtureOfLorasLinear, "choose_experts", choose)
    return calls


def test_generate_keeps_the_prompts_choice_for_every_token_with_and_without_cache(monkeypatch):
    model, prompt = mol_model(stage=2, seed=3), token_ids(4, 5, seed=6)
    with torch.no_grad():
        model(input_ids=prompt)
    on_prompt = {id(layer): layer.prompt_routing.choices[(id(layer), "default")] for layer in layers(model).values()}
    assert len({tuple(experts.tolist()) for experts in on_prompt.values()}) > 1  # the routers do choose
    calls = spy_on_choices(monkeypatch)
    cached = generate_with_and_without_cache(model, 6, input_ids=prompt)
    assert len(calls) == 2 * 6 * len(on_prompt)  # every layer, every step of both runs
    for layer, experts in calls:
        assert torch.equal(experts, on_prompt[layer])
    # the last step's scores are the forward's logits on the sequence routed from the prompt (its labels mark it)
    sequence = cached.sequences[:, :-1]
    labels = sequence.clone()
    labels[:, :prompt.shape[1]] = -100
    with torch.no_grad():
        logits = model(input_ids=sequence, labels=labels).logits[:, -1]
        routed_on_everything = model(input_ids=sequence).logits[:, -1]
    assert_close(cached.scores[-1], logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cached.scores[-1], routed_on_everything, atol=1e-4)  # the prompt is what decides


def test_a_cache_from_the_prompts_forward_keeps_its_choice_and_an_unknown_cache_is_refused():
    model, prompt = mol_model(stage=2, seed=3), token_ids(2, 5, seed=6)
    with torch.no_grad():
        first = model(input_ids=prompt, use_cache=True)
        chosen = {id(layer): layer.prompt_routing.choices[(id(layer), "default")] for layer in layers(model).values()}
        step = model(input_ids=first.logits[:, -1:].argmax(-1), cache=first.cache, use_cache=True)
        for layer in layers(model).values():
            assert torch.equal(layer.prompt_routing.choices[(id(layer), "default")], chosen[id(layer)])
        whole = model(input_ids=torch.cat([prompt, first.logits[:, -1:].argmax(-1)], dim=1),
                      labels=torch.cat([torch.full_like(prompt, -100), prompt[:, :1]], dim=1))
        assert_close(step.logits[:, -1], whole.logits[:, -1], rtol=1e-5, atol=1e-5)
        other = tiny_llama()(input_ids=prompt, use_cache=True).cache  # a cache no prompt forward of ours returned
        with pytest.raises(ValueError, match="continues a cache that no prompt forward"):
            model(input_ids=prompt[:, :1], cache=other, use_cache=True)


def test_stage1_generate_uses_the_task_ids_for_every_token():
    model, prompt, task_ids = mol_model(stage=1), token_ids(2, 5), torch.tensor([2, 0])
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(input_ids=prompt, task_ids=task_ids, use_cache=True, **options)
    uncached = model.generate(input_ids=prompt, task_ids=task_ids, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    beams = model.generate(input_ids=prompt, task_ids=task_ids, num_beams=2, num_return_sequences=2, **options)
    assert beams.shape == (4, 10)


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def test_saved_adapters_reload_in_a_fresh_process_with_identical_logits(tmp_path):
    """Both stages through `PeftModel.from_pretrained`; stage 2 also through transformers' own `load_adapter`,
    whose `generate` keeps the prompt's choice through the cache."""
    ids, task_ids = token_ids(2, 6), torch.tensor([1, 2])
    tiny_llama().save_pretrained(tmp_path / "base")
    for stage in (1, 2):
        model = mol_model(stage=stage)
        model.save_pretrained(tmp_path / f"stage{stage}")
        with torch.no_grad():
            torch.save(model(input_ids=ids, task_ids=task_ids).logits, tmp_path / f"stage{stage}.pt")
    torch.save(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
               tmp_path / "generated.pt")
    script = textwrap.dedent(f"""
        import torch, hf_moe
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        folder, ids = {str(tmp_path)!r}, torch.tensor({ids.tolist()})
        for stage in (1, 2):
            base = AutoModelForCausalLM.from_pretrained(folder + "/base")
            model = PeftModel.from_pretrained(base, folder + f"/stage{{stage}}").eval()
            config = model.peft_config["default"]
            assert type(config).__name__ == "MixtureOfLorasConfig" and config.stage == stage
            assert config.task_names == {TASKS!r}
            with torch.no_grad():
                logits = model(input_ids=ids, task_ids=torch.tensor({task_ids.tolist()})).logits
            torch.testing.assert_close(logits, torch.load(folder + f"/stage{{stage}}.pt"), rtol=0, atol=0)
        generated = torch.load(folder + "/generated.pt")
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0), generated)
        plain = AutoModelForCausalLM.from_pretrained(folder + "/base")
        plain.load_adapter(folder + "/stage2")
        assert torch.equal(plain.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0), generated)
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# The two-stage recipe


SHORT = {"training.max_steps": 2, "training.per_device_train_batch_size": 4, "training.save_strategy": "no",
         "training.logging_steps": 1, "training.use_cpu": True, "training.disable_tqdm": True,
         "training.dataloader_num_workers": 0, "data.max_length": 32}


@pytest.fixture(scope="module")
def mixed_tasks(tmp_path_factory) -> str:
    """The first four examples of each of three shipped tasks (rows with task, prompt, answer, text), interleaved."""
    examples = [json.loads(line) for line in (tasks_path() / "train.jsonl").read_text().splitlines()]
    by_task = {task: [row for row in examples if row["task"] == task][:4] for task in ("add", "sort", "upper")}
    picked = [row for group in zip(*by_task.values()) for row in group]
    path = tmp_path_factory.mktemp("mixed") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in picked))
    return str(path)


def run_stage(stage: int, data: str, output_dir, **overrides):
    return run_recipe(f"{RECIPES}/mixture_of_loras_stage{stage}.yaml", model=str(tiny_llama_path()),
                      output_dir=str(output_dir), **{"data.train_file": data, **SHORT, **overrides})


def test_the_two_stage_recipe_runs_end_to_end(mixed_tasks, tmp_path):
    first = run_stage(1, mixed_tasks, tmp_path / "stage1")
    saved = json.loads((tmp_path / "stage1" / "adapter_config.json").read_text())
    assert saved["stage"] == 1 and saved["task_names"] == ["add", "sort", "upper"] and saved["num_tasks"] == 3
    assert first.trainer.state.global_step == 2
    # stage 2 with frozen experts: they are stage 1's, bit for bit; the routers train on their loss
    second = run_stage(2, mixed_tasks, tmp_path / "stage2", init_adapter=str(tmp_path / "stage1"),
                       **{"peft.stage2_train_experts": False})
    saved = json.loads((tmp_path / "stage2" / "adapter_config.json").read_text())
    assert saved["stage"] == 2 and saved["task_names"] == ["add", "sort", "upper"] and saved["r"] == 8
    assert any("lora_moe/router_loss" in entry for entry in second.trainer.state.log_history)
    from safetensors.torch import load_file

    stage1 = load_file(tmp_path / "stage1" / "adapter_model.safetensors")
    stage2 = load_file(tmp_path / "stage2" / "adapter_model.safetensors")
    assert stage1.keys() == stage2.keys()
    for name in stage1:
        assert torch.equal(stage1[name], stage2[name]) is ("router" not in name), name
    # the stage-2 adapter generates without task ids
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path()),
                                      str(tmp_path / "stage2")).eval()
    generated = model.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, min_new_tokens=3,
                               do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("overrides, field", [
    ({"init_adapter": None}, "`init_adapter`=None"),
    ({"peft.stage": 3}, "`stage`=3"),
    ({"peft.r": 4}, "`peft.r`=4"),
    ({"data.text_field": "text", "data.prompt_field": None, "data.response_field": None,
      "data.prompt_template": None}, "`data.text_field`='text'"),
    ({"data.task_field": None}, "`data.task_field`"),
    ({"init_adapter": "missing-folder"}, "`init_adapter`='missing-folder'"),
])
def test_bad_stage2_recipes_name_the_field(overrides, field, mixed_tasks, tmp_path):
    (tmp_path / "stage1").mkdir()
    config = hf_moe.MixtureOfLorasConfig(**{**MOL, "r": 8, "task_names": ["add", "sort", "upper"]})
    peft_model(config, base=AutoModelForCausalLM.from_pretrained(tiny_llama_path())).save_pretrained(
        tmp_path / "stage1")
    options = {"init_adapter": str(tmp_path / "stage1"), **overrides}
    with pytest.raises(ValueError, match=field):
        run_stage(2, mixed_tasks, tmp_path / "out", **options)


def test_init_adapter_is_refused_outside_stage2(mixed_tasks, tmp_path):
    with pytest.raises(ValueError, match="`init_adapter`='somewhere' is invalid: only Mixture-of-LoRAs stage 2"):
        run_stage(1, mixed_tasks, tmp_path / "out", init_adapter="somewhere")
