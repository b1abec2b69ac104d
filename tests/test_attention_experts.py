"""Attention experts (`num_attention_experts`, JetMoE's mixture of attention heads): the layer against its formula
written out with loops over tokens and chosen experts on shared keys and values, causality, cached generation and the
cache's shapes, the routers' losses, save/load and remote code, gradient checkpointing, Trainer, kernels, the preset
and config validation.

Every model is tiny and fp32 (conftest's shapes: hidden 32, 4 heads of 8 over 2 key-value heads, FFN experts of
width 64 or 16); 3 attention experts, top-2.
"""

import copy
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
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import ParamWrapper
from test_trainer import causal_lm_rows, train_one_step
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig, MixtralMoEForCausalLM
from hf_moe.cli import main
from hf_moe.conversion.layout import ConversionError, check_exportable, our_tensor_shapes, parameter_counts
from hf_moe.modeling.modeling_hf_moe import MoEAttention, MoEAttentionExperts, MoERotaryEmbedding

ATOL = 1e-5
FAMILY_OVERRIDES = {
    "mixtral": {},
    # per-head q/k RMSNorm on the expert queries and the shared keys, and the experts' shared output bias
    "deepseek": {"qkv_bias": False, "o_proj_bias": True},
}


def experts_config(family: str = "mixtral", **overrides):
    make = make_mixtral_config if family == "mixtral" else make_deepseek_config
    return make(**{"num_attention_experts": 3, **FAMILY_OVERRIDES[family], **overrides})


def experts_model(family: str = "mixtral", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model_class = MixtralMoEForCausalLM if family == "mixtral" else DeepSeekMoEForCausalLM
    return randomize_weights_(model_class(experts_config(family, **overrides))).eval()


def greedy(model, prompt, use_cache: bool, attention_mask=None, new_tokens: int = 6):
    return model.generate(prompt, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID, use_cache=use_cache)


def causal_mask(seq_len: int) -> torch.Tensor:
    """The additive [1, 1, S, S] mask of eager attention: key j is visible to query i iff j <= i."""
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return torch.zeros(seq_len, seq_len).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]


def rope(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotation of the two halves of the last dim: v * cos + (-v2, v1) * sin."""
    v1, v2 = v.chunk(2, dim=-1)
    return v * cos + torch.cat((-v2, v1), dim=-1) * sin


# --------------------------------------------------------------------------------------------------------------
# The layer against its formula
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "top_k"), [("mixtral", 2), ("mixtral", 1), ("deepseek", 3)])
def test_layer_matches_the_formula_over_tokens_and_chosen_experts_with_shared_keys_and_values(family, top_k):
    config = experts_config(family, num_attention_experts_per_tok=top_k, attn_implementation="eager")
    torch.manual_seed(0)
    layer = randomize_weights_(MoEAttentionExperts(config, layer_idx=0))
    x = torch.randn(2, 5, 32)
    heads, kv_heads, head_dim = 4, 2, 8
    cos, sin = MoERotaryEmbedding(config)(x, torch.arange(5)[None].expand(2, -1))  # [B, S, D]
    with torch.no_grad():
        output, _ = layer(x, position_embeddings=(cos, sin), attention_mask=causal_mask(5))
        for b in range(2):
            keys = layer.k_norm(layer.k_proj(x[b])).view(5, kv_heads, head_dim)  # ONE set, shared by the experts
            keys = rope(keys, cos[b][:, None], sin[b][:, None])
            values = layer.v_proj(x[b]).view(5, kv_heads, head_dim)
            for t in range(5):
                logits = layer.gate.weight @ x[b, t]  # [E_a]
                chosen = logits.topk(top_k)
                weights = chosen.values.softmax(dim=-1)  # JetMoE: softmax over the chosen logits
                expected = layer.o_proj_bias.clone() if layer.o_proj_bias is not None else torch.zeros(32)
                for weight, expert in zip(weights, chosen.indices):
                    query = layer.q_norm(layer.q_proj[expert] @ x[b, t]).view(heads, head_dim)
                    query = rope(query, cos[b, t], sin[b, t])
                    head_outputs = []
                    for h in range(heads):
                        kv = h // (heads // kv_heads)  # as the dense attention's grouped-query heads
                        scores = keys[: t + 1, kv] @ query[h] / math.sqrt(head_dim)  # causal: keys 0..t
                        head_outputs.append(scores.softmax(dim=0) @ values[: t + 1, kv])
                    expected = expected + weight * (layer.o_proj[expert] @ torch.cat(head_outputs))
                assert_close(output[b, t], expected, atol=ATOL, rtol=0)


def test_experts_that_copy_a_dense_attention_compute_that_attention():
    dense_config = make_mixtral_config(attn_implementation="eager")
    torch.manual_seed(0)
    dense = randomize_weights_(MoEAttention(dense_config, layer_idx=0))
    layer = randomize_weights_(MoEAttentionExperts(experts_config(attn_implementation="eager"), layer_idx=0))
    with torch.no_grad():
        layer.k_proj.load_state_dict(dense.k_proj.state_dict())
        layer.v_proj.load_state_dict(dense.v_proj.state_dict())
        layer.q_proj.copy_(dense.q_proj.weight.expand_as(layer.q_proj))
        layer.o_proj.copy_(dense.o_proj.weight.expand_as(layer.o_proj))
        x = torch.randn(2, 6, 32)
        position_embeddings = MoERotaryEmbedding(dense_config)(x, torch.arange(6)[None])
        expected, _ = dense(x, position_embeddings=position_embeddings, attention_mask=causal_mask(6))
        got, _ = layer(x, position_embeddings=position_embeddings, attention_mask=causal_mask(6))
    assert_close(got, expected, atol=ATOL, rtol=0)  # the router's weights sum to 1


# --------------------------------------------------------------------------------------------------------------
# Causality, generation and the KV cache
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_a_later_token_never_changes_earlier_logits(family):
    model = experts_model(family)
    input_ids = random_input_ids(1, 8)
    changed = input_ids.clone()
    changed[0, -1] = changed[0, -1] % 100 + 1
    with torch.no_grad():
        logits, changed_logits = model(input_ids).logits, model(changed).logits
    # equal up to float rounding: the last token's new experts change how many rows each expert's matrix product
    # takes, and with it the CPU's kernel (differences of ~1e-6 here; a leak would show at ~1e-1)
    assert_close(changed_logits[:, :-1], logits[:, :-1], atol=ATOL, rtol=0)
    assert (changed_logits[:, -1] - logits[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_greedy_generation_with_cache_matches_without_cache_with_left_padding(family, attn_implementation):
    model = experts_model(family, attn_implementation=attn_implementation)
    prompt = random_input_ids(2, 4, seed=6)
    mask = torch.ones_like(prompt)
    prompt[0, 0], mask[0, 0] = PAD_TOKEN_ID, 0  # one left-padded row
    with torch.no_grad():
        with_cache = greedy(model, prompt, True, mask)
        without_cache = greedy(model, prompt, False, mask)
        # the cached steps' logits equal the full forward's
        full = model(with_cache, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)).logits
        prefill = model(with_cache[:, :6], attention_mask=torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1),
                        use_cache=True)
        cache, steps = prefill.past_key_values, [prefill.logits]
        for t in range(6, 10):
            step_mask = torch.cat([mask, torch.ones(2, t - 3, dtype=torch.long)], 1)
            steps.append(model(with_cache[:, t:t + 1], attention_mask=step_mask, cache=cache, use_cache=True).logits)
    assert with_cache.shape == (2, 10)
    assert torch.equal(with_cache, without_cache)
    real = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1).bool()
    assert_close(torch.cat(steps, 1)[real], full[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_the_cache_holds_only_the_shared_keys_and_values_of_a_dense_model(family):
    model = experts_model(family)
    torch.manual_seed(0)
    dense_class = MixtralMoEForCausalLM if family == "mixtral" else DeepSeekMoEForCausalLM
    dense = dense_class(experts_config(family, num_attention_experts=None)).eval()
    input_ids = random_input_ids(2, 5)
    with torch.no_grad():
        cache = model(input_ids, use_cache=True).past_key_values
        dense_cache = dense(input_ids, use_cache=True).past_key_values
    assert len(cache.layers) == len(dense_cache.layers) == model.config.num_hidden_layers
    for layer, dense_layer in zip(cache.layers, dense_cache.layers):
        assert layer.keys.shape == dense_layer.keys.shape == (2, 2, 5, 8)  # [B, nKV, S, D]
        assert layer.values.shape == dense_layer.values.shape == (2, 2, 5, 8)


# --------------------------------------------------------------------------------------------------------------
# The routers' balancing losses
# --------------------------------------------------------------------------------------------------------------


def test_the_attention_routers_losses_are_the_switch_and_z_losses_added_with_their_coefficients():
    model = experts_model(output_router_logits=True, attention_router_aux_loss_coef=0.1,
                          attention_router_z_loss_coef=0.01).train()
    input_ids = random_input_ids(2, 6)
    recorded = []
    hooks = [layer.self_attn.gate.register_forward_hook(lambda m, i, o: recorded.append(o[0].detach()))
             for layer in model.model.layers]
    output = model(input_ids, labels=input_ids)
    for hook in hooks:
        hook.remove()
    logits = torch.cat(recorded)  # [layers * T, E_a]: the Switch loss pools the layers
    probs = logits.softmax(dim=-1)
    chosen = F.one_hot(probs.topk(2, dim=-1).indices, 3).sum(dim=1).float()  # [rows, E_a]
    switch = 3 * (chosen.mean(dim=0) * probs.mean(dim=0)).sum()
    z = torch.stack([torch.logsumexp(r, dim=-1).square().mean() for r in recorded]).mean()
    losses = output.router_losses
    assert_close(losses["attention_router_aux_loss_coef"], switch, atol=1e-6, rtol=0)
    assert_close(losses["attention_router_z_loss_coef"], z, atol=1e-5, rtol=0)
    assert_close(output.aux_loss, losses["router_aux_loss_coef"])  # `aux_loss` stays the FFN routers' loss
    model.config.attention_router_aux_loss_coef = model.config.attention_router_z_loss_coef = 0.0
    without = model(input_ids, labels=input_ids).loss
    assert_close(output.loss - without, 0.1 * switch + 0.01 * z, atol=1e-5, rtol=0)
    assert model.eval()(input_ids, output_router_logits=False).router_losses is None  # only with router logits on


# --------------------------------------------------------------------------------------------------------------
# Save/load, remote code, gradient checkpointing, Trainer
# --------------------------------------------------------------------------------------------------------------

def test_save_load_and_load_as_remote_code_without_hf_moe(tmp_path):
    model = experts_model("deepseek", seed=1)
    input_ids = random_input_ids(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    prompt = random_input_ids(2, 4, seed=3)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "generate": {"input_ids": prompt, "max_new_tokens": 6, "min_new_tokens": 6}}
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert (loaded.config.num_attention_experts, loaded.config.num_attention_experts_per_tok) == (3, 2)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    child = load_as_remote_code_without_hf_moe({"model": tmp_path / "model"}, inputs, tmp_path)["model"]
    attention = child["classes"]["model.layers.0.self_attn"]
    assert attention.startswith("transformers_modules.") and attention.endswith("modeling_hf_moe.MoEAttentionExperts")
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    # bit-identical weights; memory-mapped ones may take another CPU matmul path (a few ulps)
    assert_close(child["logits"], expected, atol=ATOL, rtol=0)
    assert torch.equal(child["sequences"], greedy(model, prompt, True))


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids = random_input_ids(2, 8)
    grads = []
    for checkpointing in (False, True):
        model = experts_model(output_router_logits=True, attention_router_z_loss_coef=0.001).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in ("gate.weight", "q_proj", "o_proj", "k_proj.weight", "v_proj.weight"):
        assert f"model.layers.1.self_attn.{name}" in grads[0], name
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-6, rtol=0)


def test_one_trainer_step_adds_the_attention_routers_losses_and_updates_the_experts(tmp_path):
    model = experts_model(output_router_logits=True, attention_router_z_loss_coef=0.001)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".self_attn." in n}
    outputs = []
    hook = model.register_forward_hook(lambda m, i, o: outputs.append(o))
    result = train_one_step(model.train(), causal_lm_rows(), tmp_path)
    hook.remove()
    assert torch.isfinite(torch.tensor(result.training_loss))
    (output,) = outputs
    losses = output.router_losses
    assert {"router_aux_loss_coef", "attention_router_aux_loss_coef", "attention_router_z_loss_coef"} <= set(losses)
    labels = torch.tensor([row["labels"] for row in causal_lm_rows()])
    task_loss = F.cross_entropy(output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    weighted = sum(getattr(model.config, name) * value for name, value in losses.items())
    assert_close(output.loss, task_loss + weighted, atol=1e-5, rtol=0)  # Trainer's loss holds every router loss
    for name, value in before.items():
        assert not torch.equal(model.get_parameter(name), value), name


@pytest.mark.parametrize("layout", [None, [["attention", "moe"], ["attention", "dense", "attention", "moe"]]],
                         ids=["layers", "block_layout"])
def test_peft_lora_on_the_experts_query_and_output_projections_equals_the_merged_weights(tmp_path, layout):
    """PEFT's `target_parameters` wraps the attention module that owns q_proj [E_a, nH * D, H] and o_proj; the model
    must call that module with its input first (the wrapper's `x`). Each expert e gets its own W_e + s B_e A_e, with
    PEFT's stacked factors A [E_a * r, in] and B [out, r * E_a] (rank slots outermost in A, experts innermost in B)."""
    overrides = {} if layout is None else {"block_layout": layout}
    model = experts_model(**overrides)
    input_ids = random_input_ids(2, 7)
    rank, alpha = 2, 4
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_parameters=["self_attn.q_proj", "self_attn.o_proj"]))
    torch.manual_seed(5)
    merged = copy.deepcopy(model)
    attention_layers = [name for name, module in model.named_modules() if isinstance(module, MoEAttentionExperts)]
    assert len(attention_layers) == (2 if layout is None else 3)
    for layer in attention_layers:
        for projection in ("q_proj", "o_proj"):
            weight = merged.get_parameter(f"{layer}.{projection}")  # [E_a, out, in]
            experts, out_features, in_features = weight.shape
            (wrapper,) = [module for name, module in peft_model.named_modules()
                          if name.startswith(f"base_model.model.{layer}") and isinstance(module, ParamWrapper)
                          and module.parameter_name == projection]
            lora_a, lora_b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            with torch.no_grad():
                lora_a.normal_(std=0.2)
                lora_b.normal_(std=0.2)
                a = lora_a.view(experts, rank, in_features)  # A_e [r, in]
                b = lora_b.view(out_features, rank, experts).permute(2, 0, 1)  # B_e [out, r]
                weight += (alpha / rank) * b @ a
    with torch.no_grad():
        expected = merged(input_ids).logits
        assert (expected - model(input_ids).logits).abs().max() > 1e-2  # the adapters change the logits
        assert_close(peft_model(input_ids).logits, expected, atol=ATOL, rtol=0)
    peft_model(input_ids, labels=input_ids).loss.backward()
    grads = [parameter.grad for name, parameter in peft_model.named_parameters() if "lora_" in name]
    assert len(grads) == 4 * len(attention_layers) and all(grad is not None and grad.abs().sum() > 0 for grad in grads)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    with torch.no_grad():
        assert_close(reloaded(input_ids).logits, expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Kernels: the FFN experts' implementations and the attention implementations agree
# --------------------------------------------------------------------------------------------------------------


def test_experts_implementations_agree_on_a_model_with_attention_experts():
    input_ids = random_input_ids(2, 8)
    results = {}
    for implementation in ("eager", "sorted_mm", "batched_mm", "grouped_mm"):
        model = experts_model(output_router_logits=True).train()
        model.set_experts_implementation(implementation)
        output = model(input_ids, labels=input_ids)
        output.loss.backward()
        results[implementation] = (output.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    logits, grads = results.pop("eager")
    assert grads["model.layers.0.self_attn.q_proj"] is not None and grads["model.layers.0.mlp.experts.down_proj"] is not None
    for implementation, (other_logits, other_grads) in results.items():
        assert_close(other_logits, logits, atol=ATOL, rtol=0, msg=implementation)
        for name, grad in grads.items():
            assert_close(other_grads[name], grad, atol=ATOL, rtol=0, msg=f"{implementation}: {name}")


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_sdpa_and_eager_agree_and_eager_returns_every_routed_heads_weights(family):
    input_ids = random_input_ids(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = experts_model(family, attn_implementation=implementation)
        with torch.no_grad():
            logits[implementation] = model(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert_close(logits["sdpa"][real], logits["eager"][real], atol=ATOL, rtol=0)
    model = experts_model(family, attn_implementation="eager")
    with torch.no_grad():
        attentions = model(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    assert len(attentions) == model.config.num_hidden_layers
    assert attentions[0].shape == (2, 2 * 4, 7, 7)  # [B, k * nH, S, S]: the heads of both chosen experts


# --------------------------------------------------------------------------------------------------------------
# The preset, the conversion layout and config validation
# --------------------------------------------------------------------------------------------------------------


def test_jetmoe_preset_builds_attention_and_ffn_experts_and_the_cli_lists_it(capsys):
    config = MixtralMoEConfig.from_preset("jetmoe", vocab_size=128, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    assert (config.num_attention_experts, config.num_attention_experts_per_tok) == (8, 2)
    assert (config.num_local_experts, config.num_experts_per_tok, config.norm_topk_prob) == (8, 2, True)
    assert (config.attention_router_aux_loss_coef, config.attention_router_z_loss_coef) == (0.01, 0.001)
    assert (config.router_aux_loss_coef, config.router_z_loss_coef) == (0.01, 0.001)
    model = MixtralMoEForCausalLM(config)
    for layer in model.model.layers:
        assert isinstance(layer.self_attn, MoEAttentionExperts)
        assert layer.self_attn.q_proj.shape == (8, 2 * 16, 32)  # [E_a, nH * D, H]
    assert not any("self_attn" in rule for rule in config.base_model_tp_plan)  # replicated attention
    assert main(["presets"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("jetmoe ")]
    assert "MixtralMoEConfig" in line and "attention experts" in line


def test_layout_counts_the_tensors_and_exports_refuse_attention_experts():
    config = experts_config("deepseek")
    model = DeepSeekMoEForCausalLM(config)
    assert our_tensor_shapes(config) == {name: tuple(t.shape) for name, t in model.state_dict().items()}
    total, active = parameter_counts(config)
    assert total == sum(p.numel() for p in model.parameters())
    dense_total, dense_active = parameter_counts(experts_config("deepseek", num_attention_experts=None))
    layers, router, expert = 3, 3 * 32, 2 * 32 * 32  # per layer: a router [3, 32]; per expert: q and o [32, 32]
    assert total - dense_total == layers * (router + 3 * expert - expert)  # 3 experts instead of one dense q and o
    assert active - dense_active == layers * (router + 2 * expert - expert)  # a token runs 2 of them
    for fmt in ("mixtral", "olmoe"):
        with pytest.raises(ConversionError, match="`num_attention_experts`"):
            check_exportable(experts_config(), fmt)


def test_defaults_two_experts_per_token_and_none_without_attention_experts():
    assert make_mixtral_config(num_attention_experts=8).num_attention_experts_per_tok == 2
    assert make_mixtral_config(num_attention_experts=1).num_attention_experts_per_tok == 1
    config = MixtralMoEConfig()
    assert config.num_attention_experts is None and config.num_attention_experts_per_tok is None


@pytest.mark.parametrize(("config_class", "overrides", "field"), [
    (MixtralMoEConfig, {"num_attention_experts": 0}, "num_attention_experts"),
    (MixtralMoEConfig, {"num_attention_experts": 2, "num_attention_experts_per_tok": 3},
     "num_attention_experts_per_tok"),
    (MixtralMoEConfig, {"num_attention_experts": 2, "num_attention_experts_per_tok": 0},
     "num_attention_experts_per_tok"),
    (MixtralMoEConfig, {"num_attention_experts_per_tok": 2}, "num_attention_experts_per_tok"),
    (MixtralMoEConfig, {"attention_router_aux_loss_coef": -0.1}, "attention_router_aux_loss_coef"),
    (MixtralMoEConfig, {"attention_router_z_loss_coef": float("nan")}, "attention_router_z_loss_coef"),
    (DeepSeekMoEConfig, {"num_attention_experts": 4, "qkv_bias": True}, "qkv_bias"),
    (DeepSeekMoEConfig, {"num_attention_experts": 4, "attention_sinks": True}, "attention_sinks"),
    (DeepSeekMoEConfig, {"num_attention_experts": 4, "attention_type": "mla", "kv_lora_rank": 16,
                         "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}, "attention_type"),
])
def test_invalid_attention_experts_settings_raise_naming_the_field(config_class, overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        config_class(**overrides)
