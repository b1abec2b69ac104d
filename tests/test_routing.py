"""Routing: the router's top-k semantics, capacity and token dropping, expert choice, GShard random routing, noisy
gating, every balancing loss against a written-out formula, and the validation of the routing config fields.

Most tests drive a bare `TopKRouter` with hand-made logits: the router weight is the identity on the first E hidden
dimensions, so `router(hidden)` sees exactly the logits written in the test.
"""

import dataclasses
import itertools
import math

import pytest
import torch
from conftest import FAMILIES, make_mixtral_config, random_input_ids, randomize_weights_
from torch.testing import assert_close
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hf_moe import MixtralMoEConfig, MixtralMoEForCausalLM
from hf_moe.modeling import experts_kernels
from hf_moe.modeling.routing import (
    RouterDecision,
    TopKRouter,
    device_balance_loss,
    expert_balance_loss,
    importance_loss,
    load_balancing_loss,
    load_loss,
    router_losses,
    sequence_balance_loss,
    z_loss,
)

HIDDEN = 32  # the tiny config's hidden size


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def router_for(num_experts=4, top_k=2, **overrides) -> TopKRouter:
    """A router in eval mode whose weight is [I_E | 0]: its logits are the first E hidden dimensions."""
    config = make_mixtral_config(num_local_experts=num_experts, num_experts_per_tok=top_k, **overrides)
    router = TopKRouter(config)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :num_experts] = torch.eye(num_experts)
        if config.noisy_gating:
            router.noise_weight.copy_(0.5 * torch.randn_like(router.noise_weight))
    return router.eval()


def hidden_for(logits) -> torch.Tensor:
    """Hidden states [T, H] whose router logits (under `router_for`) are exactly `logits` [T, E]."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    hidden = torch.zeros(logits.shape[0], HIDDEN)
    hidden[:, : logits.shape[1]] = logits
    return hidden


def route(router, logits):
    """-> (top_k_weights [T, k], top_k_index [T, k], decision)."""
    router_logits, weights, index, decision = router(hidden_for(logits))
    assert torch.equal(router_logits, torch.as_tensor(logits, dtype=torch.float32))  # the helper's premise
    return weights, index, decision


def make_decision(logits, top_k_index, probs=None, top_k_weights=None, load_probs=None) -> RouterDecision:
    """A hand-made decision: every slot valid and dispatched; probs default to softmax(logits)."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    top_k_index = torch.as_tensor(top_k_index, dtype=torch.long)
    probs = torch.softmax(logits, dim=-1) if probs is None else torch.as_tensor(probs, dtype=torch.float32)
    if top_k_weights is None:
        top_k_weights = probs.gather(1, top_k_index)
    valid = torch.ones_like(top_k_index, dtype=torch.bool)
    return RouterDecision(logits=logits, probs=probs, top_k_index=top_k_index,
                          top_k_weights=torch.as_tensor(top_k_weights, dtype=torch.float32), valid=valid,
                          dispatched=valid, load_probs=load_probs)


def softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def cv_squared_reference(values: list[float]) -> float:
    """Unbiased variance over mean squared, written out."""
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return variance / mean**2


def gshard_keep_reference(top_k_index: torch.Tensor, num_experts: int, capacity_factor: float, groups: int):
    """GShard priority, written out: per contiguous token group, all first choices in token order, then all second
    choices, ...; each expert keeps at most C = ceil(cf * k * T_g / E) slots. -> [T, k] bool."""
    num_tokens, top_k = top_k_index.shape
    keep = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    bounds = [num_tokens * g // groups for g in range(groups + 1)]
    for start, stop in itertools.pairwise(bounds):
        capacity = max(1, math.ceil(capacity_factor * top_k * (stop - start) / num_experts))
        used = [0] * num_experts
        for slot in range(top_k):
            for token in range(start, stop):
                expert = int(top_k_index[token, slot])
                if used[expert] < capacity:
                    used[expert] += 1
                    keep[token, slot] = True
    return keep


# Two sparse layers, T=5 tokens, E=4 experts, k=2; top-2 indices are the real top-2 of the logits.
LAYER_LOGITS = [
    [[2.0, 1.0, 0.1, -1.0], [0.3, 1.5, -0.4, 0.9], [-1.2, 0.2, 2.2, 0.7], [1.1, -0.5, 0.4, 0.0],
     [0.0, 0.6, -0.3, 1.8]],
    [[0.5, -0.7, 1.3, 0.2], [1.6, 0.4, -1.0, 0.8], [-0.2, 2.1, 0.3, -0.9], [0.9, 1.2, 0.0, -0.3],
     [-1.5, 0.1, 0.7, 1.0]],
]
LAYER_TOP2 = [
    [[0, 1], [1, 3], [2, 3], [0, 2], [3, 1]],
    [[2, 0], [0, 3], [1, 2], [1, 0], [3, 2]],
]


def two_layer_decisions() -> list[RouterDecision]:
    return [make_decision(logits, top2) for logits, top2 in zip(LAYER_LOGITS, LAYER_TOP2)]


def switch_reference(layers: list[int], token_mask: list[int], num_experts=4) -> float:
    """Switch loss pooled over `layers` (indices into LAYER_LOGITS), only tokens with mask 1, written out."""
    counts, prob_sums, total = [0.0] * num_experts, [0.0] * num_experts, 0.0
    for layer in layers:
        for t, row in enumerate(LAYER_LOGITS[layer]):
            if not token_mask[t]:
                continue
            total += 1
            for e in LAYER_TOP2[layer][t]:
                counts[e] += 1
            for e, p in enumerate(softmax_row(row)):
                prob_sums[e] += p
    return num_experts * sum((counts[e] / total) * (prob_sums[e] / total) for e in range(num_experts))


def test_hand_made_top2_indices_are_the_top2_of_the_logits():
    for logits, top2 in zip(LAYER_LOGITS, LAYER_TOP2):
        assert torch.equal(torch.tensor(logits).topk(2, dim=-1).indices, torch.tensor(top2))


# --------------------------------------------------------------------------------------------------------------
# Balancing losses against written-out formulas
# --------------------------------------------------------------------------------------------------------------


def test_switch_loss_pooled_over_layers_equals_written_out_formula():
    loss = load_balancing_loss(two_layer_decisions())
    assert loss.item() == pytest.approx(switch_reference([0, 1], [1] * 5), abs=1e-6)


def test_switch_loss_per_layer_is_the_mean_of_each_layer_loss():
    loss = load_balancing_loss(two_layer_decisions(), per_layer=True)
    expected = (switch_reference([0], [1] * 5) + switch_reference([1], [1] * 5)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert abs(expected - switch_reference([0, 1], [1] * 5)) > 1e-3  # the case tells the two reductions apart


def test_switch_loss_excludes_masked_tokens():
    mask = [1, 1, 0, 1, 0]
    pooled = load_balancing_loss(two_layer_decisions(), torch.tensor(mask))
    per_layer = load_balancing_loss(two_layer_decisions(), torch.tensor(mask), per_layer=True)
    assert pooled.item() == pytest.approx(switch_reference([0, 1], mask), abs=1e-6)
    expected_per_layer = (switch_reference([0], mask) + switch_reference([1], mask)) / 2
    assert per_layer.item() == pytest.approx(expected_per_layer, abs=1e-6)
    assert abs(pooled.item() - switch_reference([0, 1], [1] * 5)) > 1e-3  # the mask changed the value


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_switch_loss_pooled_equals_transformers_mixtral_load_balancing_loss_func(masked):
    # T = 6 tokens as a [B=2, S=3] batch
    torch.manual_seed(3)
    logits = [torch.randn(6, 4), torch.randn(6, 4)]
    decisions = [make_decision(layer, layer.topk(2, dim=-1).indices) for layer in logits]
    attention_mask = torch.tensor([[1, 1, 1], [0, 1, 1]]) if masked else None
    ours = load_balancing_loss(decisions, None if attention_mask is None else attention_mask.reshape(-1))
    theirs = load_balancing_loss_func(tuple(logits), num_experts=4, top_k=2, attention_mask=attention_mask)
    assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_importance_loss_is_unbiased_cv_squared_of_gate_sums():
    decisions = two_layer_decisions()
    expected = []
    for layer, decision in enumerate(decisions):
        importance = [0.0] * 4
        for t in range(5):
            for slot, e in enumerate(LAYER_TOP2[layer][t]):
                importance[e] += float(decision.top_k_weights[t, slot])
        expected.append(cv_squared_reference(importance))
    assert importance_loss(decisions).item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_load_loss_is_cv_squared_of_summed_load_probabilities():
    load_probs = torch.tensor([[0.9, 0.6, 0.3, 0.2], [0.1, 0.8, 0.7, 0.4], [0.5, 0.5, 0.5, 0.5],
                               [0.95, 0.05, 0.6, 0.4]])
    decision = make_decision(torch.zeros(4, 4), [[0, 1], [1, 2], [0, 1], [0, 2]], load_probs=load_probs)
    loads = [sum(float(load_probs[t, e]) for t in range(4)) for e in range(4)]  # [2.45, 1.95, 2.1, 1.5]
    assert load_loss([decision]).item() == pytest.approx(cv_squared_reference(loads), rel=1e-5)


def test_load_loss_is_none_without_load_probabilities():
    assert load_loss(two_layer_decisions()) is None


def test_z_loss_is_mean_squared_logsumexp_of_real_tokens():
    mask = [1, 0, 1, 1, 1]
    expected = []
    for logits in LAYER_LOGITS:
        values = [math.log(sum(math.exp(v) for v in row)) ** 2 for t, row in enumerate(logits) if mask[t]]
        expected.append(sum(values) / len(values))
    assert z_loss(two_layer_decisions(), torch.tensor(mask)).item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def deepseek_f_and_p(layer: int, tokens: list[int], num_experts=4, top_k=2):
    """DeepSeekMoE: f_i = E/(kT) * #tokens choosing i,  P_i = mean over tokens of softmax prob i."""
    f, p = [0.0] * num_experts, [0.0] * num_experts
    for t in tokens:
        for e in LAYER_TOP2[layer][t]:
            f[e] += num_experts / (top_k * len(tokens))
        for e, prob in enumerate(softmax_row(LAYER_LOGITS[layer][t])):
            p[e] += prob / len(tokens)
    return f, p


def test_expert_balance_loss_is_sum_of_f_times_p_averaged_over_layers():
    expected = []
    for layer in range(2):
        f, p = deepseek_f_and_p(layer, list(range(5)))
        expected.append(sum(fi * pi for fi, pi in zip(f, p)))
    assert expert_balance_loss(two_layer_decisions()).item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_device_balance_loss_uses_mean_f_and_summed_p_per_device_group():
    expected = []
    for layer in range(2):
        f, p = deepseek_f_and_p(layer, list(range(5)))
        devices = [[0, 1], [2, 3]]  # D = 2 contiguous groups of E = 4 experts
        f_device = [sum(f[e] for e in group) / len(group) for group in devices]
        p_device = [sum(p[e] for e in group) for group in devices]
        expected.append(sum(fd * pd for fd, pd in zip(f_device, p_device)))
    loss = device_balance_loss(two_layer_decisions(), num_device_groups=2)
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # D groups differ from the expert-level loss on this input
    assert abs(loss.item() - expert_balance_loss(two_layer_decisions()).item()) > 1e-3


def test_sequence_balance_loss_is_per_sequence_with_normalised_sigmoid_scores():
    # B = 2 sequences of S = 3, sigmoid scores; the last token of sequence 1 is padding
    logits = [[1.0, -0.5, 0.3, 2.0], [0.2, 0.8, -1.0, 0.1], [-0.3, 0.4, 1.2, 0.0],
              [0.7, 0.6, -0.2, -1.1], [1.5, -0.4, 0.9, 0.3], [-2.0, 1.0, 0.5, 0.2]]
    top2 = [[3, 0], [1, 3], [2, 1], [0, 1], [0, 2], [1, 2]]
    mask = [1, 1, 1, 1, 1, 0]
    normalised = []
    for row in logits:
        s = [sigmoid(v) for v in row]
        normalised.append([v / sum(s) for v in s])
    decision = make_decision(logits, top2, probs=normalised)
    per_sequence = []
    for b in range(2):
        tokens = [t for t in range(3 * b, 3 * b + 3) if mask[t]]
        f, p = [0.0] * 4, [0.0] * 4
        for t in tokens:
            for e in top2[t]:
                f[e] += 4 / (2 * len(tokens))
            for e in range(4):
                p[e] += normalised[t][e] / len(tokens)
        per_sequence.append(sum(fi * pi for fi, pi in zip(f, p)))
    loss = sequence_balance_loss([decision], batch_size=2, token_mask=torch.tensor(mask))
    assert loss.item() == pytest.approx(sum(per_sequence) / 2, rel=1e-6)


def test_router_probs_of_sigmoid_scoring_are_sigmoid_scores_normalised_to_sum_one():
    router = router_for(scoring_func="sigmoid")
    row = [1.0, -0.5, 0.3, 2.0]
    _, _, decision = route(router, [row])
    s = [sigmoid(v) for v in row]
    assert_close(decision.probs[0], torch.tensor([v / sum(s) for v in s]), atol=1e-6, rtol=0)


def test_router_losses_holds_a_key_only_for_each_non_zero_coefficient():
    decisions = two_layer_decisions()
    off = make_mixtral_config(router_aux_loss_coef=0.0)
    assert set(router_losses(decisions, off)) == {"router_aux_loss_coef"}  # the aux loss is always reported
    on = make_mixtral_config(router_z_loss_coef=0.1, router_importance_loss_coef=0.2, expert_balance_loss_coef=0.3,
                             device_balance_loss_coef=0.4, num_device_groups=2, sequence_balance_loss_coef=0.5)
    losses = router_losses(decisions, on, batch_size=1)
    assert set(losses) == {"router_aux_loss_coef", "router_z_loss_coef", "router_importance_loss_coef",
                           "expert_balance_loss_coef", "device_balance_loss_coef", "sequence_balance_loss_coef"}
    assert losses["router_z_loss_coef"].item() == pytest.approx(z_loss(decisions).item())
    assert losses["device_balance_loss_coef"].item() == pytest.approx(device_balance_loss(decisions, 2).item())


def test_router_losses_has_the_load_loss_only_when_load_probabilities_exist():
    config = make_mixtral_config(noisy_gating=True, router_load_loss_coef=0.1)
    assert "router_load_loss_coef" not in router_losses(two_layer_decisions(), config)
    with_probs = [make_decision(LAYER_LOGITS[0], LAYER_TOP2[0], load_probs=torch.rand(5, 4))]
    assert "router_load_loss_coef" in router_losses(with_probs, config)


def test_noisy_gating_load_probabilities_follow_the_normal_cdf_formula():
    """Shazeer et al. 2017: P(t -> e) = Phi((clean_e - kth_largest_noisy_among_other_experts) / std_e)."""
    torch.manual_seed(0)
    router = router_for(num_experts=4, top_k=2, noisy_gating=True).train()
    clean = [[1.0, 0.5, -0.2, 0.1], [0.0, 0.2, 0.4, -0.6], [2.0, -1.0, 0.3, 0.3], [-0.4, 0.9, 0.8, 0.1]]
    hidden = hidden_for(clean)
    torch.manual_seed(42)
    _, weights, index, decision = router(hidden)

    noise_pre = (hidden @ router.noise_weight.detach().T).tolist()
    torch.manual_seed(42)
    standard_normal = torch.randn(4, 4).tolist()  # the same draw as the router's randn_like
    for t in range(4):
        std = [math.log1p(math.exp(v)) + 1e-2 for v in noise_pre[t]]
        noisy = [clean[t][e] + standard_normal[t][e] * std[e] for e in range(4)]
        for e in range(4):
            others = sorted((noisy[j] for j in range(4) if j != e), reverse=True)
            threshold = others[2 - 1]  # k-th largest among the other experts
            z = (clean[t][e] - threshold) / std[e]
            expected = 0.5 * (1 + math.erf(z / math.sqrt(2)))
            assert decision.load_probs[t, e].item() == pytest.approx(expected, abs=1e-5), (t, e)
        # the noisy logits choose the experts and give the gates (softmax over the kept noisy logits)
        top2 = sorted(range(4), key=lambda e: -noisy[e])[:2]
        assert index[t].tolist() == top2
        kept = softmax_row([noisy[e] for e in top2])
        assert_close(weights[t], torch.tensor(kept), atol=1e-5, rtol=0)


def test_noisy_gating_is_off_in_eval():
    router = router_for(noisy_gating=True)
    clean = [[1.0, 0.5, -0.2, 0.1]]
    _, index, decision = route(router, clean)
    assert decision.load_probs is None
    assert index[0].tolist() == [0, 1]


# --------------------------------------------------------------------------------------------------------------
# Degenerate batches: zero real tokens, one expert
# --------------------------------------------------------------------------------------------------------------

# Every balancing loss, by its coefficient's name (the keys of `router_losses`).
# the balancing losses of token routing (Mixture-of-Depths' router loss has its own tests)
# the FFN routers' balancing losses (Mixture-of-Depths' and the attention experts' routers have their own tests)
LOSS_COEFS = [f.name for f in dataclasses.fields(MixtralMoEConfig)
              if f.name.endswith("_loss_coef") and f.name != "mod_aux_loss_coef"
              and not f.name.startswith("attention_router_")]
CV_SQUARED_LOSSES = ("router_importance_loss_coef", "router_load_loss_coef")


def every_loss_on(num_experts: int, top_k: int, **overrides):
    """A config with every balancing loss on (noisy gating for the load loss)."""
    return make_mixtral_config(num_local_experts=num_experts, num_experts_per_tok=top_k, noisy_gating=True,
                               num_device_groups=num_experts // 2 or 1, **{name: 0.1 for name in LOSS_COEFS},
                               **overrides)


def losses_of_a_training_forward(config, attention_mask):
    """-> (router_losses of two sparse layers, the hidden states [B*S, H] they were routed from, with grad)."""
    torch.manual_seed(0)
    router = TopKRouter(config).train()
    with torch.no_grad():
        for param in router.parameters():
            param.copy_(0.5 * torch.randn_like(param))
    hidden = torch.randn(attention_mask.numel(), HIDDEN, requires_grad=True)
    decisions = [router(hidden)[3], router(2 * hidden)[3]]
    return router_losses(decisions, config, attention_mask, batch_size=attention_mask.shape[0]), hidden


def backward_if_differentiable(loss):
    """A loss can be a constant (e.g. the load loss when every expert is always chosen)."""
    if loss.requires_grad:
        loss.backward()


def test_every_balancing_loss_is_covered():
    losses, _ = losses_of_a_training_forward(every_loss_on(4, 2), torch.ones(2, 3))
    assert set(losses) == set(LOSS_COEFS)


@pytest.mark.parametrize("per_layer", [False, True], ids=["pooled", "per_layer"])
@pytest.mark.parametrize("name", LOSS_COEFS)
def test_loss_over_zero_real_tokens_is_zero_with_a_zero_gradient(name, per_layer):
    """An all-padding batch: a mean over no tokens is 0 (not 0 / 0 = NaN, which would poison every gradient)."""
    config = every_loss_on(4, 2, aux_loss_per_layer=per_layer)
    losses, hidden = losses_of_a_training_forward(config, torch.zeros(2, 3))
    assert losses[name].item() == 0.0
    backward_if_differentiable(losses[name])
    assert hidden.grad is None or torch.equal(hidden.grad, torch.zeros_like(hidden.grad))


@pytest.mark.parametrize("name", LOSS_COEFS)
def test_loss_over_one_expert_is_finite_with_finite_gradients(name):
    """One expert is always balanced: CV^2 is 0 (the unbiased variance of one value would be 0 / 0), the
    Switch and DeepSeek losses take their balanced value k = 1, and no balancing loss has a gradient."""
    losses, hidden = losses_of_a_training_forward(every_loss_on(1, 1), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    balanced = {**{loss: 1.0 for loss in LOSS_COEFS}, **{loss: 0.0 for loss in CV_SQUARED_LOSSES}}
    backward_if_differentiable(losses[name])
    assert hidden.grad is None or torch.isfinite(hidden.grad).all()
    if name != "router_z_loss_coef":  # the z-loss pushes the logit itself towards 0, with one expert too
        assert losses[name].item() == pytest.approx(balanced[name], abs=1e-6)
        assert hidden.grad is None or torch.equal(hidden.grad, torch.zeros_like(hidden.grad))


def test_noisy_gating_that_chooses_every_expert_has_load_probability_one_and_finite_gradients():
    """num_experts == num_experts_per_tok: no k-th competitor exists, P(t -> e) = 1 (the normal CDF at +inf, whose
    gradient is NaN)."""
    losses, hidden = losses_of_a_training_forward(every_loss_on(2, 2), torch.ones(2, 3))
    assert losses["router_load_loss_coef"].item() == 0.0
    sum(losses.values()).backward()
    assert torch.isfinite(hidden.grad).all()


def test_sequence_balance_loss_ignores_all_padding_sequences():
    """The mean is over sequences with real tokens: an all-padding row does not dilute it."""
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    decision = make_decision(logits, logits.topk(2, dim=-1).indices)
    padded = make_decision(torch.cat([logits, torch.randn(3, 4)]), torch.cat([logits, torch.randn(3, 4)]).topk(
        2, dim=-1).indices)
    alone = sequence_balance_loss([decision], batch_size=2)
    with_padding_row = sequence_balance_loss([padded], batch_size=3, token_mask=torch.tensor([1] * 6 + [0] * 3))
    assert with_padding_row.item() == pytest.approx(alone.item(), rel=1e-6)


@pytest.mark.parametrize("family_name", ["mixtral", "deepseek"])
def test_all_padding_batch_gives_zero_aux_loss_and_finite_gradients(family_name):
    model = FAMILIES[family_name].causal_lm(router_z_loss_coef=0.1, router_importance_loss_coef=0.1,
                                            expert_balance_loss_coef=0.1, sequence_balance_loss_coef=0.1).train()
    input_ids = random_input_ids(2, 5)
    out = model(input_ids, attention_mask=torch.zeros_like(input_ids), labels=input_ids, output_router_logits=True)
    assert out.aux_loss.item() == 0.0
    assert all(value.item() == 0.0 for value in out.router_losses.values())
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


# --------------------------------------------------------------------------------------------------------------
# Top-k semantics
# --------------------------------------------------------------------------------------------------------------

TOPK_LOGITS = [[2.0, 1.0, 0.5, -1.0], [0.1, 0.3, -0.2, 0.9], [-1.0, 0.5, 0.4, 2.0]]
TOPK_INDEX = [[0, 1], [3, 1], [3, 1]]


def test_softmax_top_k_without_norm_gives_the_full_softmax_probabilities():
    weights, index, _ = route(router_for(norm_topk_prob=False), TOPK_LOGITS)
    assert index.tolist() == TOPK_INDEX
    expected = [[softmax_row(row)[e] for e in chosen] for row, chosen in zip(TOPK_LOGITS, TOPK_INDEX)]
    assert_close(weights, torch.tensor(expected), atol=1e-6, rtol=0)


def test_softmax_top_k_with_norm_renormalises_the_chosen_probabilities():
    weights, index, _ = route(router_for(norm_topk_prob=True), TOPK_LOGITS)
    expected = []
    for row, chosen in zip(TOPK_LOGITS, TOPK_INDEX):
        probs = [softmax_row(row)[e] for e in chosen]
        expected.append([p / sum(probs) for p in probs])
    assert index.tolist() == TOPK_INDEX
    assert_close(weights, torch.tensor(expected), atol=1e-6, rtol=0)


def test_mixtral_top_k_then_softmax_equals_norm_topk_prob():
    weights, index, _ = route(router_for(norm_topk_prob=True), TOPK_LOGITS)
    logits = torch.tensor(TOPK_LOGITS)
    top_logits, top_index = logits.topk(2, dim=-1)  # Mixtral: top-k of the logits, then softmax over them
    assert torch.equal(index, top_index)
    assert_close(weights, torch.softmax(top_logits, dim=-1), atol=1e-6, rtol=0)


def test_routed_scaling_factor_multiplies_the_gate_weights():
    plain, _, _ = route(router_for(norm_topk_prob=True), TOPK_LOGITS)
    scaled, index, _ = route(router_for(norm_topk_prob=True, routed_scaling_factor=2.5), TOPK_LOGITS)
    assert index.tolist() == TOPK_INDEX
    assert_close(scaled, 2.5 * plain, atol=1e-6, rtol=0)
    assert_close(scaled.sum(dim=-1), torch.full((3,), 2.5), atol=1e-6, rtol=0)


def test_selection_bias_changes_the_chosen_experts_but_gates_are_unbiased_sigmoid_scores():
    row = [1.0, 0.8, 0.0, -0.5]
    router = router_for(scoring_func="sigmoid", router_selection_bias=True, norm_topk_prob=False)
    _, unbiased_index, _ = route(router, [row])
    assert sorted(unbiased_index[0].tolist()) == [0, 1]
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    weights, index, _ = route(router, [row])
    assert sorted(index[0].tolist()) == [0, 2]  # sigmoid 0.5 + bias 1.0 beats sigmoid(0.8)
    expected = [sigmoid(row[e]) for e in index[0].tolist()]  # the bias is not in the gate
    assert_close(weights[0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_a_checkpoint_without_selection_bias_loads_with_zero_bias_and_nothing_reported_missing(tmp_path):
    """E.g. an upcycled dense model opened with aux-loss-free balancing on; a saved bias still loads."""
    torch.manual_seed(0)
    MixtralMoEForCausalLM(make_mixtral_config()).save_pretrained(tmp_path / "plain")
    model, info = MixtralMoEForCausalLM.from_pretrained(tmp_path / "plain", router_selection_bias=True,
                                                        output_loading_info=True)
    assert not info["missing_keys"]
    for router in model.model.routers():
        assert torch.equal(router.e_score_correction_bias, torch.zeros(router.num_experts))
        router.e_score_correction_bias.fill_(0.25)
    model.save_pretrained(tmp_path / "biased")
    reloaded = MixtralMoEForCausalLM.from_pretrained(tmp_path / "biased")
    assert all(torch.equal(router.e_score_correction_bias, torch.full((router.num_experts,), 0.25))
               for router in reloaded.model.routers())


def test_group_limited_softmax_routing_picks_only_from_groups_with_the_best_max():
    # 4 groups of 2; group max: 5, 4, 3, -5 -> groups {0, 1}. Global top-3 would be {0, 2, 4};
    # ranking groups by the sum of their top two (-> groups {2, 0}) would give {0, 4, 5}.
    row = [5.0, -5.0, 4.0, -4.5, 3.0, 2.9, -5.0, -5.0]
    router = router_for(num_experts=8, top_k=3, n_group=4, topk_group=2, norm_topk_prob=False)
    weights, index, _ = route(router, [row])
    assert sorted(index[0].tolist()) == [0, 2, 3]
    expected = [softmax_row(row)[e] for e in index[0].tolist()]
    assert_close(weights[0], torch.tensor(expected), atol=1e-6, rtol=0)


def test_group_limited_sigmoid_routing_ranks_groups_by_the_sum_of_their_top_two():
    # group sums of sigmoid: 1.0, 1.452, 1.412, 0.238 -> groups {1, 2}; by max it would be {0, 1} -> {0, 2}
    row = [3.0, -3.0, 1.0, 0.95, 0.9, 0.85, -2.0, -2.0]
    router = router_for(num_experts=8, top_k=2, n_group=4, topk_group=2, scoring_func="sigmoid")
    _, index, _ = route(router, [row])
    assert sorted(index[0].tolist()) == [2, 3]


def test_group_limited_routing_never_picks_outside_the_best_groups_on_random_logits():
    torch.manual_seed(5)
    logits = 2 * torch.randn(64, 8)
    for scoring_func in ("softmax", "sigmoid"):
        router = router_for(num_experts=8, top_k=3, n_group=4, topk_group=2, scoring_func=scoring_func)
        _, index, _ = route(router, logits)
        scores = torch.softmax(logits, -1) if scoring_func == "softmax" else torch.sigmoid(logits)
        for t in range(64):
            groups = scores[t].view(4, 2)
            group_score = groups.max(-1).values if scoring_func == "softmax" else groups.sum(-1)
            best = set(group_score.topk(2).indices.tolist())
            assert {e // 2 for e in index[t].tolist()} <= best, (scoring_func, t)


# --------------------------------------------------------------------------------------------------------------
# Capacity and token dropping
# --------------------------------------------------------------------------------------------------------------


def skewed_logits(num_tokens=24, num_experts=4, seed=0) -> torch.Tensor:
    """Random logits that favour experts 0 and 1, so a capacity factor below ~1.5 drops slots."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=generator) + torch.tensor([1.5, 1.0, 0.0, -0.5])


@pytest.mark.parametrize("dispatch_groups", [1, 2, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_capacity_is_never_exceeded_and_kept_slots_follow_gshard_priority(mode, dispatch_groups):
    capacity_factor = 0.75
    overrides = {"capacity_factor": capacity_factor} if mode == "train" else {
        "capacity_factor": 4.0, "eval_capacity_factor": capacity_factor}  # the other mode's factor never binds
    router = router_for(dispatch_groups=dispatch_groups, **overrides).train(mode == "train")
    logits = skewed_logits()
    weights, index, decision = route(router, logits)
    expected_keep = gshard_keep_reference(index, 4, capacity_factor, dispatch_groups)
    assert torch.equal(decision.dispatched, expected_keep)
    group_size = 24 // dispatch_groups
    capacity = math.ceil(capacity_factor * 2 * group_size / 4)
    for g in range(dispatch_groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        kept = torch.bincount(index[rows][decision.dispatched[rows]], minlength=4)
        wanted = torch.bincount(index[rows].reshape(-1), minlength=4)
        assert torch.equal(kept, torch.minimum(wanted, torch.tensor(capacity)))  # full up to C, never over
    assert (~decision.dispatched).any()  # the factor really dropped slots
    assert torch.all(weights[~decision.dispatched] == 0)


def test_capacity_priority_is_first_choices_before_second_choices_in_token_order():
    # 6 tokens, E=4, k=2, cf=0.5 -> C = ceil(0.5 * 2 * 6 / 4) = 2
    logits = [[3.0, 2.0, 0.0, -1.0],   # 0: first 0, second 1
              [3.0, 2.0, 0.0, -1.0],   # 1: first 0, second 1
              [3.0, 0.0, 2.0, -1.0],   # 2: first 0 (dropped: 0 is full), second 2
              [0.0, 3.0, 2.0, -1.0],   # 3: first 1, second 2
              [0.0, 3.0, -1.0, 2.0],   # 4: first 1 (expert 1 now full), second 3
              [-1.0, 0.0, 3.0, 2.0]]   # 5: first 2, second 3
    router = router_for(capacity_factor=0.5).train()
    _, index, decision = route(router, logits)
    assert index.tolist() == [[0, 1], [0, 1], [0, 2], [1, 2], [1, 3], [2, 3]]
    # expert 1's two places go to the first choices of tokens 3 and 4, not to the earlier second choices of 0 and 1;
    # expert 2 takes token 5's first choice, then token 2's second choice (token 3's second choice is dropped)
    expected = [[True, False], [True, False], [False, True], [True, False], [True, True], [True, True]]
    assert decision.dispatched.tolist() == expected


def test_dispatch_groups_give_each_group_its_own_capacity():
    # every token picks expert 0 first and expert 1 second; T=12, k=2, E=4, cf=1
    logits = [[2.0, 1.0, 0.0, -1.0]] * 12
    _, _, pooled = route(router_for(capacity_factor=1.0).train(), logits)  # C = ceil(2 * 12 / 4) = 6
    assert pooled.dispatched[:, 0].tolist() == [True] * 6 + [False] * 6
    _, _, grouped = route(router_for(capacity_factor=1.0, dispatch_groups=3).train(), logits)  # C = 2 per group
    assert grouped.dispatched[:, 0].tolist() == [True, True, False, False] * 3
    assert grouped.dispatched[:, 1].tolist() == [True, True, False, False] * 3


def test_dropped_slots_have_zero_weight_and_no_gradient():
    router = router_for(capacity_factor=0.5).train()
    hidden = hidden_for(skewed_logits()).requires_grad_(True)
    _, weights, _, decision = router(hidden)
    dropped = ~decision.dispatched
    assert dropped.any() and decision.dispatched.any()
    assert torch.all(weights[dropped] == 0)
    weights[dropped].sum().backward(retain_graph=True)
    assert hidden.grad is None or torch.all(hidden.grad == 0)
    assert router.weight.grad is None or torch.all(router.weight.grad == 0)
    weights[decision.dispatched].pow(2).sum().backward()  # kept slots do carry gradient
    assert hidden.grad.abs().sum() > 0


def test_eval_capacity_factor_none_is_dropless_in_eval():
    router = router_for(capacity_factor=0.25, eval_capacity_factor=None)
    logits = skewed_logits()
    _, _, eval_decision = route(router, logits)
    assert eval_decision.dispatched.all()
    _, _, train_decision = route(router.train(), logits)
    assert not train_decision.dispatched.all()  # the same router drops in training


def test_token_choice_without_capacity_factor_never_drops():
    _, _, decision = route(router_for().train(), skewed_logits())
    assert decision.dispatched.all()


@pytest.mark.parametrize("experts_implementation", ["eager", "sorted_mm", "grouped_mm", "batched_mm"])
def test_token_with_every_slot_dropped_leaves_the_layer_output_equal_to_its_residual(experts_implementation):
    # C = max(1, ceil(0.1 * 2 * 16 / 4)) = 1 slot per expert for 16 tokens: at most 4 tokens keep a slot
    torch.manual_seed(0)
    config = make_mixtral_config(eval_capacity_factor=0.1, num_hidden_layers=1)
    model = randomize_weights_(MixtralMoEForCausalLM(config)).eval()
    model.set_experts_implementation(experts_implementation)
    layer = model.model.layers[0]
    seen = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(input=args[0]), with_kwargs=True),
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.update(attn=out[0])),
        layer.mlp.gate.register_forward_hook(lambda m, args, out: seen.update(decision=out[3])),
        layer.mlp.register_forward_hook(lambda m, args, out: seen.update(moe=out)),
        layer.register_forward_hook(lambda m, args, out: seen.update(output=out)),
    ]
    with torch.no_grad():
        model(random_input_ids(2, 8))
    for hook in hooks:
        hook.remove()
    all_dropped = ~seen["decision"].dispatched.any(dim=-1)  # [T]
    assert all_dropped.sum() >= 12
    moe = seen["moe"].reshape(16, -1)
    residual = (seen["input"] + seen["attn"]).reshape(16, -1)
    output = seen["output"].reshape(16, -1)
    assert torch.equal(moe[all_dropped], torch.zeros_like(moe[all_dropped]))
    assert torch.equal(output[all_dropped], residual[all_dropped])
    assert not torch.equal(output[~all_dropped], residual[~all_dropped])  # kept tokens do get an expert


# --------------------------------------------------------------------------------------------------------------
# Expert choice
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dispatch_groups", "capacity_factor"), [(1, 1.0), (2, 1.0), (1, 2.0), (3, 0.5)])
def test_expert_choice_gives_every_expert_exactly_capacity_tokens_per_group(dispatch_groups, capacity_factor):
    router = router_for(router_type="expert_choice", capacity_factor=capacity_factor,
                        dispatch_groups=dispatch_groups, router_aux_loss_coef=0.0).train()
    logits = skewed_logits(num_tokens=12)
    _, index, decision = route(router, logits)
    probs = torch.softmax(logits, dim=-1)
    group_size = 12 // dispatch_groups
    capacity = math.ceil(capacity_factor * group_size / 4)
    for g in range(dispatch_groups):
        tokens = range(g * group_size, (g + 1) * group_size)
        for e in range(4):
            taken = {t for t in tokens for slot in range(index.shape[1])
                     if decision.valid[t, slot] and index[t, slot] == e}
            assert len(taken) == capacity, (g, e)
            best = sorted(tokens, key=lambda t: -probs[t, e].item())[:capacity]  # the expert's top-C tokens
            assert taken == set(best), (g, e)


def test_expert_choice_weights_are_the_softmax_probabilities_and_padding_slots_are_invalid_with_zero_weight():
    router = router_for(router_type="expert_choice", capacity_factor=1.0, router_aux_loss_coef=0.0).train()
    logits = skewed_logits(num_tokens=12)
    weights, index, decision = route(router, logits)
    assert index.shape[1] == int(decision.valid.sum(dim=-1).max())  # k_max slots
    assert (~decision.valid).any()  # some tokens have fewer experts than k_max: padding slots exist
    for t in range(12):
        row_probs = softmax_row(logits[t].tolist())
        experts = [int(index[t, s]) for s in range(index.shape[1]) if decision.valid[t, s]]
        assert len(experts) == len(set(experts))  # a token meets each expert at most once
        for s in range(index.shape[1]):
            if decision.valid[t, s]:
                assert weights[t, s].item() == pytest.approx(row_probs[int(index[t, s])], abs=1e-6)
            else:
                assert weights[t, s].item() == 0.0
                assert 0 <= index[t, s] < 4  # still a valid expert id
    assert torch.equal(decision.dispatched, decision.valid)


def test_expert_choice_uses_the_train_capacity_factor_in_eval_when_no_eval_factor_is_set():
    router = router_for(router_type="expert_choice", capacity_factor=1.0, router_aux_loss_coef=0.0)
    _, index, decision = route(router, skewed_logits(num_tokens=12))
    for e in range(4):
        assert int(((index == e) & decision.valid).sum()) == 3


# --------------------------------------------------------------------------------------------------------------
# GShard random routing
# --------------------------------------------------------------------------------------------------------------

# normalised second gate g2 = 1 / (1 + e^(l1 - l2)): 1/(1+e) = 0.2689 and 1/(1+e^0.2) = 0.4502
GSHARD_ROWS = [[2.0, 1.0, -1.0, -3.0], [0.5, 0.3, -2.0, -2.0]]


def test_gshard_random_routing_dispatches_the_second_expert_with_probability_twice_its_gate():
    n = 10000
    logits = torch.tensor(GSHARD_ROWS).repeat_interleave(n, dim=0)  # T = 20000
    router = router_for(random_routing=True).train()
    torch.manual_seed(0)
    weights, index, decision = route(router, logits)
    assert decision.dispatched[:, 0].all()
    for kind, row in enumerate(GSHARD_ROWS):
        rows = slice(kind * n, (kind + 1) * n)
        assert (index[rows] == torch.tensor([0, 1])).all()
        g2 = math.exp(row[1]) / (math.exp(row[0]) + math.exp(row[1]))
        p = min(1.0, 2 * g2)
        frequency = decision.dispatched[rows, 1].float().mean().item()
        assert abs(frequency - p) < 5 * math.sqrt(p * (1 - p) / n), (kind, frequency, p)
        kept = decision.dispatched[rows, 1]
        assert torch.all(weights[rows][~kept, 1] == 0)
        assert_close(weights[rows][kept, 1], torch.full((int(kept.sum()),), g2), atol=1e-6, rtol=0)


def test_gshard_random_routing_always_dispatches_the_second_expert_in_eval():
    logits = torch.tensor(GSHARD_ROWS).repeat_interleave(500, dim=0)
    _, _, decision = route(router_for(random_routing=True), logits)
    assert decision.dispatched.all()


# --------------------------------------------------------------------------------------------------------------
# Experts implementations agree with dropping and with expert choice
# --------------------------------------------------------------------------------------------------------------

ROUTING_WITH_DROPS = {
    "capacity": {"capacity_factor": 0.5},
    "capacity_groups": {"capacity_factor": 0.75, "dispatch_groups": 2},
    "expert_choice": {"router_type": "expert_choice", "capacity_factor": 1.0, "router_aux_loss_coef": 0.0},
}


@pytest.mark.parametrize("routing", list(ROUTING_WITH_DROPS))
def test_experts_implementations_agree_in_outputs_and_gradients(routing, monkeypatch):
    """Every implementation, and `sorted_mm`'s other product paths (`torch.mm` where oneDNN is off; the grouped kernel
    CUDA GPUs run, here through torch's CPU kernel), agrees with eager with dropped slots (weight 0) and with expert
    choice."""
    torch.manual_seed(0)
    model = randomize_weights_(MixtralMoEForCausalLM(make_mixtral_config(**ROUTING_WITH_DROPS[routing]))).train()
    input_ids = random_input_ids(2, 12)

    def run(implementation):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(input_ids, labels=input_ids, output_router_logits=True, output_router_stats=True)
        out.loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        return out, grads

    eager, eager_grads = run("eager")
    if routing == "expert_choice":
        assert all(layer["dropped_fraction"] == 0 for layer in eager.router_stats)
    else:
        assert all(layer["dropped_fraction"] > 0 for layer in eager.router_stats)
    assert any(g.abs().max() > 0 for n, g in eager_grads.items() if "experts.gate_up_proj" in n)
    results = {implementation: run(implementation) for implementation in ("sorted_mm", "grouped_mm", "batched_mm")}
    with torch.backends.mkldnn.flags(enabled=False):
        results["sorted_mm, torch.mm products"] = run("sorted_mm")
    monkeypatch.setattr(experts_kernels, "_grouped_kernel_applies", lambda hidden_states, weight: True)
    results["sorted_mm, grouped kernel"] = run("sorted_mm")
    for implementation, (out, grads) in results.items():
        assert_close(out.logits, eager.logits, atol=1e-5, rtol=0, msg=implementation)
        assert_close(out.loss, eager.loss, atol=1e-5, rtol=0, msg=implementation)
        for name, grad in grads.items():
            assert_close(grad, eager_grads[name], atol=1e-5, rtol=0, msg=f"{implementation}: {name}")


# --------------------------------------------------------------------------------------------------------------
# Validation of the routing fields
# --------------------------------------------------------------------------------------------------------------

E8 = {"num_local_experts": 8}
EXPERT_CHOICE = {"router_type": "expert_choice", "capacity_factor": 2.0}
INVALID_ROUTING = [
    ({"router_type": "top_k"}, "router_type"),
    ({"scoring_func": "tanh"}, "scoring_func"),
    ({**E8, "n_group": 3}, "n_group"),
    ({**E8, "n_group": 0}, "n_group"),
    ({**E8, "n_group": 2, "topk_group": 3}, "topk_group"),
    ({**E8, "n_group": 2, "topk_group": 0}, "topk_group"),
    ({**E8, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "num_experts_per_tok"),
    ({"random_routing": True, "num_experts_per_tok": 1}, "random_routing"),
    ({"random_routing": True, "num_experts_per_tok": 3}, "random_routing"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"eval_capacity_factor": 0.0}, "eval_capacity_factor"),
    ({"eval_capacity_factor": -0.5}, "eval_capacity_factor"),
    ({"dispatch_groups": 0}, "dispatch_groups"),
    ({"router_type": "expert_choice"}, "capacity_factor"),
    ({**EXPERT_CHOICE, "noisy_gating": True}, "noisy_gating"),
    ({**EXPERT_CHOICE, "router_selection_bias": True}, "router_selection_bias"),
    ({**EXPERT_CHOICE, "random_routing": True}, "random_routing"),
    ({**EXPERT_CHOICE, "scoring_func": "sigmoid"}, "scoring_func"),
    ({**E8, **EXPERT_CHOICE, "n_group": 2}, "n_group"),
    *[({name: -0.1}, name) for name in (
        "router_aux_loss_coef", "router_z_loss_coef", "router_importance_loss_coef", "router_load_loss_coef",
        "expert_balance_loss_coef", "device_balance_loss_coef", "sequence_balance_loss_coef",
        "router_bias_update_rate")],
    ({"router_load_loss_coef": 0.1}, "router_load_loss_coef"),
    ({"num_device_groups": 3}, "num_device_groups"),
    ({"num_device_groups": 0}, "num_device_groups"),
    ({"router_bias_update_rate": 0.001}, "router_bias_update_rate"),
]


@pytest.mark.parametrize(("overrides", "field"), INVALID_ROUTING,
                         ids=[f"{field}:{'-'.join(f'{k}={v}' for k, v in o.items())}" for o, field in INVALID_ROUTING])
def test_invalid_routing_field_raises_value_error_naming_it(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make_mixtral_config(**overrides)


@pytest.mark.parametrize("overrides", [
    {**E8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4},
    {"random_routing": True, "capacity_factor": 1.0, "eval_capacity_factor": 2.0, "dispatch_groups": 2},
    {**EXPERT_CHOICE, "router_aux_loss_coef": 0.0},
    {"noisy_gating": True, "router_load_loss_coef": 0.1, "router_importance_loss_coef": 0.1},
    {"scoring_func": "sigmoid", "router_selection_bias": True, "router_bias_update_rate": 0.001},
    {"num_device_groups": 2, "device_balance_loss_coef": 0.05},
], ids=["groups", "gshard", "expert_choice", "noisy", "aux_free", "device_groups"])
def test_valid_routing_combinations_build(overrides):
    config = make_mixtral_config(**overrides)
    assert isinstance(config, MixtralMoEConfig)
    for name, value in overrides.items():
        assert getattr(config, name) == value
