"""The benchmarks' fair floor (benchmarks/common.py: the dense floor with its products through oneDNN, the library
`sorted_mm` runs the experts' products on) computes the same outputs and gradients as torch's own floor."""

import copy

import pytest
import torch


@pytest.fixture
def common(monkeypatch):
    """benchmarks/common.py as a module."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    module = importlib.import_module("common")
    if not module.fair_floor_applies(torch.float32):
        pytest.skip("no oneDNN linear on this machine: the fair floor is torch's floor")
    return module


def ffn(hidden=64, width=96):
    from hf_moe import MixtralMoEConfig
    from hf_moe.modeling.modeling_hf_moe import MoEMLP

    torch.manual_seed(0)
    config = MixtralMoEConfig(hidden_size=hidden, intermediate_size=width, num_attention_heads=4,
                              num_key_value_heads=4)
    return MoEMLP(config, width)


def test_onednn_ffn_matches_torch_forward_and_backward(common):
    floor = ffn()
    fair = common.through_onednn(copy.deepcopy(floor))
    assert {type(layer).__name__ for layer in fair.modules()} >= {"OneDNNLinear"}
    inputs = torch.randn(2, 37, 64, requires_grad=True)
    grad = torch.randn(2, 37, 64)
    results = []
    for module in (floor, fair):
        inputs.grad = None
        output = module(inputs)
        output.backward(grad)
        results.append((output.detach(), inputs.grad.clone(), [p.grad.clone() for p in module.parameters()]))
    (output, inputs_grad, grads), (fair_output, fair_inputs_grad, fair_grads) = results
    torch.testing.assert_close(fair_output, output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fair_inputs_grad, inputs_grad, atol=1e-5, rtol=1e-5)
    for fair_grad, grad in zip(fair_grads, grads, strict=True):
        torch.testing.assert_close(fair_grad, grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference takes the direct call, without the autograd function
        torch.testing.assert_close(fair(inputs), floor(inputs), atol=1e-5, rtol=1e-5)


def test_onednn_linear_with_bias_and_frozen_weight(common):
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    fair = common.through_onednn(copy.deepcopy(layer))
    fair.weight.requires_grad_(False)
    layer.weight.requires_grad_(False)
    inputs = torch.randn(5, 16, requires_grad=True)
    for module in (layer, fair):
        module(inputs).square().sum().backward()
    torch.testing.assert_close(fair.bias.grad, layer.bias.grad, atol=1e-5, rtol=1e-5)
    assert fair.weight.grad is None


def test_check_fair_floor_passes_the_llama_floor_and_catches_a_wrong_one(common):
    """The check the benchmarks run: the dense Llama with its MLP through oneDNN passes; a floor whose weights
    differ does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    floor = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    fair = common.through_onednn(copy.deepcopy(floor), lambda name: ".mlp." in name)
    converted = [name for name, layer in fair.named_modules() if isinstance(layer, common.OneDNNLinear)]
    assert len(converted) == 6 and all(".mlp." in name for name in converted)  # attention and LM head stay
    input_ids = torch.randint(0, 64, (2, 9))
    common.check_fair_floor(floor, fair, lambda model: model(input_ids, labels=input_ids).logits)
    with torch.no_grad():
        fair.model.layers[0].mlp.down_proj.weight[0, 0] += 0.1
    with pytest.raises(AssertionError, match="fair floor and floor differ"):
        common.check_fair_floor(floor, fair, lambda model: model(input_ids, labels=input_ids).logits)


def test_check_fair_floor_compares_the_inputs_gradient(common):
    floor = ffn(16, 24)
    fair = common.through_onednn(copy.deepcopy(floor))
    inputs = torch.randn(7, 16, requires_grad=True)
    common.check_fair_floor(floor, fair, lambda module: module(inputs), inputs)
    assert inputs.grad is None and all(p.grad is None for p in fair.parameters())
