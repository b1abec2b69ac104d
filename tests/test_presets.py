"""Presets: every paper's routing recipe builds a tiny model that trains, saves, reloads and generates."""

import math

import pytest
import torch
from conftest import PAD_TOKEN_ID, random_input_ids, randomize_weights_
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe import (
    DeepSeekMoEConfig,
    DeepSeekMoEForCausalLM,
    MixtralMoEConfig,
    MixtralMoEForCausalLM,
    MixtralMoEForSequenceClassification,
)

EXPECTED_PRESETS = ("mixtral", "switch", "gshard", "noisy_topk", "st_moe", "expert_choice", "deepseek_moe",
                    "deepseek_v2", "deepseek_v3", "qwen2_moe", "glam", "soft_moe", "soft_moe_causal", "mixture_of_depths",
                    "brainformer")
MIXTRAL_PRESETS = ("mixtral", "switch", "gshard", "noisy_topk", "st_moe", "expert_choice", "soft_moe", "soft_moe_causal",
                   "mixture_of_depths")
NOT_CAUSAL_PRESETS = ("expert_choice", "soft_moe", "brainformer")  # generate refuses them

TINY_MIXTRAL = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "num_local_experts": 4, "max_position_embeddings": 256,
                    "pad_token_id": PAD_TOKEN_ID}
TINY_DEEPSEEK = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "n_routed_experts": 8,
                     "max_position_embeddings": 256, "pad_token_id": PAD_TOKEN_ID}
# Multi-head latent attention (DeepSeek-V2/V3 presets) at tiny ranks; one key and value per query head.
TINY_MLA = {"num_key_value_heads": None, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4, "v_head_dim": 6}
# Per preset: shrink what the paper sizes for 64 experts, keep the recipe (groups, top-k > 1, shared experts ...).
TINY_OVERRIDES = {
    "mixtral": {},
    "switch": {},
    "gshard": {},
    "noisy_topk": {"num_local_experts": 8},  # top-4 of 8
    "st_moe": {},
    "expert_choice": {},
    "deepseek_moe": {"num_experts_per_tok": 2},
    "deepseek_v2": {"num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, "num_device_groups": 4, **TINY_MLA},
    "deepseek_v3": {"num_experts_per_tok": 3, "n_group": 4, "topk_group": 2, **TINY_MLA},
    "qwen2_moe": {},  # top-4 of 8, all layers sparse
    "glam": {},  # top-2 of 8, layers 0 and 2 sparse
    "soft_moe": {},
    "soft_moe_causal": {},
    "mixture_of_depths": {},  # layer 1 of 2 routed
    "brainformer": {},  # 3 layers of the 8-sub-block block, expert choice over 8 experts
}


def tiny_config(name: str, **overrides):
    config_class, tiny = (MixtralMoEConfig, TINY_MIXTRAL) if name in MIXTRAL_PRESETS else (DeepSeekMoEConfig,
                                                                                         TINY_DEEPSEEK)
    return config_class.from_preset(name, **{**tiny, **TINY_OVERRIDES[name], **overrides})


def tiny_model(name: str, model_class=None, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(name, **overrides)
    if model_class is None:
        model_class = MixtralMoEForCausalLM if name in MIXTRAL_PRESETS else DeepSeekMoEForCausalLM
    return randomize_weights_(model_class(config))


def train_three_steps(model, labels=None) -> list[float]:
    """3 AdamW steps (lr 1e-3) with every balancing loss of the config on; aux-loss-free bias updates if the config
    asks for them. Returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids = random_input_ids(2, 12, seed=3)
    losses = []
    for _ in range(3):
        out = model(input_ids, labels=input_ids if labels is None else labels, output_router_logits=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if model.config.router_bias_update_rate > 0:
            hf_moe.update_router_bias(model)
        losses.append(out.loss.item())
    return losses


def greedy(model, input_ids, use_cache: bool, new_tokens: int = 6):
    return model.generate(input_ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=PAD_TOKEN_ID, use_cache=use_cache)


@pytest.fixture(scope="module", params=EXPECTED_PRESETS)
def trained(request):
    """(preset name, tiny model after 3 training steps in eval mode, the 3 losses, its router weights before)."""
    model = tiny_model(request.param)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "mlp.slot_embeds"))}
    losses = train_three_steps(model)
    return request.param, model.eval(), losses, before


# --------------------------------------------------------------------------------------------------------------
# The preset registry
# --------------------------------------------------------------------------------------------------------------


def test_list_presets_names_every_paper_with_a_one_line_summary():
    presets = hf_moe.list_presets()
    assert set(EXPECTED_PRESETS) <= set(presets)
    for name, summary in presets.items():
        family, _, text = summary.partition(": ")
        assert family in ("MixtralMoEConfig", "DeepSeekMoEConfig"), name
        assert text and "\n" not in summary, name
    assert {n for n, s in presets.items() if s.startswith("MixtralMoEConfig")} >= set(MIXTRAL_PRESETS)


@pytest.mark.parametrize(("config_class", "name"), [(MixtralMoEConfig, "deepseek_v3"),
                                                    (DeepSeekMoEConfig, "switch"),
                                                    (MixtralMoEConfig, "no_such_preset")])
def test_from_preset_of_another_family_raises_naming_the_preset_and_the_allowed_ones(config_class, name):
    with pytest.raises(ValueError) as error:
        config_class.from_preset(name)
    message = str(error.value)
    assert repr(name) in message
    own = [n for n, s in hf_moe.list_presets().items() if s.startswith(config_class.__name__)]
    assert own and all(repr(n) in message for n in own)


def test_from_preset_applies_the_paper_settings():
    config = MixtralMoEConfig.from_preset("switch", **TINY_MIXTRAL)
    assert (config.num_experts_per_tok, config.norm_topk_prob, config.router_jitter_noise) == (1, False, 0.01)
    assert (config.capacity_factor, config.eval_capacity_factor, config.router_aux_loss_coef) == (1.25, None, 0.01)
    config = DeepSeekMoEConfig.from_preset("deepseek_v3", **{**TINY_DEEPSEEK, **TINY_OVERRIDES["deepseek_v3"]})
    assert (config.scoring_func, config.router_selection_bias, config.router_bias_update_rate) == ("sigmoid", True,
                                                                                                  0.001)
    assert (config.routed_scaling_factor, config.sequence_balance_loss_coef) == (2.5, 0.0001)


def test_from_preset_overrides_win_over_the_preset():
    config = MixtralMoEConfig.from_preset("mixtral", **TINY_MIXTRAL, router_aux_loss_coef=0.5, norm_topk_prob=False)
    assert config.num_local_experts == 4  # the preset says 8
    assert config.router_aux_loss_coef == 0.5  # the preset says 0.02
    assert config.norm_topk_prob is False
    assert config.num_experts_per_tok == 2  # untouched preset field


# --------------------------------------------------------------------------------------------------------------
# Every preset trains, saves, reloads and generates
# --------------------------------------------------------------------------------------------------------------


def test_preset_trains_three_steps_with_finite_loss(trained):
    name, model, losses, before = trained
    assert all(math.isfinite(loss) for loss in losses), (name, losses)
    for param_name, weight in before.items():  # the routers learned
        assert not torch.equal(model.get_parameter(param_name), weight), (name, param_name)


def test_preset_reloads_through_auto_model_with_identical_eval_logits(trained, tmp_path):
    name, model, _, _ = trained
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), (name, key)
    input_ids = random_input_ids(2, 8, seed=5)
    with torch.no_grad():
        # bit-identical weights; memory-mapped loads can change the CPU matmul summation order by one ulp
        assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("trained", [name for name in EXPECTED_PRESETS if name not in NOT_CAUSAL_PRESETS],
                         indirect=True)
def test_preset_greedy_generation_with_cache_matches_without_cache(trained, request):
    name, model, _, _ = trained
    prompt = random_input_ids(2, 4, seed=6)
    with torch.no_grad():
        with_cache = greedy(model, prompt, use_cache=True)
        without_cache = greedy(model, prompt, use_cache=False)
    assert with_cache.shape == (2, 10)
    assert torch.equal(with_cache, without_cache), name


def test_generate_refuses_inference_capacity_because_dropping_is_not_causal():
    model = MixtralMoEForCausalLM(MixtralMoEConfig.from_preset("switch", **TINY_MIXTRAL, eval_capacity_factor=2.0))
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        model.generate(random_input_ids(1, 4, seed=7), max_new_tokens=2, do_sample=False)


def test_expert_choice_generate_raises_naming_expert_choice():
    model = tiny_model("expert_choice").eval()
    with pytest.raises(ValueError, match="expert_choice"):
        model.generate(random_input_ids(1, 4), max_new_tokens=2)


def test_expert_choice_trains_with_the_sequence_classification_head():
    model = tiny_model("expert_choice", model_class=MixtralMoEForSequenceClassification, num_labels=3)
    before = model.model.layers[0].mlp.gate.weight.detach().clone()
    losses = train_three_steps(model, labels=torch.tensor([0, 2]))
    assert all(math.isfinite(loss) for loss in losses)
    assert not torch.equal(model.model.layers[0].mlp.gate.weight, before)
    model.eval()
    with torch.no_grad():
        out = model(random_input_ids(2, 12, seed=3), output_router_stats=True)
    assert out.logits.shape == (2, 3)
    # every expert took exactly C = ceil(2.0 * 24 / 4) = 12 of the 24 tokens
    for layer in out.router_stats:
        assert layer["load"].tolist() == [12.0] * 4


def test_deepseek_v3_selection_bias_survives_save_and_load(tmp_path):
    model = tiny_model("deepseek_v3").eval()
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    assert len(routers) == 2
    torch.manual_seed(1)
    for router in routers:
        router.e_score_correction_bias.copy_(0.3 * torch.randn(8))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for layer in (1, 2):
        key = f"model.layers.{layer}.mlp.gate.e_score_correction_bias"
        expected = model.get_buffer(key)
        assert torch.equal(saved[key], expected)
        assert torch.equal(loaded.get_buffer(key), expected)
        assert loaded.get_buffer(key).dtype == torch.float32
    input_ids = random_input_ids(2, 8, seed=5)
    with torch.no_grad():
        assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)
