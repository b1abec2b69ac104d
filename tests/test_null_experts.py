"""Null experts (`num_null_experts`, AdaMoE, Zeng et al. 2024): routing over E true + N null experts written out on
small tensors, the renormalisation over the chosen true experts, zero output and no compute for null choices, the
balancing loss with the null experts' loads averaged, router statistics, cached generation, save/load and remote
code, a Trainer step, the experts implementations against each other, and config validation.

Every model is tiny and fp32 (conftest's shapes: hidden 32, 4 experts of width 64).
"""

import math

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
from huggingface_hub.errors import StrictDataclassFieldValidationError
from test_trainer import causal_lm_rows, train_one_step
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig, MixtralMoEForCausalLM
from hf_moe.conversion.layout import ConversionError, check_exportable
from hf_moe.modeling import experts_kernels
from hf_moe.modeling.modeling_hf_moe import MoESparseBlock
from hf_moe.modeling.routing import RouterDecision, TopKRouter, load_balancing_loss, router_statistics

HIDDEN = 32  # the tiny config's hidden size
ATOL = 1e-5


def null_router(num_experts=4, num_null=2, top_k=3, **overrides) -> TopKRouter:
    """A router in eval mode whose logits are the first E + N hidden dimensions: the true experts' weight is
    [I_E | 0] and the null experts' is [0 | I_N | 0]."""
    config = make_mixtral_config(num_local_experts=num_experts, num_null_experts=num_null, num_experts_per_tok=top_k,
                                 **overrides)
    router = TopKRouter(config)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :num_experts] = torch.eye(num_experts)
        router.null_weight.zero_()
        router.null_weight[:, num_experts:num_experts + num_null] = torch.eye(num_null)
    return router.eval()


def hidden_for(logits) -> torch.Tensor:
    """Hidden states [T, H] whose router logits (under `null_router`) are exactly `logits` [T, E + N]."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    hidden = torch.zeros(logits.shape[0], HIDDEN)
    hidden[:, : logits.shape[1]] = logits
    return hidden


# E = 4 true experts (ids 0-3) and N = 2 null experts (ids 4, 5); k = 3
LOGITS = [
    [2.0, 1.0, 0.1, -1.0, 0.5, -0.3],  # top-3: 0, 1, 4 (null)  -> two true experts
    [0.3, 1.5, -0.4, 0.9, 1.2, 0.0],  # top-3: 1, 4 (null), 3  -> two true experts
    [-1.0, 0.2, 0.0, -0.5, 2.0, 1.9],  # top-3: 4, 5 (null), 1  -> one true expert
    [-2.0, -1.5, -1.8, -2.2, 3.0, 2.5],  # top-3: 4, 5, then 1  -> one true expert
    [1.0, 1.1, 1.2, 1.3, -3.0, -3.0],  # top-3: 3, 2, 1         -> three true experts
]


def softmax_row(row):
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def top_k_written_out(row, k):
    return sorted(range(len(row)), key=lambda e: -row[e])[:k]


# --------------------------------------------------------------------------------------------------------------
# The router against the paper's formula
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_takes_top_k_over_true_and_null_experts_of_one_softmax(norm_topk_prob):
    router = null_router(norm_topk_prob=norm_topk_prob)
    router_logits, weights, index, decision = router(hidden_for(LOGITS))
    assert router_logits.shape == (5, 6) and torch.equal(router_logits, torch.tensor(LOGITS))
    for t, row in enumerate(LOGITS):
        s = softmax_row(row)  # one softmax over the E + N = 6 experts
        chosen = top_k_written_out(row, 3)
        assert index[t].tolist() == chosen
        true_sum = sum(s[e] for e in chosen if e < 4)  # AdaMoE: renormalised over the chosen TRUE experts
        for slot, e in enumerate(chosen):
            expected = (s[e] / true_sum if norm_topk_prob else s[e]) if e < 4 else 0.0  # a null slot weighs 0
            assert weights[t, slot].item() == pytest.approx(expected, abs=1e-6)
            assert decision.dispatched[t, slot].item() == (e < 4)
        assert_close(decision.probs[t], torch.tensor(s), atol=1e-6, rtol=0)
    assert decision.valid.all() and decision.num_null_experts == 2
    # tokens use 2, 2, 1, 1 and 3 true experts: the number is adaptive
    assert decision.dispatched.sum(dim=-1).tolist() == [2, 2, 1, 1, 3]


def test_capacity_counts_true_experts_only():
    # C = ceil(cf * k * T / E) slots per true expert, E = 4 true experts; null slots take none
    router = null_router(capacity_factor=2.0).train()  # C = 8: nothing dropped
    _, weights, index, decision = router(hidden_for(LOGITS))
    assert torch.equal(decision.dispatched, index < 4)
    router = null_router(capacity_factor=0.5).train()  # C = ceil(0.5 * 3 * 5 / 4) = 2
    _, weights, index, decision = router(hidden_for(LOGITS))
    kept_per_expert = [int(((index == e) & decision.dispatched).sum()) for e in range(4)]
    # GShard order (all first choices, then all second, ...): expert 1 keeps token 1's first and token 0's second
    # choice of its 5; expert 3 keeps token 4's first and token 1's third choice, which it would lose if the null
    # first choices of tokens 2 and 3 took capacity
    assert kept_per_expert == [1, 2, 1, 2]
    assert not decision.dispatched[index >= 4].any() and torch.all(weights[~decision.dispatched] == 0)


# --------------------------------------------------------------------------------------------------------------
# The MoE block: zero output, no compute for null experts
# --------------------------------------------------------------------------------------------------------------


def null_block(**overrides) -> MoESparseBlock:
    torch.manual_seed(0)
    config = make_mixtral_config(num_null_experts=2, num_experts_per_tok=3, **overrides)
    block = randomize_weights_(MoESparseBlock(config)).eval()
    with torch.no_grad():  # the router of `null_router`, scaled so that every logit is readable from the input
        block.gate.weight.zero_()
        block.gate.weight[:, :4] = torch.eye(4)
        block.gate.null_weight.zero_()
        block.gate.null_weight[:, 4:6] = torch.eye(2)
    return block


def swiglu_expert(experts, e, x):
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[e])


def test_block_output_is_the_weighted_sum_of_the_chosen_true_experts_and_null_pairs_are_never_computed():
    block = null_block()
    x = hidden_for(LOGITS) + torch.cat([torch.zeros(5, 6), 0.3 * torch.randn(5, HIDDEN - 6)], dim=1)
    rows_seen = []
    hook = block.experts.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    with torch.no_grad():
        output = block(x[None])[0]
        _, weights, index, _ = block.gate(x)
    hook.remove()
    assert rows_seen == [2 + 2 + 1 + 1 + 3]  # one row per (token, true expert) pair: no null pair is computed
    for t in range(5):
        expected = sum(weights[t, j] * swiglu_expert(block.experts, int(index[t, j]), x[t])
                       for j in range(3) if index[t, j] < 4)
        assert_close(output[t], expected, atol=ATOL, rtol=0)


def test_a_token_routed_only_to_null_experts_passes_through_unchanged():
    torch.manual_seed(0)
    config = make_mixtral_config(num_hidden_layers=1, num_null_experts=2, num_experts_per_tok=2)
    model = randomize_weights_(MixtralMoEForCausalLM(config)).eval()
    layer = model.model.layers[0]
    seen = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda m, args, out: seen.update(normed=out)),
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.update(attn=out[0])),
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(input=args[0]), with_kwargs=True),
        layer.register_forward_hook(lambda m, args, out: seen.update(output=out)),
        layer.mlp.gate.register_forward_hook(lambda m, args, out: seen.update(index=out[2])),
    ]
    with torch.no_grad():
        # the null weights: the part of token 2's router input orthogonal to the other tokens', scaled up, so that
        # token 2's null logits are huge and the other tokens' are 0
        model(random_input_ids(1, 6))
        normed = seen["normed"][0]
        others = torch.linalg.qr(normed[[0, 1, 3, 4, 5]].T).Q  # [H, 5], an orthonormal basis of the others
        direction = normed[2] - others @ (others.T @ normed[2])
        layer.mlp.gate.null_weight.copy_(100.0 * direction.expand(2, -1) / direction.norm())
        model(random_input_ids(1, 6))
    for hook in hooks:
        hook.remove()
    only_null = (seen["index"] >= 4).all(dim=-1)  # [T]
    assert only_null[2] and not only_null.all()
    residual = seen["input"] + seen["attn"]  # the stream after attention
    assert torch.equal(seen["output"][0, only_null], residual[0, only_null])  # the feed-forward added nothing
    assert not torch.equal(seen["output"][0, ~only_null], residual[0, ~only_null])


# --------------------------------------------------------------------------------------------------------------
# The balancing loss and the statistics
# --------------------------------------------------------------------------------------------------------------


def decision_for(logits, num_null=2, top_k=3) -> RouterDecision:
    logits = torch.tensor(logits)
    probs = logits.softmax(dim=-1)
    index = logits.topk(top_k, dim=-1).indices
    true_slots = index < logits.shape[1] - num_null
    return RouterDecision(logits=logits, probs=probs, top_k_index=index, top_k_weights=probs.gather(1, index),
                          valid=torch.ones_like(true_slots), dispatched=true_slots, num_null_experts=num_null)


def adamoe_loss_reference(layers, masks, num_experts=4, num_null=2, top_k=3) -> float:
    """Pooled over `layers` (lists of logits rows), counting tokens with mask 1, written out:
    f_e = #(e chosen) / T, with f of each null expert replaced by the mean f of the null experts; P_e = sum_t p_te / T;
    loss = (E + N) * sum_e f_e P_e."""
    total_experts = num_experts + num_null
    counts, prob_sums, tokens = [0.0] * total_experts, [0.0] * total_experts, 0
    for rows, mask in zip(layers, masks):
        for row, real in zip(rows, mask):
            if not real:
                continue
            tokens += 1
            for e in top_k_written_out(row, top_k):
                counts[e] += 1
            for e, p in enumerate(softmax_row(row)):
                prob_sums[e] += p
    null_mean = sum(counts[num_experts:]) / num_null
    counts = counts[:num_experts] + [null_mean] * num_null
    return total_experts * sum((counts[e] / tokens) * (prob_sums[e] / tokens) for e in range(total_experts))


SECOND_LAYER = [[0.1, -0.2, 0.4, 1.0, 0.8, 1.1], [2.0, -1.0, 0.0, 0.5, 0.3, -0.4], [0.0, 0.05, -0.1, 0.2, -0.05, 0.1],
                [1.0, 2.0, 3.0, -1.0, 0.0, 2.5], [-0.5, 0.5, 1.5, 0.2, 1.4, 1.6]]


def test_balancing_loss_averages_the_null_experts_loads():
    decisions = [decision_for(LOGITS), decision_for(SECOND_LAYER)]
    mask = [1, 1, 0, 1, 1]
    pooled = load_balancing_loss(decisions, torch.tensor(mask))
    assert pooled.item() == pytest.approx(adamoe_loss_reference([LOGITS, SECOND_LAYER], [mask, mask]), abs=1e-6)
    per_layer = load_balancing_loss(decisions, per_layer=True)
    expected = (adamoe_loss_reference([LOGITS], [[1] * 5]) + adamoe_loss_reference([SECOND_LAYER], [[1] * 5])) / 2
    assert per_layer.item() == pytest.approx(expected, abs=1e-6)
    # the averaging matters here: the same loss without it (plain Switch over E + N) differs
    plain = [RouterDecision(**{**vars(d), "num_null_experts": 0}) for d in decisions]
    assert abs(load_balancing_loss(plain, per_layer=True).item() - expected) > 1e-3


def test_model_aux_loss_is_the_averaged_loss_of_its_recorded_router_logits():
    torch.manual_seed(0)
    config = make_mixtral_config(num_null_experts=3, num_experts_per_tok=3, output_router_logits=True)
    model = randomize_weights_(MixtralMoEForCausalLM(config)).train()
    input_ids = random_input_ids(2, 6)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    assert [logits.shape for logits in out.router_logits] == [(12, 7), (12, 7)]  # E + N columns
    layers = [logits.tolist() for logits in out.router_logits]
    mask = attention_mask.reshape(-1).tolist()
    expected = adamoe_loss_reference(layers, [mask, mask], num_experts=4, num_null=3, top_k=3)
    assert out.aux_loss.item() == pytest.approx(expected, abs=1e-5)
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.null_weight.grad.abs().max() > 0


def test_statistics_count_the_true_experts_and_the_null_fraction():
    (stats,) = router_statistics([decision_for(LOGITS)])
    assert stats["load"].tolist() == [1, 5, 1, 2]  # dispatched slots of the 4 true experts only
    assert stats["null_fraction"].item() == pytest.approx(6 / 15)  # 6 of the 15 slots chose a null expert
    assert stats["dropped_fraction"].item() == 0  # a null choice is not a dropped slot


# --------------------------------------------------------------------------------------------------------------
# Generation, save/load, Trainer, experts implementations
# --------------------------------------------------------------------------------------------------------------


def null_model(family: str = "mixtral", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    settings = dict(num_null_experts=3, num_experts_per_tok=3, **overrides)
    if family == "mixtral":
        model = MixtralMoEForCausalLM(make_mixtral_config(**settings))
    else:
        model = DeepSeekMoEForCausalLM(make_deepseek_config(**settings))
    return randomize_weights_(model).eval()


def greedy(model, prompt, use_cache: bool, attention_mask=None, new_tokens: int = 6):
    return model.generate(prompt, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID, use_cache=use_cache)


@pytest.mark.parametrize(("family", "overrides"), [
    ("mixtral", {}),
    ("deepseek", {}),
    ("deepseek", {"num_hidden_layers": 4, "mod_capacity": 0.5}),  # with Mixture-of-Depths layers
], ids=["mixtral", "deepseek", "deepseek_mod"])
def test_greedy_generation_with_cache_matches_without_cache(family, overrides):
    model = null_model(family, **overrides)
    prompt = random_input_ids(2, 4, seed=6)
    mask = torch.ones_like(prompt)
    prompt[0, 0], mask[0, 0] = PAD_TOKEN_ID, 0  # one left-padded row
    with torch.no_grad():
        with_cache = greedy(model, prompt, True, mask)
        without_cache = greedy(model, prompt, False, mask)
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
        full = model(with_cache, attention_mask=full_mask).logits
        prefix = model(with_cache[:, :9], attention_mask=full_mask[:, :9], use_cache=True)
        step = model(with_cache[:, 9:], attention_mask=full_mask, cache=prefix.past_key_values, use_cache=True).logits
    assert torch.equal(with_cache, without_cache)
    assert_close(prefix.logits[full_mask[:, :9].bool()], full[:, :9][full_mask[:, :9].bool()], atol=ATOL, rtol=0)
    assert_close(step[:, -1], full[:, -1], atol=ATOL, rtol=0)


def test_save_load_and_load_as_remote_code_without_hf_moe(tmp_path):
    model = null_model("deepseek", seed=1)
    input_ids = random_input_ids(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.num_null_experts == 3
    assert loaded.model.layers[1].mlp.gate.null_weight.shape == (3, 32)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    child = load_as_remote_code_without_hf_moe({"model": tmp_path / "model"}, inputs, tmp_path)["model"]
    assert child["classes"][""].startswith("transformers_modules.")
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    assert_close(child["logits"], expected, atol=1e-6, rtol=0)


def test_one_trainer_step_updates_the_null_expert_logits(tmp_path):
    model = null_model(output_router_logits=True)
    before = model.model.layers[0].mlp.gate.null_weight.detach().clone()
    result = train_one_step(model.train(), causal_lm_rows(), tmp_path)
    assert math.isfinite(result.training_loss)
    assert not torch.equal(model.model.layers[0].mlp.gate.null_weight, before)


def test_experts_implementations_agree_in_outputs_and_gradients(monkeypatch):
    model = null_model(output_router_logits=True, capacity_factor=1.0).train()
    input_ids = random_input_ids(2, 12)

    def run(implementation):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(input_ids, labels=input_ids, output_router_stats=True)
        out.loss.backward()
        return out, {name: param.grad.clone() for name, param in model.named_parameters()}

    eager, eager_grads = run("eager")
    assert all(0 < layer["null_fraction"] < 1 for layer in eager.router_stats)
    assert eager_grads["model.layers.0.mlp.gate.null_weight"].abs().max() > 0
    results = {implementation: run(implementation) for implementation in ("auto", "sorted_mm", "grouped_mm",
                                                                          "batched_mm")}
    monkeypatch.setattr(experts_kernels, "_grouped_kernel_applies", lambda hidden_states, weight: True)
    results["sorted_mm, grouped kernel"] = run("sorted_mm")
    for implementation, (out, grads) in results.items():
        assert_close(out.logits, eager.logits, atol=ATOL, rtol=0, msg=implementation)
        assert_close(out.loss, eager.loss, atol=ATOL, rtol=0, msg=implementation)
        for name, grad in grads.items():
            assert_close(grad, eager_grads[name], atol=ATOL, rtol=0, msg=f"{implementation}: {name}")


# --------------------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------------------


def test_top_k_may_exceed_the_true_experts_up_to_true_plus_null():
    config = MixtralMoEConfig(num_local_experts=4, num_null_experts=4, num_experts_per_tok=8)
    assert config.num_null_experts == 4 and MixtralMoEConfig().num_null_experts == 0
    assert DeepSeekMoEConfig(n_routed_experts=8, num_null_experts=2, num_experts_per_tok=10).num_null_experts == 2
    assert config.base_model_ep_plan == {}  # expert parallelism would read null ids as another rank's experts
    with pytest.raises(ValueError, match=r"`num_experts_per_tok`=9 .*num_null_experts=4"):
        MixtralMoEConfig(num_local_experts=4, num_null_experts=4, num_experts_per_tok=9)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"num_null_experts": -1}, "num_null_experts"),
    ({"moe_block_type": "soft_moe"}, "moe_block_type"),
    ({"moe_block_type": "soft_merging"}, "moe_block_type"),
    ({"router_type": "expert_choice", "capacity_factor": 2.0}, "router_type"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"n_group": 2, "topk_group": 1}, "n_group"),
    ({"noisy_gating": True}, "noisy_gating"),
    ({"num_experts_per_tok": 2, "random_routing": True}, "random_routing"),
    ({"router_selection_bias": True}, "router_selection_bias"),
    ({"router_importance_loss_coef": 0.1}, "router_importance_loss_coef"),
    ({"expert_balance_loss_coef": 0.01}, "expert_balance_loss_coef"),
    ({"sequence_balance_loss_coef": 0.01}, "sequence_balance_loss_coef"),
])
def test_invalid_null_expert_settings_raise_naming_the_field(overrides, field):
    settings = {"num_local_experts": 4, "num_null_experts": 2, "num_experts_per_tok": 3, **overrides}
    with pytest.raises(ValueError, match=f"`{field}`"):
        MixtralMoEConfig(**settings)


def test_a_null_expert_count_of_another_type_raises_naming_the_field():
    for value in (1.5, True):
        with pytest.raises(StrictDataclassFieldValidationError, match="num_null_experts"):
            MixtralMoEConfig(num_null_experts=value)


def test_router_bias_with_null_experts_raises_naming_the_field():
    with pytest.raises(ValueError, match="`router_bias`"):
        DeepSeekMoEConfig(n_routed_experts=8, num_null_experts=2, num_experts_per_tok=3, router_bias=True)


def test_export_to_a_native_format_refuses_null_experts():
    with pytest.raises(ConversionError, match="`num_null_experts`=2"):
        check_exportable(make_mixtral_config(num_null_experts=2, num_experts_per_tok=3), "mixtral")
