"""The `sorted_mm` experts implementation: registered with transformers, exact against eager."""

import pytest
import torch
from conftest import make_mixtral_config, random_input_ids, randomize_weights_
from torch.testing import assert_close
from transformers import MixtralConfig, MixtralForCausalLM

from hf_moe.modeling.modeling_hf_moe import MoEExperts


def experts_module(implementation: str, hidden_act: str = "silu") -> MoEExperts:
    config = make_mixtral_config(hidden_act=hidden_act)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    experts = MoEExperts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    return experts


@pytest.mark.parametrize("grad_enabled", [True, False])  # the autograd function, and the inference path
def test_expert_ids_of_other_ranks_are_skipped(grad_enabled):
    """Under expert parallelism, ids >= num_experts mark tokens owned by another rank (with zero weight)."""
    sorted_mm, eager = experts_module("sorted_mm"), experts_module("eager")
    hidden = torch.randn(6, 32)
    index = torch.tensor([[0, 4], [1, 2], [4, 4], [3, 0], [2, 4], [1, 3]])  # 4 == num_experts: not on this rank
    weights = torch.rand(6, 2) * (index < 4)
    with torch.set_grad_enabled(grad_enabled):
        output = sorted_mm(hidden, index, weights)
    assert output.requires_grad == grad_enabled
    assert_close(output, eager(hidden, index, weights), atol=1e-6, rtol=0)
    assert torch.equal(output[2], torch.zeros(32))


@pytest.mark.parametrize("hidden_act", ["silu", "gelu"])
@pytest.mark.parametrize("experts_used", [4, 2])
def test_gradients_of_inputs_weights_and_routing_match_eager(hidden_act, experts_used):
    """SiLU takes a fused backward, other activations autograd's. With 2 of 4 experts routed to, the gradient
    blocks of the other two (left uninitialised, then zeroed) must be exactly zero."""
    outputs = {}
    for implementation in ("eager", "sorted_mm"):
        experts = experts_module(implementation, hidden_act)
        hidden = torch.randn(10, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
        index = torch.randint(0, experts_used, (10, 2), generator=torch.Generator().manual_seed(2)) * (4 // experts_used)
        weights = torch.rand(10, 2, generator=torch.Generator().manual_seed(3)).requires_grad_()
        torch.full((64, 1024), float("nan"))  # leave non-zero memory behind for uninitialised buffers
        out = experts(hidden, index, weights)
        out.backward(torch.randn_like(out, memory_format=torch.contiguous_format))
        outputs[implementation] = (out, hidden.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    for ours, reference in zip(outputs["sorted_mm"], outputs["eager"]):
        assert_close(ours, reference, atol=1e-5, rtol=0)
    unused = [expert for expert in range(4) if expert % (4 // experts_used)]
    for gradient in outputs["sorted_mm"][3:]:
        assert torch.equal(gradient[unused], torch.zeros_like(gradient[unused]))


def test_transformers_own_mixtral_can_select_it():
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    torch.manual_seed(0)
    model = randomize_weights_(MixtralForCausalLM(config))
    input_ids = random_input_ids(2, 7)
    results = {}
    for implementation in ("grouped_mm", "sorted_mm"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), [p.grad.clone() for p in model.parameters()])
    assert model.config._experts_implementation == "sorted_mm"
    assert_close(results["sorted_mm"][0], results["grouped_mm"][0], atol=1e-5, rtol=0)
    for ours, reference in zip(results["sorted_mm"][1], results["grouped_mm"][1]):
        assert_close(ours, reference, atol=1e-5, rtol=0)
