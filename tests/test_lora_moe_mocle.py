"""MoCLE: each sequence's prompt falls in a k-means cluster, whose learned embedding picks one LoRA expert (top-1) per
adapted Linear, next to a universal expert. The forward against the formula written out token by token (three
mixings, with and without the universal expert, gate noise in training only), k-means on a hand-checkable example
and its determinism, the cluster decided once from the prompt and kept while generating, gradient accumulation,
unfitted centroids and bad fields, save/load in a fresh process, the recipe."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import generate_with_and_without_cache
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from test_lora_moe import VOCAB, peft_model, tiny_llama, token_ids, train_one_step
from test_lora_moe_mixture_of_loras import PROMPT, prompt_labels
from test_recipes import RECIPES
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe.data import tasks_path, tiny_llama_path
from hf_moe.finetune.lora_moe import MocleLinear, fit_clusters
from hf_moe.finetune.lora_moe.mocle import CLUSTER_KEY, ClusterRoutingRecord, kmeans, nearest_centroid
from hf_moe.finetune.lora_moe.prompt_routing import PromptRouting
from hf_moe.finetune.recipes import load_recipe, run_recipe, validate_recipe

MOCLE = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "r": 4, "universal_r": 2, "num_experts": 3,
         "num_clusters": 3, "cluster_embedding_dim": 8, "router_temperature": 0.5}
KEY = (CLUSTER_KEY, "default")


@torch.no_grad()
def randomize_(model, std: float = 0.3):
    """Random values for every adapter tensor but the centroids (B included, so no expert is at its init)."""
    for name, param in model.named_parameters():
        if "mocle_" in name and "centroids" not in name:
            param.copy_(std * torch.randn_like(param))
    return model


def fit_prompts() -> torch.Tensor:
    return token_ids(12, PROMPT + 2, seed=7)


def mocle_model(seed: int = 0, fit: bool = True, **overrides):
    torch.manual_seed(seed)
    model = randomize_(peft_model(hf_moe.MocleConfig(**{**MOCLE, **overrides}), randomize=False))
    if fit:
        fit_clusters(model, [fit_prompts()[:6], fit_prompts()[6:]])
    return model


def layers(model) -> dict[str, MocleLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MocleLinear)}


def all_parameters(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def clusters_of(model) -> torch.Tensor:
    return next(iter(layers(model).values())).prompt_routing.choices[KEY]


def mocle_formula(layer, x, clusters, mixing, noise=None, adapter="default"):
    """W x + b + w_E (alpha / r) B_i A_i x + w_U (alpha / r_U) B_U A_U x, the expert i and the weights from the gate
    of each sequence's cluster, written out token by token (alpha 32, r 4, r_U 2, temperature 0.5)."""
    t = layer.adapter_tensors(adapter)
    expected = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    for b in range(x.shape[0]):
        logits = t["gate"] @ t["cluster_embedding"][clusters[b]] + t["gate_bias"]
        logits = logits + (noise[b] if noise is not None else 0)
        gates = torch.softmax(logits / 0.5, dim=0)
        i = int(gates.argmax())
        g = gates[i]
        expert_weight, universal_weight = {"complement": (g, 1 - g), "add": (g, 1.0),
                                           "complement_squared": (g * g, 1 - g)}[mixing]
        for s in range(x.shape[1]):
            expected[b, s] += expert_weight * (32 / 4) * (t["B"][i] @ (t["A"][i] @ x[b, s]))
            if "universal_A" in t:
                expected[b, s] += universal_weight * (32 / 2) * (t["universal_B"] @ (t["universal_A"] @ x[b, s]))
    return expected


def experts_of_clusters(layer, adapter="default") -> list[int]:
    t = layer.adapter_tensors(adapter)
    return (t["cluster_embedding"] @ t["gate"].T + t["gate_bias"]).argmax(dim=-1).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_importing_hf_moe_registers_mocle():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    peft_type = PeftType("MOCLE")
    assert peft_type is PeftType["MOCLE"] and peft_type in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is hf_moe.MocleConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == "mocle_" == PEFT_TYPE_TO_TUNER_MAPPING[peft_type].prefix
    config = hf_moe.MocleConfig()
    assert config.peft_type is peft_type and config.routes_per_sequence
    assert (config.num_experts, config.num_clusters, config.cluster_embedding_dim, config.router_temperature,
            config.router_noise_std, config.r, config.lora_alpha, config.lora_dropout, config.universal_mixing) == (
        4, 64, 384, 0.05, 0.1, 8, 32, 0.1, "complement")


def test_shapes_saved_fields_and_centroids_saved_once(tmp_path):
    model = mocle_model(universal_mixing="add", router_noise_std=0.2, kmeans_seed=3)
    config = model.peft_config["default"]
    assert config.feature_layer == 1 and config.target_modules == {"q_proj", "v_proj"}  # half of 2 layers
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    shapes = {name: tuple(value.shape) for name, value in layer.adapter_tensors("default").items()}
    assert shapes == {"cluster_embedding": (3, 8), "gate": (3, 8), "gate_bias": (3,), "A": (3, 4, 32),
                      "B": (3, 16, 4), "universal_A": (2, 32), "universal_B": (16, 2)}
    owner = model.base_model.model.model.layers[0].self_attn.q_proj
    assert owner.mocle_centroids["default"].shape == (3, 32) and layer.centroids("default") is owner.centroids("default")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert not any("centroids" in name for name in trainable) and any("mocle_gate." in name for name in trainable)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {**MOCLE, "peft_type": "MOCLE", "lora_alpha": 32, "universal_mixing": "add", "router_noise_std": 0.2,
                "kmeans_seed": 3, "feature_layer": 1, "universal_expert": True, "kmeans_iterations": 300}
    for name, value in expected.items():
        assert saved[name] == value, name
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert [name for name in weights if "centroids" in name] == [
        "base_model.model.model.layers.0.self_attn.q_proj.mocle_centroids"]
    loaded = PeftConfig.from_pretrained(tmp_path).to_dict()
    assert {**loaded, "inference_mode": False} == config.to_dict()


@pytest.mark.parametrize("options, message", [
    ({"num_experts": 0}, "`num_experts`=0 is invalid: must be a positive integer"),
    ({"num_clusters": 2.5}, "`num_clusters`=2.5"),
    ({"cluster_embedding_dim": 0}, "`cluster_embedding_dim`=0"),
    ({"router_temperature": 0}, "`router_temperature`=0 is invalid: must be > 0"),
    ({"router_noise_std": -0.1}, "`router_noise_std`=-0.1"),
    ({"universal_expert": "yes"}, "`universal_expert`='yes'"),
    ({"universal_r": 0}, "`universal_r`=0"),
    ({"universal_mixing": "mean"}, (r"`universal_mixing`='mean' is invalid: allowed values: \['complement', "
                                    r"'add', 'complement_squared'\]")),
    ({"feature_layer": -1}, "`feature_layer`=-1"),
    ({"feature_layer": True}, "`feature_layer`=True"),
    ({"kmeans_seed": "0"}, "`kmeans_seed`='0'"),
    ({"kmeans_iterations": 0}, "`kmeans_iterations`=0"),
])
def test_invalid_fields_are_named_with_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        hf_moe.MocleConfig(**{**MOCLE, **options})


def test_a_feature_layer_deeper_than_the_base_is_refused():
    with pytest.raises(ValueError, match=r"`feature_layer`=3 is invalid: must be in \[0, 2\]"):
        peft_model(hf_moe.MocleConfig(**{**MOCLE, "feature_layer": 3}))


# ---------------------------------------------------------------------------------------------------------------
# Forward = the formula


@pytest.mark.parametrize("mixing, universal", [("complement", True), ("add", True), ("complement_squared", True),
                                               ("complement", False)])
def test_forward_is_the_formula_without_noise_in_eval(mixing, universal):
    model = mocle_model(universal_mixing=mixing, universal_expert=universal, router_noise_std=0.5)
    # a module whose gate sends the clusters to different experts
    layer = next(layer for layer in layers(model).values() if len(set(experts_of_clusters(layer))) > 1)
    assert ("universal_A" in layer.adapter_tensors("default")) is universal
    clusters = torch.tensor([2, 0, 1, 2])
    x = torch.randn(4, 5, 32)
    layer.prompt_routing = PromptRouting(None, choices={KEY: clusters})
    with torch.no_grad():
        out = layer(x)
        assert_close(out, mocle_formula(layer, x, clusters, mixing))
        assert torch.equal(layer(x), out)  # eval: no noise


def test_training_adds_gate_noise_before_the_temperature():
    model = mocle_model(router_noise_std=0.5)
    layer = layers(model)["base_model.model.model.layers.0.self_attn.q_proj"]
    clusters, x = torch.tensor([1, 0, 2]), torch.randn(3, 4, 32)
    layer.prompt_routing = PromptRouting(None, choices={KEY: clusters})
    layer.train()
    layer.start_recording()
    torch.manual_seed(11)
    with torch.no_grad():
        out = layer(x)
    record = layer.stop_recording()[0]
    torch.manual_seed(11)
    noise = 0.5 * torch.randn(3, 3)  # router_noise_std 0.5
    with torch.no_grad():
        assert_close(out, mocle_formula(layer, x, clusters, "complement", noise=noise))
        assert not torch.allclose(out, layer.eval()(x), atol=1e-5)
    t = layer.adapter_tensors("default")
    assert isinstance(record, ClusterRoutingRecord) and torch.equal(record.clusters, clusters)
    assert_close(record.logits, (t["cluster_embedding"][clusters] @ t["gate"].T + t["gate_bias"] + noise) / 0.5)
    assert torch.equal(record.top_k_index[:, 0], record.logits.argmax(dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# k-means


def test_kmeans_on_a_hand_checkable_example():
    points = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [10.0, 10.0], [10.0, 11.0], [11.0, 10.0]])
    for seed in range(5):
        result = kmeans(points, 2, seed=seed)
        first = int(result.assignments[0])
        assert result.assignments.tolist() == [first] * 3 + [1 - first] * 3
        assert_close(result.centroids[first], torch.tensor([1 / 3, 1 / 3]))
        assert_close(result.centroids[1 - first], torch.tensor([31 / 3, 31 / 3]))
        assert result.inertia == pytest.approx(8 / 3, rel=1e-5)  # 2 * (2/9 + 5/9 + 5/9)
    every_point = kmeans(points, 6, seed=0)
    assert every_point.inertia == 0 and sorted(every_point.assignments.tolist()) == list(range(6))
    assert torch.equal(nearest_centroid(points, every_point.centroids), every_point.assignments)
    with pytest.raises(ValueError, match="`num_clusters`=3 is invalid: the prompts' features have only 2 distinct"):
        kmeans(torch.tensor([[0.0], [0.0], [1.0], [1.0]]), 3)
    with pytest.raises(ValueError, match="`num_clusters`=7 is invalid: k-means needs at least num_clusters points"):
        kmeans(points, 7)


def test_kmeans_is_deterministic_for_a_seed():
    points = torch.rand(300, 6, generator=torch.Generator().manual_seed(0))
    results = [kmeans(points, 5, seed=seed) for seed in range(4)]
    for seed, result in enumerate(results):
        again = kmeans(points, 5, seed=seed)
        assert torch.equal(again.centroids, result.centroids) and torch.equal(again.assignments, result.assignments)
        assert torch.equal(result.assignments, nearest_centroid(points, result.centroids))
    assert len({tuple(result.centroids.flatten().tolist()) for result in results}) > 1  # the seed matters


def test_fit_clusters_stores_the_centroids_the_model_routes_by():
    model = mocle_model(fit=False)
    prompts = fit_prompts()
    fit = fit_clusters(model, [{"input_ids": prompts[:6].tolist()}, prompts[6:]])  # lists and tensors
    owner = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(owner.mocle_centroids["default"], fit.centroids) and fit.sizes.sum() == 12
    assert len(set(fit.assignments.tolist())) == 3
    with torch.no_grad():
        model(input_ids=prompts)
    assert torch.equal(clusters_of(model), fit.assignments)
    # a batch with labels: only the prompt (tokens before the first label) is read
    responses = torch.cat([prompts, token_ids(12, 4, seed=8)], dim=1)
    labels = torch.cat([torch.full_like(prompts, -100), responses[:, prompts.shape[1]:]], dim=1)
    again = fit_clusters(model, [{"input_ids": responses, "labels": labels}])
    assert torch.equal(again.centroids, fit.centroids)


# ---------------------------------------------------------------------------------------------------------------
# The cluster: decided once, on the prompt


def test_the_cluster_is_decided_once_from_the_prompt_only(monkeypatch):
    model, ids = mocle_model(), token_ids(6, 8, seed=2)
    calls, original = [], MocleLinear._nearest_clusters

    def spy(self, routing, adapter_name):
        calls.append(original(self, routing, adapter_name))
        return calls[-1]

    monkeypatch.setattr(MocleLinear, "_nearest_clusters", spy)
    with torch.no_grad():
        model(input_ids=ids, labels=prompt_labels(ids))
        trained_on = clusters_of(model)
        assert len(calls) == 1 and len(set(trained_on.tolist())) > 1  # one decision for every layer
        changed = ids.clone()
        changed[:, PROMPT:] = (changed[:, PROMPT:] + 5) % VOCAB  # another response: the same clusters
        model(input_ids=changed, labels=prompt_labels(changed))
        assert torch.equal(clusters_of(model), trained_on)
        model(input_ids=ids[:, :PROMPT])  # inference on the prompt alone
        assert torch.equal(clusters_of(model), trained_on)
        model(input_ids=ids)  # without labels the whole sequence is the prompt
        assert len(calls) == 4


def test_unfitted_centroids_are_refused_and_merging_too(tmp_path):
    model, ids = mocle_model(fit=False), token_ids(2, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="centroids of the MoCLE adapter 'default' were never fitted"):
        model(input_ids=ids)
    rows = [{"input_ids": row.tolist(), "attention_mask": [1] * 6, "labels": prompt_labels(row[None])[0].tolist()}
            for row in ids]
    with pytest.raises(ValueError, match="never fitted"):
        train_one_step(model.train(), rows, tmp_path, batch_size=2, accumulation=1)
    with pytest.raises(ValueError, match="cannot be merged"):
        mocle_model().merge_and_unload()
    with torch.no_grad(), pytest.raises(ValueError, match="sequences \\[0, 1\\] have none"):
        mocle_model()(input_ids=ids, labels=ids)  # every token labelled: no prompt to cluster


# ---------------------------------------------------------------------------------------------------------------
# Training


def test_gradient_accumulation_and_activation_checkpointing_give_the_same_step(tmp_path):
    """One SGD step on 4 rows of equal label counts: batch 4 vs batch 1 with 4 accumulation steps and activation
    checkpointing (no gate noise: its draws depend on the batching). With noise, activation checkpointing replays the
    forward's noise: the step is the one without it."""
    ids = token_ids(4, 8, seed=5)
    rows = [{"input_ids": row.tolist(), "attention_mask": [1] * 8, "labels": prompt_labels(row[None])[0].tolist()}
            for row in ids]

    def step(batch_size, accumulation, noise, **options):
        model = mocle_model(router_noise_std=noise)
        before = all_parameters(model)
        trainer = train_one_step(model.train(), rows, tmp_path, batch_size, accumulation, **options)
        return before, all_parameters(model), trainer.state.log_history[0]

    before, full, full_log = step(4, 1, 0.0)
    _, accumulated, accumulated_log = step(1, 4, 0.0, activation_checkpointing=True)
    for name in full:  # float sums in another order, after an SGD step of learning rate 0.5
        assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-5)
        assert torch.equal(full[name], before[name]) is ("mocle_" not in name or "centroids" in name), name
    assert_close(accumulated_log["loss"], full_log["loss"], rtol=1e-5, atol=1e-6)
    _, noisy, _ = step(4, 1, 0.5)
    _, noisy_checkpointed, _ = step(4, 1, 0.5, activation_checkpointing=True)
    for name in noisy:
        assert_close(noisy_checkpointed[name], noisy[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(noisy[name], full[name]) for name in noisy if "mocle_gate" in name)


# ---------------------------------------------------------------------------------------------------------------
# Generation


def test_generate_keeps_the_prompts_cluster_with_and_without_cache(monkeypatch):
    model, prompt = mocle_model(seed=3), token_ids(4, 5, seed=6)
    with torch.no_grad():
        model(input_ids=prompt)
    on_prompt = clusters_of(model)
    assert len(set(on_prompt.tolist())) > 1
    gate_calls, decisions, original_gate = [], [], MocleLinear.gate
    original_decide = MocleLinear._nearest_clusters
    monkeypatch.setattr(MocleLinear, "gate", lambda self, clusters, adapter: gate_calls.append(clusters.clone())
                        or original_gate(self, clusters, adapter))
    monkeypatch.setattr(MocleLinear, "_nearest_clusters", lambda self, routing, adapter: decisions.append(1)
                        or original_decide(self, routing, adapter))
    cached = generate_with_and_without_cache(model, 5, input_ids=prompt)
    assert len(decisions) == 2 and len(gate_calls) == 2 * 5 * len(layers(model))  # decided once per generate
    assert all(torch.equal(clusters, on_prompt) for clusters in gate_calls)
    sequence = cached.sequences[:, :-1]  # the last step's scores: the forward on the sequence clustered by its prompt
    labels = sequence.clone()
    labels[:, :prompt.shape[1]] = -100
    with torch.no_grad():
        assert_close(cached.scores[-1], model(input_ids=sequence, labels=labels).logits[:, -1], rtol=1e-5, atol=1e-5)
        first = model(input_ids=prompt, use_cache=True)  # a cache from the prompt's forward keeps its clusters
        token = first.logits[:, -1:].argmax(-1)
        step = model(input_ids=token, cache=first.cache, use_cache=True)
        assert torch.equal(clusters_of(model), on_prompt)
        whole = model(input_ids=torch.cat([prompt, token], dim=1),
                      labels=torch.cat([torch.full_like(prompt, -100), token], dim=1))
        assert_close(step.logits[:, -1], whole.logits[:, -1], rtol=1e-5, atol=1e-5)
        other = tiny_llama()(input_ids=prompt, use_cache=True).cache  # a cache no prompt forward of ours returned
        with pytest.raises(ValueError, match="continues a cache that no prompt forward"):
            model(input_ids=prompt[:, :1], cache=other, use_cache=True)


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def test_a_saved_adapter_reloads_in_a_fresh_process_with_identical_logits(tmp_path):
    ids = token_ids(3, 6, seed=9)
    tiny_llama().save_pretrained(tmp_path / "base")
    model = mocle_model(universal_mixing="complement_squared")
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, tmp_path / "logits.pt")
    torch.save(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0),
               tmp_path / "generated.pt")
    script = textwrap.dedent(f"""
        import torch, hf_moe
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        folder, ids = {str(tmp_path)!r}, torch.tensor({ids.tolist()})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder + "/base"),
                                          folder + "/adapter").eval()
        config = model.peft_config["default"]
        assert type(config).__name__ == "MocleConfig" and config.universal_mixing == "complement_squared"
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, torch.load(folder + "/logits.pt"), rtol=0, atol=0)
        generated = torch.load(folder + "/generated.pt")
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0), generated)
        plain = AutoModelForCausalLM.from_pretrained(folder + "/base")
        plain.load_adapter(folder + "/adapter")
        assert torch.equal(plain.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0), generated)
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# The recipe


SHORT = {"training.max_steps": 2, "training.per_device_train_batch_size": 4, "training.save_strategy": "no",
         "training.logging_steps": 1, "training.use_cpu": True, "training.disable_tqdm": True,
         "training.dataloader_num_workers": 0, "data.max_length": 32, "peft.num_clusters": 3}


@pytest.fixture(scope="module")
def few_tasks(tmp_path_factory) -> str:
    """The first three examples of each of four shipped tasks."""
    examples = [json.loads(line) for line in (tasks_path() / "train.jsonl").read_text().splitlines()]
    picked = [row for task in ("add", "sort", "upper", "count")
              for row in [example for example in examples if example["task"] == task][:3]]
    path = tmp_path_factory.mktemp("tasks") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in picked))
    return str(path)


def test_the_recipe_fits_the_clusters_then_trains(few_tasks, tmp_path):
    result = run_recipe(f"{RECIPES}/mocle.yaml", model=str(tiny_llama_path()), output_dir=str(tmp_path / "out"),
                        **{"data.train_file": few_tasks, **SHORT})
    assert result.trainer.state.global_step == 2
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOCLE" and saved["num_clusters"] == 3 and saved["feature_layer"] == 2
    (centroids,) = [value for name, value in load_file(tmp_path / "out" / "adapter_model.safetensors").items()
                    if "centroids" in name]
    assert centroids.shape == (3, 256) and not centroids.isnan().any()
    assert_close(centroids.norm(dim=-1), torch.ones(3), atol=0.3, rtol=0)  # means of unit vectors
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path()),
                                      str(tmp_path / "out")).eval()
    generated = model.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, min_new_tokens=3,
                               do_sample=False)
    assert generated.shape == (1, 7)
    recipe = load_recipe(f"{RECIPES}/mocle.yaml", model=str(tiny_llama_path()), **{
        "data.train_file": few_tasks, "data.text_field": "text", "data.prompt_field": None,
        "data.response_field": None, "data.prompt_template": None})
    with pytest.raises(ValueError, match="`data.text_field`='text' is invalid: MoCLE clusters each sequence by its"):
        validate_recipe(recipe)
