"""The native transformers families olmoe, glm4_moe and gpt_oss, held exactly by `hf_moe_deepseek` configs: logits,
generation, caching, attention and experts kernels, gradients, config validation, save/load and remote code.

Each family has a map from transformers' config to ours (`*_config_to_ours`, every key the family reads) and from its
tensors to ours (`to_our_tensors`: names and layouts). Models are tiny, fp32 and randomised (every parameter, biases,
norms, sinks and the selection bias included); logits must agree within 1e-5 absolute.
"""


import pytest
import torch
from conftest import FAMILIES as OUR_FAMILIES
from conftest import (
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    load_as_remote_code_without_hf_moe,
    random_input_ids,
    randomize_weights_,
)
from test_modeling import _plan_regex
from torch.testing import assert_close
from transformers import (
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
)

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig
from hf_moe.modeling.modeling_hf_moe import attention_function

ATOL = 1e-5
SHAPES = {"vocab_size": VOCAB_SIZE, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 256, "pad_token_id": PAD_TOKEN_ID,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "initializer_range": 0.02, "num_experts_per_tok": 2}
# transformers' config keys that both sides spell and read the same way
SHARED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
               "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
               "attention_dropout", "num_experts_per_tok")


def shared_fields(native) -> dict:
    return {key: getattr(native, key) for key in SHARED_KEYS}


# --------------------------------------------------------------------------------------------------------------
# The three families: config map, tensor map, a tiny native config
# --------------------------------------------------------------------------------------------------------------


def olmoe_config_to_ours(native: OlmoeConfig) -> DeepSeekMoEConfig:
    """Every layer sparse, no shared experts, experts of width intermediate_size; q/k RMSNorm over the whole
    projection; attention_bias is on all four projections."""
    return DeepSeekMoEConfig(
        **shared_fields(native), intermediate_size=native.intermediate_size,
        moe_intermediate_size=native.intermediate_size, n_routed_experts=native.num_experts, n_shared_experts=0,
        first_k_dense_replace=0, norm_topk_prob=native.norm_topk_prob, qkv_bias=native.attention_bias,
        o_proj_bias=native.attention_bias, qk_norm=True, qk_norm_type="whole_projection", clip_qkv=native.clip_qkv,
        output_router_logits=native.output_router_logits, router_aux_loss_coef=native.router_aux_loss_coef,
    )


def glm4_moe_config_to_ours(native: Glm4MoeConfig) -> DeepSeekMoEConfig:
    """DeepSeek-V3's router (sigmoid, selection bias, groups by their top-2 sum, renormalised, scaled), shared
    experts, dense first layers; q/k/v biases without an o_proj bias; per-head q/k norm; partial RoPE (inside
    rope_parameters, as transformers keeps it)."""
    return DeepSeekMoEConfig(
        **shared_fields(native), head_dim=getattr(native, "head_dim", None),
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.moe_intermediate_size,
        n_routed_experts=native.n_routed_experts, n_shared_experts=native.n_shared_experts,
        first_k_dense_replace=native.first_k_dense_replace, scoring_func="sigmoid", router_selection_bias=True,
        router_in_fp32=True,  # as Glm4MoeTopkRouter: identical in fp32, transformers' numbers in bf16
        n_group=native.n_group, topk_group=native.topk_group, norm_topk_prob=native.norm_topk_prob,
        routed_scaling_factor=native.routed_scaling_factor, qkv_bias=native.attention_bias,
        qk_norm=native.use_qk_norm, router_aux_loss_coef=0.0,  # glm4_moe computes no balancing loss
    )


def gpt_oss_config_to_ours(native: GptOssConfig) -> DeepSeekMoEConfig:
    """Biases everywhere, attention sinks, sliding/full layers, a biased router whose softmax over the top-k logits
    is softmax-then-top-k renormalised, biased experts with the clamped SwiGLU."""
    return DeepSeekMoEConfig(
        **shared_fields(native), head_dim=native.head_dim, intermediate_size=native.intermediate_size,
        moe_intermediate_size=native.intermediate_size, n_routed_experts=native.num_local_experts,
        n_shared_experts=0, first_k_dense_replace=0, norm_topk_prob=True, qkv_bias=native.attention_bias,
        o_proj_bias=native.attention_bias, attention_sinks=True, sliding_window=native.sliding_window,
        layer_types=native.layer_types, router_bias=True, expert_bias=True, experts_activation="clamped_swiglu",
        swiglu_alpha=native.swiglu_alpha, swiglu_limit=native.swiglu_limit,
        output_router_logits=native.output_router_logits, router_aux_loss_coef=native.router_aux_loss_coef,
    )


def gpt_oss_tensors_to_ours(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss keeps `x @ W` experts with gate/up interleaved along 2I: gate_up_proj [E, H, 2I] (gate at even
    columns), down_proj [E, I, H]; ours are [E, 2I, H] as [gate; up] and [E, H, I]. Its router is `mlp.router`."""
    ours = {}
    for name, tensor in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            tensor = torch.cat([tensor[..., 0::2], tensor[..., 1::2]], dim=-1).transpose(1, 2)
        elif name.endswith("mlp.experts.gate_up_proj_bias"):
            tensor = torch.cat([tensor[..., 0::2], tensor[..., 1::2]], dim=-1)
        elif name.endswith("mlp.experts.down_proj"):
            tensor = tensor.transpose(1, 2)
        ours[name.replace(".mlp.router.", ".mlp.gate.")] = tensor.contiguous()
    return ours


def same_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(tensors)  # olmoe and glm4_moe hold the same names and layouts as ours in memory


FAMILIES = {
    "olmoe": (
        lambda: OlmoeConfig(**SHAPES, intermediate_size=16, num_experts=8, norm_topk_prob=False,
                            attention_bias=True, clip_qkv=1.5),
        OlmoeForCausalLM, olmoe_config_to_ours, same_tensors,
    ),
    "glm4_moe": (
        lambda: Glm4MoeConfig(**SHAPES, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                              n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                              topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True,
                              use_qk_norm=True, partial_rotary_factor=0.5),
        Glm4MoeForCausalLM, glm4_moe_config_to_ours, same_tensors,
    ),
    "gpt_oss": (
        lambda: GptOssConfig(**SHAPES, head_dim=8, intermediate_size=16, num_local_experts=8, sliding_window=4,
                             swiglu_limit=1.0,  # low enough that both clamps bite on these weights
                             rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                              "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                              "original_max_position_embeddings": 64}),
        GptOssForCausalLM, gpt_oss_config_to_ours, gpt_oss_tensors_to_ours,
    ),
}


def make_pair(family: str, seed: int = 0):
    """(native model, our model) with the same random weights, in eval mode."""
    make_native_config, native_class, config_to_ours, tensors_to_ours = FAMILIES[family]
    torch.manual_seed(seed)
    native_config = make_native_config()
    native = randomize_weights_(native_class(native_config))
    with torch.no_grad():
        for name, buffer in native.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
    ours = DeepSeekMoEForCausalLM(config_to_ours(native_config))
    ours.load_state_dict(tensors_to_ours(native.state_dict()), strict=True)
    return native.eval(), ours.eval()


def left_padded_batch():
    """Two rows, the second with 4 pad tokens on the left."""
    input_ids = random_input_ids(2, 9)
    input_ids[1, :4] = PAD_TOKEN_ID
    return input_ids, (input_ids != PAD_TOKEN_ID).long()


def greedy(model, input_ids, attention_mask, **kwargs):
    return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=6,
                          min_new_tokens=6, pad_token_id=PAD_TOKEN_ID, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Parity with transformers' own classes
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_native_on_a_left_padded_batch(family, attn_implementation):
    native, ours = make_pair(family)
    ours.set_attn_implementation(attn_implementation)
    input_ids, attention_mask = left_padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():
        expected = native(input_ids, attention_mask=attention_mask).logits
        logits = ours(input_ids, attention_mask=attention_mask).logits
    assert_close(logits[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_native_and_with_cache_matches_without(family):
    native, ours = make_pair(family)
    input_ids, attention_mask = left_padded_batch()
    generated = greedy(ours, input_ids, attention_mask)
    assert torch.equal(generated, greedy(native, input_ids, attention_mask))
    assert torch.equal(generated, greedy(ours, input_ids, attention_mask, use_cache=False))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_with_a_static_cache_matches_the_dynamic_cache(family):
    """`cache_implementation="static"`: generate then makes the masks, one per attention layer type, ahead of each
    step (`create_masks_for_generate`) and passes them in as a dict; gpt_oss alternates sliding and full layers."""
    native, ours = make_pair(family)
    input_ids, attention_mask = left_padded_batch()
    generated = greedy(ours, input_ids, attention_mask)
    assert torch.equal(greedy(ours, input_ids, attention_mask, cache_implementation="static"), generated)
    assert torch.equal(greedy(native, input_ids, attention_mask), generated)


@pytest.mark.parametrize(("family", "overrides"), [
    ("mixtral", {}), ("deepseek", {}), ("mixtral", {"sliding_window": 4}), ("mixtral", {"num_attention_experts": 3}),
    ("mixtral", {"block_layout": [["attention", "moe", "attention", "dense"], ["attention", "moe"]]}),
    ("deepseek", {"attention_type": "mla", "qk_norm": False, "qkv_bias": False, "num_key_value_heads": 4,
                  "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                  "v_head_dim": 8}),
], ids=["mixtral", "deepseek", "sliding window", "attention experts", "block_layout", "mla"])
def test_our_layouts_generate_with_a_static_cache_as_with_the_dynamic_one(family, overrides):
    model = OUR_FAMILIES[family].causal_lm(**overrides)
    input_ids, attention_mask = left_padded_batch()
    expected = greedy(model, input_ids, attention_mask)
    assert torch.equal(greedy(model, input_ids, attention_mask, cache_implementation="static"), expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sdpa_matches_eager(family):
    _, ours = make_pair(family)
    input_ids, attention_mask = left_padded_batch()
    real = attention_mask.bool()
    with torch.no_grad():
        ours.set_attn_implementation("eager")
        expected = ours(input_ids, attention_mask=attention_mask).logits
        ours.set_attn_implementation("sdpa")
        assert_close(ours(input_ids, attention_mask=attention_mask).logits[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backward_gives_the_native_loss_and_gradients(family):
    native, ours = make_pair(family)
    _, _, _, tensors_to_ours = FAMILIES[family]
    ours.set_attn_implementation("eager")
    input_ids, attention_mask = left_padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 1:][attention_mask[:, :-1] == 0] = -100  # no loss on what a pad position predicts: its query sees nothing
    native_loss = native(input_ids, attention_mask=attention_mask, labels=labels).loss
    loss = ours(input_ids, attention_mask=attention_mask, labels=labels).loss
    assert_close(loss, native_loss, atol=ATOL, rtol=0)
    native_loss.backward()
    loss.backward()
    expected = tensors_to_ours({name: param.grad for name, param in native.named_parameters()})
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        assert_close(param.grad, expected[name], atol=ATOL, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------------------------
# Experts kernels: exact, or refused by name
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "sorted_mm", "auto"])
def test_every_experts_implementation_matches_eager_or_is_refused(family, implementation):
    _, ours = make_pair(family)
    input_ids = random_input_ids(2, 9)
    with torch.no_grad():
        ours.set_experts_implementation("eager")
        expected = ours(input_ids).logits
        ours.set_experts_implementation(implementation)
        if implementation == "sorted_mm" and family == "gpt_oss":
            with pytest.raises(ValueError, match="sorted_mm.*expert_bias.*clamped_swiglu"):
                ours(input_ids)
            return
        assert_close(ours(input_ids).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides", [{"expert_bias": True}, {"experts_activation": "clamped_swiglu"}],
                         ids=["expert_bias", "clamped_swiglu"])
def test_sorted_mm_refuses_each_gpt_oss_expert_feature_and_auto_computes_it_exactly(overrides):
    shapes = dict(SHAPES, intermediate_size=16, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=0,
                  first_k_dense_replace=0)
    torch.manual_seed(0)
    model = randomize_weights_(DeepSeekMoEForCausalLM(DeepSeekMoEConfig(**shapes, **overrides))).eval()
    input_ids = random_input_ids(2, 9)
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = model(input_ids).logits
        model.set_experts_implementation("auto")
        assert_close(model(input_ids).logits, expected, atol=ATOL, rtol=0)
        model.set_experts_implementation("sorted_mm")
        with pytest.raises(ValueError, match="sorted_mm"):
            model(input_ids)


def test_experts_gradients_of_grouped_mm_match_eager_with_biases_and_clamps():
    _, ours = make_pair("gpt_oss")
    input_ids = random_input_ids(2, 9)
    grads = {}
    for implementation in ("eager", "grouped_mm"):
        ours.zero_grad()
        ours.set_experts_implementation(implementation)
        ours(input_ids, labels=input_ids).loss.backward()
        grads[implementation] = {name: p.grad.clone() for name, p in ours.named_parameters() if "experts" in name}
    for name, grad in grads["eager"].items():
        assert_close(grads["grouped_mm"][name], grad, atol=ATOL, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------------------------
# Attention pieces
# --------------------------------------------------------------------------------------------------------------


def test_sinks_are_refused_by_kernels_that_drop_them():
    sinks = torch.zeros(4)
    with pytest.raises(ValueError, match="flash_attention_2.*attention_sinks"):
        attention_function("flash_attention_2", sinks)
    attention_function("flash_attention_2", None)  # no sinks: any kernel


def test_alternating_layers_get_the_window_and_the_cache_keeps_it():
    _, ours = make_pair("gpt_oss")
    assert [layer.self_attn.sliding_window for layer in ours.model.layers] == [4, None, 4]
    input_ids = random_input_ids(1, 10)
    with torch.no_grad():
        full = ours(input_ids).logits
        cache = ours(input_ids[:, :7], use_cache=True).cache
        stepped = ours(input_ids[:, 7:], cache=cache).logits
    assert_close(stepped, full[:, 7:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallel_plans_name_real_modules_with_registered_styles(family):
    import transformers.distributed.expert_parallel
    import transformers.distributed.tensor_parallel  # noqa: F401  (importing them registers the styles)
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    _, ours = make_pair(family)
    names = {n for n, _ in ours.model.named_modules() if n} | {n for n, _ in ours.model.named_parameters()}
    for plan in (ours.config.base_model_tp_plan, ours.config.base_model_ep_plan):
        assert set(plan.values()) <= set(ALL_PARALLEL_STYLES.valid_keys())
        for key in plan:
            assert any(_plan_regex(key).match(name) for name in names), key


def test_tensor_parallel_plan_gathers_projections_around_a_whole_projection_norm():
    _, ours = make_pair("olmoe")
    plan = ours.config.base_model_tp_plan
    assert plan["layers.*.self_attn.q_proj"] == "colwise_gather_output"
    assert plan["layers.*.self_attn.o_proj"] == "rowwise_split_input"
    assert "layers.*.self_attn.q_norm" not in plan


def test_init_weights_zeroes_expert_biases_and_draws_sinks_and_router_bias():
    torch.manual_seed(0)
    _, ours = make_pair("gpt_oss")
    model = DeepSeekMoEForCausalLM(ours.config)
    layer = model.model.layers[0]
    assert torch.equal(layer.mlp.experts.gate_up_proj_bias, torch.zeros(8, 32))
    assert torch.equal(layer.mlp.experts.down_proj_bias, torch.zeros(8, 32))
    assert 0 < layer.self_attn.sinks.std() < 0.1 and 0 < layer.mlp.gate.bias.std() < 0.1


# --------------------------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------------------------

INVALID = [
    ({"qk_norm": True, "qk_norm_type": "whole"}, "qk_norm_type"),
    ({"qk_norm": False, "qk_norm_type": "whole_projection"}, "qk_norm_type"),
    ({"clip_qkv": 0.0}, "clip_qkv"),
    ({"clip_qkv": float("inf")}, "clip_qkv"),
    ({"experts_activation": "geglu"}, "experts_activation"),
    ({"swiglu_limit": 7.0}, "swiglu_limit"),
    ({"experts_activation": "clamped_swiglu", "swiglu_alpha": -1.0}, "swiglu_alpha"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention", "linear_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention", "full_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}},
     r"rope_parameters\['partial_rotary_factor'\]"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1}},
     r"rope_parameters\['partial_rotary_factor'\]"),  # int(8 * 0.1) = 0 rotated dims
]


@pytest.mark.parametrize(("overrides", "field"), INVALID, ids=[field + str(i) for i, (_, field) in enumerate(INVALID)])
def test_invalid_family_field_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`=.*is invalid"):
        DeepSeekMoEConfig(**SHAPES, n_routed_experts=8, **overrides)


@pytest.mark.parametrize("field", ["attention_sinks", "o_proj_bias", "clip_qkv"])
def test_mla_refuses_the_grouped_query_attention_options(field):
    with pytest.raises(ValueError, match=f"`{field}`=.*attention_type='mla'"):
        DeepSeekMoEConfig(**dict(SHAPES, num_key_value_heads=4), attention_type="mla", kv_lora_rank=16,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, **{field: 1.0 if field == "clip_qkv"
                                                                                    else True})


@pytest.mark.parametrize(("field", "value"), [("qk_norm_type", "whole_projection"), ("clip_qkv", 1.0),
                                              ("o_proj_bias", True), ("attention_sinks", True), ("router_bias", True),
                                              ("expert_bias", True), ("experts_activation", "clamped_swiglu")])
def test_mixtral_refuses_the_family_fields_and_points_to_deepseek(field, value):
    with pytest.raises(ValueError, match=f"`{field}`=.*MixtralMoEConfig fixes.*DeepSeekMoEConfig"):
        MixtralMoEConfig(**{field: value})


def test_misspelt_family_field_warns_with_the_close_name(caplog):
    with caplog.at_level("WARNING"):
        DeepSeekMoEConfig(attention_sink=True)
    assert "did you mean `attention_sinks`" in caplog.text


def test_clamped_swiglu_defaults_to_gpt_oss_constants():
    config = DeepSeekMoEConfig(experts_activation="clamped_swiglu")
    assert (config.swiglu_alpha, config.swiglu_limit) == (1.702, 7.0)


# --------------------------------------------------------------------------------------------------------------
# Save and load
# --------------------------------------------------------------------------------------------------------------

FAMILY_FIELDS = ("qk_norm_type", "clip_qkv", "o_proj_bias", "attention_sinks", "router_bias", "expert_bias",
                 "experts_activation", "swiglu_alpha", "swiglu_limit", "layer_types", "rope_parameters")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_fields_and_logits_survive_save_and_load(family, tmp_path):
    _, ours = make_pair(family)
    ours.save_pretrained(tmp_path)
    loaded = DeepSeekMoEForCausalLM.from_pretrained(tmp_path).eval()
    for field in FAMILY_FIELDS:
        assert getattr(loaded.config, field) == getattr(ours.config, field), field
    input_ids = random_input_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, ours(input_ids).logits)


def test_gpt_oss_like_model_loads_as_remote_code_without_hf_moe(tmp_path):
    _, model = make_pair("gpt_oss", seed=1)
    model.save_pretrained(tmp_path / "model")
    prompt = random_input_ids(2, 4, seed=3)
    inputs = {"input_ids": random_input_ids(2, 7),
              "generate": {"input_ids": prompt, "max_new_tokens": 6, "min_new_tokens": 6}}
    child = load_as_remote_code_without_hf_moe({"model": tmp_path / "model"}, inputs, tmp_path)["model"]
    assert child["classes"]["model.layers.0.self_attn"].startswith("transformers_modules.")
    with torch.no_grad():
        assert_close(child["logits"], model(inputs["input_ids"]).logits, atol=1e-6, rtol=0)
        expected = model.generate(prompt, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                  pad_token_id=PAD_TOKEN_ID)
    assert torch.equal(child["sequences"], expected)
