"""Expert Gate: one LoRA expert and one autoencoder per task; training forwards use the sample's task, inference the
expert of the autoencoder that reconstructs the prompt's frozen features best, kept for every generated token.
The gate against its formulas, the layer against the formula, what trains, the decision from the prompt only,
generate with and without a cache, save/load in a fresh process, gradient accumulation, adding a task, the recipe."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import generate_with_and_without_cache
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from test_lora_moe import VOCAB, peft_model, tiny_llama, token_ids
from test_lora_moe_mixture_of_loras import PROMPT, one_step, prompt_labels, rows
from test_recipes import RECIPES
from torch.testing import assert_close
from transformers import AutoTokenizer

import hf_moe
from hf_moe.data import tasks_path, tiny_llama_path
from hf_moe.finetune.lora_moe import ExpertGateLinear, ExpertGateModel
from hf_moe.finetune.lora_moe.expert_gate import (
    AUTOENCODER_PARAMETERS,
    STATISTICS_BUFFERS,
    add_task,
    calibrate_feature_statistics,
    copy_expert,
    route_prompts,
    task_relatedness,
)
from hf_moe.finetune.lora_moe.prompt_routing import PromptRouting, prompt_features
from hf_moe.finetune.recipes import run_recipe

TASKS = ["add", "sort", "upper"]
EG = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "r": 4, "task_names": TASKS, "autoencoder_dim": 8}


@torch.no_grad()
def randomize_experts_(model, std: float = 0.3):
    """Random LoRA experts (B included); the autoencoders keep their (random) initialisation."""
    for name, param in model.named_parameters():
        if "expert_gate_A" in name or "expert_gate_B" in name:
            param.copy_(std * torch.randn_like(param))
    return model


def eg_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return randomize_experts_(peft_model(hf_moe.ExpertGateConfig(**{**EG, **overrides}), randomize=False))


def layers(model) -> dict[str, ExpertGateLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ExpertGateLinear)}


def all_tensors(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in [*model.named_parameters(), *model.named_buffers()]}


def decision(model, adapter: str = "default") -> torch.Tensor:
    """The experts this model's latest forward decided on its prompt."""
    return next(iter(layers(model).values())).prompt_routing.choices[("expert_gate", adapter)]


def gate_formula(tuner, features: torch.Tensor, temperature: float = 2.0, adapter: str = "default"):
    """The paper's gate written out: x = sigmoid((z - mu) / sqrt(var + 1e-5)); per task k, A_k(x) = sigmoid(W_d
    relu(W_e x + b_e) + b_d), er_k = ||x - A_k(x)||^2; p = softmax(-er / t). -> (x, reconstructions [K], er, p)."""
    mean, var = tuner.expert_gate_feature_mean[adapter], tuner.expert_gate_feature_var[adapter]
    w_e, b_e, w_d, b_d = (getattr(tuner, name)[adapter] for name in AUTOENCODER_PARAMETERS)
    x = 1 / (1 + torch.exp(-(features - mean) / torch.sqrt(var + 1e-5)))
    reconstructions = [torch.sigmoid(torch.relu(x @ w_e[k].T + b_e[k]) @ w_d[k].T + b_d[k]) for k in range(len(w_e))]
    errors = torch.stack([((x - a) ** 2).sum(dim=-1) for a in reconstructions], dim=-1)
    weights = torch.exp(-errors / temperature)
    return x, reconstructions, errors, weights / weights.sum(dim=-1, keepdim=True)


def expert_formula(layer, x, experts, adapter="default"):
    """W x + b + (alpha / r) B_e A_e x, one expert e per sequence, written out token by token."""
    lora_a, lora_b = layer.expert_gate_A[adapter], layer.expert_gate_B[adapter]
    expected = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            expected[b, s] += (16 / 4) * (lora_b[experts[b]] @ (lora_a[experts[b]] @ x[b, s]))
    return expected


# ---------------------------------------------------------------------------------------------------------------
# Config, parameters, errors


def test_registered_and_every_field_is_saved_with_the_autoencoders_once(tmp_path):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import PeftType

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType("EXPERT_GATE")] is hf_moe.ExpertGateConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType("EXPERT_GATE")] == "expert_gate_"
    defaults = hf_moe.ExpertGateConfig()
    assert (defaults.autoencoder_dim, defaults.temperature, defaults.autoencoder_loss) == (100, 2.0, "cross_entropy")
    model = eg_model(temperature=1.5, reconstruction_error="mean", autoencoder_loss="squared_error",
                     autoencoder_loss_coef=0.5, statistics_samples=64)
    tuner = model.base_model
    assert isinstance(tuner, ExpertGateModel) and model.peft_config["default"].feature_layer == 1  # 2 layers // 2
    shapes = [tuple(getattr(tuner, name)["default"].shape) for name in AUTOENCODER_PARAMETERS]
    assert shapes == [(3, 8, 32), (3, 8), (3, 32, 8), (3, 32)]
    layer = layers(model)["base_model.model.model.layers.1.mlp.down_proj"]
    assert layer.expert_gate_A["default"].shape == (3, 4, 64) and layer.expert_gate_B["default"].shape == (3, 32, 4)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {**EG, "peft_type": "EXPERT_GATE", "num_tasks": 3, "feature_layer": 1, "temperature": 1.5,
                "reconstruction_error": "mean", "autoencoder_loss": "squared_error", "autoencoder_loss_coef": 0.5,
                "statistics_samples": 64}
    for name, value in expected.items():
        assert saved[name] == value, name
    assert {**PeftConfig.from_pretrained(tmp_path).to_dict(), "inference_mode": False} == \
        model.peft_config["default"].to_dict()
    weights = load_file(tmp_path / "adapter_model.safetensors")
    model_level = sorted(name for name in weights if "layers" not in name)  # once, on the tuner, no adapter name
    assert model_level == sorted(f"base_model.{name}" for name in (*AUTOENCODER_PARAMETERS, *STATISTICS_BUFFERS))
    assert len(weights) == len(model_level) + 2 * len(layers(model))


@pytest.mark.parametrize("options, field", [
    ({"feature_layer": -1}, "`feature_layer`=-1 is invalid"),
    ({"feature_layer": True}, "`feature_layer`=True"),
    ({"autoencoder_dim": 0}, "`autoencoder_dim`=0"),
    ({"temperature": 0}, "`temperature`=0 is invalid: must be > 0"),
    ({"reconstruction_error": "max"}, r"`reconstruction_error`='max' is invalid: allowed values: \['sum', 'mean'\]"),
    ({"autoencoder_loss": "l1"}, r"allowed values: \['cross_entropy', 'squared_error'\]"),
    ({"autoencoder_loss_coef": -1.0}, "`autoencoder_loss_coef`=-1.0"),
    ({"statistics_samples": 1.5}, "`statistics_samples`=1.5"),
    ({"task_names": ["a", "a"]}, "`task_names`"),
])
def test_invalid_fields_are_named_with_what_is_allowed(options, field):
    with pytest.raises(ValueError, match=field):
        hf_moe.ExpertGateConfig(**{**EG, **options})


@pytest.mark.parametrize("options, field", [
    ({"feature_layer": 3}, r"`feature_layer`=3 is invalid: must be in \[0, 2\]"),
    ({"autoencoder_dim": 32}, "`autoencoder_dim`=32 is invalid: must be below the model's hidden size 32"),
    ({"task_names": None}, "`num_tasks` is None and so is `task_names`"),
])
def test_fields_that_do_not_fit_the_model_are_named_when_it_is_built(options, field):
    with pytest.raises(ValueError, match=field):
        peft_model(hf_moe.ExpertGateConfig(**{**EG, **options}))


def test_merge_and_direct_injection_are_refused():
    from peft import inject_adapter_in_model

    with pytest.raises(ValueError, match="cannot be merged"):
        eg_model().merge_and_unload()
    with pytest.raises(ValueError, match="uses shared state"):
        inject_adapter_in_model(hf_moe.ExpertGateConfig(**EG), tiny_llama())


# ---------------------------------------------------------------------------------------------------------------
# The gate and the layer = the formulas


def test_gate_errors_relevance_and_loss_follow_the_formulas():
    model = eg_model(statistics_samples=5)
    tuner, ids = model.base_model, token_ids(3, 7, seed=2)
    with torch.no_grad():
        model.train()(input_ids=ids, labels=prompt_labels(ids), task_ids=torch.tensor([0, 1, 2]))
        model.train()(input_ids=ids, labels=prompt_labels(ids), task_ids=torch.tensor([0, 1, 2]))
    features = prompt_features(model.get_base_model(), 1, prompt_labels(ids).eq(-100), input_ids=ids)
    first5 = torch.cat([features, features])[:5].double()  # the statistics: the first 5 training prompts, then frozen
    assert tuner.expert_gate_feature_count["default"].item() == 5
    assert_close(tuner.expert_gate_feature_mean["default"], first5.mean(0).float())
    assert_close(tuner.expert_gate_feature_var["default"], first5.var(0, unbiased=False).float())
    x, reconstructions, errors, relevance = gate_formula(tuner, features)
    task_ids = torch.tensor([2, 0, 2])
    gate = tuner.autoencoder_gate(features, "default", task_ids=task_ids)
    assert_close(gate.inputs, x)
    assert_close(gate.errors, errors)
    assert_close(gate.relevance, relevance)
    assert torch.equal(gate.expert, errors.argmin(dim=-1))
    # the paper's cross-entropy, minus the target's entropy, of each sample's own task autoencoder, mean over dims
    own = torch.stack([reconstructions[task][b] for b, task in enumerate(task_ids.tolist())])
    cross_entropy = -(x * torch.log(own) + (1 - x) * torch.log(1 - own))
    entropy = -(x * torch.log(x) + (1 - x) * torch.log(1 - x))
    assert_close(gate.loss, (cross_entropy - entropy).mean(dim=-1), rtol=1e-4, atol=1e-6)
    # the relatedness of the paper's eq. 2
    assert hf_moe.finetune.lora_moe.expert_gate.relatedness(2.0, 3.0) == 1 - (3.0 - 2.0) / 2.0


def test_the_layer_applies_the_task_expert_in_training_and_the_gates_choice_at_eval():
    model = eg_model(statistics_samples=0)  # no statistics: x = sigmoid(z)
    tuner = model.base_model
    layer = layers(model)["base_model.model.model.layers.0.self_attn.o_proj"]
    x, features = torch.randn(4, 6, 32), 3 * torch.randn(4, 32)
    chosen = gate_formula(tuner, features)[2].argmin(dim=-1)
    assert len(set(chosen.tolist())) > 1  # the sequences do get different experts
    task_ids = (chosen + 1) % 3
    cases = ((False, task_ids, chosen), (True, task_ids, task_ids), (True, None, chosen))
    for training, given, experts in cases:  # eval ignores the task ids; training without them uses the gate
        layer.train(training)
        layer.task_ids = given
        layer.prompt_routing = PromptRouting(None, choices={}, features={1: features})
        with torch.no_grad():
            assert_close(layer(x), expert_formula(layer, x, experts))
    layer.prompt_routing = PromptRouting(None, choices={}, continuing=True)  # decoding on an unknown cache
    with pytest.raises(ValueError, match="continues a cache that no prompt forward"):
        layer(x)


def test_the_autoencoder_loss_reaches_only_each_samples_task_autoencoder():
    model, ids = eg_model(seed=1).train(), token_ids(2, 8, seed=3)
    task_ids = torch.tensor([0, 2])
    out = model(input_ids=ids, labels=prompt_labels(ids), task_ids=task_ids)
    assert set(out.aux_losses) == {"autoencoder_loss", "gate_accuracy"}
    features = prompt_features(model.get_base_model(), 1, prompt_labels(ids).eq(-100), input_ids=ids)
    assert out.aux_losses["gate_accuracy"] == (gate_formula(model.base_model, features)[2].argmin(-1) ==
                                               task_ids).float().mean()
    out.aux_losses["autoencoder_loss"].backward()
    for name in AUTOENCODER_PARAMETERS:
        grad = getattr(model.base_model, name)["default"].grad
        assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0, name
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), name  # task 1 had no sample
    for layer in layers(model).values():  # the loss reads frozen features only: no expert gets a gradient
        assert layer.expert_gate_A["default"].grad is None


def test_the_decision_comes_from_the_prompt_only():
    model = eg_model(statistics_samples=4)
    ids = token_ids(4, 8, seed=5)
    calibrate_feature_statistics(model, [{"input_ids": ids, "labels": prompt_labels(ids)}])  # then frozen
    changed = ids.clone()
    changed[:, PROMPT:] = (changed[:, PROMPT:] + 7) % VOCAB  # another response
    with torch.no_grad():
        model.eval()(input_ids=ids[:, :PROMPT])
        on_prompt = decision(model)
        assert len(set(on_prompt.tolist())) > 1
        assert torch.equal(on_prompt, route_prompts(model, ids[:, :PROMPT]).expert)
        for sequence in (ids, changed):  # an eval forward on prompt + response, marked by its labels
            model(input_ids=sequence, labels=prompt_labels(sequence))
            assert torch.equal(decision(model), on_prompt)
        model.train()(input_ids=changed, labels=prompt_labels(changed))  # training forward without task ids
        assert torch.equal(decision(model), on_prompt)
        model(input_ids=changed, labels=prompt_labels(changed), task_ids=torch.tensor([2, 2, 0, 1]))
        assert decision(model).tolist() == [2, 2, 0, 1]
        model.eval()(input_ids=ids)  # without labels every token is the prompt
        assert torch.equal(decision(model), route_prompts(model, ids).expert)


# ---------------------------------------------------------------------------------------------------------------
# Training: gradient accumulation


def test_gradient_accumulation_gives_the_same_autoencoder_loss_contribution(tmp_path):
    """One SGD step on 4 rows (3 tasks, equal label counts): batch 4 vs batch 1 with 4 accumulation steps (and
    activation checkpointing), with statistics calibrated beforehand. Each micro-batch's autoencoder loss is
    weighted by its share of the label tokens, so the step is the same."""
    ids = token_ids(4, 8, seed=5)
    train_rows = rows(ids, tasks=[0, 1, 2, 1])

    def step(batch_size, accumulation, coef, **options):
        model = eg_model(statistics_samples=4, autoencoder_loss_coef=coef)
        assert calibrate_feature_statistics(model, [{"input_ids": ids, "labels": prompt_labels(ids)}]) == 4
        trainer = one_step(model, train_rows, tmp_path, batch_size, accumulation, **options)
        return all_tensors(model), trainer.state.log_history[0]

    full, full_log = step(4, 1, coef=1.0)
    accumulated, accumulated_log = step(1, 4, coef=1.0, activation_checkpointing=True)
    without, _ = step(4, 1, coef=0.0)
    decoder = "base_model.expert_gate_decoder_bias.default"
    assert (full[decoder] - without[decoder]).abs().max() > 1e-3  # the loss moves the autoencoders
    for name in full:  # float sums in another order, after an SGD step of learning rate 0.5
        assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-5)
    assert_close(accumulated_log["loss"], full_log["loss"], rtol=1e-5, atol=1e-6)
    for name in ("autoencoder_loss", "gate_accuracy"):
        assert_close(accumulated_log[f"lora_moe/{name}"], full_log[f"lora_moe/{name}"], rtol=1e-5, atol=1e-6)
    assert full_log["lora_moe/aux_loss"] == full_log["lora_moe/autoencoder_loss"]


# ---------------------------------------------------------------------------------------------------------------
# Generation and save / load


def test_generate_keeps_the_prompts_decision_with_and_without_cache(monkeypatch):
    model, prompt = eg_model(seed=3, statistics_samples=4), token_ids(4, 5, seed=6)
    calibrate_feature_statistics(model, [{"input_ids": prompt}])
    expected = route_prompts(model, prompt).expert
    assert len(set(expected.tolist())) > 1
    calls, original = [], ExpertGateModel.autoencoder_gate

    def gate(self, *args, **kwargs):
        calls.append(original(self, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(ExpertGateModel, "autoencoder_gate", gate)
    generate_with_and_without_cache(model, 6, input_ids=prompt)
    assert len(calls) == 2 and all(torch.equal(call.expert, expected) for call in calls)  # once per generate
    assert torch.equal(decision(model), expected)


def test_saved_adapter_reloads_in_a_fresh_process_with_identical_logits(tmp_path):
    ids = token_ids(2, 6)
    tiny_llama().save_pretrained(tmp_path / "base")
    model = eg_model(seed=2)
    calibrate_feature_statistics(model, [{"input_ids": token_ids(4, 6, seed=9)}])
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, tmp_path / "logits.pt")
    torch.save(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
               tmp_path / "generated.pt")
    torch.save(route_prompts(model, ids).relevance, tmp_path / "relevance.pt")
    script = textwrap.dedent(f"""
        import torch, hf_moe
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from hf_moe.finetune.lora_moe.expert_gate import route_prompts
        folder, ids = {str(tmp_path)!r}, torch.tensor({ids.tolist()})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder + "/base"),
                                          folder + "/adapter").eval()
        config = model.peft_config["default"]
        assert type(config).__name__ == "ExpertGateConfig" and config.task_names == {TASKS!r}
        assert model.base_model.expert_gate_feature_count["default"].item() == 4
        assert not model.base_model.expert_gate_encoder_weight["default"].requires_grad  # loaded for inference
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, torch.load(folder + "/logits.pt"), rtol=0, atol=0)
        torch.testing.assert_close(route_prompts(model, ids).relevance, torch.load(folder + "/relevance.pt"),
                                   rtol=0, atol=0)
        generated = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, torch.load(folder + "/generated.pt"))
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Lifelong learning: a new task


def test_a_new_task_leaves_the_old_experts_and_autoencoders_unchanged(tmp_path):
    model = eg_model(seed=4)
    ids = token_ids(4, 8, seed=7)
    calibrate_feature_statistics(model, [{"input_ids": ids, "labels": prompt_labels(ids)}])
    before = all_tensors(model)
    assert add_task(model, "reverse") == 3
    config = model.peft_config["default"]
    assert config.task_names == [*TASKS, "reverse"] and config.num_tasks == 4
    assert config.statistics_samples == 4  # frozen where they were: the old autoencoders keep their inputs
    added = all_tensors(model)
    for name, value in before.items():
        grown = "expert_gate_" in name and "feature" not in name  # one more row: the new task's
        assert torch.equal(added[name][:3] if grown else added[name], value), name
    assert all(torch.equal(layer.expert_gate_B["default"][3], torch.zeros_like(layer.expert_gate_B["default"][3]))
               for layer in layers(model).values())
    # train the new task only: the old rows do not move (zero gradients, no weight decay), the new ones do
    one_step(model, rows(token_ids(2, 8, seed=8), tasks=[3, 3]), tmp_path, batch_size=2)
    trained = all_tensors(model)
    for name, value in added.items():
        if "expert_gate_" in name and "feature" not in name:
            assert torch.equal(trained[name][:3], value[:3]), name
            assert not torch.equal(trained[name][3], value[3]) or name.endswith("expert_gate_A.default"), name
        else:
            assert torch.equal(trained[name], value), name
    # relatedness of the new task to each old one (eq. 2), from the mean errors on the new task's data
    batch = {"input_ids": token_ids(3, 8, seed=8), "labels": prompt_labels(token_ids(3, 8, seed=8))}
    errors = route_prompts(model, **batch).errors.mean(dim=0)
    related = task_relatedness(model, [batch], "reverse")
    assert related.keys() == set(TASKS)
    for index, name in enumerate(TASKS):
        assert math.isclose(related[name], 1 - (errors[index] - errors[3]).item() / errors[3].item(), rel_tol=1e-5)
    assert copy_expert(model, "sort", "reverse") == len(layers(model))
    for layer in layers(model).values():
        assert torch.equal(layer.expert_gate_A["default"][3], layer.expert_gate_A["default"][1])
    model.save_pretrained(tmp_path / "grown")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "grown").eval()
    assert reloaded.peft_config["default"].num_tasks == 4
    with torch.no_grad():
        assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The recipe


@pytest.fixture(scope="module")
def six_tasks(tmp_path_factory) -> str:
    """Twelve examples of each of the six shipped tasks, interleaved."""
    examples = [json.loads(line) for line in (tasks_path() / "train.jsonl").read_text().splitlines()]
    names = sorted({row["task"] for row in examples})
    by_task = [[row for row in examples if row["task"] == task][:12] for task in names]
    path = tmp_path_factory.mktemp("six") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for group in zip(*by_task) for row in group))
    return str(path)


SHORT = {"training.max_steps": 6, "training.per_device_train_batch_size": 12, "training.save_strategy": "no",
         "training.logging_steps": 1, "training.use_cpu": True, "training.disable_tqdm": True,
         "training.dataloader_num_workers": 0, "data.max_length": 32}


def test_the_recipe_trains_a_gate_that_routes_eval_prompts_to_their_task(six_tasks, tmp_path):
    result = run_recipe(f"{RECIPES}/expert_gate.yaml", model=str(tiny_llama_path()), output_dir=str(tmp_path / "out"),
                        **{"data.train_file": six_tasks, **SHORT})
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    names = saved["task_names"]
    assert names == ["add", "count", "python", "reverse", "sort", "upper"] and saved["peft_type"] == "EXPERT_GATE"
    assert all("lora_moe/autoencoder_loss" in entry for entry in result.trainer.state.log_history[:-1])
    model = result.trainer.model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path(), padding_side="left")
    examples = [json.loads(line) for line in (tasks_path() / "eval.jsonl").read_text().splitlines()]
    examples = [row for task in names for row in [row for row in examples if row["task"] == task][:20]]
    batch = tokenizer([row["prompt"] for row in examples], return_tensors="pt", padding=True)
    chosen = route_prompts(model, batch["input_ids"], batch["attention_mask"]).expert
    truth = torch.tensor([names.index(row["task"]) for row in examples])
    accuracy = (chosen == truth).float().mean().item()
    assert accuracy >= 0.8, accuracy  # the tasks are easy to tell apart: a clear majority after six steps


def test_the_recipe_refuses_data_without_a_prompt(six_tasks, tmp_path):
    with pytest.raises(ValueError, match="`data.text_field`='text' is invalid: Expert Gate routes"):
        run_recipe(f"{RECIPES}/expert_gate.yaml", model=str(tiny_llama_path()), output_dir=str(tmp_path / "out"),
                   **{"data.train_file": six_tasks, **SHORT, "data.text_field": "text", "data.prompt_field": None,
                      "data.response_field": None, "data.prompt_template": None})
