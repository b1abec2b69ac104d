"""MoLA: per-layer expert counts, the top-k routed LoRA forward, and the per-layer balance loss."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from test_lora_moe import causal_lm_loss, peft_model, tiny_llama, token_ids
from torch.testing import assert_close

import hf_moe
from hf_moe.finetune.lora_moe import MolaLinear

MOLA = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "r": 4}


def experts_by_layer(model) -> dict[int, set[int]]:
    counts = {}
    for module in model.modules():
        if isinstance(module, MolaLinear):
            counts.setdefault(module.layer_index, set()).add(module.num_experts["default"])
    return counts


@pytest.mark.parametrize("num_experts, expected", [
    ("triangle", [2, 4, 6, 8]),
    ("inverted", [8, 6, 4, 2]),
    ("hourglass", [8, 2, 2, 8]),
    ("uniform", [5, 5, 5, 5]),
    ([3, 1, 2, 4], [3, 1, 2, 4]),
    (3, [3, 3, 3, 3]),
])
def test_each_decoder_layer_gets_its_number_of_experts(num_experts, expected):
    top_k = [1, 1, 1, 1] if isinstance(num_experts, list) else 1
    model = get_peft_model(tiny_llama(num_layers=4), hf_moe.MolaConfig(num_experts=num_experts, top_k=top_k))
    assert experts_by_layer(model) == {layer: {count} for layer, count in enumerate(expected)}
    routers = [name for name, _ in model.named_parameters() if "mola_router" in name]
    assert len(routers) == 4 * 7  # every attention and FFN projection of every layer


def test_presets_scale_to_any_depth_and_lists_must_match_it():
    assert hf_moe.MolaConfig(num_experts="triangle").experts_per_layer(8) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert hf_moe.MolaConfig(num_experts="triangle").experts_per_layer(2) == [2, 6]
    with pytest.raises(ValueError, match="one entry per decoder layer"):
        get_peft_model(tiny_llama(num_layers=2), hf_moe.MolaConfig(num_experts=[2, 4, 6]))
    with pytest.raises(ValueError, match="layer 0 has 2 experts"):
        get_peft_model(tiny_llama(num_layers=2), hf_moe.MolaConfig(num_experts="triangle", top_k=3))


def test_mola_linear_equals_top_k_routed_lora_written_out():
    model = peft_model(hf_moe.MolaConfig(**MOLA, num_experts=[4, 6], top_k=[2, 3]))
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    router, lora_a, lora_b = (param["default"] for param in (layer.mola_router, layer.mola_A, layer.mola_B))
    expected = []
    for token in x.reshape(-1, 32):
        probs = torch.softmax(router @ token, dim=-1)
        top = probs.topk(3)
        delta = sum(w / top.values.sum() * (lora_b[e] @ (lora_a[e] @ token)) for w, e in zip(top.values, top.indices))
        expected.append(F.linear(token, layer.base_layer.weight) + layer.scaling["default"] * delta)
    with torch.no_grad():
        assert_close(layer(x), torch.stack(expected).view(2, 5, 32))


def reference_mola_balance_loss(layer_logits: list[torch.Tensor], num_experts: list[int], top_k: list[int]):
    """MoLA's `load_balancing_loss_func` (GCYZSL/MoLA, src/mola_modeling_llama_hacked.py), written out: per layer,
    the logits of its targeted Linears concatenated; f = top-k counts normalised to sum to one."""
    overall = torch.tensor(0.0)
    for logits, experts, k in zip(layer_logits, num_experts, top_k):
        routing_weights = torch.softmax(logits, dim=-1)
        selected = torch.topk(routing_weights, k, dim=-1).indices.reshape(-1)
        counts = F.one_hot(selected, experts).sum(dim=-2)
        tokens_per_expert = counts / counts.sum()
        overall = overall + torch.sum(tokens_per_expert * routing_weights.mean(dim=0)) * experts
    return overall


def test_balance_loss_matches_the_reference_code_and_reaches_the_loss():
    config = hf_moe.MolaConfig(**MOLA, num_experts=[4, 6], top_k=[2, 3], router_aux_loss_coef=0.01)
    model = peft_model(config)
    layers = {}
    for module in model.modules():
        if isinstance(module, MolaLinear):
            module.register_forward_pre_hook(lambda module, args: layers.setdefault(module.layer_index, []).append(
                F.linear(args[0].reshape(-1, args[0].shape[-1]), module.mola_router["default"])))
    ids = token_ids(2, 6)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    expected = reference_mola_balance_loss([torch.cat(layers[0]), torch.cat(layers[1])], [4, 6], [2, 3])
    assert_close(out.aux_losses["router_aux_loss"], expected)
    assert_close(out.loss, causal_lm_loss(out.logits, ids) + 0.01 * expected)


def test_balance_loss_is_off_by_default():
    model = peft_model(hf_moe.MolaConfig(**MOLA))
    ids = token_ids()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert not hasattr(out, "aux_losses")
    assert_close(out.loss, causal_lm_loss(out.logits, ids))
