"""Multi-head latent attention (`attention_type="mla"`): parity with transformers' DeepSeek-V2/V3 attention and whole
models on copied weights, caching, padding, kernels, training, remote code and config validation.

Every model is tiny and fp32: hidden 32, 4 heads, q rank 24, kv rank 16, nope 8 + rope 4 query/key dims, v dim 6
(v != q/k head dim, as in DeepSeek, where 128 != 192).
"""


import pytest
import torch
from conftest import (
    PAD_TOKEN_ID,
    load_as_remote_code_without_hf_moe,
    make_deepseek_config,
    random_input_ids,
    randomize_weights_,
)
from huggingface_hub.errors import StrictDataclassClassValidationError
from test_trainer import causal_lm_rows, train_one_step
from torch.testing import assert_close
from transformers import (
    AutoConfig,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
)
from transformers.cache_utils import DynamicCache
from transformers.modeling_rope_utils import yarn_apply_mscale
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention, DeepseekV2RotaryEmbedding
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig
from hf_moe.modeling.modeling_hf_moe import MoEMultiLatentAttention, MoERotaryEmbedding, mla_softmax_scale

ATOL = 1e-5
TINY_MLA = {"attention_type": "mla", "num_key_value_heads": None, "qk_norm": False, "qkv_bias": False,
            "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}
# YaRN as DeepSeek-V2/V3 set it, with mscale != mscale_all_dim so that both the cos/sin factor and the softmax scale
# differ from 1
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}


def mla_config(**overrides) -> DeepSeekMoEConfig:
    """conftest's DeepSeek-style tiny config (dense layer 0, gated shared expert) with MLA."""
    return make_deepseek_config(**{**TINY_MLA, **overrides})


def mla_model(seed: int = 0, **overrides) -> DeepSeekMoEForCausalLM:
    torch.manual_seed(seed)
    return randomize_weights_(DeepSeekMoEForCausalLM(mla_config(**overrides))).eval()


def greedy(model, input_ids, attention_mask=None, new_tokens=8, **kwargs):
    return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# The attention module against transformers' DeepseekV3Attention / DeepseekV2Attention on copied weights
# --------------------------------------------------------------------------------------------------------------

SHAPES = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16,
          "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6, "max_position_embeddings": 256,
          "rms_norm_eps": 1e-6, "attn_implementation": "eager"}


def causal_mask(batch: int, query_len: int, past: int = 0) -> torch.Tensor:
    """[B, 1, S, past + S] additive mask."""
    mask = torch.full((query_len, past + query_len), float("-inf")).triu(past + 1)
    return mask[None, None].expand(batch, 1, -1, -1)


def attention_pair(native_attention, native_config, q_lora_rank, rope_interleave, rope_parameters):
    """(ours, native) attention modules with the same random weights."""
    ours = MoEMultiLatentAttention(mla_config(**SHAPES, q_lora_rank=q_lora_rank, rope_interleave=rope_interleave,
                                              rope_parameters=rope_parameters), layer_idx=0)
    native = native_attention(native_config, layer_idx=0)
    randomize_weights_(native)
    ours.load_state_dict(native.state_dict(), strict=True)
    return ours.eval(), native.eval()


@pytest.mark.parametrize("rope_parameters", [None, YARN], ids=["default_rope", "yarn_mscale"])
@pytest.mark.parametrize("rope_interleave", [True, False], ids=["interleaved", "halves"])
@pytest.mark.parametrize("q_lora_rank", [24, None], ids=["q_lora", "q_proj"])
def test_attention_matches_deepseek_v3_attention_and_caches_the_same_latent(q_lora_rank, rope_interleave,
                                                                               rope_parameters):
    native_config = DeepseekV3Config(**SHAPES, q_lora_rank=q_lora_rank, rope_interleave=rope_interleave,
                                     rope_parameters=rope_parameters)
    ours, native = attention_pair(DeepseekV3Attention, native_config, q_lora_rank, rope_interleave, rope_parameters)
    assert ours.scaling == native.scaling
    hidden = torch.randn(2, 9, 32)
    positions = torch.arange(9)[None].expand(2, -1)
    our_rope = MoERotaryEmbedding(ours.config)(hidden, positions)
    native_rope = DeepseekV3RotaryEmbedding(native_config)(hidden, positions)
    our_cache, native_cache = DynamicCache(config=ours.config), DynamicCache(config=native_config)
    with torch.no_grad():
        # a prefill of 6 tokens, then 3 tokens continuing the cache
        for start, stop in ((0, 6), (6, 9)):
            mask = causal_mask(2, stop - start, past=start)
            rope = [tuple(t[:, start:stop] for t in our_rope), tuple(t[:, start:stop] for t in native_rope)]
            expected, expected_weights = native(hidden[:, start:stop], rope[1], mask, cache=native_cache)
            actual, actual_weights = ours(hidden[:, start:stop], rope[0], mask, cache=our_cache)
            assert_close(actual, expected, atol=ATOL, rtol=0)
            assert_close(actual_weights, expected_weights, atol=ATOL, rtol=0)
    assert_close(our_cache.layers[0].keys, native_cache.layers[0].keys, atol=ATOL, rtol=0)  # c_kv [B, 1, 9, r]
    assert_close(our_cache.layers[0].values, native_cache.layers[0].values, atol=ATOL, rtol=0)  # k_rope


@pytest.mark.parametrize("rope_parameters", [None, {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}],
                         ids=["default_rope", "yarn_mscale"])
@pytest.mark.parametrize("q_lora_rank", [24, None], ids=["q_lora", "q_proj"])
def test_interleaved_rope_attention_matches_deepseek_v2_complex_rope_attention(q_lora_rank, rope_parameters):
    """V2 rotates the pairs as complex numbers and keeps them interleaved; V3's rope_interleave=True lists them
    de-interleaved: q and k are permuted alike, so the attention is the same."""
    native_config = DeepseekV2Config(**SHAPES, q_lora_rank=q_lora_rank, rope_parameters=rope_parameters)
    ours, native = attention_pair(DeepseekV2Attention, native_config, q_lora_rank, True, rope_parameters)
    assert ours.scaling == native.scaling
    hidden = torch.randn(2, 9, 32)
    positions = torch.arange(9)[None].expand(2, -1)
    with torch.no_grad():
        expected, _ = native(hidden, causal_mask(2, 9), position_embeddings=DeepseekV2RotaryEmbedding(native_config)(
            hidden, positions))
        actual, _ = ours(hidden, MoERotaryEmbedding(ours.config)(hidden, positions), causal_mask(2, 9))
    assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    YARN,
    {**YARN, "mscale_all_dim": 0.0},  # 0 = no softmax-scale adjustment
    {**YARN, "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707},  # DeepSeek-V2's
    {**YARN, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},  # V3
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "mscale_all_dim": 1.0},
])
def test_softmax_scale_is_transformers_yarn_apply_mscale(rope_parameters):
    config = mla_config(rope_parameters=rope_parameters, max_position_embeddings=4096 * 40)
    assert mla_softmax_scale(config) == yarn_apply_mscale(config.rope_parameters, 12**-0.5)


# --------------------------------------------------------------------------------------------------------------
# Whole models: DeepSeek-V3 and V2 routing are existing routing fields; weights copied by name, no renaming
# --------------------------------------------------------------------------------------------------------------

WHOLE_MODEL = dict(SHAPES, q_lora_rank=24, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
                   n_group=4, topk_group=2)


def _deepseek_v3_pair():
    """V3: sigmoid scores, selection bias (random here), group score = sum of the top 2, renormalised, x2.5."""
    shapes = dict(WHOLE_MODEL, norm_topk_prob=True, routed_scaling_factor=2.5, rope_parameters=YARN)
    ours = DeepSeekMoEForCausalLM(DeepSeekMoEConfig(
        **shapes, attention_type="mla", n_routed_experts=8, scoring_func="sigmoid",
        router_selection_bias=True,
    ))
    native = DeepseekV3ForCausalLM(DeepseekV3Config(**shapes, n_routed_experts=8))
    randomize_weights_(ours)
    with torch.no_grad():
        for router in ours.model.routers():
            router.e_score_correction_bias.copy_(0.3 * torch.randn(8))
    return ours, native


def _deepseek_v2_pair():
    """V2: softmax, group-limited greedy (group score = max), no renormalisation, x16; complex-pair RoPE."""
    shapes = dict(WHOLE_MODEL, norm_topk_prob=False, routed_scaling_factor=16.0,
                  rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})
    ours = DeepSeekMoEForCausalLM(DeepSeekMoEConfig(**shapes, attention_type="mla", n_routed_experts=8))
    native = DeepseekV2ForCausalLM(DeepseekV2Config(**shapes, n_routed_experts=8, topk_method="group_limited_greedy"))
    randomize_weights_(ours)
    return ours, native


@pytest.mark.parametrize("pair", [_deepseek_v3_pair, _deepseek_v2_pair], ids=["deepseek_v3", "deepseek_v2"])
def test_whole_model_logits_match_transformers_deepseek(pair):
    torch.manual_seed(0)
    ours, native = pair()
    assert set(ours.state_dict()) == set(native.state_dict())  # the same in-memory layout, no renaming
    native.load_state_dict(ours.state_dict(), strict=True)
    input_ids = random_input_ids(2, 9)
    with torch.no_grad():
        assert_close(ours.eval()(input_ids).logits, native.eval()(input_ids).logits, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Caching, padding, kernels
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_interleave": False}, {"sliding_window": 3}],
                         ids=["q_lora_interleaved", "q_proj_halves", "sliding_window"])
def test_greedy_generation_with_cache_matches_without_cache(overrides):
    model = mla_model(**overrides)
    prompt = random_input_ids(2, 4)
    assert torch.equal(greedy(model, prompt, use_cache=True), greedy(model, prompt, use_cache=False))


def test_left_padded_batch_gives_the_logits_of_the_unpadded_rows():
    model = mla_model()
    long_ids, short_ids = random_input_ids(1, 9, seed=1), random_input_ids(1, 5, seed=2)
    input_ids = torch.cat([long_ids, torch.cat([torch.full((1, 4), PAD_TOKEN_ID), short_ids], dim=1)])
    with torch.no_grad():
        batch = model(input_ids, attention_mask=(input_ids != PAD_TOKEN_ID).long()).logits
        assert_close(batch[0], model(long_ids).logits[0], atol=ATOL, rtol=0)
        assert_close(batch[1, 4:], model(short_ids).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn_implementation", [
    "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow),  # flex compiles its kernel: 13 s on 2 cores
])
def test_attention_implementation_matches_eager(attn_implementation):
    model = mla_model(attn_implementation="eager")
    input_ids = random_input_ids(2, 9)
    with torch.no_grad():
        expected = model(input_ids).logits
        model.set_attn_implementation(attn_implementation)
        assert_close(model(input_ids).logits, expected, atol=ATOL, rtol=0)


def test_output_attentions_has_one_map_per_layer_under_eager():
    model = mla_model(attn_implementation="eager")
    with torch.no_grad():
        attentions = model(random_input_ids(2, 7), output_attentions=True).attentions
    assert len(attentions) == 3 and all(a.shape == (2, 4, 7, 7) for a in attentions)
    assert_close(attentions[0].sum(-1), torch.ones(2, 4, 7), atol=ATOL, rtol=0)


@pytest.mark.slow  # about 30 s on 2 cores
def test_torch_compile_fullgraph_matches_eager_forward():
    model = mla_model()
    input_ids = random_input_ids(2, 8)
    with torch.no_grad():
        expected = model(input_ids).logits
        actual = torch.compile(model, fullgraph=True)(input_ids).logits
    torch._dynamo.reset()
    assert_close(actual, expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------

MLA_PROJECTIONS = ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
                   "o_proj")


def test_init_weights_draws_projections_from_initializer_range_and_sets_norms_to_one():
    torch.manual_seed(0)
    model = DeepSeekMoEForCausalLM(mla_config(hidden_size=64, initializer_range=0.02))
    attention = model.model.layers[0].self_attn
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
        assert abs(getattr(attention, name).weight.std().item() - 0.02) < 0.004, name
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        assert torch.equal(getattr(attention, name).weight, torch.ones_like(getattr(attention, name).weight))


def test_backward_reaches_every_mla_projection():
    model = mla_model().train()
    input_ids = random_input_ids(2, 8)
    model(input_ids, labels=input_ids).loss.backward()
    for layer in model.model.layers:
        for name in MLA_PROJECTIONS:
            grad = getattr(layer.self_attn, name).weight.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = mla_model().train()
    input_ids = random_input_ids(2, 8)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids, labels=input_ids, output_router_logits=True).loss
        loss.backward()
        return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}

    loss, grads = loss_and_grads()
    model.activation_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    assert_close(checkpointed_loss, loss, atol=ATOL, rtol=0)
    for name, grad in grads.items():
        assert_close(checkpointed_grads[name], grad, atol=ATOL, rtol=0, msg=name)


def test_trainer_step_with_aux_loss_updates_attention_and_router(tmp_path):
    model = mla_model(output_router_logits=True, router_aux_loss_coef=1.0).train()
    before = {name: param.detach().clone() for name, param in model.named_parameters()
              if name.endswith(("self_attn.kv_b_proj.weight", "mlp.gate.weight"))}
    result = train_one_step(model, causal_lm_rows(), tmp_path)
    assert torch.isfinite(torch.tensor(result.training_loss))
    for name, value in before.items():
        assert not torch.equal(model.get_parameter(name), value), name


# --------------------------------------------------------------------------------------------------------------
# Save and load, with hf_moe and as remote code without it
# --------------------------------------------------------------------------------------------------------------

def test_saved_model_loads_as_remote_code_without_hf_moe(tmp_path):
    model = mla_model(seed=1)
    model.save_pretrained(tmp_path / "model")
    prompt = random_input_ids(2, 4, seed=3)
    inputs = {"input_ids": random_input_ids(2, 7),
              "generate": {"input_ids": prompt, "max_new_tokens": 6, "min_new_tokens": 6}}
    child = load_as_remote_code_without_hf_moe({"model": tmp_path / "model"}, inputs, tmp_path)["model"]
    attention = child["classes"]["model.layers.0.self_attn"]
    assert attention.startswith("transformers_modules.")
    assert attention.endswith("modeling_hf_moe.MoEMultiLatentAttention")
    with torch.no_grad():
        assert_close(child["logits"], model(inputs["input_ids"]).logits, atol=1e-6, rtol=0)
    assert torch.equal(child["sequences"], greedy(model, prompt, new_tokens=6))


def test_config_round_trips_with_head_dim_as_the_rotary_dim(tmp_path):
    config = mla_config(q_lora_rank=None, rope_interleave=False, rope_parameters=YARN)
    assert config.head_dim == 4 and config.num_key_value_heads == 4
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is DeepSeekMoEConfig
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()


# --------------------------------------------------------------------------------------------------------------
# Config: presets and validation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_presets_use_mla_with_the_published_dims(preset):
    config = DeepSeekMoEConfig.from_preset(preset, vocab_size=128, hidden_size=64, num_hidden_layers=2)
    published = {"attention_type": "mla", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                 "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True}
    assert {name: getattr(config, name) for name in published} == published
    assert config.head_dim == 64 and config.num_key_value_heads == config.num_attention_heads
    lite = DeepSeekMoEConfig.from_preset(preset, vocab_size=128, hidden_size=64, num_hidden_layers=2, q_lora_rank=None)
    assert "layers.*.self_attn.q_proj" in lite.base_model_tp_plan
    assert "layers.*.self_attn.q_b_proj" in config.base_model_tp_plan


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_tensor_parallel_plan_names_the_mla_modules_and_no_others(q_lora_rank):
    model = mla_model(q_lora_rank=q_lora_rank)
    names = {name for name, _ in model.model.named_modules()}
    attention_rules = [key for key in model.config.base_model_tp_plan if ".self_attn." in key]
    assert len(attention_rules) == 4
    for key in attention_rules:
        assert key.replace("*", "0") in names, key


def test_default_rope_interleave_is_true_with_mla_and_none_without():
    assert mla_config().rope_interleave is True
    assert make_deepseek_config().rope_interleave is None


@pytest.mark.parametrize(("overrides", "field"), [
    ({"attention_type": "MLA"}, "attention_type"),
    ({"kv_lora_rank": None}, "kv_lora_rank"),
    ({"qk_nope_head_dim": 0}, "qk_nope_head_dim"),
    ({"v_head_dim": -6}, "v_head_dim"),
    ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"head_dim": 8}, "head_dim"),
    ({"qk_norm": True}, "qk_norm"),
    ({"qkv_bias": True}, "qkv_bias"),
    ({"attention_type": "gqa", "num_key_value_heads": 2}, "q_lora_rank"),  # MLA fields left set under GQA
    ({"attention_type": "gqa", "q_lora_rank": None, "kv_lora_rank": None, "qk_nope_head_dim": None,
      "qk_rope_head_dim": None, "v_head_dim": None, "rope_interleave": False}, "rope_interleave"),
])
def test_invalid_mla_setting_raises_a_one_line_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"^`{field}`=.* is invalid: ") as error:
        mla_config(**overrides)
    assert "\n" not in str(error.value)


def test_mla_error_for_key_value_heads_says_what_is_allowed():
    with pytest.raises(ValueError, match=r"must equal num_attention_heads=4 \(or be None\) with attention_type='mla'"):
        mla_config(num_key_value_heads=2)


@pytest.mark.parametrize("field", ["attention_type", "kv_lora_rank", "q_lora_rank", "rope_interleave"])
def test_mixtral_refuses_mla_fields_and_points_to_deepseek(field):
    value = {"attention_type": "mla", "rope_interleave": True}.get(field, 16)
    with pytest.raises(ValueError, match=f"`{field}`=.*MixtralMoEConfig fixes {field} to .*DeepSeekMoEConfig"):
        MixtralMoEConfig(**{field: value})


def test_invalid_mla_field_set_after_construction_is_refused_at_save(tmp_path):
    config = mla_config()
    config.kv_lora_rank = 0
    with pytest.raises(StrictDataclassClassValidationError, match="`kv_lora_rank`=0"):
        config.save_pretrained(tmp_path)
