"""Mixture-of-Depths (`mod_capacity`, Raposo et al. 2024): a routed layer against the paper's formula written out on
the gathered chosen tokens (training top-C and the causal r > 0 rule, rows shorter than C), the block computing those
tokens only (nothing for a skipped decoding step), the balancing losses over the gathered real tokens, causality,
cached generation, the router loss, save/load and remote code, gradient checkpointing, Trainer and config validation.

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
from test_trainer import causal_lm_rows, train_one_step
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig, MixtralMoEForCausalLM
from hf_moe.modeling.modeling_hf_moe import MoDRouter

ATOL = 1e-5


def mod_model(family: str = "mixtral", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if family == "mixtral":
        config = make_mixtral_config(num_hidden_layers=4, mod_capacity=0.5, **overrides)
        model = MixtralMoEForCausalLM(config)
    else:
        config = make_deepseek_config(num_hidden_layers=4, mod_capacity=0.5, **overrides)
        model = DeepSeekMoEForCausalLM(config)
    return randomize_weights_(model).eval()


def greedy(model, prompt, use_cache: bool, attention_mask=None, new_tokens: int = 6):
    return model.generate(prompt, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID, use_cache=use_cache)


def gathered_block_reference(layer, x, cos, sin, chosen, r):
    """The paper's update on the gathered chosen tokens of each sequence: x~ = x[chosen] (original order and
    positions), f = a + m with a = attn(norm(x~)) causal among x~ and m = mlp(norm(x~ + a)); then
    out[chosen] = x~ + r[chosen] * f and out = x elsewhere."""
    out = x.clone()
    for b in range(x.shape[0]):
        idx = chosen[b].nonzero().squeeze(-1)
        xs = x[b, idx][None]
        n = idx.numel()
        causal = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(x.dtype).min)
        attention, _ = layer.self_attn(layer.input_layernorm(xs), position_embeddings=(cos[b, idx][None],
                                       sin[b, idx][None]), attention_mask=causal[None, None])
        update = attention + layer.mlp(layer.post_attention_layernorm(xs + attention))
        out[b, idx] = (xs + r[b, idx][None, :, None] * update)[0]
    return out


# --------------------------------------------------------------------------------------------------------------
# The routed layer against its formula
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
@pytest.mark.parametrize("training", [True, False])
def test_routed_layer_matches_the_block_on_the_gathered_chosen_tokens(family, training):
    model = mod_model(family, attn_implementation="eager")
    layer = model.model.layers[1]
    assert layer.mod_router is not None and model.model.layers[0].mod_router is None
    x = torch.randn(2, 8, 32)
    cos, sin = model.model.rotary_emb(x, torch.arange(8)[None].expand(2, -1))
    layer.train(training)
    with torch.no_grad():
        r = x @ layer.mod_router.proj.weight[0]  # [B, S]
        if training:  # top C = ceil(0.5 * 8) = 4 per sequence
            chosen = torch.zeros(2, 8, dtype=torch.bool).scatter(1, r.topk(4, dim=1).indices, True)
        else:  # causal: r > 0, i.e. sigmoid(r) > 0.5
            chosen = r > 0
        assert chosen.any() and not chosen.all()
        expected = gathered_block_reference(layer, x, cos, sin, chosen, r)
        got = layer(x, position_embeddings=(cos, sin), position_ids=torch.arange(8)[None])
    assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(got[~chosen], x[~chosen])  # a skipped token passes unchanged


def test_training_with_a_row_shorter_than_the_capacity_matches_the_gathered_formula():
    # C = 4 of S = 8, but row 1 has 3 real tokens: it gathers them and one padding slot whose result is dropped
    model = mod_model(attn_implementation="eager")
    layer = model.model.layers[1].train()
    x = torch.randn(2, 8, 32)
    token_mask = torch.ones(2, 8, dtype=torch.long)
    token_mask[1, :5] = 0
    cos, sin = model.model.rotary_emb(x, torch.arange(8)[None].expand(2, -1))
    with torch.no_grad():
        r = x @ layer.mod_router.proj.weight[0]
        chosen = torch.zeros(2, 8, dtype=torch.bool).scatter(1, r.masked_fill(token_mask == 0, -torch.inf)
                                                              .topk(4, dim=1).indices, True) & token_mask.bool()
        expected = gathered_block_reference(layer, x, cos, sin, chosen, r)
        got = layer(x, position_embeddings=(cos, sin), position_ids=torch.arange(8)[None], token_mask=token_mask)
    assert chosen.sum(dim=1).tolist() == [4, 3]
    assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(got[~chosen], x[~chosen])


@pytest.mark.parametrize("training", [True, False])
def test_the_block_runs_on_the_gathered_tokens_only(training):
    model = mod_model(attn_implementation="sdpa")
    layer = model.model.layers[1].train(training)
    seen = []
    hooks = [module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (kwargs.get("hidden_states", args[0] if args else None)).shape), with_kwargs=True)
        for module in (layer.self_attn, layer.mlp, layer.mlp.gate)]
    x = torch.randn(2, 8, 32)
    cos, sin = model.model.rotary_emb(x, torch.arange(8)[None].expand(2, -1))
    with torch.no_grad():
        layer(x, position_embeddings=(cos, sin), position_ids=torch.arange(8)[None])
        chosen_eval = (x @ layer.mod_router.proj.weight[0]) > 0
    for hook in hooks:
        hook.remove()
    # training: C = ceil(0.5 * 8) = 4 per row; evaluation: as many as the row with the most tokens with r > 0
    capacity = 4 if training else int(chosen_eval.sum(dim=1).max())
    assert capacity < 8
    assert seen == [(2, capacity, 32), (2, capacity, 32), (2 * capacity, 32)]  # attention, MoE block, its router


def test_a_decoding_step_whose_token_is_skipped_runs_nothing_and_caches_a_zero_key():
    model = mod_model()
    layer = model.model.layers[1]
    calls = []
    hooks = [module.register_forward_hook(lambda m, args, out: calls.append(m)) for module in (layer.self_attn,
                                                                                               layer.mlp)]
    with torch.no_grad():
        out = model(random_input_ids(1, 5), use_cache=True)
        layer.mod_router.proj.weight.fill_(0.0)  # r = 0 for every token: no token is chosen (r > 0 is needed)
        calls.clear()
        seen = {}
        hook = layer.register_forward_hook(lambda m, args, kwargs, output: seen.update(input=args[0], output=output),
                                           with_kwargs=True)
        model(random_input_ids(1, 1, seed=4), cache=out.past_key_values, use_cache=True)
        hook.remove()
    for hook in hooks:
        hook.remove()
    assert calls == []  # neither the attention nor the MoE block of the routed layer ran
    assert torch.equal(seen["output"], seen["input"])
    keys = out.past_key_values.layers[1].keys
    assert keys.shape[2] == 6 and keys[:, :, -1].eq(0).all()  # one entry per token, the new one a zero key


def test_balancing_losses_of_a_routed_layer_count_its_gathered_real_tokens_only():
    model = mod_model(output_router_logits=True, mod_layers=[1]).train()
    input_ids = random_input_ids(2, 8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # row 1: 3 real tokens, fewer than C = 4
    decisions = []
    hook = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, args, out: decisions.append(out[3]))
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids)
    hook.remove()
    logits = out.router_logits
    assert [layer.shape[0] for layer in logits] == [16, 8, 16, 16]  # layer 1 routes 4 gathered tokens per row
    real = attention_mask.reshape(-1).float()
    masks = [real, decisions[0].token_mask.float(), real, real]
    assert masks[1].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]  # row 1's padding slot
    # the Switch loss pooled over the layers, written out over their real rows
    counts, prob_sums = torch.zeros(4), torch.zeros(4)
    for layer_logits, mask in zip(logits, masks):
        probs = layer_logits.detach().softmax(dim=-1)
        chosen = F.one_hot(probs.topk(2, dim=-1).indices, 4).sum(dim=1).float()
        counts += (chosen * mask[:, None]).sum(dim=0)
        prob_sums += (probs * mask[:, None]).sum(dim=0)
    total = sum(mask.sum() for mask in masks)
    assert_close(out.aux_loss.detach(), 4 * torch.sum((counts / total) * (prob_sums / total)), atol=1e-6, rtol=0)


def test_training_chooses_ceil_capacity_tokens_per_sequence_and_never_padding():
    torch.manual_seed(0)
    router = MoDRouter(make_mixtral_config(num_hidden_layers=4, mod_capacity=0.3)).train()
    x, token_mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.long)
    token_mask[1, :8] = 0  # row 1 has two real tokens, fewer than C = ceil(0.3 * 10) = 3
    _, chosen, _ = router(x, token_mask)
    assert chosen[0].sum() == math.ceil(0.3 * 10)
    assert torch.equal(chosen[1], token_mask[1].bool())
    _, chosen_eval, _ = router.eval()(x, token_mask)
    assert not chosen_eval[1, :8].any()


# --------------------------------------------------------------------------------------------------------------
# Causal inference and generation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_inference_never_leaks_a_later_token_into_earlier_logits(family):
    model = mod_model(family)
    input_ids = random_input_ids(1, 8)
    changed = input_ids.clone()
    changed[0, -1] = changed[0, -1] % 100 + 1
    with torch.no_grad():
        logits, changed_logits = model(input_ids).logits, model(changed).logits
    # to rounding: whether the last token is chosen changes how many tokens the gathered block runs on, hence the
    # shapes of its matrix products
    assert_close(changed_logits[:, :-1], logits[:, :-1], atol=ATOL, rtol=0)
    assert (changed_logits[:, -1] - logits[:, -1]).abs().max() > 1e-4


def test_training_top_c_is_not_causal():
    model = mod_model().train()
    input_ids = random_input_ids(1, 8)
    changed = input_ids.clone()
    changed[0, -1] = changed[0, -1] % 100 + 1
    with torch.no_grad():
        differences = [(model(ids).logits[:, :-1]) for ids in (input_ids, changed)]
    assert (differences[0] - differences[1]).abs().max() > 1e-4  # the top-C choice compares with the last token


def test_a_static_cache_is_refused_naming_the_setting():
    """A routed layer marks a skipped token by its zero key in a cache that grows one entry per token; a static
    cache is preallocated with zeros."""
    with pytest.raises(ValueError, match="Mixture-of-Depths.*StaticCache.*`cache_implementation`: allowed None or "
                                         "'dynamic'"):
        mod_model().generate(random_input_ids(1, 5), max_new_tokens=2, pad_token_id=PAD_TOKEN_ID,
                             cache_implementation="static")


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_greedy_generation_with_cache_matches_without_cache(family, attn_implementation):
    model = mod_model(family, attn_implementation=attn_implementation)
    prompt = random_input_ids(2, 4, seed=6)
    mask = torch.ones_like(prompt)
    prompt[0, 0], mask[0, 0] = PAD_TOKEN_ID, 0  # one left-padded row
    with torch.no_grad():
        with_cache = greedy(model, prompt, True, mask)
        without_cache = greedy(model, prompt, False, mask)
        # the cached forward's logits equal the full forward's, step after step
        full = model(with_cache, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)).logits
        cache_out = model(with_cache[:, :6], attention_mask=torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1),
                          use_cache=True)
        cache, steps = cache_out.past_key_values, [cache_out.logits]
        for t in range(6, 10):
            step_mask = torch.cat([mask, torch.ones(2, t - 3, dtype=torch.long)], 1)
            steps.append(model(with_cache[:, t:t + 1], attention_mask=step_mask, cache=cache,
                               use_cache=True).logits)
    assert with_cache.shape == (2, 10)
    assert torch.equal(with_cache, without_cache)
    real = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1).bool()
    assert_close(torch.cat(steps, 1)[real], full[real], atol=ATOL, rtol=0)
    keys = cache.layers[1].keys  # the routed layer stores the keys of its skipped tokens as zeros
    skipped = keys.eq(0).all(-1).all(1)
    assert skipped[0, 0] and skipped[real].any() and not skipped.all()


# --------------------------------------------------------------------------------------------------------------
# The router loss
# --------------------------------------------------------------------------------------------------------------


def test_router_loss_is_the_bce_of_the_logits_against_top_c_and_is_added_with_its_coefficient():
    model = mod_model(output_router_logits=True, router_aux_loss_coef=0.0).train()
    input_ids = random_input_ids(2, 8)
    logits_by_layer = []
    hooks = [layer.mod_router.register_forward_hook(lambda m, i, o: logits_by_layer.append(o[0].detach()))
             for layer in model.model.layers if layer.mod_router is not None]
    output = model(input_ids, labels=input_ids)
    for hook in hooks:
        hook.remove()
    assert len(logits_by_layer) == 2  # layers 1 and 3
    expected = torch.stack([
        F.binary_cross_entropy_with_logits(r, torch.zeros_like(r).scatter(1, r.topk(4, dim=1).indices, 1.0))
        for r in logits_by_layer
    ]).mean()
    assert_close(output.router_losses["mod_aux_loss_coef"], expected, atol=1e-6, rtol=0)
    model.config.mod_aux_loss_coef = 0.0
    without = model(input_ids, labels=input_ids).loss
    assert_close(output.loss - without, 0.01 * expected, atol=1e-6, rtol=0)
    assert "mod_aux_loss_coef" not in (model.eval()(input_ids, labels=input_ids).router_losses or {})


# --------------------------------------------------------------------------------------------------------------
# Save/load, remote code, gradient checkpointing, Trainer
# --------------------------------------------------------------------------------------------------------------

def test_save_load_and_load_as_remote_code_without_hf_moe(tmp_path):
    model = mod_model("deepseek", seed=1)
    input_ids = random_input_ids(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    prompt = random_input_ids(2, 4, seed=3)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "generate": {"input_ids": prompt, "max_new_tokens": 6, "min_new_tokens": 6}}
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.mod_capacity == 0.5 and loaded.config.mod_layers == [1, 3]
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    child = load_as_remote_code_without_hf_moe({"model": tmp_path / "model"}, inputs, tmp_path)["model"]
    assert child["classes"]["model.layers.1.mod_router"].startswith("transformers_modules.")
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    # bit-identical weights; memory-mapped ones may take another CPU matmul path (a few ulps)
    assert_close(child["logits"], expected, atol=ATOL, rtol=0)
    assert torch.equal(child["sequences"], greedy(model, prompt, True))


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids = random_input_ids(2, 8)
    grads = []
    for checkpointing in (False, True):
        model = mod_model(output_router_logits=True).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "model.layers.1.mod_router.proj.weight" in grads[0]
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-6, rtol=0)


def test_one_trainer_step_with_the_router_loss_updates_the_mod_router(tmp_path):
    model = mod_model(output_router_logits=True)
    before = model.model.layers[1].mod_router.proj.weight.detach().clone()
    result = train_one_step(model.train(), causal_lm_rows(), tmp_path)
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(model.model.layers[1].mod_router.proj.weight, before)


# --------------------------------------------------------------------------------------------------------------
# Config validation and the preset
# --------------------------------------------------------------------------------------------------------------


def test_mod_layers_default_to_every_other_layer_from_layer_one():
    assert MixtralMoEConfig(num_hidden_layers=6, mod_capacity=0.125).mod_layers == [1, 3, 5]
    assert DeepSeekMoEConfig(num_hidden_layers=4, mod_capacity=0.125, mod_layers=[2]).mod_layers == [2]
    assert MixtralMoEConfig().mod_capacity is None and MixtralMoEConfig().mod_layers is None


@pytest.mark.parametrize(("overrides", "field"), [
    ({"mod_capacity": 0.0}, "mod_capacity"),
    ({"mod_capacity": 1.5}, "mod_capacity"),
    ({"mod_layers": [1]}, "mod_layers"),
    ({"mod_capacity": 0.5, "mod_layers": [0, 1]}, "mod_layers"),
    ({"mod_capacity": 0.5, "mod_layers": [3, 1]}, "mod_layers"),
    ({"mod_capacity": 0.5, "mod_layers": [4]}, "mod_layers"),
    ({"mod_capacity": 0.5, "sliding_window": 16}, "mod_layers"),
    ({"mod_aux_loss_coef": -0.1}, "mod_aux_loss_coef"),
    ({"mod_capacity": 0.5, "num_attention_experts": 4}, "num_attention_experts"),
])
def test_invalid_mod_settings_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        MixtralMoEConfig(num_hidden_layers=4, **overrides)


def test_other_attention_kernels_raise_naming_the_setting():
    model = mod_model()
    model.config._attn_implementation = "flex_attention"
    x = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="attn_implementation.*Mixture-of-Depths"):
        model.model.layers[1](x, position_embeddings=model.model.rotary_emb(x, torch.arange(4)[None]))


def test_preset_builds_routed_layers():
    config = MixtralMoEConfig.from_preset("mixture_of_depths", vocab_size=128, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                          num_local_experts=4)
    assert config.mod_capacity == 0.125 and config.mod_aux_loss_coef == 0.01
    model = MixtralMoEForCausalLM(config)
    assert [layer.mod_router is not None for layer in model.model.layers] == [False, True, False, True]
