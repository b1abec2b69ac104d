# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""The checkpoint layouts every converter shares: our config and tensor names, the native MoE formats', and the map
between them. Import, export, upcycling, verification and the model cards all read them from here; nothing here reads
or writes weights.

- Config key maps: `native_config_to_ours` (mixtral, qwen2_moe, qwen3_moe, the deepseek-moe remote code) and
  `ours_to_native_config` (mixtral, qwen2_moe, qwen3_moe, after `check_exportable` names every field the format
  cannot hold), `engine_warnings` (what llama.cpp computes differently), `load_our_config`.
- Tensor names and shapes: `our_tensor_shapes(config)` (every state-dict key of our `*ForCausalLM`, in layer order),
  `parameter_counts`, and `tensor_plan(config, fmt)`: one `TensorMapping` per tensor of ours with the native tensors
  that hold the same numbers (names relative to `model.layers.N.`; everything else keeps its name):

      ours                                   native (E experts, projections (gate, up, down))
      mlp.gate.weight              [E, H]    {moe}.gate.weight
      mlp.experts.gate_up_proj [E, 2I, H]    {moe}.experts.{e}.{gate}.weight [I, H] (rows 0..I-1 of expert e)
                                             {moe}.experts.{e}.{up}.weight   [I, H] (rows I..2I-1)
      mlp.experts.down_proj    [E, H, I]     {moe}.experts.{e}.{down}.weight [H, I]
      mlp.shared_experts.X                   {moe}.{shared}.X
      mlp.shared_expert_gate.weight [1, H]   {moe}.shared_expert_gate.weight

  with {moe} = `block_sparse_moe` and (w1, w3, w2) for Mixtral, `mlp` and (gate_proj, up_proj, down_proj) otherwise;
  {shared} = `shared_expert` (Qwen2-MoE) or `shared_experts` (DeepSeek).
- What the converters share around them: `build_config` (validation errors as one-line `ConversionError`s),
  `check_names` (a checkpoint's tensor names against a plan's), and the config and code files of an output folder
  (`save_our_config`, `ensure_generation_config`, `remote_code_files`).
"""

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    GenerationConfig,
    Glm4MoeConfig,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files
from transformers.utils import logging

from ..modeling import modeling_hf_moe
from ..modeling.configuration_hf_moe import DeepSeekMoEConfig, MixtralMoEConfig, MoEDecoderConfig
from .safetensors_io import ConversionError, read_config_dict

logger = logging.get_logger(__name__)

# The formats of the families whose every behaviour is a field of our configs: exact both ways, checked by a round
# trip of the config (`_round_trip_problems`).
FAMILY_FORMATS = ("deepseek_v2", "deepseek_v3", "glm4_moe", "olmoe", "gpt_oss")
IMPORT_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek", *FAMILY_FORMATS)
EXPORT_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", *FAMILY_FORMATS)
NATIVE_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
}
OUR_CONFIG_CLASSES = {cls.model_type: cls for cls in (MixtralMoEConfig, DeepSeekMoEConfig)}
# The llama.cpp architecture each export format is served as, and the `norm_topk_prob` it hard-codes there.
LLAMA_CPP_ARCHITECTURES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
LLAMA_CPP_NORM_TOPK_PROB = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}
# Formats whose llama.cpp loader requires `output.weight`: a tied head is written out as a copy of the embeddings.
UNTIED_HEAD_FORMATS = ("qwen2_moe",)
# |w . x| of `constant_shared_gate` stays below this: exp(-z) then rounds to 1 in fp32, so sigmoid(z) = 1/2 exactly.
SHARED_GATE_LOGIT_BOUND = 2.0**-26

# Fields with the same name and meaning in our configs and in MixtralConfig, Qwen2MoeConfig and Qwen3MoeConfig.
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id",
    "eos_token_id", "tie_word_embeddings", "rope_parameters", "attention_dropout", "num_experts_per_tok",
    "output_router_logits", "router_aux_loss_coef",
)
# Buffers that old checkpoints saved although they are recomputed from the config.
IGNORED_SOURCE_SUFFIXES = (".rotary_emb.inv_freq",)
# `configuration_deepseek.DeepseekConfig` defaults (DeepSeek-MoE remote code), for keys a config.json may omit.
DEEPSEEK_DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
    "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": None, "n_shared_experts": None,
    "n_routed_experts": None, "num_experts_per_tok": None, "moe_layer_freq": 1, "first_k_dense_replace": 0,
    "norm_topk_prob": False, "scoring_func": "softmax", "topk_method": "greedy", "aux_loss_alpha": 0.001,
    "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": None, "bos_token_id": 100000, "eos_token_id": 100001,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
    "attention_dropout": 0.0, "routed_scaling_factor": 1.0,
}


# ---------------------------------------------------------------------------------------------------------------
# Config mapping: native -> ours
# ---------------------------------------------------------------------------------------------------------------


def refuse(source: str, field: str, value, allowed: str) -> ConversionError:
    """The one-line refusal of a source config's `field`: what it is and what is allowed."""
    return ConversionError(f"{source}: `{field}`={value!r} is not supported: {allowed}")


def one_line(error: Exception) -> str:
    """An error message on one line, for the command line."""
    return " ".join(str(error).split())


def build_config(cls: type[PreTrainedConfig], what: str, **fields) -> PreTrainedConfig:
    """`cls(**fields)`, with validation errors turned into a one-line `ConversionError`."""
    try:
        return cls(**fields)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"{what}: {one_line(error)}") from None


def qwen_mlp_layer_types(num_layers: int, decoder_sparse_step: int, mlp_only_layers: Iterable[int]) -> list[str]:
    """Qwen2/3-MoE's rule: layer i is sparse iff `(i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers`."""
    dense = set(mlp_only_layers)
    return [
        "sparse" if (i + 1) % decoder_sparse_step == 0 and i not in dense else "dense" for i in range(num_layers)
    ]


def qwen_sparse_rule(mlp_layer_types: list[str]) -> tuple[int, list[int]]:
    """`(decoder_sparse_step, mlp_only_layers)` reproducing `mlp_layer_types` under Qwen's rule.

    Every pattern is expressible (step 1 with every dense layer listed); this picks the step that needs the
    shortest `mlp_only_layers` (the smallest such step on ties), so [dense, sparse, dense, sparse] gives (2, []).
    """
    sparse = [i for i, kind in enumerate(mlp_layer_types) if kind == "sparse"]
    best = None
    for step in range(1, len(mlp_layer_types) + 2):
        if any((i + 1) % step for i in sparse):
            continue
        mlp_only = [i for i, kind in enumerate(mlp_layer_types) if kind == "dense" and (i + 1) % step == 0]
        if best is None or len(mlp_only) < len(best[1]):
            best = (step, mlp_only)
    return best


def deepseek_layer_rule(mlp_layer_types: list[str]) -> dict[str, int]:
    """`{first_k_dense_replace, moe_layer_freq}` reproducing `mlp_layer_types` under DeepSeek's rule
    (layer i sparse iff `i >= first_k_dense_replace and i % moe_layer_freq == 0`), or `{}` when none does."""
    num_layers = len(mlp_layer_types)
    first_sparse = next((i for i, kind in enumerate(mlp_layer_types) if kind == "sparse"), num_layers)
    for freq in range(1, num_layers + 1):
        derived = ["sparse" if i >= first_sparse and i % freq == 0 else "dense" for i in range(num_layers)]
        if derived == mlp_layer_types:
            return {"first_k_dense_replace": first_sparse, "moe_layer_freq": freq}
    return {}


def explicit_layer_fields(mlp_layer_types: list[str]) -> dict:
    """Our DeepSeek-family fields for a given sparse/dense pattern (explicit types + the equivalent rule if any)."""
    return {"mlp_layer_types": mlp_layer_types, **deepseek_layer_rule(mlp_layer_types)}


def _common_fields(native: PreTrainedConfig) -> dict:
    # a family without a balancing loss (deepseek_v2/v3, glm4_moe) has no `router_aux_loss_coef`: 0, as it computes
    fields = {name: getattr(native, name, 0.0 if name == "router_aux_loss_coef" else None) for name in COMMON_FIELDS}
    fields["rope_parameters"] = dict(native.rope_parameters)
    # Qwen2/3-MoE have no `head_dim` field but honour one found in config.json (getattr), as Mixtral does
    fields["head_dim"] = getattr(native, "head_dim", None)
    return fields


def _mixtral_to_ours(native: MixtralConfig) -> MixtralMoEConfig:
    if native.router_jitter_noise:
        logger.warning(f"mixtral: `router_jitter_noise`={native.router_jitter_noise} (training only) is kept, but "
                       f"hf_moe applies it to the router's input only, Mixtral to the experts' input as well.")
    return build_config(
        MixtralMoEConfig, "mixtral config", **_common_fields(native),
        intermediate_size=native.intermediate_size, num_local_experts=native.num_local_experts,
        sliding_window=native.sliding_window, router_jitter_noise=native.router_jitter_noise,
        norm_topk_prob=True,  # MixtralTopKRouter always renormalises the top-k probabilities
    )


def single_sliding_window(model_type: str, native: PreTrainedConfig) -> int | None:
    """Our one `sliding_window` (applied to every layer) from the per-layer `layer_types` of a Qwen2, Qwen3 or
    Qwen2-MoE config."""
    kinds = set(native.layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return native.sliding_window
    raise refuse(model_type, "layer_types", native.layer_types,
                 "hf_moe applies one sliding window to every layer (allowed: all 'full_attention' or all "
                 "'sliding_attention')")


def _qwen2_moe_to_ours(native: Qwen2MoeConfig) -> DeepSeekMoEConfig:
    layer_types = qwen_mlp_layer_types(native.num_hidden_layers, native.decoder_sparse_step, native.mlp_only_layers)
    return build_config(
        DeepSeekMoEConfig, "qwen2_moe config", **_common_fields(native),
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.moe_intermediate_size,
        n_routed_experts=native.num_experts, n_shared_experts=1,
        shared_expert_intermediate_size=native.shared_expert_intermediate_size, shared_expert_gate=True,
        norm_topk_prob=native.norm_topk_prob, qkv_bias=native.qkv_bias, qk_norm=False,
        sliding_window=single_sliding_window("qwen2_moe", native), **explicit_layer_fields(layer_types),
    )


def _qwen3_moe_to_ours(native: Qwen3MoeConfig) -> DeepSeekMoEConfig:
    if native.attention_bias:
        raise refuse("qwen3_moe", "attention_bias", native.attention_bias,
                     "hf_moe has biases on q/k/v only, not on o_proj (allowed: False)")
    layer_types = qwen_mlp_layer_types(native.num_hidden_layers, native.decoder_sparse_step, native.mlp_only_layers)
    return build_config(
        DeepSeekMoEConfig, "qwen3_moe config", **_common_fields(native),
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.moe_intermediate_size,
        n_routed_experts=native.num_experts, n_shared_experts=0, norm_topk_prob=native.norm_topk_prob,
        qk_norm=True, qkv_bias=False, sliding_window=native.sliding_window, **explicit_layer_fields(layer_types),
    )


def _deepseek_rope(fields: dict) -> dict:
    """rope_parameters from DeepSeek-MoE's legacy `rope_theta` / `rope_scaling` (None or linear)."""
    scaling = fields["rope_scaling"]
    if scaling is None:
        return {"rope_type": "default", "rope_theta": fields["rope_theta"]}
    scaling_type = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
    if scaling_type != "linear":
        raise refuse("deepseek", "rope_scaling", scaling,
                     "only None or {'type': 'linear', 'factor': ...} convert exactly")
    return {"rope_type": "linear", "factor": scaling["factor"], "rope_theta": fields["rope_theta"]}


def _check_deepseek_supported(fields: dict) -> None:
    """Refuse the DeepSeek options that our model does not compute (other scoring, group routing, o_proj bias)."""
    for field, allowed in (("scoring_func", "softmax"), ("topk_method", "greedy"), ("attention_bias", False)):
        if fields[field] != allowed:
            raise refuse("deepseek", field, fields[field], f"allowed: {allowed!r}")
    for field in ("n_routed_experts", "num_experts_per_tok"):
        if fields[field] is None:
            raise refuse("deepseek", field, None, "must be set for an MoE model")
    if fields["seq_aux"] and fields["aux_loss_alpha"] > 0:
        logger.warning(
            "deepseek: `seq_aux`=True (per-sequence balance loss) is a training-time option that hf_moe does not "
            "reproduce; `aux_loss_alpha` becomes `router_aux_loss_coef` of the batch-level Switch loss."
        )


def _deepseek_to_ours(config_dict: dict) -> DeepSeekMoEConfig:
    fields = {**DEEPSEEK_DEFAULTS, **config_dict}
    _check_deepseek_supported(fields)
    passed = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace",
              "moe_layer_freq", "hidden_act", "max_position_embeddings", "initializer_range",
              "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
              "attention_dropout", "routed_scaling_factor")
    return build_config(
        DeepSeekMoEConfig, "deepseek config", **{name: fields[name] for name in passed},
        num_key_value_heads=fields["num_key_value_heads"] or fields["num_attention_heads"],
        n_shared_experts=fields["n_shared_experts"] or 0,
        # MoEGate renormalises only when top_k > 1: a single expert keeps its softmax probability
        norm_topk_prob=fields["norm_topk_prob"] and fields["num_experts_per_tok"] > 1,
        router_aux_loss_coef=fields["aux_loss_alpha"], rope_parameters=_deepseek_rope(fields),
        qk_norm=False, qkv_bias=False, shared_expert_gate=False,
    )


# The five families below hold no behaviour of their own: every one is a field of DeepSeekMoEConfig. A family without
# dense layers or shared experts has `first_k_dense_replace=0` / `n_shared_experts=0`, and expert width
# `moe_intermediate_size`.


def _mla_fields(native: PreTrainedConfig, rope_interleave: bool) -> dict:
    if native.attention_bias:
        raise refuse(native.model_type, "attention_bias", native.attention_bias,
                     "hf_moe's multi-head latent attention has no projection biases (allowed: False)")
    if native.num_key_value_heads not in (None, native.num_attention_heads):
        raise refuse(native.model_type, "num_key_value_heads", native.num_key_value_heads,
                     f"MLA has a key and a value per head (allowed: num_attention_heads={native.num_attention_heads})")
    return {
        "attention_type": "mla", "q_lora_rank": native.q_lora_rank, "kv_lora_rank": native.kv_lora_rank,
        "qk_nope_head_dim": native.qk_nope_head_dim, "qk_rope_head_dim": native.qk_rope_head_dim,
        "v_head_dim": native.v_head_dim, "rope_interleave": rope_interleave,
        "num_key_value_heads": native.num_attention_heads, "head_dim": None,
    }


def _shared_expert_fields(native: PreTrainedConfig) -> dict:
    """DeepSeek-V2/V3 and GLM-4.5: one ungated MLP of width moe_intermediate_size * n_shared_experts."""
    shared = native.n_shared_experts or 0
    return {"n_shared_experts": shared, "shared_expert_intermediate_size": native.moe_intermediate_size * shared,
            "shared_expert_gate": False}


def _deepseek_v2_to_ours(native: DeepseekV2Config) -> DeepSeekMoEConfig:
    if native.topk_method not in ("greedy", "group_limited_greedy"):
        raise refuse("deepseek_v2", "topk_method", native.topk_method,
                     "allowed: 'greedy', 'group_limited_greedy' (DeepseekV2TopkRouter computes no other)")
    grouped = native.topk_method == "group_limited_greedy"
    return build_config(
        DeepSeekMoEConfig, "deepseek_v2 config", **{**_common_fields(native), **_mla_fields(native, True)},
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.moe_intermediate_size,
        n_routed_experts=native.n_routed_experts, **_shared_expert_fields(native),
        first_k_dense_replace=native.first_k_dense_replace, scoring_func="softmax", router_in_fp32=True,
        n_group=native.n_group if grouped else 1, topk_group=native.topk_group if grouped else 1,
        norm_topk_prob=False,  # DeepseekV2TopkRouter never renormalises, whatever `norm_topk_prob` says
        routed_scaling_factor=native.routed_scaling_factor,
    )


def _v3_router_fields(native: PreTrainedConfig) -> dict:
    """DeepSeek-V3's router, shared by GLM-4.5: sigmoid scores, a selection bias, groups by their top-2 sum."""
    return {"scoring_func": "sigmoid", "router_selection_bias": True, "router_in_fp32": True,
            "n_group": native.n_group,
            "topk_group": native.topk_group, "norm_topk_prob": native.norm_topk_prob,
            "routed_scaling_factor": native.routed_scaling_factor}


def _deepseek_v3_to_ours(native: DeepseekV3Config) -> DeepSeekMoEConfig:
    return build_config(
        DeepSeekMoEConfig, "deepseek_v3 config",
        **{**_common_fields(native), **_mla_fields(native, native.rope_interleave)},
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.moe_intermediate_size,
        n_routed_experts=native.n_routed_experts, **_shared_expert_fields(native),
        first_k_dense_replace=native.first_k_dense_replace, **_v3_router_fields(native),
    )


def _glm4_moe_to_ours(native: Glm4MoeConfig) -> DeepSeekMoEConfig:
    return build_config(
        DeepSeekMoEConfig, "glm4_moe config", **_common_fields(native),
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.moe_intermediate_size,
        n_routed_experts=native.n_routed_experts, **_shared_expert_fields(native),
        first_k_dense_replace=native.first_k_dense_replace, **_v3_router_fields(native),
        qkv_bias=native.attention_bias, qk_norm=native.use_qk_norm,  # per head; partial RoPE is in rope_parameters
    )


def _olmoe_to_ours(native: OlmoeConfig) -> DeepSeekMoEConfig:
    head_dim = getattr(native, "head_dim", None) or native.hidden_size // native.num_attention_heads
    if head_dim * native.num_attention_heads != native.hidden_size:
        allowed = native.hidden_size / native.num_attention_heads
        raise refuse("olmoe", "head_dim", head_dim, f"OlmoeAttention sizes its q/k norms by hidden_size "
                     f"(allowed: hidden_size / num_attention_heads = {allowed})")
    return build_config(
        DeepSeekMoEConfig, "olmoe config", **_common_fields(native),
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.intermediate_size,
        n_routed_experts=native.num_experts, n_shared_experts=0, first_k_dense_replace=0,
        norm_topk_prob=native.norm_topk_prob, qkv_bias=native.attention_bias, o_proj_bias=native.attention_bias,
        qk_norm=True, qk_norm_type="whole_projection", clip_qkv=native.clip_qkv,
    )


def _gpt_oss_to_ours(native: GptOssConfig) -> DeepSeekMoEConfig:
    # gpt-oss's softmax over the top-k logits (of a biased router) is softmax -> top-k -> renormalised
    return build_config(
        DeepSeekMoEConfig, "gpt_oss config", **_common_fields(native),
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.intermediate_size,
        n_routed_experts=native.num_local_experts, n_shared_experts=0, first_k_dense_replace=0, norm_topk_prob=True,
        qkv_bias=native.attention_bias, o_proj_bias=native.attention_bias, attention_sinks=True,
        sliding_window=native.sliding_window, layer_types=list(native.layer_types), router_bias=True,
        expert_bias=True, experts_activation="clamped_swiglu", swiglu_alpha=native.swiglu_alpha,
        swiglu_limit=native.swiglu_limit,
    )


_NATIVE_TO_OURS: dict[str, tuple[type[PreTrainedConfig] | None, Callable]] = {
    "mixtral": (MixtralConfig, _mixtral_to_ours),
    "qwen2_moe": (Qwen2MoeConfig, _qwen2_moe_to_ours),
    "qwen3_moe": (Qwen3MoeConfig, _qwen3_moe_to_ours),
    "deepseek": (None, _deepseek_to_ours),  # remote code: no transformers class, read the dict directly
    "deepseek_v2": (DeepseekV2Config, _deepseek_v2_to_ours),
    "deepseek_v3": (DeepseekV3Config, _deepseek_v3_to_ours),
    "glm4_moe": (Glm4MoeConfig, _glm4_moe_to_ours),
    "olmoe": (OlmoeConfig, _olmoe_to_ours),
    "gpt_oss": (GptOssConfig, _gpt_oss_to_ours),
}


def source_format(config_dict: dict) -> str:
    """The import format of a source config.json (its `model_type`); refuses anything else."""
    model_type = config_dict.get("model_type")
    if model_type in OUR_CONFIG_CLASSES:
        raise ConversionError(f"`model_type`={model_type!r} is already an hf_moe checkpoint: nothing to import")
    if model_type not in IMPORT_FORMATS:
        raise ConversionError(f"`model_type`={model_type!r} cannot be imported (allowed: {', '.join(IMPORT_FORMATS)})")
    if config_dict.get("quantization_config"):
        raise ConversionError(f"{model_type}: `quantization_config` is set: quantized checkpoints are not supported "
                              f"(allowed: unquantized weights)")
    return model_type


def native_config_to_ours(config_dict: dict) -> MoEDecoderConfig:
    """Our config (MixtralMoEConfig or DeepSeekMoEConfig) for a native config.json dict.

    Native transformers configs are first parsed by their own class, so that defaults and legacy keys
    (`rope_theta`, `rope_scaling`, ...) are read exactly as transformers reads them.
    """
    fmt = source_format(config_dict)
    native_class, to_ours = _NATIVE_TO_OURS[fmt]
    if native_class is None:
        return to_ours(config_dict)
    try:
        native = native_class.from_dict(config_dict)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"invalid {fmt} config: {one_line(error)}") from None
    return to_ours(native)


def load_our_config(src: str | os.PathLike) -> MoEDecoderConfig:
    """Our config from the config.json of an hf_moe checkpoint folder; refuses other model types."""
    config_dict = read_config_dict(src)
    model_type = config_dict.get("model_type")
    if model_type not in OUR_CONFIG_CLASSES:
        hint = " (use `hf-moe import` for native checkpoints)" if model_type in IMPORT_FORMATS else ""
        raise ConversionError(
            f"`model_type`={model_type!r} is not an hf_moe checkpoint (allowed: {', '.join(OUR_CONFIG_CLASSES)}){hint}"
        )
    try:
        return OUR_CONFIG_CLASSES[model_type].from_dict(config_dict)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"invalid {model_type} config in {src}: {one_line(error)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Config mapping: ours -> native
# ---------------------------------------------------------------------------------------------------------------


def default_head_dim(config: MoEDecoderConfig) -> int:
    return config.hidden_size // config.num_attention_heads


def _export_problems(config: MoEDecoderConfig, fmt: str) -> list[str]:
    """Every field of `config` that `fmt` cannot represent, as "`field`=value: why (allowed: ...)" strings."""
    checks = [
        ("routed_scaling_factor", config.routed_scaling_factor == 1.0,
         f"{fmt} routers do not scale the gate weights (allowed: 1.0)"),
        ("router_type", config.router_type == "token_choice",
         f"{fmt} routes by token choice (allowed: 'token_choice')"),
        ("scoring_func", config.scoring_func == "softmax", f"{fmt} routers use softmax scores (allowed: 'softmax')"),
        ("n_group", config.n_group == 1, f"{fmt} has no group-limited routing (allowed: 1)"),
        ("router_selection_bias", not config.router_selection_bias,
         f"{fmt} routers have no selection bias (allowed: False)"),
        ("noisy_gating", not config.noisy_gating, f"{fmt} routers have no noise projection (allowed: False)"),
        ("eval_capacity_factor", config.eval_capacity_factor is None,
         f"{fmt} never drops tokens at inference (allowed: None)"),
        ("moe_block_type", config.moe_block_type == "routed",
         f"{fmt} routes tokens to experts (allowed: 'routed')"),
        ("num_null_experts", config.num_null_experts == 0, f"{fmt} has no null experts (allowed: 0)"),
        ("mod_capacity", config.mod_capacity is None, f"{fmt} runs every block on every token (allowed: None)"),
        ("attention_type", config.attention_type == "gqa",
         f"{fmt} has no multi-head latent attention (allowed: 'gqa'; export to deepseek_v2 or deepseek_v3)"),
        ("o_proj_bias", not config.o_proj_bias, f"{fmt} has no o_proj bias (allowed: False)"),
        ("num_attention_experts", config.num_attention_experts is None,
         f"{fmt} has one dense attention per layer, no attention experts (allowed: None)"),
        ("attention_sinks", not config.attention_sinks, f"{fmt} has no attention sinks (allowed: False)"),
        ("clip_qkv", config.clip_qkv is None, f"{fmt} does not clip q, k and v (allowed: None)"),
        ("qk_norm_type", config.qk_norm_type == "per_head", f"{fmt} norms q and k per head (allowed: 'per_head')"),
        ("router_bias", not config.router_bias, f"{fmt} routers have no bias (allowed: False)"),
        ("expert_bias", not config.expert_bias, f"{fmt} experts have no biases (allowed: False)"),
        ("experts_activation", config.experts_activation == "glu",
         f"{fmt} experts compute act(gate) * up (allowed: 'glu')"),
        ("layer_types", len(set(config.attention_layer_types())) == 1,
         f"{fmt} gives every layer the same attention (allowed: None, or one kind for every layer)"),
        ("rope_parameters", config.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0,
         f"{fmt} rotates the whole head (allowed: no partial_rotary_factor, or 1.0)"),
    ]
    if fmt == "mixtral":
        checks += [
            ("n_shared_experts", config.n_shared_experts == 0, "mixtral has no shared experts (allowed: 0)"),
            ("mlp_layer_types", all(kind == "sparse" for kind in config.mlp_layer_types),
             "every mixtral layer is sparse (allowed: only 'sparse')"),
            ("qk_norm", not config.qk_norm, "mixtral has no q/k norm (allowed: False)"),
            ("qkv_bias", not config.qkv_bias, "mixtral has no q/k/v biases (allowed: False)"),
            ("norm_topk_prob", config.norm_topk_prob, "mixtral always renormalises the top-k weights (allowed: True)"),
        ]
    elif fmt == "qwen2_moe":
        checks += [
            ("n_shared_experts", config.n_shared_experts > 0,
             "every qwen2_moe sparse layer has a gated shared expert (allowed: >= 1, with shared_expert_gate=True)"),
            ("shared_expert_gate", config.shared_expert_gate,
             "qwen2_moe always scales the shared expert by sigmoid(shared_expert_gate(x)) (allowed: True)"),
            ("qk_norm", not config.qk_norm, "qwen2_moe has no q/k norm (allowed: False)"),
            ("head_dim", config.head_dim in (None, default_head_dim(config)),
             (f"Qwen2MoeConfig has no head_dim field (allowed: None or hidden_size // num_attention_heads = "
             f"{default_head_dim(config)})")),
            ("sliding_window", config.sliding_window is None,
             ("qwen2_moe derives its sliding layers (every other layer below max_window_layers) and not every "
             "engine reads an explicit layer_types, while hf_moe windows every layer (allowed: None)")),
        ]
    elif fmt == "qwen3_moe":
        checks += [
            ("n_shared_experts", config.n_shared_experts == 0, "qwen3_moe has no shared experts (allowed: 0)"),
            ("qkv_bias", not config.qkv_bias, "qwen3_moe has no q/k/v biases (allowed: False)"),
            ("qk_norm", config.qk_norm, "every qwen3_moe layer has per-head q/k RMSNorm (allowed: True)"),
        ]
    return [f"`{field}`={getattr(config, field)!r}: {why}" for field, ok, why in checks if not ok]


def check_exportable(config: MoEDecoderConfig, fmt: str) -> None:
    """Raise `ConversionError` listing every field of `config` that `fmt` cannot represent exactly."""
    if fmt not in EXPORT_FORMATS:
        raise ConversionError(f"`format`={fmt!r} is not an export format (allowed: {', '.join(EXPORT_FORMATS)})")
    if config.block_layout is not None:  # no native format has sub-blocks: one attention, then one feed-forward
        problems = [(f"`block_layout`={config.block_layout!r}: every {fmt} layer is one attention, then one "
                     f"feed-forward (allowed: None, with mlp_layer_types saying which layers are sparse)")]
    else:
        problems = _round_trip_problems(config, fmt) if fmt in FAMILY_FORMATS else _export_problems(config, fmt)
    if problems:
        hint = ""
        if any(p.startswith(("`routed_scaling_factor`", "`shared_expert_gate`")) for p in problems):
            hint = (f" (for a DeepSeek-style upcycle, run `hf-moe upcycle DENSE OUT --arch deepseek ... "
                    f"--format {fmt}` instead: it folds the routed scale into the expert weights"
                    + (" and gates the shared expert exactly" if fmt == "qwen2_moe" else "") + ")")
        raise ConversionError(f"cannot export to {fmt}: " + "; ".join(problems) + hint)
    for field in ("capacity_factor", "random_routing"):
        if getattr(config, field):
            logger.warning(f"`{field}`={getattr(config, field)!r} is a training-time option that {fmt} drops.")
    if config.router_jitter_noise:
        detail = ("mixtral applies it to the experts' input as well" if fmt == "mixtral"
                  else f"{fmt} has no jitter and drops it")
        logger.warning(f"`router_jitter_noise`={config.router_jitter_noise} is a training-time option: {detail}.")


def _native_common_fields(config: MoEDecoderConfig, fmt: str) -> dict:
    fields = {name: getattr(config, name) for name in COMMON_FIELDS}
    fields["rope_parameters"] = dict(config.rope_parameters)
    if fmt in UNTIED_HEAD_FORMATS:  # the head is written out as a copy of the embeddings (`export_native`)
        fields["tie_word_embeddings"] = False
    return fields


def _native_norm_topk_prob(config: MoEDecoderConfig, fmt: str) -> bool:
    """`norm_topk_prob` to write: with top_k == num_experts the top-k softmax weights are all E of them, which already
    sum to 1, so renormalising changes nothing and the value llama.cpp hard-codes for `fmt` is written."""
    if config.num_experts_per_tok == config.num_experts:
        return LLAMA_CPP_NORM_TOPK_PROB[fmt]
    return config.norm_topk_prob


def _qwen_layer_fields(config: MoEDecoderConfig) -> dict:
    step, mlp_only = qwen_sparse_rule(list(config.mlp_layer_types))
    return {"decoder_sparse_step": step, "mlp_only_layers": mlp_only}


def _ours_to_mixtral(config: MoEDecoderConfig) -> MixtralConfig:
    return build_config(
        MixtralConfig, "mixtral export", **_native_common_fields(config, "mixtral"), head_dim=config.head_dim,
        intermediate_size=config.moe_intermediate_size, num_local_experts=config.num_experts,
        sliding_window=config.sliding_window, router_jitter_noise=config.router_jitter_noise,
    )


def _ours_to_qwen2_moe(config: MoEDecoderConfig) -> Qwen2MoeConfig:
    return build_config(  # full attention only (see _export_problems)
        Qwen2MoeConfig, "qwen2_moe export", **_native_common_fields(config, "qwen2_moe"),
        intermediate_size=config.intermediate_size, moe_intermediate_size=config.moe_intermediate_size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size, num_experts=config.num_experts,
        norm_topk_prob=_native_norm_topk_prob(config, "qwen2_moe"), qkv_bias=config.qkv_bias,
        use_sliding_window=False,
        **_qwen_layer_fields(config),
    )


def _ours_to_qwen3_moe(config: MoEDecoderConfig) -> Qwen3MoeConfig:
    return build_config(
        Qwen3MoeConfig, "qwen3_moe export", **_native_common_fields(config, "qwen3_moe"),
        head_dim=config.head_dim or default_head_dim(config),
        intermediate_size=config.intermediate_size, moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.num_experts, norm_topk_prob=_native_norm_topk_prob(config, "qwen3_moe"),
        attention_bias=False,
        use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
        **_qwen_layer_fields(config),
    )


def _native_family_fields(config: MoEDecoderConfig) -> dict:
    fields = {name: getattr(config, name) for name in COMMON_FIELDS if name != "router_aux_loss_coef"}
    fields["rope_parameters"] = dict(config.rope_parameters)
    return fields


def _native_mla_fields(config: MoEDecoderConfig) -> dict:
    return {name: getattr(config, name) for name in
            ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}


def _native_v3_fields(config: MoEDecoderConfig) -> dict:
    """Routing and MoE layout shared by DeepSeek-V3 and GLM-4.5 (their routers are the same)."""
    return {
        "intermediate_size": config.intermediate_size, "moe_intermediate_size": config.moe_intermediate_size,
        "n_routed_experts": config.num_experts, "n_shared_experts": config.n_shared_experts,
        "first_k_dense_replace": config.mlp_layer_types.index("sparse") if "sparse" in config.mlp_layer_types
        else config.num_hidden_layers,
        "n_group": config.n_group, "topk_group": config.topk_group, "norm_topk_prob": config.norm_topk_prob,
        "routed_scaling_factor": config.routed_scaling_factor, "num_nextn_predict_layers": 0,
    }


def _ours_to_deepseek_v2(config: MoEDecoderConfig) -> DeepseekV2Config:
    v3 = _native_v3_fields(config)
    grouped = config.n_group > 1
    return build_config(
        DeepseekV2Config, "deepseek_v2 export", **_native_family_fields(config), **_native_mla_fields(config),
        **{name: v3[name] for name in ("intermediate_size", "moe_intermediate_size", "n_routed_experts",
                                       "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor")},
        topk_method="group_limited_greedy" if grouped else "greedy",
        n_group=config.n_group if grouped else None, topk_group=config.topk_group if grouped else None,
        attention_bias=False,
    )


def _ours_to_deepseek_v3(config: MoEDecoderConfig) -> DeepseekV3Config:
    return build_config(
        DeepseekV3Config, "deepseek_v3 export", **_native_family_fields(config), **_native_mla_fields(config),
        **_native_v3_fields(config), rope_interleave=config.rope_interleave, attention_bias=False,
    )


def _ours_to_glm4_moe(config: MoEDecoderConfig) -> Glm4MoeConfig:
    rope = dict(config.rope_parameters)
    rope.setdefault("partial_rotary_factor", 1.0)  # Glm4MoeConfig would default it to 0.5
    return build_config(
        Glm4MoeConfig, "glm4_moe export", **{**_native_family_fields(config), "rope_parameters": rope},
        **_native_v3_fields(config), head_dim=config.head_dim, attention_bias=config.qkv_bias,
        use_qk_norm=config.qk_norm,
    )


def _ours_to_olmoe(config: MoEDecoderConfig) -> OlmoeConfig:
    return build_config(
        OlmoeConfig, "olmoe export", **_native_family_fields(config), intermediate_size=config.moe_intermediate_size,
        num_experts=config.num_experts, norm_topk_prob=config.norm_topk_prob, attention_bias=config.qkv_bias,
        clip_qkv=config.clip_qkv, router_aux_loss_coef=config.router_aux_loss_coef,
    )


def _ours_to_gpt_oss(config: MoEDecoderConfig) -> GptOssConfig:
    # constants our config leaves unset (glu experts) take GptOssConfig's defaults: the round trip then names
    # `experts_activation` rather than a constant
    constants = {name: getattr(config, name) for name in ("swiglu_alpha", "swiglu_limit") if getattr(config, name)}
    return build_config(
        GptOssConfig, "gpt_oss export", **_native_family_fields(config), head_dim=config.head_dim,
        intermediate_size=config.moe_intermediate_size, num_local_experts=config.num_experts,
        attention_bias=config.qkv_bias, sliding_window=config.sliding_window,
        layer_types=config.attention_layer_types(),
        router_aux_loss_coef=config.router_aux_loss_coef, **constants,
    )


# What a round trip through a family format may change without changing what the model computes at inference:
# training-time options (the format keeps none, or only its own balancing coefficient) and bookkeeping.
_NOT_COMPARED = {
    "router_aux_loss_coef", "router_z_loss_coef", "router_importance_loss_coef", "router_load_loss_coef",
    "expert_balance_loss_coef", "device_balance_loss_coef", "num_device_groups", "sequence_balance_loss_coef",
    "router_bias_update_rate", "aux_loss_per_layer", "output_router_logits", "router_jitter_noise",
    "capacity_factor", "random_routing", "dispatch_groups", "initializer_range", "use_cache", "attention_dropout",
    "router_in_fp32",  # precision only: the same numbers in float32
    "attention_router_aux_loss_coef", "attention_router_z_loss_coef",  # the attention experts' (compared as such)
    "first_k_dense_replace", "moe_layer_freq",  # compared as `mlp_layer_types`
    "dtype", "architectures", "auto_map", "transformers_version", "_name_or_path", "model_type",
}


def _computed_fields(config: MoEDecoderConfig) -> dict:
    """The fields of `config` that decide what it computes at inference, with unused ones left out and defaults
    spelled out, so that two configs computing the same model compare equal."""
    # DeepSeekMoEConfig's fields, which MixtralMoEConfig answers too (fixed values for those it cannot hold)
    names = [field.name for field in dataclass_fields(DeepSeekMoEConfig) if field.name not in _NOT_COMPARED]
    fields = {name: getattr(config, name, None) for name in names if name != "n_routed_experts"}
    fields["num_experts"] = config.num_experts
    fields["layer_types"] = config.attention_layer_types()
    fields["sliding_window"] = config.sliding_window if "sliding_attention" in fields["layer_types"] else None
    rope = dict(config.rope_parameters)
    if rope.get("partial_rotary_factor") == 1.0:
        del rope["partial_rotary_factor"]
    fields["rope_parameters"] = rope
    if "dense" not in config.mlp_layer_types:
        fields.pop("intermediate_size", None)
    if config.n_shared_experts == 0:
        fields.pop("shared_expert_intermediate_size", None)
    if config.experts_activation != "clamped_swiglu":
        fields.pop("swiglu_alpha", None), fields.pop("swiglu_limit", None)
    return fields


def _round_trip_problems(config: MoEDecoderConfig, fmt: str) -> list[str]:
    """Every field that `fmt` cannot hold: the config written as `fmt` and read back, compared field by field."""
    if fmt in ("deepseek_v2", "deepseek_v3") and config.attention_type != "mla":
        return [f"`attention_type`={config.attention_type!r}: {fmt} uses multi-head latent attention "
                f"(allowed: 'mla')"]
    if fmt not in ("deepseek_v2", "deepseek_v3") and config.attention_type == "mla":
        return [f"`attention_type`='mla': {fmt} has no multi-head latent attention (allowed: 'gqa')"]
    try:
        back = _NATIVE_TO_OURS[fmt][1](_OURS_TO_NATIVE[fmt](config))
    except ConversionError as error:
        return [str(error)]
    ours, theirs = _computed_fields(config), _computed_fields(back)
    return [f"`{name}`={ours.get(name)!r}: " + (f"{fmt} can only hold {theirs[name]!r}" if name in theirs
                                                else f"{fmt} has no use for it")
            for name in sorted(ours) if ours[name] != theirs.get(name)]  # what only theirs uses differs elsewhere


_OURS_TO_NATIVE = {
    "mixtral": _ours_to_mixtral, "qwen2_moe": _ours_to_qwen2_moe, "qwen3_moe": _ours_to_qwen3_moe,
    "deepseek_v2": _ours_to_deepseek_v2, "deepseek_v3": _ours_to_deepseek_v3, "glm4_moe": _ours_to_glm4_moe,
    "olmoe": _ours_to_olmoe, "gpt_oss": _ours_to_gpt_oss,
}


def ours_to_native_config(config: MoEDecoderConfig, fmt: str) -> PreTrainedConfig:
    """The transformers config (MixtralConfig, Qwen2MoeConfig or Qwen3MoeConfig) equivalent to `config`.

    Raises `ConversionError` naming every field that `fmt` cannot represent.
    """
    check_exportable(config, fmt)
    native = _OURS_TO_NATIVE[fmt](config)
    native.architectures = [NATIVE_ARCHITECTURES[fmt]]
    return native


def engine_warnings(config: MoEDecoderConfig, native: PreTrainedConfig) -> list[str]:
    """What llama.cpp computes differently from transformers for the export `native` of `config`, one sentence each
    naming the engine and the field (empty: llama.cpp decodes it as transformers does). See the module docstring."""
    fmt = native.model_type
    if fmt not in LLAMA_CPP_ARCHITECTURES:  # served by llama.cpp as transformers computes them, as far as known
        return []
    arch = LLAMA_CPP_ARCHITECTURES[fmt]
    warnings = []
    norm_topk_prob = getattr(native, "norm_topk_prob", True)  # MixtralConfig has none: Mixtral always renormalises
    if norm_topk_prob != LLAMA_CPP_NORM_TOPK_PROB[fmt]:
        done = "always renormalises" if LLAMA_CPP_NORM_TOPK_PROB[fmt] else "never renormalises"
        warnings.append(
            f"llama.cpp ({arch}) {done} the top-k routing weights, ignoring `norm_topk_prob`={norm_topk_prob}: "
            f"it decodes this {fmt} export differently from transformers (equivalent only with top_k == num_experts)")
    if fmt != "mixtral" and "dense" in config.mlp_layer_types:
        warnings.append(
            f"llama.cpp ({arch}) requires every layer to be sparse: `mlp_only_layers`={native.mlp_only_layers} / "
            f"`decoder_sparse_step`={native.decoder_sparse_step} (dense layers "
            f"{[i for i, kind in enumerate(config.mlp_layer_types) if kind == 'dense']}) do not load there")
    if fmt != "qwen2_moe" and native.sliding_window is not None:
        warnings.append(
            f"llama.cpp ({arch}) has no sliding-window attention: `sliding_window`={native.sliding_window} is ignored "
            f"there (full attention past the window)")
    return warnings


def native_config_dict(native: PreTrainedConfig) -> dict:
    """The config.json content for an exported native config: what transformers writes (`to_json_string`), plus
    `num_experts` for qwen3_moe, the key that Qwen3-MoE checkpoints carry (transformers 5 writes only its alias
    `num_local_experts`)."""
    content = json.loads(native.to_json_string(use_diff=True))
    if native.model_type == "qwen3_moe":
        content["num_experts"] = native.num_experts
    return dict(sorted(content.items()))


# ---------------------------------------------------------------------------------------------------------------
# Tensor mapping
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertLayout:
    """Where a native format keeps the tensors of a sparse layer, relative to `model.layers.N.`."""

    moe_prefix: str  # module holding router and experts: "block_sparse_moe" (Mixtral) or "mlp"
    projections: tuple[str, str, str]  # per-expert module names of (gate, up, down)
    shared_prefix: str | None  # shared-expert module inside `moe_prefix`, None when the format has none
    router: str = "gate"  # the router module inside `moe_prefix`
    fused: bool = False  # experts stored as gpt-oss stores them: [E, H, 2I] with gate/up interleaved, [E, I, H]


LAYOUTS = {
    "mixtral": ExpertLayout("block_sparse_moe", ("w1", "w3", "w2"), None),
    "qwen2_moe": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "qwen3_moe": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), None),
    "deepseek": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "deepseek_v2": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "deepseek_v3": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "glm4_moe": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
    "olmoe": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), None),
    "gpt_oss": ExpertLayout("mlp", ("gate_up_proj", "gate_up_proj", "down_proj"), None, router="router", fused=True),
}


def fuse_gate_up(gates: list[torch.Tensor], ups: list[torch.Tensor]) -> torch.Tensor:
    """E gate and E up weights, each [I, H] -> our `gate_up_proj` [E, 2I, H] (gate rows first, then up)."""
    return torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)


def split_gate_up(gate_up: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Our `gate_up_proj` [E, 2I, H] -> (E gate weights [I, H], E up weights [I, H])."""
    gate, up = gate_up.chunk(2, dim=1)
    return list(gate.unbind(0)), list(up.unbind(0))


@dataclass(frozen=True)
class TensorMapping:
    """One tensor of ours and the native tensors that hold the same numbers.

    kind: "same" (one native tensor, identical), "gate_up" (E gate then E up per-expert weights <->
    `gate_up_proj`), "down" (E per-expert down weights <-> `down_proj`), and gpt-oss's fused experts: "interleaved"
    (a last dim alternating gate and up columns <-> our [gate; up] halves: the `gate_up_proj_bias` [E, 2I]),
    "interleaved_t" (gate_up_proj [E, H, 2I] interleaved <-> ours [E, 2I, H]), "transposed" ([E, I, H] <-> our
    `down_proj` [E, H, I]).
    """

    ours: str
    native: tuple[str, ...]
    kind: str = "same"

    def to_ours(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The native tensors (in `self.native` order) -> our tensor."""
        if self.kind == "gate_up":
            half = len(tensors) // 2
            return fuse_gate_up(tensors[:half], tensors[half:])
        if self.kind == "down":
            return torch.stack(tensors)
        if self.kind == "interleaved":
            return deinterleave(tensors[0])
        if self.kind == "interleaved_t":
            return deinterleave(tensors[0]).transpose(1, 2).contiguous()
        if self.kind == "transposed":
            return tensors[0].transpose(1, 2).contiguous()
        return tensors[0]

    def to_native(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Our tensor -> the native tensors, in `self.native` order."""
        if self.kind == "gate_up":
            gates, ups = split_gate_up(tensor)
            return gates + ups
        if self.kind == "down":
            return list(tensor.unbind(0))
        if self.kind == "interleaved":
            return [interleave(tensor)]
        if self.kind == "interleaved_t":
            return [interleave(tensor.transpose(1, 2))]
        if self.kind == "transposed":
            return [tensor.transpose(1, 2).contiguous()]
        return [tensor]


def deinterleave(tensor: torch.Tensor) -> torch.Tensor:
    """[..., 2I] alternating gate and up (g0, u0, g1, u1, ...) -> [..., 2I] as [gate; up] (g0, g1, ..., u0, u1, ...)."""
    return torch.cat([tensor[..., 0::2], tensor[..., 1::2]], dim=-1)


def interleave(tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of `deinterleave`: [..., 2I] as [gate; up] -> gate and up alternating."""
    gate, up = tensor.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2).contiguous()


def constant_shared_gate(norm_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A Qwen2-MoE `shared_expert_gate.weight` [1, H] whose gate sigmoid(w . x) is exactly 1/2 in fp32, like a zero
    weight, but whose logit w . x is not zero: llama.cpp computes that sigmoid as silu(z) / z, which is 0/0 = NaN for
    a zero weight.

    A linear gate without bias cannot be exactly constant unless w = 0 (sigmoid(w . (-x)) = 1 - sigmoid(w . x)), so
    the logit is kept tiny instead: w = eps * e_j, one entry at the largest post-attention RMSNorm weight |g_j|. The
    gate's input is that norm's output x, with |x_j| <= |g_j| * sqrt(H), and eps is the largest power of two with
    eps * |g_j| * sqrt(H) <= 2^-26 (`SHARED_GATE_LOGIT_BOUND`). Then |z| <= 2^-26, exp(-z) rounds to 1 in fp32 (half
    an ulp of 1 is 2^-25 below it, 2^-24 above), and sigmoid(z) = 1 / (1 + 1) = 1/2 exactly, as is silu(z) / z =
    (z / 2) / z. Zero error in fp32 for every input whose x_j is not exactly 0 (then z = 0 and llama.cpp gets NaN
    again) nor below 2^-126 / eps (a subnormal z); a float16 checkpoint cannot hold eps below 2^-24 (its smallest
    subnormal), where |z| may exceed the bound and the gate is 1/2 within |z| / 4.
    """
    magnitudes = norm_weight.detach().float().abs().flatten()
    hidden = magnitudes.numel()
    j = int(magnitudes.argmax())
    largest = max(float(magnitudes[j]), 2.0**-60)  # an all-zero norm (x = 0 always) cannot be helped
    eps = 2.0 ** math.floor(math.log2(SHARED_GATE_LOGIT_BOUND / (largest * math.sqrt(hidden))))
    if dtype == torch.float16:
        eps = max(eps, 2.0**-24)
    weight = torch.zeros(1, hidden, dtype=dtype)
    weight[0, j] = eps
    return weight


def our_tensor_shapes(config: MoEDecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of our `*ForCausalLM` for `config`, with its shape, in layer order."""
    hidden = config.hidden_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for layer_idx, sub_blocks in enumerate(config.layer_sub_blocks()):
        prefix = f"model.layers.{layer_idx}."
        if config.block_layout is None:  # self_attn, mlp and their two norms
            shapes.update(_attention_shapes(config, prefix + "self_attn."))
            shapes.update(_feed_forward_shapes(config, sub_blocks[1], prefix + "mlp."))
            shapes[prefix + "input_layernorm.weight"] = (hidden,)
            shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
            continue
        for block_idx, kind in enumerate(sub_blocks):  # block_layout: each sub-block's norm and module
            block_prefix = f"{prefix}blocks.{block_idx}."
            shapes[block_prefix + "norm.weight"] = (hidden,)
            if kind == "attention":
                shapes.update(_attention_shapes(config, block_prefix + "self_attn."))
            else:
                shapes.update(_feed_forward_shapes(config, kind, block_prefix + "mlp."))
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def parameter_counts(config: MoEDecoderConfig, names: Iterable[str] | None = None) -> tuple[int, int]:
    """(total, active per token) parameters of our model for `config`, over the state-dict `names` (default: all
    of them, a tied head counted once). A token runs k of the E routed experts of each sparse layer. "Active" is
    the most a token can run: a token that picks null experts (`num_null_experts`) runs fewer real ones, and under
    Mixture-of-Depths (`mod_capacity`) a token skips the routed blocks it is not chosen for."""
    shapes = our_tensor_shapes(config)
    if names is None:
        names = [name for name in shapes if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    names = [name for name in names if not name.endswith(SELECTION_BIAS)]
    total = sum(math.prod(shapes[name]) for name in names)
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    idle_experts = config.num_experts - config.num_experts_per_tok if config.num_sparse_layers else 0
    active = total - config.num_sparse_layers * idle_experts * expert
    if config.num_attention_experts is not None:  # a token runs the q and o projections of k of the E_a experts
        attention_expert = 2 * config.hidden_size * config.num_attention_heads * config.head_dim
        idle_attention_experts = config.num_attention_experts - config.num_attention_experts_per_tok
        active -= config.num_attention_blocks() * idle_attention_experts * attention_expert
    return total, active


def _attention_shapes(config: MoEDecoderConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    if config.attention_type == "mla":
        return {prefix + name: shape for name, shape in _mla_shapes(config).items()}
    head_dim = config.head_dim or default_head_dim(config)
    hidden, heads = config.hidden_size, config.num_attention_heads
    q_width, kv_width = heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"sinks": (heads,)} if config.attention_sinks else {}
    shapes.update({
        "q_proj.weight": (q_width, hidden),
        "k_proj.weight": (kv_width, hidden),
        "v_proj.weight": (kv_width, hidden),
        "o_proj.weight": (hidden, q_width),
    })
    if config.num_attention_experts is not None:  # attention experts: a router, per-expert q and o (3D, no `.weight`)
        experts = config.num_attention_experts
        del shapes["q_proj.weight"], shapes["o_proj.weight"]
        shapes.update({"gate.weight": (experts, hidden), "q_proj": (experts, q_width, hidden),
                       "o_proj": (experts, hidden, q_width)})
    if config.qkv_bias:
        shapes.update({"q_proj.bias": (q_width,), "k_proj.bias": (kv_width,), "v_proj.bias": (kv_width,)})
    if config.o_proj_bias:
        shapes["o_proj.bias" if config.num_attention_experts is None else "o_proj_bias"] = (hidden,)
    if config.qk_norm:
        per_head = config.qk_norm_type == "per_head"
        shapes.update({"q_norm.weight": (head_dim if per_head else q_width,),
                       "k_norm.weight": (head_dim if per_head else kv_width,)})
    return {prefix + name: shape for name, shape in shapes.items()}


def _mla_shapes(config: MoEDecoderConfig) -> dict[str, tuple[int, ...]]:
    hidden, heads = config.hidden_size, config.num_attention_heads
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if config.q_lora_rank is None:
        shapes = {"q_proj.weight": (heads * qk_head_dim, hidden)}
    else:
        shapes = {"q_a_proj.weight": (config.q_lora_rank, hidden), "q_a_layernorm.weight": (config.q_lora_rank,),
                  "q_b_proj.weight": (heads * qk_head_dim, config.q_lora_rank)}
    return {
        **shapes,
        "kv_a_proj_with_mqa.weight": (config.kv_lora_rank + config.qk_rope_head_dim, hidden),
        "kv_a_layernorm.weight": (config.kv_lora_rank,),
        "kv_b_proj.weight": (heads * (config.qk_nope_head_dim + config.v_head_dim), config.kv_lora_rank),
        "o_proj.weight": (hidden, heads * config.v_head_dim),
    }


# the selection bias of aux-loss-free balancing, a buffer saved with the router (not a parameter)
SELECTION_BIAS = "gate.e_score_correction_bias"


def _feed_forward_shapes(config: MoEDecoderConfig, kind: str, prefix: str) -> dict[str, tuple[int, ...]]:
    """A 'moe' (the sparse block) or 'dense' feed-forward's tensors, named under `prefix`."""
    shapes = _sparse_mlp_shapes(config) if kind == "moe" else _mlp_shapes(config.hidden_size, config.intermediate_size)
    return {prefix + name: shape for name, shape in shapes.items()}


def _mlp_shapes(hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {"gate_proj.weight": (width, hidden), "up_proj.weight": (width, hidden), "down_proj.weight": (hidden, width)}


def _sparse_mlp_shapes(config: MoEDecoderConfig) -> dict[str, tuple[int, ...]]:
    hidden, experts, width = config.hidden_size, config.num_experts, config.moe_intermediate_size
    shapes = {"gate.weight": (experts, hidden)}
    if config.router_bias:
        shapes["gate.bias"] = (experts,)
    if config.router_selection_bias:
        shapes[SELECTION_BIAS] = (experts,)  # a float32 buffer
    shapes.update({"experts.gate_up_proj": (experts, 2 * width, hidden), "experts.down_proj": (experts, hidden, width)})
    if config.expert_bias:
        shapes.update({"experts.gate_up_proj_bias": (experts, 2 * width), "experts.down_proj_bias": (experts, hidden)})
    if config.n_shared_experts > 0:
        shared = _mlp_shapes(hidden, config.shared_expert_intermediate_size)
        shapes.update({f"shared_experts.{name}": shape for name, shape in shared.items()})
    if config.shared_expert_gate:
        shapes["shared_expert_gate.weight"] = (1, hidden)
    return shapes


# our keys that live in a sparse layer's MoE block: router, routed experts, shared experts and their gate
_SPARSE_KEY = re.compile(
    r"(model\.layers\.\d+\.)mlp\.(gate\..+|experts\..+|shared_experts\..+|shared_expert_gate\..+)"
)


def tensor_mapping(name: str, layout: ExpertLayout, num_experts: int) -> TensorMapping:
    """How our tensor `name` is stored in a native format with `layout` (see the module docstring)."""
    match = _SPARSE_KEY.fullmatch(name)
    if match is None:  # embeddings, attention, norms, dense MLPs, lm_head: same name everywhere
        return TensorMapping(name, (name,))
    layer_prefix, rest = match.groups()
    moe = f"{layer_prefix}{layout.moe_prefix}."
    if rest.startswith("gate."):  # the router: weight, bias, selection bias
        return TensorMapping(name, (f"{moe}{layout.router}.{rest.removeprefix('gate.')}",))
    if layout.fused:  # same names; gate/up interleaved, products stored as x @ W
        kind = {"experts.gate_up_proj": "interleaved_t", "experts.gate_up_proj_bias": "interleaved",
                "experts.down_proj": "transposed"}.get(rest, "same")
        return TensorMapping(name, (moe + rest,), kind)
    gate, up, down = layout.projections
    if rest == "experts.gate_up_proj":
        names = [f"{moe}experts.{e}.{proj}.weight" for proj in (gate, up) for e in range(num_experts)]
        return TensorMapping(name, tuple(names), "gate_up")
    if rest == "experts.down_proj":
        return TensorMapping(name, tuple(f"{moe}experts.{e}.{down}.weight" for e in range(num_experts)), "down")
    if rest.startswith("shared_experts."):
        return TensorMapping(name, (f"{moe}{layout.shared_prefix}.{rest.removeprefix('shared_experts.')}",))
    return TensorMapping(name, (moe + rest,))  # router `gate.weight`, `shared_expert_gate.weight`


def tensor_plan(config: MoEDecoderConfig, fmt: str) -> list[TensorMapping]:
    """One `TensorMapping` per tensor of our model for `config`, in layer order, for the native format `fmt`."""
    layout = LAYOUTS[fmt]
    if layout.shared_prefix is None and config.n_shared_experts > 0:
        raise ConversionError(f"{fmt} has no shared experts but `n_shared_experts`={config.n_shared_experts}")
    return [tensor_mapping(name, layout, config.num_experts) for name in our_tensor_shapes(config)]


def layer_of(name: str) -> int:
    """Layer index of a key, -1 for the tensors outside the decoder layers."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def multi_token_prediction_names(config_dict: dict, names: Iterable[str]) -> list[str]:
    """The tensors of DeepSeek-V3's and GLM-4.5's multi-token-prediction layers (`num_nextn_predict_layers` layers
    stored after the last decoder layer), which transformers' classes do not build and an import drops."""
    num_layers = config_dict.get("num_hidden_layers", 0)
    extra = config_dict.get("num_nextn_predict_layers") or 0
    return [name for name in names if num_layers <= layer_of(name) < num_layers + extra]


def group_by_layer(plan: list[TensorMapping]) -> list[list[TensorMapping]]:
    """The plan split into the non-layer tensors (first) and one group per decoder layer, in order."""
    groups: dict[int, list[TensorMapping]] = {}
    for mapping in plan:
        groups.setdefault(layer_of(mapping.ours), []).append(mapping)
    return [groups[key] for key in sorted(groups)]


# ---------------------------------------------------------------------------------------------------------------
# Plan checks and output folders shared by the converters
# ---------------------------------------------------------------------------------------------------------------


def _list_names(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_names(expected: Iterable[str], present: Iterable[str], what: str) -> None:
    """Refuse a checkpoint whose tensor names differ from the plan's (missing or unexpected tensors)."""
    expected, ignored = set(expected), {name for name in present if name.endswith(IGNORED_SOURCE_SUFFIXES)}
    present = set(present) - ignored
    if ignored:
        logger.info(f"skipping {len(ignored)} recomputed buffer(s): {_list_names(ignored)}")
    if missing := expected - present:
        raise ConversionError(f"{what} lacks tensors that its config requires: {_list_names(missing)}")
    if unexpected := present - expected:
        raise ConversionError(f"{what} has tensors that its config does not explain: {_list_names(unexpected)}")


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16", as config.json's `dtype` names it."""
    return str(dtype).removeprefix("torch.")


def our_model_code_files() -> list[str]:
    """Names of the flat modeling files copied next to our checkpoints (modeling file + its relative imports)."""
    modeling_file = modeling_hf_moe.__file__
    return [Path(path).name for path in (modeling_file, *get_relative_import_files(modeling_file))]


def save_our_config(config: MoEDecoderConfig, folder: Path) -> None:
    """Write config.json and the flat remote-code files exactly as our `*ForCausalLM.save_pretrained` does."""
    family = type(config).__name__.removesuffix("Config")
    model_class = getattr(modeling_hf_moe, f"{family}ForCausalLM")
    config.architectures = [model_class.__name__]
    custom_object_save(model_class, folder)  # modeling_hf_moe.py + configuration_hf_moe.py + routing.py
    config.save_pretrained(folder)


def ensure_generation_config(folder: Path, config: PreTrainedConfig) -> None:
    """Write generation_config.json from the model config (as save_pretrained does) unless the source had one."""
    if not (folder / "generation_config.json").exists():
        GenerationConfig.from_model_config(config).save_pretrained(folder)


def remote_code_files(config_dict: dict) -> set[str]:
    """The model-code files a source config's `auto_map` points at (stale once the weights are converted)."""
    references = []
    for value in (config_dict.get("auto_map") or {}).values():
        references.extend(value if isinstance(value, (list, tuple)) else [value])
    return {f"{reference.split('--')[-1].split('.')[0]}.py" for reference in references if reference}
