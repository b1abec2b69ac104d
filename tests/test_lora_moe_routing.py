"""MixLoRA's routing and LoRA-shape options: top-p ("mixlora-dynamic") and top-1 ("mixlora-switch") routing, jitter
noise, a separate expert rank / alpha, rsLoRA scaling and the FFN projections that carry expert LoRA.

Each forward is checked against its formula written out one token and one expert at a time.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import generate_with_and_without_cache
from peft import PeftConfig
from test_lora_moe import (
    MIXLORA,
    adapter_state,
    causal_lm_loss,
    peft_model,
    tiny_llama,
    token_ids,
    train_one_step,
)
from torch.testing import assert_close
from transformers import LlamaForCausalLM

import hf_moe

OPTIONS = {"routing_strategy": "mixlora-dynamic", "top_p": 0.6, "jitter_noise": 0.1, "router_z_loss_coef": 0.01,
           "expert_r": 2, "expert_lora_alpha": 4, "use_rslora": True, "expert_projections": ["up_proj", "down_proj"]}


def top_p_choice(probs: torch.Tensor, top_p: float) -> list[tuple[torch.Tensor, int]]:
    """The smallest set of most probable experts whose mass exceeds top_p, with their unnormalised probabilities."""
    chosen, mass = [], 0.0
    for e in probs.argsort(descending=True).tolist():
        chosen.append((probs[e], e))
        mass += probs[e].item()
        if mass > top_p:
            break
    return chosen


def top_k_choice(probs: torch.Tensor, top_k: int) -> list[tuple[torch.Tensor, int]]:
    top = probs.topk(top_k)
    return list(zip(top.values / top.values.sum(), top.indices.tolist()))


def expected_choice(config, probs: torch.Tensor):
    if config.routing_strategy == "mixlora-dynamic":
        return top_p_choice(probs, config.top_p)
    if config.routing_strategy == "mixlora-switch":
        return [(probs.max(), int(probs.argmax()))]
    return top_k_choice(probs, config.top_k)


def naive_block(block, config, x: torch.Tensor, router_x: torch.Tensor | None = None) -> torch.Tensor:
    """y = sum_{e chosen} w_e FFN_e(x): FFN_e's projections are W + s B_e A_e where the projection carries expert
    LoRA (W alone otherwise), s = expert_lora_alpha / sqrt(expert_r) (rsLoRA), biases kept; the router reads
    `router_x` (default x)."""
    ffn, w = block.base_layer, block.adapter_tensors("default")
    alpha = config.expert_lora_alpha or config.lora_alpha
    rank = config.expert_r or config.r
    s = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    tokens = x.reshape(-1, x.shape[-1])
    router_tokens = (x if router_x is None else router_x).reshape(-1, x.shape[-1])
    out = torch.zeros_like(tokens)

    def projection(name, e):
        base = getattr(ffn, f"{name}_proj")
        weight = base.weight + s * w[f"{name}_B"][e] @ w[f"{name}_A"][e] if f"{name}_A" in w else base.weight
        return weight, base.bias

    for t, token in enumerate(tokens):
        probs = torch.softmax(w["router"] @ router_tokens[t], dim=-1)
        for weight, e in expected_choice(config, probs):
            hidden = ffn.act_fn(F.linear(token, *projection("gate", e))) * F.linear(token, *projection("up", e))
            out[t] += weight * F.linear(hidden, *projection("down", e))
    return out.view(x.shape)


def mixlora_block(config, mlp_bias: bool = False):
    model = peft_model(config, base=tiny_llama(mlp_bias=mlp_bias))
    return model, model.base_model.model.model.layers[0].mlp


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_the_options_round_trip_through_adapter_config_json(tmp_path):
    config = hf_moe.MixLoraConfig(**MIXLORA, **OPTIONS)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = PeftConfig.from_pretrained(tmp_path)
    for name, value in OPTIONS.items():
        assert saved[name] == getattr(loaded, name) == value
    assert loaded.to_dict() == config.to_dict()
    defaults = hf_moe.MixLoraConfig()
    assert (defaults.routing_strategy, defaults.top_p, defaults.jitter_noise, defaults.router_z_loss_coef,
            defaults.expert_r, defaults.expert_lora_alpha, defaults.use_rslora, defaults.expert_projections) == (
        "mixlora", 0.8, 0.0, 0.001, None, None, False, None)
    assert hf_moe.MolaConfig(r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    assert hf_moe.LoraMoeConfig(r=4, lora_alpha=8).scaling == 2.0


@pytest.mark.parametrize("field, value, allowed", [
    ("routing_strategy", "top-p", "mixlora-dynamic"),
    ("top_p", 0.0, r"\(0, 1\]"),
    ("top_p", 1.5, r"\(0, 1\]"),
    ("router_z_loss_coef", -1.0, ">= 0"),
    ("jitter_noise", 1.0, r"\[0, 1\)"),
    ("expert_r", 0, "positive integer"),
    ("expert_lora_alpha", -2, "> 0"),
    ("use_rslora", "yes", "true or false"),
    ("expert_projections", ["gate_proj", "q_proj"], "gate_proj"),
    ("expert_projections", [], "non-empty"),
])
def test_invalid_options_raise_naming_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=f"`{field}`=.*{allowed}"):
        hf_moe.MixLoraConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------------------
# Forward against the formula


def test_top_p_gates_on_written_out_probabilities():
    from hf_moe.finetune.lora_moe.functional import top_p_gates

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05],  # 0.5, then 0.8 > 0.7: two experts
                          [0.05, 0.9, 0.03, 0.02],  # 0.9 > 0.7 alone: one
                          [0.25, 0.25, 0.25, 0.25]])  # 0.25, 0.5, 0.75: three
    weights, index, kept = top_p_gates(probs.log(), top_p=0.7)
    assert kept.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert index[0, :2].tolist() == [0, 1] and index[1, 0].item() == 1
    assert_close(weights, torch.tensor([[0.5, 0.3, 0.0], [0.9, 0.0, 0.0], [0.25, 0.25, 0.25]]))  # not renormalised
    _, _, kept = top_p_gates(probs.log(), top_p=1.0)  # no cap: every expert, whatever the rounding of the sum
    assert kept.shape == (3, 4) and kept.all()


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic", "mixlora-switch"])
def test_block_equals_the_formula_of_each_routing_strategy(strategy):
    """With an FFN bias (weighted by the gates' sum, which is below one for top-p and top-1), a separate expert rank
    and alpha with rsLoRA, and expert LoRA on up and down only. Outputs and gradients."""
    config = hf_moe.MixLoraConfig(**{**MIXLORA, **OPTIONS, "routing_strategy": strategy})
    model, block = mixlora_block(config, mlp_bias=True)
    assert "default" not in block.mixlora_gate_A and block.mixlora_up_A["default"].shape == (4, 2, 32)
    assert block.scaling["default"] == 4 / math.sqrt(2)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 16 / math.sqrt(4)
    x = torch.randn(3, 5, 32, requires_grad=True)
    trained = [x, *block.adapter_tensors("default").values()]
    output_grad = torch.randn(3, 5, 32)
    output = block(x)
    expected = naive_block(block, config, x)
    assert_close(output, expected)
    for gradient, expected_gradient in zip(torch.autograd.grad(output, trained, output_grad),
                                           torch.autograd.grad(expected, trained, output_grad)):
        assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-4)
    if strategy == "mixlora-dynamic":  # the test data do make sets of several sizes
        _, _, kept = block.route(F.linear(x.reshape(-1, 32), block.mixlora_router["default"]), "default")
        assert len(set(kept.sum(dim=-1).tolist())) > 1


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-switch"])
def test_jitter_noise_multiplies_the_input_in_training_only(strategy):
    """Training: x * u, u ~ U(1 - eps, 1 + eps), feeds the router, and the experts too except with Switch routing.
    Eval: no noise."""
    config = hf_moe.MixLoraConfig(**{**MIXLORA, "routing_strategy": strategy, "jitter_noise": 0.5})
    _, block = mixlora_block(config)
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        assert_close(block(x), naive_block(block, config, x))
        torch.manual_seed(3)
        noise = torch.empty_like(x.reshape(-1, 32)).uniform_(0.5, 1.5).view(x.shape)
        torch.manual_seed(3)
        jittered = block.train()(x)
        expert_input = x if strategy == "mixlora-switch" else x * noise
        assert_close(jittered, naive_block(block, config, expert_input, router_x=x * noise))
        assert not torch.allclose(jittered, block.eval()(x))


# ---------------------------------------------------------------------------------------------------------------
# Aux losses


def _router_probs(model, ids, **kwargs):
    blocks = [model.base_model.model.model.layers[i].mlp for i in range(2)]
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for block in blocks]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, **kwargs)
    for hook in hooks:
        hook.remove()
    logits = torch.cat([F.linear(x, block.mixlora_router["default"]).reshape(-1, 4) for x, block in zip(inputs, blocks)])
    return out, logits, torch.softmax(logits, dim=-1)


def test_top_p_balance_loss_counts_each_tokens_chosen_set():
    config = hf_moe.MixLoraConfig(**{**MIXLORA, "routing_strategy": "mixlora-dynamic", "top_p": 0.5,
                                     "router_aux_loss_coef": 0.5})
    model = peft_model(config)
    ids = token_ids(2, 6)
    out, _, probs = _router_probs(model, ids)
    chosen = torch.zeros_like(probs)  # [T, E]: 1 where the expert is in the token's set
    for t, token_probs in enumerate(probs):
        for _, e in top_p_choice(token_probs, 0.5):
            chosen[t, e] = 1
    balance = 4 * torch.sum(chosen.mean(dim=0) * probs.mean(dim=0))
    assert out.aux_losses.keys() == {"router_aux_loss"}
    assert_close(out.aux_losses["router_aux_loss"], balance)
    assert_close(out.loss, causal_lm_loss(out.logits, ids) + 0.5 * balance)


def test_switch_adds_the_z_loss_to_the_top1_balance_loss():
    config = hf_moe.MixLoraConfig(**{**MIXLORA, "routing_strategy": "mixlora-switch", "router_aux_loss_coef": 0.5,
                                     "router_z_loss_coef": 0.25})
    model = peft_model(config)
    ids = token_ids(2, 6)
    out, logits, probs = _router_probs(model, ids)
    balance = 4 * torch.sum(F.one_hot(probs.argmax(dim=-1), 4).float().mean(dim=0) * probs.mean(dim=0))
    z = torch.logsumexp(logits, dim=-1).square().mean()
    assert_close(out.aux_losses["router_aux_loss"], balance)
    assert_close(out.aux_losses["router_z_loss"], z)
    assert_close(out.loss, causal_lm_loss(out.logits, ids) + 0.5 * balance + 0.25 * z)


@pytest.mark.parametrize("strategy", ["mixlora-dynamic", "mixlora-switch"])
def test_gradient_accumulation_gives_the_same_aux_contribution(strategy, tmp_path):
    """One SGD step on 4 identical rows: batch 4 vs batch 1 with 4 accumulation steps give the same update."""
    tokens = token_ids(1, 8, seed=7)[0].tolist()
    rows = [{"input_ids": tokens, "attention_mask": [1] * 8, "labels": tokens}] * 4
    config = {**MIXLORA, "routing_strategy": strategy, "router_aux_loss_coef": 1.0, "router_z_loss_coef": 1.0}

    def step(batch_size, accumulation):
        model = peft_model(hf_moe.MixLoraConfig(**config))
        trainer = train_one_step(model, rows, tmp_path, batch_size, accumulation)
        return adapter_state(model), trainer.state.log_history[0]

    full, full_log = step(4, 1)
    accumulated, accumulated_log = step(1, 4)
    for name in full:
        assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)
    assert_close(accumulated_log["lora_moe/aux_loss"], full_log["lora_moe/aux_loss"], rtol=1e-5, atol=1e-6)
    assert full_log["lora_moe/router_aux_loss"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Generation, materialize (save / load in a fresh process: test_lora_moe.py)


@pytest.mark.parametrize("strategy", ["mixlora", "mixlora-dynamic", "mixlora-switch"])
def test_generate_with_cache_equals_without(strategy):
    model = peft_model(hf_moe.MixLoraConfig(**{**MIXLORA, **OPTIONS, "routing_strategy": strategy}))
    generate_with_and_without_cache(model, 6, rtol=1e-4, input_ids=token_ids(2, 5))


def test_materialize_refuses_routing_a_top_k_moe_cannot_express(tmp_path):
    from hf_moe.finetune.lora_moe.materialize import materialize

    tiny_llama().save_pretrained(tmp_path / "base")
    config = hf_moe.MixLoraConfig(**{**MIXLORA, "routing_strategy": "mixlora-switch"})
    peft_model(config, base=LlamaForCausalLM.from_pretrained(tmp_path / "base")).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="`routing_strategy`='mixlora-switch'"):
        materialize(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
