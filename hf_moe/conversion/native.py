# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Exact import/export between our checkpoints and the native MoE formats that serving engines read.

Import (`import_native`) reads, from a folder of safetensors weights + config.json:

| source `model_type` | written by | becomes |
|---|---|---|
| `mixtral`   | `MixtralForCausalLM.save_pretrained` (`block_sparse_moe.experts.{e}.w1/w3/w2`) | `hf_moe_mixtral` |
| `qwen2_moe` | `Qwen2MoeForCausalLM.save_pretrained` (gated shared expert, q/k/v biases)     | `hf_moe_deepseek` |
| `qwen3_moe` | `Qwen3MoeForCausalLM.save_pretrained` (per-head q/k RMSNorm)                  | `hf_moe_deepseek` |
| `deepseek`  | DeepSeek-MoE 16B remote code (`mlp.experts.{e}`, `mlp.shared_experts`)         | `hf_moe_deepseek` |

Export (`export_native`) writes `mixtral`, `qwen2_moe` or `qwen3_moe` with the per-expert key names and the config
keys that transformers, vLLM and llama.cpp read, after checking that our config is representable in that format.

How tensors map (names relative to `model.layers.N.`; everything else keeps its name):

    ours                                   native (E experts, projections (gate, up, down))
    mlp.gate.weight              [E, H]    {moe}.gate.weight
    mlp.experts.gate_up_proj [E, 2I, H]    {moe}.experts.{e}.{gate}.weight [I, H] (rows 0..I-1 of expert e)
                                           {moe}.experts.{e}.{up}.weight   [I, H] (rows I..2I-1)
    mlp.experts.down_proj    [E, H, I]     {moe}.experts.{e}.{down}.weight [H, I]
    mlp.shared_experts.X                   {moe}.{shared}.X
    mlp.shared_expert_gate.weight [1, H]   {moe}.shared_expert_gate.weight

with {moe} = `block_sparse_moe` and (w1, w3, w2) for Mixtral, `mlp` and (gate_proj, up_proj, down_proj) otherwise;
{shared} = `shared_expert` (Qwen2-MoE) or `shared_experts` (DeepSeek).

Every conversion is plan -> stream: the config mapping, the tensor names and every tensor's shape are checked
before anything is written; tensors are then streamed one layer at a time from a lazy reader into a shard writer,
inside an atomic output folder (nothing appears at OUT unless the whole conversion succeeds).

Engine-safe exports. llama.cpp (`convert_hf_to_gguf.py` + `src/models/{llama,qwen2moe,qwen3moe}.cpp`) reads these
formats with a few fixed assumptions, so an export is written the way it reads them whenever an equivalent layout
exists, and otherwise warned about (`engine_warnings`, recorded in conversion.yaml):

| llama.cpp assumption | export writes | otherwise |
|---|---|---|
| qwen2moe needs `output.weight` (no tied head) | qwen2_moe: `lm_head.weight` = a copy of the embeddings, untied | - |
| qwen2moe computes sigmoid(z) as silu(z) / z (0/0 for a zero gate) | a zero `shared_expert_gate` row becomes `constant_shared_gate` (sigmoid exactly 1/2 in fp32) | - |
| qwen2moe never renormalises the top-k weights, qwen3moe and llama (Mixtral) always do | top_k == num_experts: the value llama.cpp assumes (renormalising all E softmax weights is a no-op) | warning |
| every qwen2moe / qwen3moe layer is sparse | - | warning for `mlp_only_layers` / `decoder_sparse_step` |
| no sliding-window attention in llama / qwen3moe | - | warning for `sliding_window` |
"""

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm
from transformers import GenerationConfig, MixtralConfig, PreTrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files
from transformers.utils import logging

from ..modeling import modeling_hf_moe
from ..modeling.configuration_hf_moe import DeepSeekMoEConfig, MixtralMoEConfig, MoEDecoderConfig
from ..outputs import atomic_output_dir, check_output_dir
from .safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointReader,
    ConversionError,
    ShardWriter,
    copy_side_files,
    parse_size,
    read_config_dict,
)

logger = logging.get_logger(__name__)

IMPORT_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek")
EXPORT_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe")
NATIVE_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
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


def _refuse(source: str, field: str, value, allowed: str) -> ConversionError:
    return ConversionError(f"{source}: `{field}`={value!r} is not supported: {allowed}")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _build_config(cls: type[PreTrainedConfig], what: str, **fields) -> PreTrainedConfig:
    """`cls(**fields)`, with validation errors turned into a one-line `ConversionError`."""
    try:
        return cls(**fields)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"{what}: {_one_line(error)}") from None


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


def _explicit_layer_fields(mlp_layer_types: list[str]) -> dict:
    """Our DeepSeek-family fields for a given sparse/dense pattern (explicit types + the equivalent rule if any)."""
    return {"mlp_layer_types": mlp_layer_types, **deepseek_layer_rule(mlp_layer_types)}


def _common_fields(native: PreTrainedConfig) -> dict:
    fields = {name: getattr(native, name) for name in COMMON_FIELDS}
    fields["rope_parameters"] = dict(native.rope_parameters)
    # Qwen2/3-MoE have no `head_dim` field but honour one found in config.json (getattr), as Mixtral does
    fields["head_dim"] = getattr(native, "head_dim", None)
    return fields


def _mixtral_to_ours(native: MixtralConfig) -> MixtralMoEConfig:
    if native.router_jitter_noise:
        logger.warning(f"mixtral: `router_jitter_noise`={native.router_jitter_noise} (training only) is kept, but "
                       f"hf_moe applies it to the router's input only, Mixtral to the experts' input as well.")
    return _build_config(
        MixtralMoEConfig, "mixtral config", **_common_fields(native),
        intermediate_size=native.intermediate_size, num_local_experts=native.num_local_experts,
        sliding_window=native.sliding_window, router_jitter_noise=native.router_jitter_noise,
        norm_topk_prob=True,  # MixtralTopKRouter always renormalises the top-k probabilities
    )


def _qwen2_sliding_window(native: Qwen2MoeConfig) -> int | None:
    """Our single `sliding_window` from Qwen2-MoE's per-layer `layer_types`."""
    kinds = set(native.layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return native.sliding_window
    raise _refuse("qwen2_moe", "layer_types", native.layer_types,
                  "hf_moe applies one sliding window to every layer (allowed: all 'full_attention' or all "
                  "'sliding_attention')")


def _qwen2_moe_to_ours(native: Qwen2MoeConfig) -> DeepSeekMoEConfig:
    layer_types = qwen_mlp_layer_types(native.num_hidden_layers, native.decoder_sparse_step, native.mlp_only_layers)
    return _build_config(
        DeepSeekMoEConfig, "qwen2_moe config", **_common_fields(native),
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.moe_intermediate_size,
        n_routed_experts=native.num_experts, n_shared_experts=1,
        shared_expert_intermediate_size=native.shared_expert_intermediate_size, shared_expert_gate=True,
        norm_topk_prob=native.norm_topk_prob, qkv_bias=native.qkv_bias, qk_norm=False,
        sliding_window=_qwen2_sliding_window(native), **_explicit_layer_fields(layer_types),
    )


def _qwen3_moe_to_ours(native: Qwen3MoeConfig) -> DeepSeekMoEConfig:
    if native.attention_bias:
        raise _refuse("qwen3_moe", "attention_bias", native.attention_bias,
                      "hf_moe has biases on q/k/v only, not on o_proj (allowed: False)")
    layer_types = qwen_mlp_layer_types(native.num_hidden_layers, native.decoder_sparse_step, native.mlp_only_layers)
    return _build_config(
        DeepSeekMoEConfig, "qwen3_moe config", **_common_fields(native),
        intermediate_size=native.intermediate_size, moe_intermediate_size=native.moe_intermediate_size,
        n_routed_experts=native.num_experts, n_shared_experts=0, norm_topk_prob=native.norm_topk_prob,
        qk_norm=True, qkv_bias=False, sliding_window=native.sliding_window, **_explicit_layer_fields(layer_types),
    )


def _deepseek_rope(fields: dict) -> dict:
    """rope_parameters from DeepSeek-MoE's legacy `rope_theta` / `rope_scaling` (None or linear)."""
    scaling = fields["rope_scaling"]
    if scaling is None:
        return {"rope_type": "default", "rope_theta": fields["rope_theta"]}
    scaling_type = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
    if scaling_type != "linear":
        raise _refuse("deepseek", "rope_scaling", scaling,
                      "only None or {'type': 'linear', 'factor': ...} convert exactly")
    return {"rope_type": "linear", "factor": scaling["factor"], "rope_theta": fields["rope_theta"]}


def _check_deepseek_supported(fields: dict) -> None:
    """Refuse the DeepSeek options that our model does not compute (other scoring, group routing, o_proj bias)."""
    for field, allowed in (("scoring_func", "softmax"), ("topk_method", "greedy"), ("attention_bias", False)):
        if fields[field] != allowed:
            raise _refuse("deepseek", field, fields[field], f"allowed: {allowed!r}")
    for field in ("n_routed_experts", "num_experts_per_tok"):
        if fields[field] is None:
            raise _refuse("deepseek", field, None, "must be set for an MoE model")
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
    return _build_config(
        DeepSeekMoEConfig, "deepseek config", **{name: fields[name] for name in passed},
        num_key_value_heads=fields["num_key_value_heads"] or fields["num_attention_heads"],
        n_shared_experts=fields["n_shared_experts"] or 0,
        # MoEGate renormalises only when top_k > 1: a single expert keeps its softmax probability
        norm_topk_prob=fields["norm_topk_prob"] and fields["num_experts_per_tok"] > 1,
        router_aux_loss_coef=fields["aux_loss_alpha"], rope_parameters=_deepseek_rope(fields),
        qk_norm=False, qkv_bias=False, shared_expert_gate=False,
    )


_NATIVE_TO_OURS: dict[str, tuple[type[PreTrainedConfig] | None, Callable]] = {
    "mixtral": (MixtralConfig, _mixtral_to_ours),
    "qwen2_moe": (Qwen2MoeConfig, _qwen2_moe_to_ours),
    "qwen3_moe": (Qwen3MoeConfig, _qwen3_moe_to_ours),
    "deepseek": (None, _deepseek_to_ours),  # remote code: no transformers class, read the dict directly
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
        raise ConversionError(f"invalid {fmt} config: {_one_line(error)}") from None
    return to_ours(native)


# ---------------------------------------------------------------------------------------------------------------
# Config mapping: ours -> native
# ---------------------------------------------------------------------------------------------------------------


def _default_head_dim(config: MoEDecoderConfig) -> int:
    return config.hidden_size // config.num_attention_heads


def _export_problems(config: MoEDecoderConfig, fmt: str) -> list[str]:
    """Every field of `config` that `fmt` cannot represent, as "`field`=value: why (allowed: ...)" strings."""
    checks = [
        ("routed_scaling_factor", config.routed_scaling_factor == 1.0,
         f"{fmt} routers do not scale the gate weights (allowed: 1.0)"),
        ("router_type", config.router_type == "token_choice", f"{fmt} routes by token choice (allowed: 'token_choice')"),
        ("scoring_func", config.scoring_func == "softmax", f"{fmt} routers use softmax scores (allowed: 'softmax')"),
        ("n_group", config.n_group == 1, f"{fmt} has no group-limited routing (allowed: 1)"),
        ("router_selection_bias", not config.router_selection_bias,
         f"{fmt} routers have no selection bias (allowed: False)"),
        ("noisy_gating", not config.noisy_gating, f"{fmt} routers have no noise projection (allowed: False)"),
        ("eval_capacity_factor", config.eval_capacity_factor is None,
         f"{fmt} never drops tokens at inference (allowed: None)"),
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
            ("head_dim", config.head_dim in (None, _default_head_dim(config)),
             (f"Qwen2MoeConfig has no head_dim field (allowed: None or hidden_size // num_attention_heads = "
             f"{_default_head_dim(config)})")),
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
    problems = _export_problems(config, fmt)
    if problems:
        hint = ""
        if any(p.startswith(("`routed_scaling_factor`", "`shared_expert_gate`")) for p in problems):
            hint = (f" (for a DeepSeek-style upcycle, run `hf-moe upcycle DENSE OUT --arch deepseek ... --format {fmt}` "
                    f"instead: it folds the routed scale into the expert weights"
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
    return _build_config(
        MixtralConfig, "mixtral export", **_native_common_fields(config, "mixtral"), head_dim=config.head_dim,
        intermediate_size=config.moe_intermediate_size, num_local_experts=config.num_experts,
        sliding_window=config.sliding_window, router_jitter_noise=config.router_jitter_noise,
    )


def _ours_to_qwen2_moe(config: MoEDecoderConfig) -> Qwen2MoeConfig:
    return _build_config(  # full attention only (see _export_problems)
        Qwen2MoeConfig, "qwen2_moe export", **_native_common_fields(config, "qwen2_moe"),
        intermediate_size=config.intermediate_size, moe_intermediate_size=config.moe_intermediate_size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size, num_experts=config.num_experts,
        norm_topk_prob=_native_norm_topk_prob(config, "qwen2_moe"), qkv_bias=config.qkv_bias,
        use_sliding_window=False,
        **_qwen_layer_fields(config),
    )


def _ours_to_qwen3_moe(config: MoEDecoderConfig) -> Qwen3MoeConfig:
    return _build_config(
        Qwen3MoeConfig, "qwen3_moe export", **_native_common_fields(config, "qwen3_moe"),
        head_dim=config.head_dim or _default_head_dim(config),
        intermediate_size=config.intermediate_size, moe_intermediate_size=config.moe_intermediate_size,
        num_experts=config.num_experts, norm_topk_prob=_native_norm_topk_prob(config, "qwen3_moe"),
        attention_bias=False,
        use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
        **_qwen_layer_fields(config),
    )


_OURS_TO_NATIVE = {"mixtral": _ours_to_mixtral, "qwen2_moe": _ours_to_qwen2_moe, "qwen3_moe": _ours_to_qwen3_moe}


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


LAYOUTS = {
    "mixtral": ExpertLayout("block_sparse_moe", ("w1", "w3", "w2"), None),
    "qwen2_moe": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_expert"),
    "qwen3_moe": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), None),
    "deepseek": ExpertLayout("mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts"),
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
    `gate_up_proj`), "down" (E per-expert down weights <-> `down_proj`).
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
        return tensors[0]

    def to_native(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Our tensor -> the native tensors, in `self.native` order."""
        if self.kind == "gate_up":
            gates, ups = split_gate_up(tensor)
            return gates + ups
        if self.kind == "down":
            return list(tensor.unbind(0))
        return [tensor]


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
    for layer_idx, kind in enumerate(config.mlp_layer_types):
        prefix = f"model.layers.{layer_idx}."
        shapes.update(_attention_shapes(config, prefix + "self_attn."))
        mlp_shapes = _sparse_mlp_shapes(config) if kind == "sparse" else _mlp_shapes(hidden, config.intermediate_size)
        shapes.update({f"{prefix}mlp.{name}": shape for name, shape in mlp_shapes.items()})
        shapes[prefix + "input_layernorm.weight"] = (hidden,)
        shapes[prefix + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def parameter_counts(config: MoEDecoderConfig, names: Iterable[str] | None = None) -> tuple[int, int]:
    """(total, active per token) parameters of our model for `config`, over the state-dict `names` (default: all
    of them, a tied head counted once). A token runs k of the E routed experts of each sparse layer."""
    shapes = our_tensor_shapes(config)
    if names is None:
        names = [name for name in shapes if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    total = sum(math.prod(shapes[name]) for name in names)
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    idle_experts = config.num_experts - config.num_experts_per_tok if config.num_sparse_layers else 0
    return total, total - config.num_sparse_layers * idle_experts * expert


def _attention_shapes(config: MoEDecoderConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    head_dim = config.head_dim or _default_head_dim(config)
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        "q_proj.weight": (q_width, config.hidden_size),
        "k_proj.weight": (kv_width, config.hidden_size),
        "v_proj.weight": (kv_width, config.hidden_size),
        "o_proj.weight": (config.hidden_size, q_width),
    }
    if config.qkv_bias:
        shapes.update({"q_proj.bias": (q_width,), "k_proj.bias": (kv_width,), "v_proj.bias": (kv_width,)})
    if config.qk_norm:
        shapes.update({"q_norm.weight": (head_dim,), "k_norm.weight": (head_dim,)})
    return {prefix + name: shape for name, shape in shapes.items()}


def _mlp_shapes(hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {"gate_proj.weight": (width, hidden), "up_proj.weight": (width, hidden), "down_proj.weight": (hidden, width)}


def _sparse_mlp_shapes(config: MoEDecoderConfig) -> dict[str, tuple[int, ...]]:
    hidden, experts, width = config.hidden_size, config.num_experts, config.moe_intermediate_size
    shapes = {
        "gate.weight": (experts, hidden),
        "experts.gate_up_proj": (experts, 2 * width, hidden),
        "experts.down_proj": (experts, hidden, width),
    }
    if config.n_shared_experts > 0:
        shared = _mlp_shapes(hidden, config.shared_expert_intermediate_size)
        shapes.update({f"shared_experts.{name}": shape for name, shape in shared.items()})
    if config.shared_expert_gate:
        shapes["shared_expert_gate.weight"] = (1, hidden)
    return shapes


# our keys that live in a sparse layer's MoE block: router, routed experts, shared experts and their gate
_SPARSE_KEY = re.compile(
    r"(model\.layers\.\d+\.)mlp\.(gate\.weight|experts\..+|shared_experts\..+|shared_expert_gate\..+)"
)


def tensor_mapping(name: str, layout: ExpertLayout, num_experts: int) -> TensorMapping:
    """How our tensor `name` is stored in a native format with `layout` (see the module docstring)."""
    match = _SPARSE_KEY.fullmatch(name)
    if match is None:  # embeddings, attention, norms, dense MLPs, lm_head: same name everywhere
        return TensorMapping(name, (name,))
    layer_prefix, rest = match.groups()
    moe = f"{layer_prefix}{layout.moe_prefix}."
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


def _layer_of(name: str) -> int:
    """Layer index of a key, -1 for the tensors outside the decoder layers."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def group_by_layer(plan: list[TensorMapping]) -> list[list[TensorMapping]]:
    """The plan split into the non-layer tensors (first) and one group per decoder layer, in order."""
    groups: dict[int, list[TensorMapping]] = {}
    for mapping in plan:
        groups.setdefault(_layer_of(mapping.ours), []).append(mapping)
    return [groups[key] for key in sorted(groups)]


# ---------------------------------------------------------------------------------------------------------------
# Plan checks: names and shapes, before anything is written
# ---------------------------------------------------------------------------------------------------------------


def drop_absent_tied_head(plan: list[TensorMapping], config: MoEDecoderConfig,
                          reader: CheckpointReader) -> list[TensorMapping]:
    """With tied embeddings a checkpoint may omit `lm_head.weight` (same name in every format): drop it then."""
    if config.tie_word_embeddings and "lm_head.weight" not in reader:
        return [mapping for mapping in plan if mapping.ours != "lm_head.weight"]
    return plan


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


def check_import_shapes(plan: list[TensorMapping], reader: CheckpointReader, config: MoEDecoderConfig) -> None:
    """Run every mapping on meta tensors (no data read) and compare with the shapes our model expects."""
    expected = our_tensor_shapes(config)
    for mapping in plan:
        sources = [reader.meta(name) for name in mapping.native]
        if len({tensor.dtype for tensor in sources}) > 1:
            raise ConversionError(f"the tensors fused into {mapping.ours} have different dtypes")
        shape = tuple(mapping.to_ours(sources).shape)
        if shape != expected[mapping.ours]:
            raise ConversionError(
                f"{mapping.native[0]}{' (and its siblings)' if len(mapping.native) > 1 else ''} gives "
                f"{mapping.ours} the shape {shape}, but the config implies {expected[mapping.ours]}"
            )


def check_export_shapes(plan: list[TensorMapping], reader: CheckpointReader, config: MoEDecoderConfig) -> None:
    """Compare the shape of every tensor of our checkpoint with the one its config implies."""
    expected = our_tensor_shapes(config)
    for mapping in plan:
        shape = reader.shape(mapping.ours)
        if shape != expected[mapping.ours]:
            raise ConversionError(
                f"{mapping.ours} has the shape {shape}, but its config implies {expected[mapping.ours]}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Streaming and output folders
# ---------------------------------------------------------------------------------------------------------------


def _stream(plan: list[TensorMapping], reader: CheckpointReader, writer: ShardWriter, to_native: bool, desc: str):
    """Convert and write the plan one layer at a time: at most one layer's tensors are held besides the shard."""
    for group in tqdm(group_by_layer(plan), desc=desc, unit="layer", disable=None):
        for mapping in group:
            if to_native:
                tensor = _engine_safe(mapping.ours, reader)
                for name, part in zip(mapping.native, mapping.to_native(tensor), strict=True):
                    writer.add(name, part)
            else:
                writer.add(mapping.ours, mapping.to_ours([reader.get(name) for name in mapping.native]))


def _engine_safe(name: str, reader: CheckpointReader) -> torch.Tensor:
    """Our tensor `name` as an export writes it: a tied head absent from the checkpoint is the embeddings (only
    exported for the formats that need `lm_head.weight`), and an all-zero shared-expert gate becomes
    `constant_shared_gate` (the same gate, 1/2, without llama.cpp's 0/0)."""
    if name == "lm_head.weight" and name not in reader:
        return reader.get("model.embed_tokens.weight").clone()
    tensor = reader.get(name)
    if name.endswith(".mlp.shared_expert_gate.weight") and not tensor.any():
        layer_prefix = name.removesuffix("mlp.shared_expert_gate.weight")
        tensor = constant_shared_gate(reader.get(layer_prefix + "post_attention_layernorm.weight"), tensor.dtype)
    return tensor


def _dtype_name(dtype: torch.dtype) -> str:
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


def _ensure_generation_config(folder: Path, config: PreTrainedConfig) -> None:
    """Write generation_config.json from the model config (as save_pretrained does) unless the source had one."""
    if not (folder / "generation_config.json").exists():
        GenerationConfig.from_model_config(config).save_pretrained(folder)


def _remote_code_files(config_dict: dict) -> set[str]:
    """The model-code files a source config's `auto_map` points at (stale once the weights are converted)."""
    references = []
    for value in (config_dict.get("auto_map") or {}).values():
        references.extend(value if isinstance(value, (list, tuple)) else [value])
    return {f"{reference.split('--')[-1].split('.')[0]}.py" for reference in references if reference}


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise ConversionError(f"SRC {src} is not a folder: expected a checkpoint folder (config.json + weights)")
    check_output_dir(out, overwrite, sources=[src])


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------


def _verify_and_describe(src: Path, folder: Path, check: bool, command: str, verbose: bool = True,
                         **record) -> None:
    """conversion.yaml; with `check`, the logits against SRC's (exact: relative error <= 1e-5, else
    VerificationError and nothing is published), printed as `verification: ...` when `verbose` (as `upcycle` does),
    verification.json, and when both models fit in memory the expert load on the verification prompts; then the
    model card."""
    from ..cards import conversion_heatmap, record_conversion, write_card
    from .verify import (
        DEFAULT_TOLERANCE,
        VerificationError,
        format_report,
        verification_prompts,
        verify,
        write_verification,
    )

    record_conversion(folder, command, src=str(src), **record)
    if check:
        report = verify(src, folder, tolerance=DEFAULT_TOLERANCE)
        # verify() names its sides after upcycling (dense -> moe); here both are MoE checkpoints: name the roles
        report["source_class"], report["converted_class"] = report["dense_class"], report["moe_class"]
        if verbose:
            print(f"verification: {format_report(report)}")
        else:
            logger.info(f"verification: {format_report(report)}")
        if not report["passed"]:
            raise VerificationError(f"the {command}ed checkpoint should compute what {src} computes, but "
                                    f"{format_report(report)}; nothing was written")
        write_verification(report, folder)
        if report["mode"] == "full":
            prompts, description = verification_prompts(src, read_config_dict(src)["vocab_size"])
            conversion_heatmap(folder, prompts, f"the verification prompts: {description}")
    write_card(folder, "native")


def import_native(
    src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, verify: bool = True, verbose: bool = True,
) -> Path:
    """Convert the native checkpoint folder `src` (mixtral, qwen2_moe, qwen3_moe or deepseek) to our format in `out`.

    Writes our fused weights (shards of at most `max_shard_size`), config.json, generation_config.json, the flat
    modeling files for `trust_remote_code`, copies the other non-weight files (tokenizer, ...), and writes the
    model card. With `verify`, the logits are compared with the source's first (not for the deepseek layout, whose
    remote code hf-moe does not run), printed when `verbose`, and recorded in verification.json. Raises
    `ConversionError` (before writing
    anything) when the source is not convertible, `FileExistsError` when `out` exists and `overwrite` is False.
    Returns `out`.
    """
    src, out = Path(src), Path(out)
    _check_paths(src, out, overwrite)
    parse_size(max_shard_size)
    source_config = read_config_dict(src)
    fmt = source_format(source_config)
    config = native_config_to_ours(source_config)
    with CheckpointReader(src) as reader:
        plan = drop_absent_tied_head(tensor_plan(config, fmt), config, reader)
        check_names([name for mapping in plan for name in mapping.native], reader.keys(), f"the {fmt} checkpoint {src}")
        check_import_shapes(plan, reader, config)
        config.dtype = _dtype_name(reader.dtype("model.embed_tokens.weight"))
        with atomic_output_dir(out, "import", overwrite=overwrite, sources=[src]) as folder:
            writer = ShardWriter(folder, max_shard_size)
            _stream(plan, reader, writer, to_native=False, desc=f"import {fmt}")
            writer.finish()
            save_our_config(config, folder)
            copy_side_files(src, folder, exclude={"config.json", *_remote_code_files(source_config)})
            _ensure_generation_config(folder, config)
            _verify_and_describe(src, folder, verify and fmt != "deepseek", "import", verbose=verbose,
                                 source_format=fmt, max_shard_size=max_shard_size, verify=verify)
    logger.info(f"imported {fmt} checkpoint {src} as {config.model_type} in {out}")
    return out


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
        raise ConversionError(f"invalid {model_type} config in {src}: {_one_line(error)}") from None


def export_native(
    src: str | os.PathLike, out: str | os.PathLike, format: str, overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, verify: bool = True, verbose: bool = True,
) -> Path:
    """Convert our checkpoint folder `src` to the native `format` (mixtral, qwen2_moe or qwen3_moe) in `out`.

    Writes per-expert weights under the names the format's native loaders expect, the native config.json,
    generation_config.json, copies the other non-weight files (tokenizer, ...) but not our modeling files, and
    writes the model card. The layout is the one serving engines read (see the module docstring: an untied head for
    qwen2_moe, no zero shared-expert gate); what llama.cpp would still compute differently is logged as a warning
    and recorded as `engine_warnings` in conversion.yaml. With `verify`, the logits are compared with the source's
    first, printed when `verbose`, and recorded. Raises `ConversionError` (before writing anything) when our config
    is not representable in `format`, `FileExistsError` when `out` exists and `overwrite` is False. Returns `out`.
    """
    src, out = Path(src), Path(out)
    _check_paths(src, out, overwrite)
    parse_size(max_shard_size)
    config = load_our_config(src)
    native_config = ours_to_native_config(config, format)
    warnings = engine_warnings(config, native_config)
    with CheckpointReader(src) as reader:
        plan = tensor_plan(config, format)
        if native_config.tie_word_embeddings or not config.tie_word_embeddings:
            plan = drop_absent_tied_head(plan, config, reader)
        present = [mapping.ours for mapping in plan if mapping.ours != "lm_head.weight" or "lm_head.weight" in reader]
        check_names(present, reader.keys(), f"the {config.model_type} checkpoint {src}")
        check_export_shapes([mapping for mapping in plan if mapping.ours in present], reader, config)
        native_config.dtype = _dtype_name(reader.dtype("model.embed_tokens.weight"))
        with atomic_output_dir(out, "export", overwrite=overwrite, sources=[src]) as folder:
            writer = ShardWriter(folder, max_shard_size)
            _stream(plan, reader, writer, to_native=True, desc=f"export {format}")
            writer.finish()
            content = json.dumps(native_config_dict(native_config), indent=2) + "\n"
            (folder / "config.json").write_text(content, encoding="utf-8")
            copy_side_files(src, folder, exclude={"config.json", *our_model_code_files()})
            _ensure_generation_config(folder, native_config)
            for warning in warnings:
                logger.warning(warning)
            extra = {"engine_warnings": warnings} if warnings else {}
            _verify_and_describe(src, folder, verify, "export", verbose=verbose, format=format,
                                 max_shard_size=max_shard_size, verify=verify, **extra)
    logger.info(f"exported {config.model_type} checkpoint {src} as {format} in {out}")
    return out
