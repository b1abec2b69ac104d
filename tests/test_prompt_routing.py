"""Sequence-level routing's shared state (prompt_routing.py): the frozen prompt features are the base model's own
hidden states pooled over the prompt, with every adapter off and nothing else changed; the hook computes them once
per prompt forward for the layers that ask, and not again for a decoding step that keeps the prompt's decisions."""

import pytest
import torch
from test_lora_moe import token_ids
from test_lora_moe_mixture_of_loras import mol_model, prompt_labels
from torch.testing import assert_close

import hf_moe.finetune.lora_moe.prompt_routing as routing
from hf_moe.finetune.lora_moe import MixtureOfLorasLinear
from hf_moe.finetune.lora_moe.prompt_routing import decoder_layers, generation_routing, pool_prompt, prompt_features


def base_hidden_states(model, ids, attention_mask):
    with model.disable_adapter(), torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states


def test_pool_prompt_formula():
    tokens = torch.arange(24, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert_close(pool_prompt(tokens, mask, "prompt_mean"), torch.stack([tokens[0, :2].mean(0), tokens[1, 1:].mean(0)]))
    assert_close(pool_prompt(tokens, mask, "prompt_last"), torch.stack([tokens[0, 1], tokens[1, 3]]))
    with pytest.raises(ValueError, match="sequences \\[1\\] have none"):
        pool_prompt(tokens, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool), "prompt_mean")


@pytest.mark.parametrize("layer", [0, 1])  # hidden_states[-1] is after the final norm: the last layer is not compared
def test_prompt_features_are_the_frozen_base_hidden_states(layer):
    """Features after decoder layer l = the base model's hidden_states[l] (the adapter's random experts do not
    enter), averaged over each row's prompt mask; the adapters' switches and requires_grad are as before."""
    model = mol_model(stage=2)
    base = model.get_base_model()
    ids = token_ids(batch=2, seq=7, seed=3)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0  # left padding
    mask = attention_mask.bool() & (torch.arange(7) < 5)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    features = prompt_features(base, layer, mask, input_ids=ids, attention_mask=attention_mask)
    hidden = base_hidden_states(model, ids, attention_mask)[layer].float()
    expected = torch.stack([hidden[b, mask[b]].mean(0) for b in range(2)])
    assert_close(features, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the adapter is on again: its random experts change the hidden states
        adapted = model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True,
                        task_ids=torch.tensor([0, 1])).hidden_states[max(layer, 1)]
    assert not torch.allclose(adapted.float(), base_hidden_states(model, ids, attention_mask)[max(layer, 1)].float())
    assert trainable == {name for name, param in model.named_parameters() if param.requires_grad}
    assert not any(module.disable_adapters for module in model.modules() if isinstance(module, MixtureOfLorasLinear))


def test_prompt_features_layer_is_checked():
    model = mol_model(stage=2)
    base = model.get_base_model()
    depth = len(decoder_layers(base))
    with pytest.raises(ValueError, match=f"must be an int in \\[0, {depth}\\]"):
        prompt_features(base, depth + 1, None, input_ids=token_ids(batch=1, seq=4))


def test_hook_computes_features_once_per_prompt(monkeypatch):
    """A layer that asks for features of layer 1 gets them on a training forward (from the prompt only) and inside
    generation's prefill; the decoding steps that keep the prompt's decisions compute none."""
    model = mol_model(stage=2).eval()
    layer = next(module for module in model.modules() if isinstance(module, MixtureOfLorasLinear))
    monkeypatch.setattr(MixtureOfLorasLinear, "prompt_feature_layers", lambda self: {1} if self is layer else set())
    ids = token_ids(batch=2, seq=6, seed=4)
    labels = prompt_labels(ids)
    with torch.no_grad():
        model(input_ids=ids, labels=labels)
    expected = prompt_features(model.get_base_model(), 1, labels.eq(-100), input_ids=ids)
    assert_close(layer.prompt_routing.features[1], expected)
    real, calls = routing.prompt_features, []
    monkeypatch.setattr(routing, "prompt_features", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    for use_cache in (True, False):
        calls.clear()
        with generation_routing(model.get_base_model()):
            model.generate(input_ids=ids[:, :3], max_new_tokens=4, do_sample=False, use_cache=use_cache)
        assert len(calls) == 1, use_cache


def test_prompt_features_run_without_dropout_and_restore_every_mode():
    """In a training model with attention dropout the features are still the eval-mode ones (the same in training and
    at inference), and every module's training switch is as it was."""
    model = mol_model(stage=2)
    base = model.get_base_model()
    ids = token_ids(batch=2, seq=6, seed=5)
    expected = prompt_features(base.eval(), 1, None, input_ids=ids)
    for module in base.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model.train()
    base.model.layers[0].mlp.eval()  # a mixed state, restored as it was
    modes = {name: module.training for name, module in base.named_modules()}
    assert_close(prompt_features(base, 1, None, input_ids=ids), expected, rtol=0, atol=0)
    assert modes == {name: module.training for name, module in base.named_modules()}
