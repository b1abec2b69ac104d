"""Soft mixtures of experts (`moe_block_type`): Soft MoE (`"soft_moe"`, not causal) and per-token soft merging of the
experts' weights (`"soft_merging"`, causal): the blocks against their formulas written out here, padding, causality,
caching, save/load and remote code, gradient checkpointing, Trainer and config validation.

Every model is tiny and fp32 (conftest's shapes: hidden 32, 4 experts of width 64, 2 layers).
"""


import pytest
import torch
import torch.nn.functional as F
from conftest import (
    PAD_TOKEN_ID,
    load_as_remote_code_without_hf_moe,
    make_deepseek_config,
    make_mixtral_config,
    random_input_ids,
    randomize_weights_,
)
from test_trainer import causal_lm_rows, classification_rows, train_one_step
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from hf_moe import (
    DeepSeekMoEForCausalLM,
    MixtralMoEConfig,
    MixtralMoEForCausalLM,
    MixtralMoEForSequenceClassification,
)
from hf_moe.modeling.modeling_hf_moe import MoESoftBlock, MoESoftMergingBlock

ATOL = 1e-5


def soft_config(kind: str, family: str = "mixtral", **overrides):
    make = make_mixtral_config if family == "mixtral" else make_deepseek_config
    return make(moe_block_type=kind, router_aux_loss_coef=0.0, **overrides)


def soft_model(kind: str, family: str = "mixtral", model_class=None, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = soft_config(kind, family, **overrides)
    if model_class is None:
        model_class = MixtralMoEForCausalLM if family == "mixtral" else DeepSeekMoEForCausalLM
    return randomize_weights_(model_class(config)).eval()


def expert_ffn(experts, e: int, v: torch.Tensor) -> torch.Tensor:
    """Expert e of fused weights on rows v: down_e(silu(gate_e v) * up_e v) (+ biases if any)."""
    gate_w, up_w = experts.gate_up_proj[e].chunk(2, dim=0)
    gate_b, up_b = (experts.gate_up_proj_bias[e].chunk(2) if experts.gate_up_proj_bias is not None else (0.0, 0.0))
    down_b = experts.down_proj_bias[e] if experts.down_proj_bias is not None else 0.0
    return (F.silu(v @ gate_w.T + gate_b) * (v @ up_w.T + up_b)) @ experts.down_proj[e].T + down_b


def greedy(model, prompt, use_cache: bool, attention_mask=None, new_tokens: int = 6):
    return model.generate(prompt, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID, use_cache=use_cache)


# --------------------------------------------------------------------------------------------------------------
# The blocks against their formulas
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_slots", [1, 2])
def test_soft_moe_block_matches_dispatch_and_combine_formula_with_padding_masked(num_slots):
    torch.manual_seed(0)
    block = randomize_weights_(MoESoftBlock(soft_config("soft_moe", num_slots=num_slots)))
    with torch.no_grad():
        block.scale.fill_(1.7)
    x = torch.randn(2, 5, 32)
    token_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        output = block(x, token_mask)
        phi = block.scale * block.slot_embeds / block.slot_embeds.norm(dim=0, keepdim=True)  # [H, n*p]
        for b in range(2):
            real = token_mask[b].bool()
            logits = (x[b] / x[b].norm(dim=-1, keepdim=True)) @ phi  # [m, n*p]
            dispatch = logits[real].softmax(dim=0)  # over the real tokens, per slot
            combine = logits.softmax(dim=1)  # over the slots, per token
            slots = dispatch.T @ x[b][real]  # [n*p, H]
            slot_out = torch.stack([expert_ffn(block.experts, s // num_slots, slots[s]) for s in range(len(slots))])
            assert_close(output[b], combine @ slot_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_soft_merging_block_matches_one_ffn_with_per_token_merged_weights(family):
    # deepseek: expert biases and a gated shared expert on top
    overrides = {"expert_bias": True} if family == "deepseek" else {}
    torch.manual_seed(0)
    block = randomize_weights_(MoESoftMergingBlock(soft_config("soft_merging", family, **overrides)))
    experts = block.experts
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        output = block(x)
        for b in range(2):
            for t in range(3):
                p = (block.gate.weight @ x[b, t]).softmax(dim=-1)  # [E]
                merged = {name: torch.einsum("e,e...->...", p, getattr(experts, name))
                          for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
                          if getattr(experts, name) is not None}
                gate_w, up_w = merged["gate_up_proj"].chunk(2, dim=0)
                gate_b, up_b = merged["gate_up_proj_bias"].chunk(2) if "gate_up_proj_bias" in merged else (0.0, 0.0)
                expected = (F.silu(gate_w @ x[b, t] + gate_b) * (up_w @ x[b, t] + up_b)) @ merged["down_proj"].T
                expected = expected + merged.get("down_proj_bias", 0.0)
                if block.shared_experts is not None:
                    shared = block.shared_experts(x[b, t])
                    expected = expected + torch.sigmoid(block.shared_expert_gate(x[b, t])) * shared
                assert_close(output[b, t], expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Padding, causality and generation
# --------------------------------------------------------------------------------------------------------------


def test_soft_moe_padding_leaves_the_real_tokens_unchanged():
    model = soft_model("soft_moe")
    input_ids = random_input_ids(1, 6)
    padded = torch.cat([input_ids, torch.full((1, 3), PAD_TOKEN_ID)], dim=1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(input_ids).logits
        with_padding = model(padded, attention_mask=mask).logits[:, :6]
        unmasked = model(padded).logits[:, :6]
    assert_close(with_padding, alone, atol=ATOL, rtol=0)
    assert (unmasked - alone).abs().max() > 1e-3  # without the mask the padding would have entered the slots


def later_token_changes(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, logits with the last token replaced), both [1, 8, V]."""
    input_ids = random_input_ids(1, 8)
    changed = input_ids.clone()
    changed[0, -1] = (changed[0, -1] % 127) + 1 if changed[0, -1] != 1 else 2
    with torch.no_grad():
        return model(input_ids).logits, model(changed).logits


def test_soft_moe_leaks_a_later_token_into_earlier_logits():
    logits, changed = later_token_changes(soft_model("soft_moe"))
    assert (logits[:, :-1] - changed[:, :-1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_soft_merging_never_leaks_a_later_token_into_earlier_logits(family):
    logits, changed = later_token_changes(soft_model("soft_merging", family))
    assert_close(logits[:, :-1], changed[:, :-1], atol=1e-6, rtol=0)
    assert (logits[:, -1] - changed[:, -1]).abs().max() > 1e-4


def test_soft_moe_generate_raises_naming_soft_moe_and_the_causal_variant():
    model = soft_model("soft_moe")
    with pytest.raises(ValueError, match="soft_moe.*not causal.*soft_merging"):
        model.generate(random_input_ids(1, 4), max_new_tokens=2)


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_soft_merging_greedy_generation_with_cache_matches_without_cache(family):
    model = soft_model("soft_merging", family)
    prompt = random_input_ids(2, 4, seed=6)
    mask = torch.ones_like(prompt)
    prompt[0, 0], mask[0, 0] = PAD_TOKEN_ID, 0  # one left-padded row
    with torch.no_grad():
        with_cache = greedy(model, prompt, True, mask)
        without_cache = greedy(model, prompt, False, mask)
    assert with_cache.shape == (2, 10)
    assert torch.equal(with_cache, without_cache)


# --------------------------------------------------------------------------------------------------------------
# Save/load, remote code, gradient checkpointing, Trainer
# --------------------------------------------------------------------------------------------------------------

def test_soft_models_save_load_and_load_as_remote_code_without_hf_moe(tmp_path):
    models = {"soft_moe": soft_model("soft_moe", seed=1), "soft_merging": soft_model("soft_merging", seed=2)}
    input_ids = random_input_ids(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    prompt = random_input_ids(2, 4, seed=3)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "generate": {"input_ids": prompt, "max_new_tokens": 6, "min_new_tokens": 6}}
    for kind, model in models.items():
        model.save_pretrained(tmp_path / "models" / kind)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / kind).eval()
        assert loaded.config.moe_block_type == kind
        for key, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), (kind, key)
    children = load_as_remote_code_without_hf_moe({kind: tmp_path / "models" / kind for kind in models}, inputs,
                                                  tmp_path, generate_for=["soft_merging"])  # Soft MoE is not causal
    for kind, class_name in (("soft_moe", "MoESoftBlock"), ("soft_merging", "MoESoftMergingBlock")):
        block = children[kind]["classes"]["model.layers.0.mlp"]
        assert block.startswith("transformers_modules.") and block.endswith("modeling_hf_moe." + class_name)
        with torch.no_grad():
            expected = models[kind](input_ids, attention_mask=attention_mask).logits
        assert_close(children[kind]["logits"], expected, atol=1e-6, rtol=0)
    assert torch.equal(children["soft_merging"]["sequences"], greedy(models["soft_merging"], prompt, True))


@pytest.mark.parametrize("kind", ["soft_moe", "soft_merging"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    input_ids = random_input_ids(2, 6)
    grads = []
    for checkpointing in (False, True):
        model = soft_model(kind).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("slot_embeds" in n or "mlp.gate" in n for n in grads[0])
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kind", "model_class", "rows", "learned"), [
    ("soft_moe", MixtralMoEForSequenceClassification, classification_rows, "slot_embeds"),
    ("soft_merging", MixtralMoEForCausalLM, causal_lm_rows, "mlp.gate.weight"),
])
def test_one_trainer_step_updates_the_soft_block(kind, model_class, rows, learned, tmp_path):
    model = soft_model(kind, model_class=model_class, **({"num_labels": 2} if rows is classification_rows else {}))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if learned in n or "experts" in n}
    result = train_one_step(model.train(), rows(), tmp_path)
    assert torch.isfinite(torch.tensor(result.training_loss))
    for name, value in before.items():
        assert not torch.equal(model.get_parameter(name), value), name


# --------------------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------------------


def test_soft_moe_defaults_to_one_slot_per_expert_and_routed_blocks_have_no_slots():
    assert soft_config("soft_moe").num_slots == 1
    assert make_mixtral_config().moe_block_type == "routed" and make_mixtral_config().num_slots is None


@pytest.mark.parametrize(("overrides", "field"), [
    ({"moe_block_type": "soft"}, "moe_block_type"),
    ({"num_slots": 2}, "num_slots"),
    ({"moe_block_type": "soft_merging", "num_slots": 1}, "num_slots"),
    ({"moe_block_type": "soft_moe", "num_slots": 0}, "num_slots"),
    ({"moe_block_type": "soft_moe", "capacity_factor": 1.25}, "capacity_factor"),
    ({"moe_block_type": "soft_merging", "router_type": "expert_choice", "capacity_factor": 2.0}, "router_type"),
    ({"moe_block_type": "soft_merging", "noisy_gating": True}, "noisy_gating"),
    ({"moe_block_type": "soft_moe", "router_jitter_noise": 0.01}, "router_jitter_noise"),
])
def test_invalid_soft_block_settings_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        MixtralMoEConfig(**overrides)


def test_soft_presets_build_the_soft_blocks():
    assert MixtralMoEConfig.from_preset("soft_moe").moe_block_type == "soft_moe"
    assert MixtralMoEConfig.from_preset("soft_moe_causal").moe_block_type == "soft_merging"
    config = MixtralMoEConfig.from_preset("soft_moe_causal", vocab_size=128, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          num_local_experts=4)
    model = MixtralMoEForCausalLM(config)
    assert all(isinstance(layer.mlp, MoESoftMergingBlock) for layer in model.model.layers)
    assert model.config.base_model_ep_plan == {}
    assert not any("experts" in key for key in model.config.base_model_tp_plan)
