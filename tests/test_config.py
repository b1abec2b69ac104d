"""Configs: validation, aliases, the DeepSeek layer schedule, serialisation through AutoConfig."""

import dataclasses
import inspect
import json
import logging
import math
import re

import pytest
from conftest import make_deepseek_config, make_mixtral_config
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hf_moe import DeepSeekMoEConfig, MixtralMoEConfig
from hf_moe.modeling.configuration_hf_moe import FixedField, check_unknown_fields, config_field_names

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
        "AutoModelForTokenClassification": f"modeling_hf_moe.{family}ForTokenClassification",
        "AutoModelForQuestionAnswering": f"modeling_hf_moe.{family}ForQuestionAnswering",
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


# --------------------------------------------------------------------------------------------------------------
# Every float field: inf and nan are refused at construction, in one line naming the field
# --------------------------------------------------------------------------------------------------------------

CONFIG_CLASSES = {"mixtral": MixtralMoEConfig, "deepseek": DeepSeekMoEConfig}


def float_fields(config_class) -> list[str]:
    """The dataclass fields whose type admits a float."""
    return [f.name for f in dataclasses.fields(config_class) if "float" in str(f.type)]


def test_float_fields_are_found():
    expected = {"rms_norm_eps", "initializer_range", "attention_dropout", "routed_scaling_factor",
                "router_jitter_noise", "capacity_factor", "eval_capacity_factor", "router_aux_loss_coef",
                "router_z_loss_coef", "router_importance_loss_coef", "router_load_loss_coef",
                "expert_balance_loss_coef", "device_balance_loss_coef", "sequence_balance_loss_coef",
                "router_bias_update_rate"}
    for config_class in CONFIG_CLASSES.values():
        assert expected <= set(float_fields(config_class))


def _one_line_error_naming(error, field: str, value) -> None:
    """The house format of `_check`: "`field`=value is invalid: what is allowed.", on one line."""
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(f"`{field}`={value!r} is invalid: "), message


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize(
    ("family", "field"),
    [(family, field) for family, config_class in CONFIG_CLASSES.items() for field in float_fields(config_class)],
)
def test_non_finite_float_field_raises_one_line_value_error_naming_it(family, field, value):
    with pytest.raises(ValueError) as error:
        FACTORIES[family](**{field: value})
    assert not isinstance(error.value, StrictDataclassClassValidationError)  # raised by the field checks, at once
    message = str(error.value)
    assert "\n" not in message and f"`{field}`=" in message and "finite" in message, message


@pytest.mark.parametrize("family", list(FACTORIES))
def test_rms_norm_eps_below_the_float32_floor_is_refused_and_tiny_usual_values_build(family):
    assert FACTORIES[family](rms_norm_eps=1e-12).rms_norm_eps == 1e-12
    with pytest.raises(ValueError, match="`rms_norm_eps`=1e-30 .*overflows float32"):
        FACTORIES[family](rms_norm_eps=1e-30)


# --------------------------------------------------------------------------------------------------------------
# pad_token_id, head_dim, RoPE
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_token_id", [-1, 128, 1000])  # the tiny vocabulary has 128 ids
@pytest.mark.parametrize("family", list(FACTORIES))
def test_pad_token_id_outside_the_vocabulary_is_refused(family, pad_token_id):
    with pytest.raises(ValueError) as error:
        FACTORIES[family](pad_token_id=pad_token_id)
    _one_line_error_naming(error, "pad_token_id", pad_token_id)


@pytest.mark.parametrize("pad_token_id", [None, 0, 127])
@pytest.mark.parametrize("family", list(FACTORIES))
def test_pad_token_id_none_or_inside_the_vocabulary_builds(family, pad_token_id):
    assert FACTORIES[family](pad_token_id=pad_token_id).pad_token_id == pad_token_id


@pytest.mark.parametrize("overrides", [{"head_dim": 5}, {"hidden_size": 36, "num_attention_heads": 4}],
                         ids=["explicit", "derived"])
@pytest.mark.parametrize("family", list(FACTORIES))
def test_odd_head_dim_is_refused_because_rope_rotates_pairs(family, overrides):
    with pytest.raises(ValueError, match="`head_dim`=.*must be even"):
        FACTORIES[family](num_key_value_heads=overrides.get("num_attention_heads", 2), **overrides)


INVALID_ROPE = [
    ({"rope_type": "not_a_rope", "rope_theta": 10000.0}, "rope_parameters['rope_type']", "not_a_rope"),
    ({"rope_type": "default", "rope_theta": 0.0}, "rope_parameters['rope_theta']", 0.0),
    ({"rope_type": "default", "rope_theta": -10000.0}, "rope_parameters['rope_theta']", -10000.0),
    ({"rope_type": "default", "rope_theta": math.inf}, "rope_parameters['rope_theta']", math.inf),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 0.0}, "rope_parameters['factor']", 0.0),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": -2.0}, "rope_parameters['factor']", -2.0),
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": math.inf}, "rope_parameters['factor']", math.inf),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": -4.0, "original_max_position_embeddings": 64},
     "rope_parameters['factor']", -4.0),
    ({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.5},
     "rope_parameters['partial_rotary_factor']", 1.5),
]


@pytest.mark.parametrize(("rope_parameters", "field", "value"), INVALID_ROPE,
                         ids=[f"{field}={value}" for _, field, value in INVALID_ROPE])
@pytest.mark.parametrize("family", list(FACTORIES))
def test_invalid_rope_parameters_raise_one_line_value_error_naming_the_key(family, rope_parameters, field, value):
    with pytest.raises(ValueError) as error:
        FACTORIES[family](rope_parameters=rope_parameters)
    _one_line_error_naming(error, field, value)


def test_unknown_rope_type_error_lists_transformers_rope_types_and_default():
    with pytest.raises(ValueError) as error:
        make_mixtral_config(rope_parameters={"rope_type": "not_a_rope", "rope_theta": 10000.0})
    for rope_type in ("default", *ROPE_INIT_FUNCTIONS):
        assert repr(rope_type) in str(error.value)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "llama3"])
@pytest.mark.parametrize("family", list(FACTORIES))
def test_rope_type_without_its_factor_is_a_value_error_naming_it_not_a_key_error(family, rope_type):
    with pytest.raises(ValueError) as error:
        FACTORIES[family](rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0})
    message = str(error.value)
    assert "\n" not in message and "`rope_parameters`=" in message and "'factor'" in message, message


# --------------------------------------------------------------------------------------------------------------
# Misspelt field names: warned at construction, refused by from_preset, silent for unrelated keys
# --------------------------------------------------------------------------------------------------------------

CONFIG_LOGGER = "hf_moe.modeling.configuration_hf_moe"


def misspelt(name: str) -> str:
    """The name with one letter dropped (the last one that leaves a name no config field has)."""
    for i in reversed(range(1, len(name))):
        typo = name[:i] + name[i + 1 :]
        if typo not in config_field_names(MixtralMoEConfig) | config_field_names(DeepSeekMoEConfig):
            return typo
    raise AssertionError(name)


def _typo_cases():
    return [(family, name) for family, config_class in CONFIG_CLASSES.items()
            for name in sorted(config_field_names(config_class))]


def test_the_reported_typo_warns_and_names_both_fields(caplog):
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        config = make_mixtral_config(num_expert_per_tok=4)
    assert config.num_experts_per_tok == 2  # ignored: the warning is what tells the user
    assert "`num_expert_per_tok`=4" in caplog.text and "`num_experts_per_tok`" in caplog.text


@pytest.mark.parametrize(("family", "name"), _typo_cases())
def test_misspelt_field_warns_naming_the_field_it_is_close_to(family, name, caplog):
    typo = misspelt(name)
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        FACTORIES[family](**{typo: 1})
    assert f"`{typo}`=1" in caplog.text and f"did you mean `{name}`" in caplog.text, caplog.text


@pytest.mark.parametrize(("family", "name"), _typo_cases())
def test_misspelt_field_is_refused_by_from_preset(family, name):
    config_class = CONFIG_CLASSES[family]
    preset = {"mixtral": "switch", "deepseek": "deepseek_moe"}[family]
    typo = misspelt(name)
    with pytest.raises(ValueError) as error:
        config_class.from_preset(preset, **{typo: 1})
    message = str(error.value)
    assert "\n" not in message and f"`{typo}`=1" in message and f"`{name}`" in message, message


@pytest.mark.parametrize("strict", [False, True])
def test_check_unknown_fields_passes_fields_and_aliases_and_catches_typos(strict, caplog):
    check_unknown_fields(MixtralMoEConfig, {"num_experts": 4, "num_local_experts": 4, "qk_norm": False}, strict)
    check_unknown_fields(DeepSeekMoEConfig, {"num_experts": 4, "num_local_experts": 4}, strict)
    assert not caplog.text
    if strict:
        with pytest.raises(ValueError, match=r"`hiden_size`=8 is invalid: not a field of DeepSeekMoEConfig \(did "
                                             r"you mean `hidden_size`\?\)"):
            check_unknown_fields(DeepSeekMoEConfig, {"hiden_size": 8}, strict=True)
    else:
        with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
            check_unknown_fields(DeepSeekMoEConfig, {"hiden_size": 8}, strict=False)
        assert "`hiden_size`=8" in caplog.text and "`hidden_size`" in caplog.text


# Keys found in config.json files saved by transformers and other tools: none is a typo of one of our fields.
FOREIGN_KEYS = {"torch_dtype": "float32", "quantization_config": {"bits": 4}, "_name_or_path": "x",
                "max_window_layers": 28, "decoder_sparse_step": 1, "topk_method": "greedy", "sep_token_id": 5,
                "mask_token_id": 6, "custom_tool_metadata": {"a": 1}, "rope_theta": 10000.0, "num_labels": 2}


@pytest.mark.parametrize("family", list(FACTORIES))
def test_keys_of_other_tools_that_are_not_close_to_a_field_load_silently(family, caplog):
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        config = FACTORIES[family](**FOREIGN_KEYS)
    assert not caplog.text
    assert config.max_window_layers == 28


@pytest.mark.parametrize("family", list(FACTORIES))
def test_saved_config_json_with_extra_keys_loads_with_from_pretrained_and_from_dict(family, tmp_path, caplog):
    config = FACTORIES[family]()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update({"max_window_layers": 28, "custom_tool_metadata": {"a": 1}, "num_expert_per_tok": 4})
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger=CONFIG_LOGGER):
        loaded = AutoConfig.from_pretrained(tmp_path)
        from_dict = type(config).from_dict(saved)
    for result in (loaded, from_dict):
        assert type(result) is type(config)
        assert result.max_window_layers == 28 and result.custom_tool_metadata == {"a": 1}
        assert result.num_experts_per_tok == config.num_experts_per_tok
    assert "max_window_layers" not in caplog.text and "custom_tool_metadata" not in caplog.text
    assert "did you mean `num_experts_per_tok`" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# Fields a family fixes: a clear error (what to set instead), by constructor keyword and by assignment
# --------------------------------------------------------------------------------------------------------------


def fixed_fields(config_class) -> list[str]:
    return sorted(name for name in config_field_names(config_class)
                  if isinstance(inspect.getattr_static(config_class, name, None), FixedField))


def test_mixtral_fixes_the_fields_that_deepseek_exposes():
    assert {"moe_intermediate_size", "mlp_layer_types", "shared_expert_intermediate_size", "n_shared_experts",
            "shared_expert_gate", "qk_norm", "qkv_bias", "num_sparse_layers"} <= set(fixed_fields(MixtralMoEConfig))


def test_no_config_attribute_is_a_property_without_setter():
    """A read-only attribute is a FixedField (whose error says what to set instead), not a bare property (whose
    error is "property ... has no setter"). The `base_model_*_plan`s are transformers' plans, not fields."""
    for config_class in CONFIG_CLASSES.values():
        for klass in config_class.__mro__[: config_class.__mro__.index(PreTrainedConfig)]:
            for name, value in vars(klass).items():
                if isinstance(value, property) and name not in ("base_model_tp_plan", "base_model_ep_plan"):
                    assert value.fset is not None, f"{klass.__name__}.{name}"


def _another_value(value):
    if value is None:  # a field that only another family's option reads (e.g. the MLA ranks)
        return 2
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    return ["dense"] * len(value)


FIXED_CASES = [(family, name) for family, config_class in CONFIG_CLASSES.items() for name in fixed_fields(config_class)]


@pytest.mark.parametrize(("family", "name"), FIXED_CASES)
def test_setting_a_fixed_field_by_constructor_keyword_says_what_to_set_instead(family, name):
    value = _another_value(getattr(FACTORIES[family](), name))
    with pytest.raises(ValueError) as error:
        FACTORIES[family](**{name: value})
    _one_line_error_naming(error, name, value)
    assert f"{CONFIG_CLASSES[family].__name__} fixes {name} to" in str(error.value)
    assert "set " in str(error.value) or "use DeepSeekMoEConfig" in str(error.value)


@pytest.mark.parametrize(("family", "name"), FIXED_CASES)
def test_setting_a_fixed_field_by_assignment_says_what_to_set_instead(family, name):
    config = FACTORIES[family]()
    value = _another_value(getattr(config, name))
    with pytest.raises(ValueError) as error:
        setattr(config, name, value)
    _one_line_error_naming(error, name, value)


@pytest.mark.parametrize(("family", "name"), FIXED_CASES)
def test_setting_a_fixed_field_to_its_fixed_value_is_accepted(family, name):
    config = FACTORIES[family]()
    fixed = getattr(config, name)
    setattr(config, name, fixed)
    assert getattr(FACTORIES[family](**{name: fixed}), name) == fixed


def test_mixtral_moe_intermediate_size_error_names_intermediate_size_and_deepseek():
    with pytest.raises(ValueError, match=r"fixes moe_intermediate_size to intermediate_size \(=64\); set "
                                         r"intermediate_size.*DeepSeekMoEConfig"):
        make_mixtral_config(moe_intermediate_size=16)
