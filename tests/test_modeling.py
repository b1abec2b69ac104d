"""Modeling: parity with transformers' native MoE models, kernels, caching, padding, outputs, heads, save/load."""

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, PAD_TOKEN_ID, random_input_ids, randomize_weights_
from torch.testing import assert_close
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from hf_moe import (
    DeepSeekMoEConfig,
    DeepSeekMoEForCausalLM,
    MixtralMoEConfig,
    MixtralMoEForCausalLM,
)
from hf_moe.modeling.modeling_hf_moe import MoEDecoderLayer, MoEExperts, MoESparseBlock

ATOL = 1e-5


def left_padded_batch(long_len: int = 9, short_len: int = 5):
    """Row 0: `long_len` real tokens. Row 1: `short_len` real tokens after `long_len - short_len` pads."""
    long_ids = random_input_ids(1, long_len, seed=1)
    short_ids = random_input_ids(1, short_len, seed=2)
    pads = torch.full((1, long_len - short_len), PAD_TOKEN_ID)
    input_ids = torch.cat([long_ids, torch.cat([pads, short_ids], dim=1)])
    attention_mask = (input_ids != PAD_TOKEN_ID).long()
    return input_ids, attention_mask, long_ids, short_ids


def greedy(model, input_ids, attention_mask=None, new_tokens=6, **kwargs):
    # min_new_tokens masks EOS, so every row generates exactly `new_tokens` tokens
    return model.generate(
        input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID, **kwargs,
    )


def grads_by_name(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters()}


# --------------------------------------------------------------------------------------------------------------
# Parity with transformers' native models on the same random weights
# --------------------------------------------------------------------------------------------------------------

SHARED_SHAPES = dict(
    vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    router_aux_loss_coef=0.1, max_position_embeddings=256,
)


def _mixtral_pair(sliding_window=None):
    kwargs = dict(SHARED_SHAPES, intermediate_size=64, num_hidden_layers=2, num_local_experts=4,
                  sliding_window=sliding_window)
    ours = randomize_weights_(MixtralMoEForCausalLM(MixtralMoEConfig(**kwargs)))
    native = MixtralForCausalLM(MixtralConfig(**kwargs))
    assert set(native.state_dict()) == set(ours.state_dict())  # same in-memory layout, no renaming
    native.load_state_dict(ours.state_dict(), strict=True)
    return ours, native


def _qwen2_moe_pair():
    """Qwen2-MoE: one sigmoid-gated shared expert, q/k/v biases, no top-k renormalisation, every 2nd layer sparse."""
    shapes = dict(SHARED_SHAPES, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                  shared_expert_intermediate_size=48, norm_topk_prob=False)
    native = Qwen2MoeForCausalLM(Qwen2MoeConfig(**shapes, num_experts=8, decoder_sparse_step=2, qkv_bias=True))
    ours = DeepSeekMoEForCausalLM(DeepSeekMoEConfig(
        **shapes, n_routed_experts=8, n_shared_experts=1, shared_expert_gate=True, qkv_bias=True,
        # Qwen's decoder_sparse_step=2: layer i is sparse iff (i + 1) % 2 == 0
        mlp_layer_types=["dense", "sparse", "dense"],
    ))
    randomize_weights_(ours)
    native_state = {k.replace("shared_experts.", "shared_expert."): v for k, v in ours.state_dict().items()}
    native.load_state_dict(native_state, strict=True)
    return ours, native


def _qwen3_moe_pair():
    """Qwen3-MoE: per-head q/k RMSNorm, explicit head_dim != hidden / heads, renormalised top-k, layer 0 dense."""
    shapes = dict(SHARED_SHAPES, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, head_dim=16,
                  norm_topk_prob=True)
    native = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shapes, num_experts=8, decoder_sparse_step=1, mlp_only_layers=[0]))
    ours = DeepSeekMoEForCausalLM(DeepSeekMoEConfig(
        **shapes, n_routed_experts=8, n_shared_experts=0, first_k_dense_replace=1, qk_norm=True,
    ))
    randomize_weights_(ours)
    native.load_state_dict(ours.state_dict(), strict=True)
    return ours, native


NATIVE_PAIRS = {
    "mixtral": _mixtral_pair,
    "mixtral_sliding_window": lambda: _mixtral_pair(sliding_window=3),
    "qwen2_moe": _qwen2_moe_pair,
    "qwen3_moe": _qwen3_moe_pair,
}


@pytest.fixture(params=list(NATIVE_PAIRS))
def native_pair(request):
    torch.manual_seed(0)
    ours, native = NATIVE_PAIRS[request.param]()
    return ours.eval(), native.eval()


def test_logits_match_native_transformers_model(native_pair):
    ours, native = native_pair
    input_ids = random_input_ids(2, 9)
    with torch.no_grad():
        assert_close(ours(input_ids).logits, native(input_ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padding"])
def test_loss_and_aux_loss_match_native_transformers_model(native_pair, padded):
    ours, native = native_pair
    input_ids, attention_mask, _, _ = left_padded_batch()
    if padded:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        attention_mask, labels = None, input_ids
    kwargs = dict(attention_mask=attention_mask, labels=labels, output_router_logits=True)
    with torch.no_grad():
        ours_out, native_out = ours(input_ids, **kwargs), native(input_ids, **kwargs)
    assert_close(ours_out.aux_loss, native_out.aux_loss, atol=ATOL, rtol=0)
    assert_close(ours_out.loss, native_out.loss, atol=ATOL, rtol=0)
    real = labels != -100
    assert_close(ours_out.logits[real], native_out.logits[real], atol=ATOL, rtol=0)


def test_sliding_window_changes_attention_beyond_the_window_only():
    """Guards the sliding-window parity case against passing trivially (a window that does nothing)."""
    windowed, _ = _mixtral_pair(sliding_window=3)
    full = MixtralMoEForCausalLM(MixtralMoEConfig(**{**windowed.config.to_dict(), "sliding_window": None}))
    full.load_state_dict(windowed.state_dict())
    input_ids = random_input_ids(1, 9)
    with torch.no_grad():
        windowed_logits, full_logits = windowed.eval()(input_ids).logits, full.eval()(input_ids).logits
    assert_close(windowed_logits[:, :3], full_logits[:, :3], atol=ATOL, rtol=0)
    assert (windowed_logits[:, 3:] - full_logits[:, 3:]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------------------
# Attention and experts kernels
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "flex_attention"])
def test_attention_implementation_matches_sdpa(family, attn_implementation):
    model = family.causal_lm()
    input_ids, attention_mask, _, _ = left_padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():  # flex_attention has no backward on CPU
        sdpa_logits = model(input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation(attn_implementation)
        assert model.config._attn_implementation == attn_implementation
        other_logits = model(input_ids, attention_mask=attention_mask).logits
    assert_close(other_logits[real], sdpa_logits[real], atol=ATOL, rtol=0)


def test_from_pretrained_applies_attention_and_experts_implementation(family, tmp_path):
    model = family.causal_lm()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", experts_implementation="batched_mm"
    )
    assert loaded.config._attn_implementation == "eager"
    assert loaded.config._experts_implementation == "batched_mm"
    input_ids = random_input_ids(2, 7)
    with torch.no_grad():
        assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=ATOL, rtol=0)


def test_default_experts_implementation_is_auto(family):
    """transformers only switches kernels for models whose modeling file holds `@use_experts_implementation`; our
    kernels are registered next to transformers' own, and where transformers would default to `grouped_mm` our models
    default to "auto" (the kernel timed fastest on this CPU, test_kernel_calibration.py). An explicit choice is
    kept."""
    assert family.causal_lm().config._experts_implementation == "auto"
    assert {"sorted_mm", "auto"} <= set(ALL_EXPERTS_FUNCTIONS)
    assert family.causal_lm(experts_implementation="grouped_mm").config._experts_implementation == "grouped_mm"


@pytest.mark.parametrize("experts_implementation", ["auto", "sorted_mm", "grouped_mm", "batched_mm"])
def test_experts_implementation_matches_eager_in_outputs_and_gradients(family, experts_implementation):
    model = family.causal_lm().train()
    input_ids = random_input_ids(2, 9)

    def loss_and_grads(implementation):
        model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        model.zero_grad()
        out = model(input_ids, labels=input_ids, output_router_logits=True)
        out.loss.backward()
        return out.logits.detach(), grads_by_name(model)

    eager_logits, eager_grads = loss_and_grads("eager")
    logits, grads = loss_and_grads(experts_implementation)
    assert_close(logits, eager_logits, atol=ATOL, rtol=0)
    assert set(grads) == {name for name, _ in model.named_parameters()}
    for name, grad in grads.items():
        assert_close(grad, eager_grads[name], atol=ATOL, rtol=0, msg=name)
    # the experts really received gradient (a kernel that detaches them would give zeros on both sides)
    assert any(g.abs().max() > 0 for n, g in grads.items() if "experts.gate_up_proj" in n)


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
def test_experts_skip_the_sentinel_expert_id(mixtral_config, experts_implementation):
    """Id E (one past the last expert) means "no expert": expert parallelism sends it for tokens another rank
    serves. transformers' grouped_mm masks those rows only in an expert-parallel module (its EP plan sets
    `_is_expert_parallel`; without it the kernel leaves them uninitialised), so the test marks the module as the
    plan does. Our routers never emit the id otherwise: a dropped slot keeps a valid id with weight 0."""
    config = mixtral_config()
    config._experts_implementation = experts_implementation
    experts = randomize_weights_(MoEExperts(config))
    experts._is_expert_parallel = True
    num_experts = config.num_experts
    hidden = torch.randn(5, config.hidden_size)
    top_k_index = torch.tensor([[0, num_experts], [1, 2], [num_experts, num_experts], [3, 0], [2, num_experts]])
    top_k_weights = torch.rand(5, 2).masked_fill(top_k_index == num_experts, 0.0)
    expected = torch.zeros_like(hidden)
    for t in range(5):
        for j in range(2):
            e = int(top_k_index[t, j])
            if e == num_experts:
                continue
            gate, up = F.linear(hidden[t], experts.gate_up_proj[e]).chunk(2)
            expected[t] += top_k_weights[t, j] * F.linear(F.silu(gate) * up, experts.down_proj[e])
    with torch.no_grad():
        assert_close(experts(hidden, top_k_index, top_k_weights), expected, atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Generation, caching and padding
# --------------------------------------------------------------------------------------------------------------


def test_greedy_generation_with_cache_matches_without_cache(family):
    model = family.causal_lm()
    prompt = random_input_ids(2, 4)
    with_cache = greedy(model, prompt, new_tokens=8, use_cache=True)
    without_cache = greedy(model, prompt, new_tokens=8, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_cache_continues_a_forward_under_its_new_name_and_its_deprecated_one(family):
    # transformers 5.25 renamed the forward's `past_key_values` to `cache` (generate() passes `cache=`) and keeps
    # the old name as a deprecated alias until 5.40, as its own decoders do
    model = family.causal_lm()
    input_ids = random_input_ids(2, 7)
    with torch.no_grad():
        full = model(input_ids).logits[:, -2:]
        for name in ("cache", "past_key_values"):
            cache = model(input_ids[:, :5], use_cache=True).cache
            continued = model(input_ids[:, 5:], use_cache=True, **{name: cache})
            assert continued.cache is cache and cache.get_seq_length() == 7, name
            assert_close(continued.logits, full, atol=ATOL, rtol=0)


def test_sliding_window_generation_with_cache_matches_without_cache():
    model = FAMILIES["mixtral"].causal_lm(sliding_window=3)
    prompt = random_input_ids(2, 4)  # 4 + 10 tokens, far past the window of 3
    with_cache = greedy(model, prompt, new_tokens=10, use_cache=True)
    without_cache = greedy(model, prompt, new_tokens=10, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_left_padded_batch_logits_match_unpadded_rows(family):
    model = family.causal_lm()
    input_ids, attention_mask, long_ids, short_ids = left_padded_batch()
    num_pads = long_ids.shape[1] - short_ids.shape[1]
    with torch.no_grad():
        batch_logits = model(input_ids, attention_mask=attention_mask).logits
        long_logits, short_logits = model(long_ids).logits, model(short_ids).logits
    assert_close(batch_logits[0], long_logits[0], atol=ATOL, rtol=0)
    assert_close(batch_logits[1, num_pads:], short_logits[0], atol=ATOL, rtol=0)


def test_left_padded_batch_generation_matches_per_row_generation(family):
    model = family.causal_lm()
    input_ids, attention_mask, long_ids, short_ids = left_padded_batch()
    batch = greedy(model, input_ids, attention_mask)[:, input_ids.shape[1]:]
    assert torch.equal(batch[0], greedy(model, long_ids)[0, long_ids.shape[1]:])
    assert torch.equal(batch[1], greedy(model, short_ids)[0, short_ids.shape[1]:])


def test_logits_to_keep_one_equals_last_position_of_full_logits(family):
    model = family.causal_lm()
    input_ids = random_input_ids(2, 7)
    with torch.no_grad():
        full = model(input_ids).logits
        last = model(input_ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, model.config.vocab_size)
    assert_close(last, full[:, -1:], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Training mechanics
# --------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_same_loss_and_gradients(family):
    model = family.causal_lm().train()
    input_ids = random_input_ids(2, 8)
    # checkpointing wraps a layer's `forward` (not `__call__`), so count entries into a module inside it; a pre-hook,
    # because the non-reentrant recomputation stops early, inside the MLP, once it has every saved tensor back
    layer_calls = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: layer_calls.append(1))

    def loss_and_grads():
        model.zero_grad()
        layer_calls.clear()
        loss = model(input_ids, labels=input_ids, output_router_logits=True).loss
        loss.backward()
        return loss.detach(), grads_by_name(model), len(layer_calls)

    loss, grads, calls = loss_and_grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed_loss, checkpointed_grads, checkpointed_calls = loss_and_grads()

    num_layers = model.config.num_hidden_layers
    assert (calls, checkpointed_calls) == (num_layers, 2 * num_layers)  # layers really re-ran in backward
    assert_close(checkpointed_loss, loss, atol=ATOL, rtol=0)
    for name, grad in grads.items():
        assert_close(checkpointed_grads[name], grad, atol=ATOL, rtol=0, msg=name)


def test_torch_compile_fullgraph_matches_eager_forward():
    model = FAMILIES["mixtral"].causal_lm()
    input_ids = random_input_ids(2, 8)
    with torch.no_grad():
        expected = model(input_ids).logits
        compiled = torch.compile(model, fullgraph=True)
        actual = compiled(input_ids).logits
    torch._dynamo.reset()
    assert_close(actual, expected, atol=ATOL, rtol=0)


def test_tied_embeddings_share_one_tensor_and_survive_save_load(family, tmp_path):
    model = family.causal_lm(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.model.embed_tokens.weight)


def test_untied_embeddings_stay_separate_after_save_load(family, tmp_path):
    model = family.causal_lm(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


# --------------------------------------------------------------------------------------------------------------
# Outputs and the load-balancing loss
# --------------------------------------------------------------------------------------------------------------


def test_router_logits_have_one_entry_per_sparse_layer(family):
    model = family.causal_lm()
    batch, seq = 2, 6
    with torch.no_grad():
        out = model(random_input_ids(batch, seq), output_router_logits=True)
    num_sparse = sum(isinstance(layer.mlp, MoESparseBlock) for layer in model.model.layers)
    assert num_sparse == model.config.num_sparse_layers == model.config.mlp_layer_types.count("sparse")
    assert len(out.router_logits) == num_sparse
    assert all(logits.shape == (batch * seq, model.config.num_experts) for logits in out.router_logits)


def test_causal_lm_output_fields(family):
    model = family.causal_lm()
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        out = model(input_ids, labels=input_ids, output_router_logits=True, use_cache=True)
    assert isinstance(out, MoeCausalLMOutputWithPast)
    assert out.logits.shape == (2, 6, model.config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss)
    assert out.cache.get_seq_length() == 6
    assert out.hidden_states is None and out.attentions is None


def test_router_outputs_are_absent_unless_requested(family):
    model = family.causal_lm()
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        out = model(input_ids, labels=input_ids)
    assert out.router_logits is None and out.aux_loss is None


def test_base_model_returns_moe_model_output(family):
    model = family.base_model()
    with torch.no_grad():
        out = model(random_input_ids(2, 6), output_router_logits=True)
    assert isinstance(out, MoeModelOutputWithPast)
    assert out.last_hidden_state.shape == (2, 6, model.config.hidden_size)
    assert len(out.router_logits) == model.config.num_sparse_layers


def test_output_hidden_states_has_embeddings_plus_one_per_layer(family):
    model = family.causal_lm()
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
        last_hidden_state = model.model(input_ids).last_hidden_state
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(input_ids))
    assert torch.equal(out.hidden_states[-1], last_hidden_state)


def test_output_attentions_has_one_map_per_layer_under_eager(family):
    model = family.causal_lm()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(random_input_ids(2, 6), output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    assert all(a.shape == (2, model.config.num_attention_heads, 6, 6) for a in out.attentions)


def switch_load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None):
    """Switch Transformer eqs. 4-6, written out: E * sum_e f_e * P_e, pooled over layers (and real tokens)."""
    logits = torch.cat(router_logits)  # [L*T, E]
    probs = torch.softmax(logits.float(), dim=-1)
    selections = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()  # [L*T, E]
    if attention_mask is None:
        weight = torch.ones(logits.shape[0])
    else:
        weight = attention_mask.reshape(-1).float().repeat(len(router_logits))
    f = (selections * weight[:, None]).sum(0) / weight.sum()  # fraction of selections per expert (sums to k)
    p = (probs * weight[:, None]).sum(0) / weight.sum()  # mean router probability per expert
    return num_experts * torch.sum(f * p)


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padding"])
def test_aux_loss_equals_written_out_switch_formula(family, padded):
    model = family.causal_lm()
    input_ids, attention_mask, _, _ = left_padded_batch()
    if not padded:
        attention_mask = None
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    expected = switch_load_balancing_loss(
        out.router_logits, model.config.num_experts, model.config.num_experts_per_tok, attention_mask
    )
    assert_close(out.aux_loss, expected, atol=1e-6, rtol=0)


def test_loss_adds_router_aux_loss_coef_times_aux_loss(family):
    model = family.causal_lm(router_aux_loss_coef=0.3)
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        with_aux = model(input_ids, labels=input_ids, output_router_logits=True)
        without_aux = model(input_ids, labels=input_ids, output_router_logits=False)
    assert with_aux.aux_loss > 0
    assert_close(with_aux.loss - without_aux.loss, 0.3 * with_aux.aux_loss, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# RoPE scaling
# --------------------------------------------------------------------------------------------------------------


def test_linear_rope_scaling_divides_the_frequencies_by_the_factor(family):
    theta, factor = 10000.0, 4.0
    model = family.causal_lm(rope_parameters={"rope_type": "linear", "factor": factor, "rope_theta": theta})
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    default_inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert_close(model.model.rotary_emb.inv_freq, default_inv_freq / factor, atol=1e-7, rtol=1e-6)


YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}


def test_yarn_rope_scaling_runs_with_explicit_head_dim(family):
    model = family.causal_lm(rope_parameters=YARN, head_dim=8)
    with torch.no_grad():
        assert torch.isfinite(model(random_input_ids(1, 6)).logits).all()


def test_yarn_rope_scaling_runs_with_default_head_dim(family):
    """transformers' yarn/dynamic/longrope initialisers read `getattr(config, "head_dim", default)`, so a config
    attribute head_dim=None must not reach them."""
    model = family.causal_lm(rope_parameters=YARN)
    with torch.no_grad():
        assert torch.isfinite(model(random_input_ids(1, 6)).logits).all()


# --------------------------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_sequence_classification_pools_the_last_non_pad_token(family, padding_side):
    model = family.sequence_classifier(num_labels=3)
    real = [random_input_ids(1, 7, seed=1)[0], random_input_ids(1, 4, seed=2)[0]]
    pads = torch.full((3,), PAD_TOKEN_ID)
    rows = [real[0], torch.cat([pads, real[1]]) if padding_side == "left" else torch.cat([real[1], pads])]
    input_ids = torch.stack(rows)
    attention_mask = (input_ids != PAD_TOKEN_ID).long()
    last_real = [6, 6] if padding_side == "left" else [6, 3]
    with torch.no_grad():
        pooled = model(input_ids, attention_mask=attention_mask).logits
        hidden = model.model(input_ids, attention_mask=attention_mask).last_hidden_state
        unpadded_short = model(real[1][None]).logits
    assert pooled.shape == (2, 3)
    expected = torch.stack([hidden[b, last_real[b]] for b in range(2)]) @ model.score.weight.T
    assert_close(pooled, expected, atol=ATOL, rtol=0)
    assert_close(pooled[1], unpadded_short[0], atol=ATOL, rtol=0)


def test_sequence_classification_loss_is_cross_entropy_of_pooled_logits(family):
    model = family.sequence_classifier(num_labels=3)
    input_ids, labels = random_input_ids(2, 5), torch.tensor([2, 0])
    with torch.no_grad():
        out = model(input_ids, labels=labels)
    assert_close(out.loss, F.cross_entropy(out.logits, labels), atol=1e-6, rtol=0)


def test_sequence_classification_without_pad_token_rejects_a_batch(family):
    model = family.sequence_classifier(num_labels=2, pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id"):
        model(random_input_ids(2, 5))


# --------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# --------------------------------------------------------------------------------------------------------------

HEADS = {
    "causal_lm": (AutoModelForCausalLM, "causal_lm", lambda out: out.logits),
    "base_model": (AutoModel, "base_model", lambda out: out.last_hidden_state),
    "sequence_classification": (AutoModelForSequenceClassification, "sequence_classifier", lambda out: out.logits),
}


@pytest.mark.parametrize("head", list(HEADS))
def test_save_pretrained_round_trip_through_auto_class(family, head, tmp_path):
    auto_class, builder, select = HEADS[head]
    model = getattr(family, builder)()
    model.save_pretrained(tmp_path)

    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_hf_moe.py", "configuration_hf_moe.py",
            "routing.py"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]

    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        # weights are bit-identical; the loaded ones are memory-mapped (not 64-byte aligned), which can change the
        # CPU matmul kernel's summation order by one ulp
        assert_close(select(loaded(input_ids)), select(model(input_ids)), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Declared parallelism plans and device-map hints
# --------------------------------------------------------------------------------------------------------------


def _plan_regex(key: str) -> re.Pattern:
    """transformers plans use `*` for a layer index."""
    return re.compile(re.escape(key).replace(r"\*", r"\d+") + r"$")


def _names(module: torch.nn.Module) -> set[str]:
    return {n for n, _ in module.named_modules() if n} | {n for n, _ in module.named_parameters()}


@pytest.mark.parametrize("plan", ["base_model_tp_plan", "base_model_ep_plan", "base_model_pp_plan"])
def test_declared_base_model_plan_keys_name_real_modules_or_parameters(family, plan):
    keys = getattr(family.make_config(), plan)
    names = _names(family.base_model())
    assert keys
    for key in keys:  # the plans hold rules for the modules this config builds, and no others
        assert any(_plan_regex(key).match(name) for name in names), f"{plan}[{key!r}] matches nothing"


def test_causal_lm_tp_and_pp_plans_name_real_modules(family):
    model = family.causal_lm()
    names = _names(model)
    for plan in (model.tp_plan, model.pp_plan, model.ep_plan):
        assert plan
        for key in plan:
            assert any(_plan_regex(key).match(n) for n in names), key


def test_declared_parallel_styles_are_registered():
    # importing these modules registers the TP and EP styles
    import transformers.distributed.expert_parallel
    import transformers.distributed.tensor_parallel  # noqa: F401
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    config = FAMILIES["deepseek"].make_config()
    styles = set(config.base_model_tp_plan.values()) | set(config.base_model_ep_plan.values())
    assert styles <= set(ALL_PARALLEL_STYLES.valid_keys())


def test_no_split_modules_name_an_existing_decoder_layer_class(family):
    model = family.causal_lm()
    classes_in_model = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) == {"MoEDecoderLayer"}
    assert set(model._no_split_modules) <= classes_in_model
    assert all(isinstance(layer, MoEDecoderLayer) for layer in model.model.layers)


# ---------------------------------------------------------------------------------------------------------------
# transformers' class conventions (its common model tests check both)


def test_causal_lm_lists_generation_mixin_among_its_direct_bases(family):
    from transformers import GenerationMixin

    assert GenerationMixin in family.causal_lm_class.__bases__


@pytest.mark.parametrize("selection_bias", [False, True])
def test_only_a_selection_bias_is_kept_in_fp32(family, selection_bias, tmp_path):
    overrides = dict(router_selection_bias=True, scoring_func="sigmoid") if selection_bias else {}
    family.causal_lm(**overrides).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    buffers = {name.rsplit(".", 1)[-1]: buffer.dtype for name, buffer in model.named_buffers()}
    assert model._keep_in_fp32_modules_strict == ({"e_score_correction_bias"} if selection_bias else set())
    assert all(any(name.endswith(module) for name, _ in [*model.named_parameters(), *model.named_buffers()])
               for module in model._keep_in_fp32_modules_strict)  # every module it names exists
    assert buffers.get("e_score_correction_bias") == (torch.float32 if selection_bias else None)
    assert model.lm_head.weight.dtype == torch.bfloat16
