"""LoRA-expert PEFT methods: registration with peft, MixLoRA (forward, save/load, adapters, aux loss, Trainer).

MoLA, LoRAMoE and `materialize` have their own files (test_lora_moe_*.py), which import the helpers below. Every
base is a tiny random Llama (no download).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftConfig, get_peft_model
from peft.utils import PeftType
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import hf_moe
from hf_moe.finetune.lora_moe import MixLoraFeedForward, MixLoraLinear, add_lora_moe_callback

VOCAB = 128


def tiny_llama(num_layers: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama: hidden 32, FFN 64, 4 heads (2 KV heads), fp32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **overrides)
    return LlamaForCausalLM(config).eval()


def token_ids(batch: int = 2, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters_(model, std: float = 0.1):
    """Random values for every adapter tensor (B included), so no expert or router is at its init."""
    for name, param in model.named_parameters():
        if any(prefix in name for prefix in ("mixlora_", "loramoe_", "mola_")):
            param.copy_(std * torch.randn_like(param))
    return model


def peft_model(config, base=None, seed: int = 0, randomize: bool = True):
    model = get_peft_model(base if base is not None else tiny_llama(), config)
    torch.manual_seed(seed)
    return (randomize_adapters_(model) if randomize else model).eval()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def train_one_step(model, rows, output_dir, batch_size: int, accumulation: int, data_collator=None, **overrides):
    """One plain SGD step (lr 0.5, no warmup, decay or clipping), examples in order, on CPU; logs the aux losses."""
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, max_steps=1, train_sampling_strategy="sequential",
        seed=0, data_seed=0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, **overrides,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=data_collator)
    add_lora_moe_callback(trainer)
    trainer.train()
    return trainer


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


MIXLORA = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "num_experts": 4, "top_k": 2, "r": 4}


# ---------------------------------------------------------------------------------------------------------------
# Registration and configs


def test_importing_hf_moe_registers_the_three_peft_types():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    for name, config_class, prefix in (("MIXLORA", hf_moe.MixLoraConfig, "mixlora_"),
                                       ("LORAMOE", hf_moe.LoraMoeConfig, "loramoe_"),
                                       ("MOLA", hf_moe.MolaConfig, "mola_")):
        peft_type = PeftType(name)
        assert peft_type is PeftType[name] and peft_type in list(PeftType) and peft_type == name
        assert PEFT_TYPE_TO_CONFIG_MAPPING[name] is config_class
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == prefix == PEFT_TYPE_TO_TUNER_MAPPING[name].prefix
        assert config_class().peft_type is peft_type
    hf_moe.finetune.lora_moe.register_lora_moe_methods()  # idempotent


@pytest.mark.parametrize("config", [
    hf_moe.MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, num_experts=6, top_k=3, router_aux_loss_coef=0.02,
                         target_modules=["mlp", "q_proj"]),
    hf_moe.LoraMoeConfig(r=2, num_experts=4, lbc_num_types=2, lbc_delta=0.2, lbc_weight=0.5),
    hf_moe.MolaConfig(num_experts=[2, 4], top_k=[1, 2], router_aux_loss_coef=0.001),
], ids=["mixlora", "loramoe", "mola"])
def test_every_hyperparameter_round_trips_through_adapter_config_json(config, tmp_path):
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.peft_type is config.peft_type
    hyperparameters = {"r", "lora_alpha", "lora_dropout", "num_experts", "top_k", "router_init_std",
                       "router_aux_loss_coef", "lbc_num_types", "lbc_delta", "lbc_weight"} & set(config.to_dict())
    for name in hyperparameters:
        assert saved[name] == getattr(config, name) == getattr(loaded, name)
    assert set(config.to_dict()) <= set(saved)
    assert loaded.to_dict() == config.to_dict()


def test_defaults_follow_the_papers():
    mixlora, loramoe, mola = hf_moe.MixLoraConfig(), hf_moe.LoraMoeConfig(), hf_moe.MolaConfig()
    assert (mixlora.r, mixlora.lora_alpha, mixlora.num_experts, mixlora.top_k) == (8, 16, 8, 2)
    assert (loramoe.r, loramoe.lora_alpha, loramoe.num_experts, loramoe.lbc_delta, loramoe.lbc_weight) == (
        4, 32, 6, 0.1, 0.1)
    assert mola.experts_per_layer(32) == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8 and mola.top_k == 2


@pytest.mark.parametrize("make, field", [
    (lambda: hf_moe.MixLoraConfig(top_k=9), "top_k"),
    (lambda: hf_moe.MixLoraConfig(r=0), "r"),
    (lambda: hf_moe.MixLoraConfig(lora_dropout=1.0), "lora_dropout"),
    (lambda: hf_moe.LoraMoeConfig(num_experts=5), "lbc_num_types"),
    (lambda: hf_moe.MolaConfig(num_experts="pyramid"), "num_experts"),
    (lambda: hf_moe.MolaConfig(num_experts=[2, 2]).experts_per_layer(4), "num_experts"),
    (lambda: hf_moe.MolaConfig(num_experts=[2, 4], top_k=3).top_k_per_layer(2), "top_k"),
])
def test_invalid_hyperparameters_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=f"`{field}`="):
        make()


def test_default_target_modules_for_llama_and_a_clear_error_otherwise():
    model = peft_model(hf_moe.MixLoraConfig(**MIXLORA), randomize=False)
    kinds = {type(module) for module in model.modules()}
    assert {MixLoraFeedForward, MixLoraLinear} <= kinds
    with pytest.raises(ValueError, match="names FFN projections"):
        get_peft_model(tiny_llama(), hf_moe.MixLoraConfig(target_modules=["mlp", "gate_proj"]))
    with pytest.raises(ValueError, match="has no"):
        get_peft_model(tiny_llama(), hf_moe.MixLoraConfig(target_modules=["self_attn"]))


# ---------------------------------------------------------------------------------------------------------------
# MixLoRA forward


def naive_mixlora_block(block: MixLoraFeedForward, x: torch.Tensor, adapter: str = "default",
                        router: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's definition, one token and one expert at a time: y = sum_{e in top-k} w_e FFN_e(x) with
    FFN_e = down_e(act(gate_e x) * up_e x) and every projection W + (alpha / r) B_e A_e (biases kept). `router`
    [E, H]: the router to use (default: the block's)."""
    ffn, w, s, k = block.base_layer, block.adapter_tensors(adapter), block.scaling[adapter], block.top_k[adapter]
    router = w["router"] if router is None else router
    tokens = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(tokens)
    for t, token in enumerate(tokens):
        probs = torch.softmax(router @ token, dim=-1)
        top = probs.topk(k)
        for weight, e in zip(top.values / top.values.sum(), top.indices):
            gate = F.linear(token, ffn.gate_proj.weight + s * w["gate_B"][e] @ w["gate_A"][e], ffn.gate_proj.bias)
            up = F.linear(token, ffn.up_proj.weight + s * w["up_B"][e] @ w["up_A"][e], ffn.up_proj.bias)
            down_weight = ffn.down_proj.weight + s * w["down_B"][e] @ w["down_A"][e]
            out[t] += weight * F.linear(ffn.act_fn(gate) * up, down_weight, ffn.down_proj.bias)
    return out.view(x.shape)


@pytest.mark.parametrize(("mlp_bias", "rank"), [(False, 4), (True, 4), (False, 3)])
def test_mixlora_block_equals_the_per_expert_definition(mlp_bias, rank):
    """Outputs and the gradients of x and every adapter tensor. Rank 3 gives [*, 3] fp32 rows, strides torch's
    grouped matmul kernel refuses: the fallback must take them."""
    model = peft_model(hf_moe.MixLoraConfig(**{**MIXLORA, "r": rank}), base=tiny_llama(mlp_bias=mlp_bias))
    block = model.base_model.model.model.layers[0].mlp
    for name in block.adapter_layer_names:  # B starts at zero: make every LoRA product count
        torch.nn.init.normal_(getattr(block, name)["default"], std=0.1)
    x = torch.randn(2, 5, 32, requires_grad=True)
    trained = [x, *(getattr(block, name)["default"] for name in block.adapter_layer_names)]
    output_grad = torch.randn(2, 5, 32)
    output = block(x)
    gradients = torch.autograd.grad(output, trained, output_grad)  # the backward runs for every layout
    expected = naive_mixlora_block(block, x)
    assert_close(output, expected)
    for gradient, expected_gradient in zip(gradients, torch.autograd.grad(expected, trained, output_grad)):
        assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-4)


def test_mixlora_hidden_dropout_has_one_mask_per_token_shared_by_its_experts():
    from hf_moe.finetune.lora_moe.layer import _dropout_per_token

    torch.manual_seed(0)
    dropout, hidden = torch.nn.Dropout(0.5), torch.ones(64, 2, 100)
    dropped = _dropout_per_token(dropout, hidden)
    assert torch.equal(dropped[:, 0], dropped[:, 1])  # both expert slots of a token see the same mask
    assert set(dropped.unique().tolist()) == {0.0, 2.0} and 0.4 < (dropped == 0).float().mean() < 0.6
    assert _dropout_per_token(dropout.eval(), hidden) is hidden


def test_mixlora_runs_each_shared_frozen_projection_once_per_forward():
    model = peft_model(hf_moe.MixLoraConfig(**MIXLORA))
    ffn = model.base_model.model.model.layers[0].mlp.base_layer
    calls = {name: [] for name in ("gate_proj", "up_proj", "down_proj")}
    for name, rows in calls.items():
        getattr(ffn, name).register_forward_hook(lambda module, args, out, rows=rows: rows.append(args[0].shape[0]))
    with torch.no_grad():
        model(input_ids=token_ids(2, 6))
    assert calls == {name: [12] for name in calls}  # one call each, over the 12 tokens, for 4 experts top-2


def test_a_fresh_mixlora_adapter_starts_as_the_base_model():
    base = tiny_llama()
    ids = token_ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = peft_model(hf_moe.MixLoraConfig(**MIXLORA), base=base, randomize=False)
        assert_close(model(input_ids=ids).logits, expected)
        with model.disable_adapter():
            assert_close(randomize_adapters_(model)(input_ids=ids).logits, expected)


# ---------------------------------------------------------------------------------------------------------------
# Aux loss


def test_loss_is_cross_entropy_plus_coefficient_times_switch_loss():
    config = hf_moe.MixLoraConfig(**{**MIXLORA, "router_aux_loss_coef": 0.5})
    model = peft_model(config)
    ids = token_ids(2, 6)
    blocks = [model.base_model.model.model.layers[i].mlp for i in range(2)]
    inputs = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    logits = [F.linear(x, block.mixlora_router["default"]) for x, block in zip(inputs, blocks)]
    # Mixtral's load_balancing_loss_func over both layers' logits concatenated, written out
    probs = torch.softmax(torch.cat([logit.reshape(-1, 4) for logit in logits]), dim=-1)
    chosen = F.one_hot(probs.topk(2).indices, 4).float()  # [T, k, E]
    switch = 4 * torch.sum(chosen.mean(dim=0) * probs.mean(dim=0))
    assert out.aux_losses.keys() == {"router_aux_loss"}
    assert_close(out.aux_losses["router_aux_loss"], switch)
    assert_close(out.aux_loss, 0.5 * switch)
    assert_close(out.loss, causal_lm_loss(out.logits, ids) + 0.5 * switch)


def test_padding_is_left_out_of_the_switch_loss():
    model = peft_model(hf_moe.MixLoraConfig(**MIXLORA))
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).aux_losses["router_aux_loss"]
        changed = ids.clone()
        changed[1, :2] = 5  # other padding tokens: same aux loss
        assert_close(model(input_ids=changed, attention_mask=mask).aux_losses["router_aux_loss"], masked)


def test_gradient_accumulation_gives_the_same_aux_contribution(tmp_path):
    """One SGD step on 4 identical rows: batch 4 (no accumulation) vs batch 1 with 4 accumulation steps (and
    activation checkpointing). Each micro-batch's aux term must be weighted by its share of the label tokens
    (Trainer sums micro-batch losses)."""
    tokens = token_ids(1, 8, seed=7)[0].tolist()
    rows = [{"input_ids": tokens, "attention_mask": [1] * 8, "labels": tokens}] * 4

    def step(batch_size, accumulation, coef, **options):
        model = peft_model(hf_moe.MixLoraConfig(**{**MIXLORA, "router_aux_loss_coef": coef}))
        trainer = train_one_step(model, rows, tmp_path, batch_size, accumulation, **options)
        return adapter_state(model), trainer.state.log_history[0]

    full, full_log = step(4, 1, coef=1.0)
    # with activation checkpointing too: recomputation in the backward pass must not record a second time
    accumulated, accumulated_log = step(1, 4, coef=1.0, activation_checkpointing=True)
    without_aux, _ = step(4, 1, coef=0.0)
    router = "base_model.model.model.layers.0.mlp.mixlora_router.default"
    assert (full[router] - without_aux[router]).abs().max() > 1e-3  # the aux term does move the router
    for name in full:
        assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)
    assert_close(accumulated_log["loss"], full_log["loss"], rtol=1e-5, atol=1e-6)
    assert_close(accumulated_log["lora_moe/aux_loss"], full_log["lora_moe/aux_loss"], rtol=1e-5, atol=1e-6)
    assert full_log["lora_moe/router_aux_loss"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Adapters: several, switching, unloading


def test_multiple_adapters_and_set_adapter():
    ids = token_ids()
    config = hf_moe.MixLoraConfig(**MIXLORA)
    model = peft_model(config)
    model.add_adapter("other", hf_moe.MixLoraConfig(**{**MIXLORA, "num_experts": 3, "top_k": 1}))
    torch.manual_seed(1)
    randomize_adapters_(model)
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.set_adapter("other")
        second = model(input_ids=ids).logits
        assert not torch.allclose(first, second)
        block = model.base_model.model.model.layers[0].mlp
        assert block.mixlora_router["other"].shape == (3, 32) and block.active_adapters == ["other"]
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        assert trainable and all(".other" in name for name in trainable)
        model.set_adapter("default")
        assert_close(model(input_ids=ids).logits, first)
        model.base_model.set_adapter(["default", "other"])
        with pytest.raises(ValueError, match="one adapter per FFN block"):
            model(input_ids=ids)
        model.set_adapter("default")
        model.delete_adapter("other")
        assert "other" not in block.mixlora_router
        assert_close(model(input_ids=ids).logits, first)


def test_merging_is_refused_and_unload_restores_the_base():
    base = tiny_llama()
    ids = token_ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = peft_model(hf_moe.MixLoraConfig(**MIXLORA), base=base)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(input_ids=ids, adapter_names=["default"] * 2)
    unloaded = model.unload()
    assert not unloaded._forward_hooks and not unloaded._forward_pre_hooks
    with torch.no_grad():
        assert_close(unloaded(input_ids=ids).logits, expected)


# ---------------------------------------------------------------------------------------------------------------
# Save -> fresh process -> load (all three methods, and MixLoRA's options, at once: one interpreter start)


FRESH_PROCESS_CHECK = textwrap.dedent("""
    import sys, torch
    import hf_moe  # registers MIXLORA, LORAMOE and MOLA with peft
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    folder = sys.argv[1]
    ids = torch.load(f"{folder}/ids.pt")
    for method in sys.argv[2:]:
        expected = torch.load(f"{folder}/{method}_logits.pt")
        base = AutoModelForCausalLM.from_pretrained(f"{folder}/base")
        model = PeftModel.from_pretrained(base, f"{folder}/{method}").eval()
        assert type(model.peft_config["default"]).__name__.lower().startswith(method[:4]), model.peft_config
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, expected), method
            model.load_adapter(f"{folder}/{method}", adapter_name="again")
            model.set_adapter("again")
            assert torch.equal(model(input_ids=ids).logits, expected), method
            auto = AutoPeftModelForCausalLM.from_pretrained(f"{folder}/{method}").eval()
            assert torch.equal(auto(input_ids=ids).logits, expected), method
            low_memory = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{folder}/base"),
                                                   f"{folder}/{method}", low_cpu_mem_usage=True).eval()
            assert torch.equal(low_memory(input_ids=ids).logits, expected), method
        # transformers' own adapter loading (no PeftModel)
        plain = AutoModelForCausalLM.from_pretrained(f"{folder}/base")
        plain.load_adapter(f"{folder}/{method}")
        with torch.no_grad():
            assert torch.equal(plain.eval()(input_ids=ids).logits, expected), method
    print("OK")
""")


def test_save_then_load_in_a_fresh_process_gives_identical_logits(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    ids = token_ids(2, 7)
    torch.save(ids, tmp_path / "ids.pt")
    configs = {
        "mixlora": hf_moe.MixLoraConfig(**MIXLORA),
        "loramoe": hf_moe.LoraMoeConfig(task_type="CAUSAL_LM", num_experts=4, lora_dropout=0.0),
        "mola": hf_moe.MolaConfig(task_type="CAUSAL_LM", num_experts="hourglass", lora_dropout=0.0),
        # MixLoRA's routing and LoRA-shape options (test_lora_moe_routing.py)
        "mixlora_dynamic": hf_moe.MixLoraConfig(**MIXLORA, routing_strategy="mixlora-dynamic", top_p=0.6,
                                                expert_r=2, expert_lora_alpha=4, use_rslora=True,
                                                expert_projections=["up_proj", "down_proj"]),
        "mixlora_switch": hf_moe.MixLoraConfig(**MIXLORA, routing_strategy="mixlora-switch", jitter_noise=0.1,
                                               expert_projections=["gate_proj"]),
    }
    for method, config in configs.items():
        model = peft_model(config, base=LlamaForCausalLM.from_pretrained(base_dir))
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, tmp_path / f"{method}_logits.pt")
        model.save_pretrained(tmp_path / method)
        files = sorted(path.name for path in (tmp_path / method).iterdir())
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"], files
        saved = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert saved["peft_type"] == method.split("_")[0].upper() and saved["base_model_name_or_path"] == str(base_dir)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(tmp_path), *configs], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
