"""Configs: validation, aliases, the DeepSeek layer schedule, serialisation through AutoConfig."""

import json
import re

import pytest
from conftest import make_deepseek_config, make_mixtral_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig

from hf_moe import DeepSeekMoEConfig, MixtralMoEConfig

FACTORIES = {"mixtral": make_mixtral_config, "deepseek": make_deepseek_config}

# (family, invalid overrides, the field the error must name). The Mixtral tiny config has 4 experts, DeepSeek 8;
# both have hidden 32, 4 heads and 2 kv heads; DeepSeek has 3 layers.
INVALID_VALUES = [
    # top-k
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("deepseek", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ("deepseek", {"num_experts_per_tok": -1}, "num_experts_per_tok"),
    # sizes: zero and negative for every size field
    *[
        (family, {field: value}, field)
        for family in ("mixtral", "deepseek")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "max_position_embeddings", "head_dim")
        for value in (0, -4)
    ],
    ("deepseek", {"num_hidden_layers": 0, "first_k_dense_replace": 0}, "num_hidden_layers"),
    ("mixtral", {"num_local_experts": 0}, "num_local_experts"),
    ("mixtral", {"num_local_experts": -2}, "num_local_experts"),
    ("deepseek", {"n_routed_experts": 0}, "n_routed_experts"),
    ("deepseek", {"n_routed_experts": -2}, "n_routed_experts"),
    ("deepseek", {"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ("deepseek", {"moe_intermediate_size": -16}, "moe_intermediate_size"),
    ("deepseek", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
    ("deepseek", {"shared_expert_intermediate_size": -16}, "shared_expert_intermediate_size"),
    ("deepseek", {"n_shared_experts": -1}, "n_shared_experts"),
    # attention heads
    ("mixtral", {"num_attention_heads": 5, "num_key_value_heads": 5}, "num_attention_heads"),
    ("deepseek", {"num_attention_heads": 3, "num_key_value_heads": 3}, "num_attention_heads"),
    ("mixtral", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("deepseek", {"num_attention_heads": 8, "num_key_value_heads": 3}, "num_key_value_heads"),
    # activation
    ("mixtral", {"hidden_act": "not_an_activation"}, "hidden_act"),
    ("deepseek", {"hidden_act": "swishy"}, "hidden_act"),
    # layer schedule
    ("deepseek", {"mlp_layer_types": ["dense", "moe", "sparse"]}, "mlp_layer_types"),
    ("deepseek", {"mlp_layer_types": ["dense", "sparse"]}, "mlp_layer_types"),
    ("deepseek", {"mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]}, "mlp_layer_types"),
    ("deepseek", {"first_k_dense_replace": 4}, "first_k_dense_replace"),
    ("deepseek", {"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ("deepseek", {"moe_layer_freq": 0}, "moe_layer_freq"),
    ("deepseek", {"moe_layer_freq": -2}, "moe_layer_freq"),
    # shared experts
    ("deepseek", {"n_shared_experts": 0, "shared_expert_gate": True}, "shared_expert_gate"),
    # losses, dropout, routing, attention window
    ("mixtral", {"router_aux_loss_coef": -0.01}, "router_aux_loss_coef"),
    ("deepseek", {"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
    ("mixtral", {"attention_dropout": 1.0}, "attention_dropout"),
    ("deepseek", {"attention_dropout": -0.1}, "attention_dropout"),
    ("mixtral", {"router_jitter_noise": 1.0}, "router_jitter_noise"),
    ("deepseek", {"router_jitter_noise": -0.5}, "router_jitter_noise"),
    ("mixtral", {"sliding_window": 0}, "sliding_window"),
    ("deepseek", {"sliding_window": -8}, "sliding_window"),
    ("mixtral", {"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ("deepseek", {"routed_scaling_factor": -1.0}, "routed_scaling_factor"),
    ("mixtral", {"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ("deepseek", {"initializer_range": -0.02}, "initializer_range"),
]


def _case(family, overrides, field):
    return pytest.param(family, overrides, field, id=f"{family}-{'-'.join(f'{k}={v}' for k, v in overrides.items())}")


def _names_for(config_class, field: str) -> list[str]:
    """The field and its `attribute_map` aliases: an error may name the field by either."""
    return [field] + [alias for alias, target in config_class.attribute_map.items() if target == field]


@pytest.mark.parametrize(
    ("family", "overrides", "field"),
    [_case(*case) for case in INVALID_VALUES],
)
def test_invalid_value_raises_value_error_naming_the_field(family, overrides, field):
    config_class = MixtralMoEConfig if family == "mixtral" else DeepSeekMoEConfig
    with pytest.raises(ValueError) as error:
        FACTORIES[family](**overrides)
    names = _names_for(config_class, field)
    assert any(re.search(rf"`{re.escape(name)}`", str(error.value)) for name in names), str(error.value)


def test_valid_tiny_configs_build():
    assert make_mixtral_config().num_experts == 4
    assert make_deepseek_config().num_experts == 8


def test_head_dim_set_explicitly_allows_heads_that_do_not_divide_hidden_size():
    config = make_mixtral_config(num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    assert config.head_dim == 16


def test_invalid_value_set_after_construction_is_rejected_at_save(tmp_path):
    config = make_mixtral_config()
    config.num_experts_per_tok = 100
    with pytest.raises(StrictDataclassClassValidationError, match="num_experts_per_tok"):
        config.save_pretrained(tmp_path)


def test_mixtral_num_experts_alias_reads_and_writes_num_local_experts():
    config = make_mixtral_config(num_local_experts=6)
    assert config.num_experts == 6
    config.num_experts = 5
    assert config.num_local_experts == 5
    assert config.to_dict()["num_local_experts"] == 5


def test_mixtral_accepts_num_experts_as_constructor_alias():
    assert make_mixtral_config(num_experts=6).num_local_experts == 6


@pytest.mark.parametrize("alias", ["num_experts", "num_local_experts"])
def test_deepseek_expert_count_aliases_read_and_write_n_routed_experts(alias):
    config = make_deepseek_config(n_routed_experts=6)
    assert getattr(config, alias) == 6
    setattr(config, alias, 4)
    assert config.n_routed_experts == 4
    assert config.to_dict()["n_routed_experts"] == 4


def test_deepseek_first_k_dense_then_every_other_layer_is_sparse():
    """DeepSeekMoE's schedule: layer i is sparse iff i >= first_k_dense_replace and i % moe_layer_freq == 0,
    i.e. GShard's every-other-layer MoE after the first dense layer(s)."""
    config = make_deepseek_config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert config.mlp_layer_types == ["dense", "dense", "sparse", "dense", "sparse", "dense"]
    assert config.num_sparse_layers == 2


def test_deepseek_first_k_dense_replace_with_freq_one_makes_the_rest_sparse():
    config = make_deepseek_config(num_hidden_layers=4, first_k_dense_replace=2, moe_layer_freq=1)
    assert config.mlp_layer_types == ["dense", "dense", "sparse", "sparse"]


def test_deepseek_explicit_mlp_layer_types_override_the_schedule():
    config = make_deepseek_config(first_k_dense_replace=1, mlp_layer_types=["sparse", "dense", "sparse"])
    assert config.mlp_layer_types == ["sparse", "dense", "sparse"]


def test_mixtral_every_layer_is_sparse_with_experts_of_intermediate_size():
    config = make_mixtral_config(num_hidden_layers=3, intermediate_size=48)
    assert config.mlp_layer_types == ["sparse", "sparse", "sparse"]
    assert config.moe_intermediate_size == 48
    assert config.n_shared_experts == 0


def test_deepseek_shared_expert_intermediate_size_defaults_to_shared_count_times_expert_width():
    config = make_deepseek_config(n_shared_experts=3, moe_intermediate_size=16)
    assert config.shared_expert_intermediate_size == 48


def test_deepseek_explicit_shared_expert_intermediate_size_is_kept():
    config = make_deepseek_config(n_shared_experts=2, moe_intermediate_size=16, shared_expert_intermediate_size=40)
    assert config.shared_expert_intermediate_size == 40


def _without_name_or_path(config) -> dict:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return d


@pytest.mark.parametrize("factory", [make_mixtral_config, make_deepseek_config], ids=["mixtral", "deepseek"])
def test_config_round_trips_through_auto_config(factory, tmp_path):
    config = factory(router_aux_loss_coef=0.25, output_router_logits=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    assert _without_name_or_path(loaded) == _without_name_or_path(config)


@pytest.mark.parametrize(
    ("factory", "family"), [(make_mixtral_config, "MixtralMoE"), (make_deepseek_config, "DeepSeekMoE")],
    ids=["mixtral", "deepseek"],
)
def test_saved_config_json_carries_auto_map_for_every_auto_class(factory, family, tmp_path):
    factory().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": f"configuration_hf_moe.{family}Config",
        "AutoModel": f"modeling_hf_moe.{family}Model",
        "AutoModelForCausalLM": f"modeling_hf_moe.{family}ForCausalLM",
        "AutoModelForSequenceClassification": f"modeling_hf_moe.{family}ForSequenceClassification",
    }
    assert saved["model_type"] == {"MixtralMoE": "hf_moe_mixtral", "DeepSeekMoE": "hf_moe_deepseek"}[family]


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64},
    ],
    ids=["linear", "yarn"],
)
@pytest.mark.parametrize("factory", [make_mixtral_config, make_deepseek_config], ids=["mixtral", "deepseek"])
def test_rope_scaling_parameters_round_trip(factory, rope_parameters, tmp_path):
    factory(rope_parameters=rope_parameters).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == rope_parameters
