# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Configurations of the two hf-moe decoder families.

`MixtralMoEConfig` and `DeepSeekMoEConfig` describe points of one design space and are read by one modeling
implementation (`modeling_hf_moe.py`). They differ in defaults and in the fields they expose:

- Mixtral-style: every layer is sparse, experts have the width `intermediate_size`, no shared experts.
- DeepSeekMoE-style: fine-grained experts of width `moe_intermediate_size`, `n_shared_experts` always-on shared
  experts (optionally gated, as Qwen2-MoE), dense layers chosen by `first_k_dense_replace` / `moe_layer_freq`
  (or an explicit `mlp_layer_types`), optional q/k RMSNorm and q/k/v biases, and the options that hold OLMoE,
  GLM-4.5 and gpt-oss exactly (whole-projection q/k norm, q/k/v clipping, o_proj bias, attention sinks, router and
  expert biases, gpt-oss's clamped SwiGLU).

The fields that one family does not expose are `FixedField`s of that family (read-only attributes whose error says
what to set instead), so the modeling code reads the same attribute names from both.

This file is copied next to every saved checkpoint (remote code): it imports public transformers helpers and, with a
single-dot import, the routing constants of `routing.py`; nothing from hf_moe outside this folder.
"""

import difflib
import math
from dataclasses import dataclass, field, fields

# First: under a transformers older than the saved copies of these files support, importing it raises an ImportError
# that names both versions, before an import or a class below fails less clearly.
from .transformers_compat import MIN_TRANSFORMERS_VERSION  # noqa: F401

# isort: split
from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.utils import logging

from .routing import ROUTER_TYPES, SCORING_FUNCS

logger = logging.get_logger(__name__)

MLP_LAYER_TYPES = ("sparse", "dense")
# What a "sparse" layer is (`moe_block_type`): routed = a router picks experts per token (routing.py); soft_moe =
# Soft MoE slots (Puigcerver et al. 2023, not causal); soft_merging = per-token soft merging of the experts' weights
# (causal). See MoESoftBlock and MoESoftMergingBlock in modeling_hf_moe.py.
MOE_BLOCK_TYPES = ("routed", "soft_moe", "soft_merging")
# The sub-blocks of a `block_layout` layer (Brainformer, Zhou et al. 2023: attention 'a', dense FFN 'f', sparsely
# gated FFN 'g'), each a pre-norm residual x + f(norm(x)): attention (the attention of `attention_type`, with attention
# experts if set); dense = a SwiGLU MLP of width `intermediate_size`; moe = the sparse block of `moe_block_type`.
BLOCK_TYPES = ("attention", "dense", "moe")
# Brainformer block #1 (Zhou et al. 2023, Fig. 8): 8 sub-layers, 2 attention, 3 sparse, 3 dense. The counts and
# kinds are the paper's text (8 sub-layers, fewer attention layers than a Transformer's); the order is read from its
# figure, which the text does not spell out (the paper finds quality insensitive to the order, not to the ratio).
BRAINFORMER_BLOCK = ["attention", "moe", "dense", "attention", "moe", "dense", "moe", "dense"]
ATTENTION_TYPES = ("gqa", "mla")  # grouped-query (MHA and MQA included) / multi-head latent attention (DeepSeek-V2)
# The fields that only multi-head latent attention reads: None unless attention_type="mla".
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")
# per_head: RMSNorm over each head of q and k (Qwen3-MoE, GLM-4.5); whole_projection: over all of q_proj's and
# k_proj's outputs at once, before the split into heads (OLMoE)
QK_NORM_TYPES = ("per_head", "whole_projection")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names, per layer (`layer_types`)
# glu: act(gate) * up with `hidden_act`; clamped_swiglu (gpt-oss): (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha
# * g) with g = clamp(gate, max=limit)
EXPERTS_ACTIVATIONS = ("glu", "clamped_swiglu")
CLAMPED_SWIGLU_DEFAULTS = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}  # gpt-oss (transformers' GptOssConfig)
MIN_RMS_NORM_EPS = 1e-20  # see check_fields; usual values are 1e-5 to 1e-6, BERT's LayerNorm uses 1e-12
_USE_DEEPSEEK_FOR_SHARED_EXPERTS = ("use DeepSeekMoEConfig for shared experts (n_shared_experts, "
                                    "shared_expert_intermediate_size, shared_expert_gate)")
_USE_DEEPSEEK_FOR_MLA = "use DeepSeekMoEConfig(attention_type='mla', ...) for multi-head latent attention"


def _use_deepseek_for(setting: str) -> str:
    return f"use DeepSeekMoEConfig({setting}) for it"


def mlp_layer_types_of(block_layout: list[list[str]]) -> list[str]:
    """What `mlp_layer_types` says of a `block_layout`: 'sparse' for a layer with a 'moe' sub-block, else 'dense'."""
    return ["sparse" if "moe" in layer else "dense" for layer in block_layout]

# Tensor-parallel rules, grouped by the modules they shard; keys are relative to the base model. The router
# (`mlp.gate`) has no rule: it stays replicated, so every rank routes every token the same way.
_ATTENTION_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}
# MLA (transformers' DeepseekV3 plan): q_a_proj and the latent norms stay replicated; `mla_kv_a_proj` sums the
# gradient of the shared rotary key, which bypasses the colwise kv_b_proj. The q projection is added per config.
_MLA_TP_PLAN = {
    "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
    "layers.*.self_attn.kv_b_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
}
# Per-head norms between a colwise and a rowwise projection see only this rank's heads: their weight gradients
# are partial and must be summed over the ranks.
_QK_NORM_TP_PLAN = {
    "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
    "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
}
# A norm over the whole q/k projection needs every head's columns: the projections gather their output (OLMoE's plan)
_WHOLE_PROJECTION_NORM_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise_gather_output",
    "layers.*.self_attn.k_proj": "colwise_gather_output",
    "layers.*.self_attn.v_proj": "colwise_gather_output",
    "layers.*.self_attn.o_proj": "rowwise_split_input",
}
_EXPERTS_TP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",  # [E, 2I, H], [gate; up] along dim 1
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
}
_SHARED_EXPERTS_TP_PLAN = {
    "layers.*.mlp.shared_experts.gate_proj": "colwise",
    "layers.*.mlp.shared_experts.up_proj": "colwise",
    "layers.*.mlp.shared_experts.down_proj": "rowwise",
}
_DENSE_MLP_TP_PLAN = {
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}
_EP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
    "layers.*.mlp.experts.down_proj": "grouped_gemm",
    "layers.*.mlp.experts": "ep_dispatch_experts",
}
# expert biases are sharded by expert with their weights (transformers' gpt-oss plan)
_EXPERT_BIAS_EP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
    "layers.*.mlp.experts.gate_up_proj_bias": "grouped_gemm",
    "layers.*.mlp.experts.down_proj": "grouped_gemm",
    "layers.*.mlp.experts.down_proj_bias": "grouped_gemm",
    "layers.*.mlp.experts": "ep_dispatch_experts",
}
# attention sinks [nH] are sharded by head with q/k/v; the attention then runs on its local slices (as transformers'
# granite_swa plan)
_SINKS_TP_PLAN = {
    "layers.*.self_attn.sinks": "colwise",
    "layers.*.self_attn": "local_params",
}
_PP_PLAN = {
    "embed_tokens": (["input_ids"], ["inputs_embeds"]),
    "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
    "norm": (["hidden_states"], ["hidden_states"]),
}


def remote_code_auto_map(family: str) -> dict[str, str]:
    """`auto_map` entries for every Auto class, pointing at the flat files saved next to a checkpoint."""
    return {
        "AutoConfig": f"configuration_hf_moe.{family}Config",
        "AutoModel": f"modeling_hf_moe.{family}Model",
        "AutoModelForCausalLM": f"modeling_hf_moe.{family}ForCausalLM",
        "AutoModelForSequenceClassification": f"modeling_hf_moe.{family}ForSequenceClassification",
        "AutoModelForTokenClassification": f"modeling_hf_moe.{family}ForTokenClassification",
        "AutoModelForQuestionAnswering": f"modeling_hf_moe.{family}ForQuestionAnswering",
    }


def _check(condition: bool, field: str, value, allowed: str) -> None:
    """Raise a ValueError that names the field, the value it got and what is allowed."""
    if not condition:
        raise ValueError(f"`{field}`={value!r} is invalid: {allowed}.")


def _check_number(field: str, value, *, above=None, at_least=None, below=None, none_means: str | None = None,
                  why: str | None = None):
    """`_check` that `value` is a finite real number (inf and nan are not) with value > `above`, >= `at_least` and
    < `below` (each bound optional); None is allowed too when `none_means` says what None stands for. `why` explains
    a bound in the error."""
    if value is None and none_means is not None:
        return
    bounds = " and ".join(f"{op} {bound}" for op, bound in ((">", above), (">=", at_least), ("<", below))
                          if bound is not None)
    or_none = f"None ({none_means}) or " if none_means is not None else ""
    allowed = f"must be {or_none}a finite number {bounds}".strip() + (f" ({why})" if why is not None else "")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    _check(
        is_number and (above is None or value > above) and (at_least is None or value >= at_least)
        and (below is None or value < below),
        field, value, allowed,
    )


class FixedField:
    """A field of the shared design space that a family fixes (a read-only attribute). Setting it to its fixed
    value is a no-op, so configs that spell it out still load; any other value raises a ValueError saying what to
    set instead, by constructor keyword and by attribute assignment alike.

    `value` is a constant or a function of the config; `fixed_to` describes it when it is derived."""

    def __init__(self, value, instead: str, fixed_to: str | None = None):
        self.value, self.instead, self.fixed_to = value, instead, fixed_to

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, config, owner=None):
        if config is None:
            return self
        return self.value(config) if callable(self.value) else self.value

    def __set__(self, config, value):
        fixed = self.__get__(config)
        fixed_to = f"{self.fixed_to} (={fixed!r})" if self.fixed_to else repr(fixed)
        _check(value == fixed, self.name, value, f"{type(config).__name__} fixes {self.name} to {fixed_to}; "
                                                 f"{self.instead}")


# Keys that transformers' PreTrainedConfig reads from the constructor's keyword arguments, besides the fields.
_TRANSFORMERS_KWARGS = {"torch_dtype", "rope_scaling", "rope_theta", "partial_rotary_factor",
                        "original_max_position_embeddings", "num_labels", "name_or_path", "attn_implementation",
                        "experts_implementation", "output_attentions", "per_layer_config"}


def check_unknown_fields(config_class: type, kwargs, strict: bool = False) -> None:
    """Catch misspelt field names: for each key of `kwargs` that is not a field of `config_class` (nor an alias of
    `attribute_map`) but is close to one (`difflib.get_close_matches`, a typo), warn naming both, or raise a
    ValueError when `strict`. Other unknown keys pass silently, so configs saved by other tools still load (their
    extra keys, private `_...` keys and special-token ids `*_token_id` of other models included)."""
    known = config_field_names(config_class)
    for key in kwargs:
        if key in known or key in _TRANSFORMERS_KWARGS or key.startswith("_") or key.endswith("_token_id"):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if not close:
            continue
        problem = f"not a field of {config_class.__name__} (did you mean `{close[0]}`?)"
        _check(not strict, key, kwargs[key], problem)
        logger.warning(f"`{key}`={kwargs[key]!r} has no effect: {problem}.")


def config_field_names(config_class: type) -> set[str]:
    """Every name a config of `config_class` accepts as a field: dataclass fields, `attribute_map` aliases and the
    fields the family fixes (`FixedField`)."""
    fixed = {name for klass in config_class.__mro__ for name, value in vars(klass).items()
             if isinstance(value, FixedField)}
    return {f.name for f in fields(config_class)} | set(config_class.attribute_map) | fixed


class MoEDecoderConfig(PreTrainedConfig):
    """Fields and validation shared by both families (not registered as a model type of its own)."""

    base_model_pp_plan = _PP_PLAN

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float | int = 0.0
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    # routing (see routing.TopKRouter and the README's table)
    router_type: str = "token_choice"
    scoring_func: str = "softmax"
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    router_selection_bias: bool = False
    router_in_fp32: bool = False
    router_jitter_noise: float = 0.0
    noisy_gating: bool = False
    random_routing: bool = False
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    dispatch_groups: int = 1
    num_null_experts: int = 0  # AdaMoE (Zeng et al. 2024): zero-output experts the top-k may choose
    # balancing: each loss has its own coefficient; several can be on at once
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    aux_loss_per_layer: bool = False
    router_z_loss_coef: float = 0.0
    router_importance_loss_coef: float = 0.0
    router_load_loss_coef: float = 0.0
    expert_balance_loss_coef: float = 0.0
    device_balance_loss_coef: float = 0.0
    num_device_groups: int = 1
    sequence_balance_loss_coef: float = 0.0
    router_bias_update_rate: float = 0.0
    # the kind of sparse block (MOE_BLOCK_TYPES); Soft MoE's slots per expert (None unless moe_block_type="soft_moe")
    moe_block_type: str = "routed"
    num_slots: int | None = None
    # Mixture-of-Depths (Raposo et al. 2024): fraction of each sequence that a routed layer processes (None = off),
    # the routed layers (None = every other layer from layer 1) and the weight of the router's BCE loss
    mod_capacity: float | int | None = None
    mod_layers: list[int] | None = None
    mod_aux_loss_coef: float | int = 0.01
    # attention experts (JetMoE's mixture of attention heads): experts per layer (None = one dense attention), experts
    # per token, and the weights of their routers' Switch loss and z-loss
    num_attention_experts: int | None = None
    num_attention_experts_per_tok: int | None = None
    attention_router_aux_loss_coef: float | int = 0.01
    attention_router_z_loss_coef: float | int = 0.0
    # heterogeneous layouts (Brainformer, Zhou et al. 2023): each layer's sub-blocks in order (BLOCK_TYPES), one list
    # per layer or one list for every layer; None = attention, then the feed-forward that `mlp_layer_types` says
    block_layout: list[list[str]] | list[str] | None = None

    def __post_init__(self, **kwargs):
        # `kwargs` holds every keyword that is not a dataclass field; transformers keeps them as attributes
        check_unknown_fields(type(self), kwargs, strict=False)
        self.expand_block_layout()
        if self.moe_block_type == "soft_moe" and self.num_slots is None:
            self.num_slots = 1  # Soft MoE's default: one slot per expert
        if self.mod_capacity is not None and self.mod_layers is None:  # the paper routes every other block
            self.mod_layers = list(range(1, self.num_hidden_layers, 2))
        if self.num_attention_experts is not None and self.num_attention_experts_per_tok is None:
            self.num_attention_experts_per_tok = 1 if self.num_attention_experts == 1 else 2  # JetMoE: top-2
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.check_fields()
        if self.head_dim is None:  # explicit, so that every RoPE initialiser (yarn, longrope, ...) reads it
            # MLA rotates qk_rope_head_dim dimensions of each head: the RoPE initialisers' `head_dim`, as transformers'
            # DeepseekV3Config sets it
            self.head_dim = (self.qk_rope_head_dim if self.attention_type == "mla"
                             else self.hidden_size // self.num_attention_heads)
        # transformers writes only the saved object's own Auto class into `auto_map`; a folder must load as any head
        family = type(self).__name__.removesuffix("Config")
        self.auto_map = {**remote_code_auto_map(family), **(getattr(self, "auto_map", None) or {})}

    def check_fields(self) -> None:
        """Validate every field; raises `ValueError` naming the field, its value and what is allowed."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "num_experts", "moe_intermediate_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, name, value, "must be a positive integer")
        _check(self.pad_token_id is None or (isinstance(self.pad_token_id, int) and
                                             0 <= self.pad_token_id < self.vocab_size),
               "pad_token_id", self.pad_token_id, f"must be None or a token id in [0, vocab_size={self.vocab_size})")
        self.check_attention_fields()
        self.check_attention_experts_fields()
        _check(self.hidden_act in ACT2FN, "hidden_act", self.hidden_act, f"allowed: {sorted(ACT2FN)}")
        _check_number("rms_norm_eps", self.rms_norm_eps, at_least=MIN_RMS_NORM_EPS,
                      why="the RMSNorm gradient at an all-zero hidden state, e.g. at padding (the padding embedding "
                          "is zero), grows as eps^-1.5 and overflows float32 to NaN below about 2e-26")
        _check_number("initializer_range", self.initializer_range, at_least=0)
        _check_number("attention_dropout", self.attention_dropout, at_least=0, below=1)
        _check(
            self.sliding_window is None or self.sliding_window > 0, "sliding_window", self.sliding_window,
            "must be None (full attention) or a positive number of tokens",
        )
        self.check_block_layout()
        self.check_layer_types()
        self.check_rope_parameters()
        self.check_null_expert_fields()
        choosable = self.num_experts + self.num_null_experts
        _check(
            1 <= self.num_experts_per_tok <= choosable, "num_experts_per_tok", self.num_experts_per_tok,
            f"must be between 1 and num_experts={self.num_experts}" + (
                f" + num_null_experts={self.num_null_experts}" if self.num_null_experts else ""),
        )
        _check_number("routed_scaling_factor", self.routed_scaling_factor, above=0)
        self.check_routing_fields()
        self.check_soft_block_fields()
        self.check_depth_fields()
        self.check_experts_fields()
        _check(self.n_shared_experts >= 0, "n_shared_experts", self.n_shared_experts, "must be >= 0")
        if self.n_shared_experts > 0:
            _check(
                self.shared_expert_intermediate_size > 0, "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size, "must be > 0 when n_shared_experts > 0",
            )
        _check(
            not self.shared_expert_gate or self.n_shared_experts > 0, "shared_expert_gate", self.shared_expert_gate,
            "can only be True when n_shared_experts > 0",
        )
        _check(
            isinstance(self.mlp_layer_types, list) and len(self.mlp_layer_types) == self.num_hidden_layers,
            "mlp_layer_types", self.mlp_layer_types, f"must be a list of num_hidden_layers={self.num_hidden_layers} "
            f"entries",
        )
        for layer_type in self.mlp_layer_types:
            _check(layer_type in MLP_LAYER_TYPES, "mlp_layer_types", self.mlp_layer_types,
                   f"entries must be one of {MLP_LAYER_TYPES}")

    def check_attention_fields(self) -> None:
        """Grouped-query attention: head_dim, heads and key-value heads. Multi-head latent attention: its ranks and
        head dims (`check_mla_fields`). The fields of the other attention type must stay None."""
        _check(self.attention_type in ATTENTION_TYPES, "attention_type", self.attention_type,
               f"allowed: {ATTENTION_TYPES}")
        if self.attention_type == "mla":
            self.check_mla_fields()
            return
        for name in MLA_FIELDS:
            _check(getattr(self, name) is None, name, getattr(self, name),
                   "only multi-head latent attention reads it: set attention_type='mla', or leave it None")
        _check(self.head_dim is None or self.head_dim > 0, "head_dim", self.head_dim, "must be None or > 0")
        if self.head_dim is None:
            _check(
                self.hidden_size % self.num_attention_heads == 0, "num_attention_heads", self.num_attention_heads,
                f"must divide hidden_size={self.hidden_size} (or set head_dim explicitly)",
            )
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        _check(head_dim % 2 == 0, "head_dim", self.head_dim,
               f"RoPE rotates pairs of dimensions, so the head dimension ({head_dim}, hidden_size // "
               f"num_attention_heads when head_dim is None) must be even")
        _check(
            self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
            self.num_key_value_heads, f"must divide num_attention_heads={self.num_attention_heads}",
        )
        _check(self.qk_norm_type in QK_NORM_TYPES, "qk_norm_type", self.qk_norm_type, f"allowed: {QK_NORM_TYPES}")
        _check(self.qk_norm or self.qk_norm_type == "per_head", "qk_norm_type", self.qk_norm_type,
               "only q/k RMSNorm reads it: set qk_norm=True, or leave it 'per_head'")
        _check_number("clip_qkv", self.clip_qkv, above=0, none_means="no clipping")

    def check_attention_experts_fields(self) -> None:
        """Attention experts: a positive expert count, 1 <= experts per token <= experts, non-negative loss
        coefficients, and grouped-query attention without the options that belong to one dense query projection
        (q/k/v biases, attention sinks)."""
        for name in ("attention_router_aux_loss_coef", "attention_router_z_loss_coef"):
            _check_number(name, getattr(self, name), at_least=0)
        num_experts, top_k = self.num_attention_experts, self.num_attention_experts_per_tok
        if num_experts is None:
            _check(top_k is None, "num_attention_experts_per_tok", top_k,
                   "only read with num_attention_experts (attention experts): set that, or leave it None")
            return
        _check(isinstance(num_experts, int) and not isinstance(num_experts, bool) and num_experts >= 1,
               "num_attention_experts", num_experts,
               "must be None (one dense attention per layer) or a positive integer (JetMoE: 8)")
        _check(isinstance(top_k, int) and not isinstance(top_k, bool) and 1 <= top_k <= num_experts,
               "num_attention_experts_per_tok", top_k,
               f"must be an integer between 1 and num_attention_experts={num_experts} (JetMoE: 2)")
        _check(self.attention_type == "gqa", "attention_type", self.attention_type,
               "attention experts share grouped-query keys and values (allowed: 'gqa')")
        _check(not self.qkv_bias, "qkv_bias", self.qkv_bias,
               "the attention experts' query projections have no bias (allowed: False; o_proj_bias adds one output "
               "bias shared by the experts)")
        _check(not self.attention_sinks, "attention_sinks", self.attention_sinks,
               "not available with attention experts (allowed: False)")

    def check_mla_fields(self) -> None:
        """Multi-head latent attention (DeepSeek-V2): positive ranks and head dims, an even rotary dim, one key and
        value per query head, and none of the grouped-query options."""
        for name, published in (("kv_lora_rank", 512), ("qk_nope_head_dim", 128), ("qk_rope_head_dim", 64),
                                ("v_head_dim", 128)):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                   f"must be a positive integer with attention_type='mla' (DeepSeek-V2/V3: {published})")
        _check(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and not isinstance(self.q_lora_rank, bool)
                                            and self.q_lora_rank > 0),
               "q_lora_rank", self.q_lora_rank,
               "must be None (a full-rank q_proj, as DeepSeek-V2-Lite) or a positive integer (DeepSeek-V2/V3: 1536)")
        _check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
               "RoPE rotates pairs of dimensions, so it must be even")
        _check(self.head_dim in (None, self.qk_rope_head_dim), "head_dim", self.head_dim,
               f"with attention_type='mla' head_dim is the rotary dimension, qk_rope_head_dim="
               f"{self.qk_rope_head_dim} (as in transformers' DeepseekV3Config): leave it None")
        _check(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads", self.num_key_value_heads,
               f"must equal num_attention_heads={self.num_attention_heads} (or be None) with attention_type='mla': "
               f"every head up-projects its own key and value from the shared latent")
        _check(isinstance(self.rope_interleave, bool), "rope_interleave", self.rope_interleave,
               "must be True (rotary dims stored as interleaved pairs, DeepSeek-V2/V3 checkpoints) or False (halves)")
        for name in ("qk_norm", "qkv_bias", "o_proj_bias", "attention_sinks", "clip_qkv"):
            _check(not getattr(self, name), name, getattr(self, name),
                   "not available with attention_type='mla' (grouped-query attention only)")

    def attention_layer_types(self) -> list[str]:
        """The attention of every layer (of every attention sub-block of `block_layout`, in order): `layer_types`, or
        what None means (every one sliding when `sliding_window` is set, else full)."""
        if self.layer_types is not None:
            return list(self.layer_types)
        return ["sliding_attention" if self.sliding_window else "full_attention"] * self.num_attention_blocks()

    def num_attention_blocks(self) -> int:
        """The attentions of the model, each with its own KV-cache layer: one per layer, or the 'attention' sub-blocks
        of `block_layout`."""
        if self.block_layout is None:
            return self.num_hidden_layers
        return sum(layer.count("attention") for layer in self.block_layout)

    def layer_sub_blocks(self) -> list[list[str]]:
        """Every layer's sub-blocks in order (BLOCK_TYPES): `block_layout`, or what None means (attention, then 'moe'
        for a 'sparse' entry of `mlp_layer_types` and 'dense' for a 'dense' one)."""
        if self.block_layout is not None:
            return [list(layer) for layer in self.block_layout]
        return [["attention", "moe" if kind == "sparse" else "dense"] for kind in self.mlp_layer_types]

    @property
    def per_layer_config(self) -> list:
        """transformers' per-layer view of the config, which its caches (DynamicCache, StaticCache) zip with
        `layer_types` to make one cache layer per entry: this config once per attention (per layer, or per attention
        sub-block of `block_layout`). The fields hold for every layer: there are no per-layer overrides."""
        return [self] * self.num_attention_blocks()

    @per_layer_config.setter
    def per_layer_config(self, value):
        _check(value is None, "per_layer_config", value,
               "hf-moe configs have no per-layer overrides: each field holds for every layer (allowed: None)")

    def expand_block_layout(self) -> None:
        """A `block_layout` given as one list of sub-block names is every layer's: one copy per layer."""
        layout = self.block_layout
        if isinstance(layout, list) and layout and all(isinstance(name, str) for name in layout):
            self.block_layout = [list(layout) for _ in range(self.num_hidden_layers)]

    def check_block_layout(self) -> None:
        """`block_layout`: None, or one non-empty list of BLOCK_TYPES names per layer, with an attention sub-block
        somewhere; with it, `mlp_layer_types` only summarises it, and what assumes layers of one attention and one
        feed-forward (DeepSeek's layer schedule, Mixture-of-Depths) is refused."""
        layout = self.block_layout
        if layout is None:
            return
        self.check_block_layout_entries()
        summary = mlp_layer_types_of(layout)
        _check(self.mlp_layer_types == summary, "mlp_layer_types", self.mlp_layer_types,
               f"with block_layout it says which layers hold a 'moe' sub-block ({summary}): leave it None")
        _check(self.mod_capacity is None, "mod_capacity", self.mod_capacity,
               "Mixture-of-Depths routes whole layers of one attention and one feed-forward, not block_layout's "
               "sub-blocks: leave None with block_layout")
        for name in ("first_k_dense_replace", "moe_layer_freq"):  # DeepSeekMoEConfig's layer schedule
            _check(getattr(self, name, None) is None, name, getattr(self, name, None),
                   "block_layout names every layer's sub-blocks ('dense' or 'moe' feed-forwards): leave it None")

    def check_block_layout_entries(self) -> None:
        """`block_layout` (not None): one non-empty list of BLOCK_TYPES names per layer, an attention among them."""
        layout = self.block_layout
        _check(isinstance(layout, list) and len(layout) == self.num_hidden_layers, "block_layout", layout,
               f"must be None or a list of num_hidden_layers={self.num_hidden_layers} lists of sub-blocks, one per "
               f"layer (or one list for every layer), e.g. {BRAINFORMER_BLOCK} (Brainformer)")
        for i, layer in enumerate(layout):
            _check(isinstance(layer, list) and len(layer) > 0 and all(name in BLOCK_TYPES for name in layer),
                   f"block_layout[{i}]", layer, f"must be a non-empty list of the sub-blocks {BLOCK_TYPES}, in the "
                                               f"order they run")
        _check(self.num_attention_blocks() > 0, "block_layout", layout,
               "needs at least one 'attention' sub-block: no other sub-block mixes the tokens (and the KV cache "
               "reads the sequence length from the first attention)")

    def validate_layer_type(self) -> None:
        """transformers' `@strict` check that `layer_types` and `mlp_layer_types` hold one entry per layer; with
        `block_layout`, `layer_types` holds one per attention sub-block instead (`check_layer_types`)."""
        validate = getattr(super(), "validate_layer_type", None)  # None in a transformers without it
        if self.block_layout is None and validate is not None:
            validate()

    def check_layer_types(self) -> None:
        """`layer_types`: None (every attention sliding if `sliding_window` is set, else full) or one entry per
        layer (per attention sub-block with `block_layout`)."""
        if self.layer_types is None:
            return
        if self.block_layout is None:
            allowed = f"must be None or a list of num_hidden_layers={self.num_hidden_layers} entries"
        else:
            allowed = (f"must be None or a list of one entry per 'attention' sub-block of block_layout "
                       f"({self.num_attention_blocks()}), in order")
        _check(isinstance(self.layer_types, list) and len(self.layer_types) == self.num_attention_blocks(),
               "layer_types", self.layer_types, allowed)
        for layer_type in self.layer_types:
            _check(layer_type in ATTENTION_LAYER_TYPES, "layer_types", self.layer_types,
                   f"entries must be one of {ATTENTION_LAYER_TYPES}")
        _check("sliding_attention" not in self.layer_types or self.sliding_window is not None, "layer_types",
               self.layer_types, "'sliding_attention' layers need sliding_window (a number of tokens)")

    def check_experts_fields(self) -> None:
        """The routed experts' activation and its two constants (read only by 'clamped_swiglu')."""
        _check(self.experts_activation in EXPERTS_ACTIVATIONS, "experts_activation", self.experts_activation,
               f"allowed: {EXPERTS_ACTIVATIONS}")
        for name in CLAMPED_SWIGLU_DEFAULTS:
            value = getattr(self, name)
            if self.experts_activation == "clamped_swiglu":
                _check_number(name, value, above=0)
                continue
            _check_number(name, value, above=0, none_means="unused")
            _check(value is None, name, value,
                   "only experts_activation='clamped_swiglu' reads it: set that, or leave it None")

    def check_rope_parameters(self) -> None:
        """RoPE: a known `rope_type`, finite positive `rope_theta` and scaling `factor`, finite numbers elsewhere,
        and every key the type needs (transformers' checks, whose bare KeyError becomes a ValueError here)."""
        rope = self.rope_parameters
        _check(isinstance(rope, dict), "rope_parameters", rope, "must be a dict with `rope_type` and `rope_theta`")
        rope_types = ("default", *ROPE_INIT_FUNCTIONS)
        _check(rope.get("rope_type") in rope_types, "rope_parameters['rope_type']", rope.get("rope_type"),
               f"allowed: {rope_types}")
        _check_number("rope_parameters['rope_theta']", rope.get("rope_theta"), above=0)
        self.check_partial_rotary_factor(rope.get("partial_rotary_factor", 1.0))
        for key, value in rope.items():
            if key in ("factor", "attention_factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings"):
                _check_number(f"rope_parameters[{key!r}]", value, above=0, none_means="the type's default")
            elif key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                _check_number(f"rope_parameters[{key!r}]", value, none_means="the type's default")
        try:
            self.validate_rope()
        except KeyError as error:
            raise ValueError(f"`rope_parameters`={rope!r} is invalid: {error.args[0]}.") from None

    def check_partial_rotary_factor(self, factor) -> None:
        """Partial RoPE (GLM-4.5: 0.5): the first int(head_dim * factor) dims of each head are rotated, an even number;
        multi-head latent attention rotates qk_rope_head_dim dims instead."""
        name = "rope_parameters['partial_rotary_factor']"
        _check_number(name, factor, above=0, why="the share of each head's dims that RoPE rotates")
        _check(factor <= 1, name, factor, "must be at most 1 (the share of each head's dims that RoPE rotates)")
        if self.attention_type == "mla":
            _check(factor == 1, name, factor, "with attention_type='mla' qk_rope_head_dim sets the rotary dims "
                                              "(allowed: 1.0 or no key)")
            return
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        rotary_dim = int(head_dim * factor)
        _check(rotary_dim > 0 and rotary_dim % 2 == 0, name, factor,
               f"int(head_dim={head_dim} * partial_rotary_factor) rotated dims must be even and > 0")

    def check_routing_fields(self) -> None:
        num_experts, top_k = self.num_experts, self.num_experts_per_tok
        _check(isinstance(self.router_in_fp32, bool), "router_in_fp32", self.router_in_fp32, "allowed: True, False")
        _check(self.router_type in ROUTER_TYPES, "router_type", self.router_type, f"allowed: {ROUTER_TYPES}")
        _check(self.scoring_func in SCORING_FUNCS, "scoring_func", self.scoring_func, f"allowed: {SCORING_FUNCS}")
        _check(isinstance(self.n_group, int) and self.n_group >= 1 and num_experts % self.n_group == 0, "n_group",
               self.n_group, f"must be a positive divisor of num_experts={num_experts}")
        _check(1 <= self.topk_group <= self.n_group, "topk_group", self.topk_group,
               f"must be between 1 and n_group={self.n_group}")
        _check(top_k <= self.topk_group * (num_experts // self.n_group) + self.num_null_experts, "num_experts_per_tok",
               top_k, f"must be at most topk_group * num_experts / n_group = "
                      f"{self.topk_group * (num_experts // self.n_group)}")
        _check_number("router_jitter_noise", self.router_jitter_noise, at_least=0, below=1)
        _check(not self.random_routing or top_k == 2, "random_routing", self.random_routing,
               f"GShard random routing needs num_experts_per_tok=2 (got {top_k})")
        for name in ("capacity_factor", "eval_capacity_factor"):
            _check_number(name, getattr(self, name), above=0, none_means="no token dropping")
        _check(isinstance(self.dispatch_groups, int) and self.dispatch_groups >= 1, "dispatch_groups",
               self.dispatch_groups, "must be an integer >= 1")
        if self.router_type == "expert_choice":
            _check(self.capacity_factor is not None, "capacity_factor", self.capacity_factor,
                   "expert choice needs a capacity factor (tokens per expert = T * capacity_factor / E), e.g. 2.0")
            for name in ("noisy_gating", "random_routing", "router_selection_bias"):
                _check(not getattr(self, name), name, getattr(self, name), "not available with expert choice routing")
            _check(self.n_group == 1, "n_group", self.n_group, "expert choice routing needs n_group=1")
            _check(self.scoring_func == "softmax", "scoring_func", self.scoring_func,
                   "expert choice routing uses softmax scores")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_importance_loss_coef",
                     "router_load_loss_coef", "expert_balance_loss_coef", "device_balance_loss_coef",
                     "sequence_balance_loss_coef", "router_bias_update_rate"):
            _check_number(name, getattr(self, name), at_least=0)
        _check(self.router_load_loss_coef == 0 or self.noisy_gating, "router_load_loss_coef",
               self.router_load_loss_coef, "the smooth load estimator needs noisy_gating=True")
        _check(isinstance(self.num_device_groups, int) and self.num_device_groups >= 1
               and num_experts % self.num_device_groups == 0, "num_device_groups", self.num_device_groups,
               f"must be a positive divisor of num_experts={num_experts}")
        _check(self.router_bias_update_rate == 0 or self.router_selection_bias, "router_bias_update_rate",
               self.router_bias_update_rate, "aux-loss-free balancing needs router_selection_bias=True")

    def check_soft_block_fields(self) -> None:
        """`moe_block_type` and `num_slots`. Soft blocks have no discrete routing: the options of the top-k router
        (capacity, noise, random routing, selection bias, groups, sigmoid scores, expert choice) must stay off."""
        _check(self.moe_block_type in MOE_BLOCK_TYPES, "moe_block_type", self.moe_block_type,
               f"allowed: {MOE_BLOCK_TYPES}")
        if self.moe_block_type == "soft_moe":
            _check(isinstance(self.num_slots, int) and not isinstance(self.num_slots, bool) and self.num_slots >= 1,
                   "num_slots", self.num_slots, "must be a positive integer (slots per expert; Soft MoE: 1)")
        else:
            _check(self.num_slots is None, "num_slots", self.num_slots,
                   "only moe_block_type='soft_moe' reads it (slots per expert): set that, or leave it None")
        if self.moe_block_type == "routed":
            return
        allowed = f"moe_block_type={self.moe_block_type!r} mixes all experts softly, with no top-k router"
        _check(self.router_type == "token_choice", "router_type", self.router_type, allowed + ": leave 'token_choice'")
        _check(self.scoring_func == "softmax", "scoring_func", self.scoring_func, allowed + ": its weights are softmaxes")
        for name in ("capacity_factor", "eval_capacity_factor"):
            _check(getattr(self, name) is None, name, getattr(self, name), allowed + ": nothing is dropped, leave None")
        for name in ("noisy_gating", "random_routing", "router_selection_bias", "router_bias"):
            _check(not getattr(self, name), name, getattr(self, name), allowed + ": leave it False")
        _check(self.router_jitter_noise == 0, "router_jitter_noise", self.router_jitter_noise, allowed + ": leave 0")
        _check(self.n_group == 1, "n_group", self.n_group, allowed + ": leave 1")

    def check_null_expert_fields(self) -> None:
        """AdaMoE's null experts (`num_null_experts`): an integer >= 0; with null experts, the options whose
        formulas do not cover them must stay off (the top-k router's columns are then E true + N null experts)."""
        value = self.num_null_experts
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, "num_null_experts", value,
               "must be an integer >= 0 (0 = no null experts; AdaMoE adds a few, e.g. as many as the true experts)")
        if value == 0:
            return
        why = f"with num_null_experts={value} (AdaMoE null experts)"
        _check(self.moe_block_type == "routed", "moe_block_type", self.moe_block_type,
               f"null experts are choices of the top-k router, which soft blocks do not have: use 'routed' {why}")
        _check(self.router_type == "token_choice", "router_type", self.router_type,
               f"null experts are choices of each token (token choice); an expert picks no null expert: use "
               f"'token_choice' {why}")
        _check(self.scoring_func == "softmax", "scoring_func", self.scoring_func,
               f"AdaMoE scores the true and null experts with one softmax: use 'softmax' {why}")
        _check(self.n_group == 1, "n_group", self.n_group, f"expert groups partition the true experts: leave 1 {why}")
        for name, reason in (
            ("noisy_gating", "its noise and smooth load estimator cover the true experts only"),
            ("random_routing", "GShard's rule drops the second of two true experts"),
            ("router_selection_bias", ("aux-loss-free balancing would drive every null expert to the mean load, "
                                       "against AdaMoE's loss, which balances the null experts' use in all")),
            ("router_bias", "gpt-oss's router bias covers the true experts only"),
        ):
            _check(not getattr(self, name), name, getattr(self, name), f"{reason}: leave it False {why}")
        for name in ("router_importance_loss_coef", "router_load_loss_coef", "expert_balance_loss_coef",
                     "device_balance_loss_coef", "sequence_balance_loss_coef"):
            _check(getattr(self, name) == 0, name, getattr(self, name),
                   f"AdaMoE balances null experts with the Switch loss (router_aux_loss_coef), the null experts' loads "
                   f"averaged; this loss has no null-expert form: leave 0 {why}")

    def check_depth_fields(self) -> None:
        """Mixture-of-Depths: `mod_capacity`, `mod_layers`, `mod_aux_loss_coef`."""
        _check_number("mod_aux_loss_coef", self.mod_aux_loss_coef, at_least=0)
        if self.mod_capacity is None:
            _check(self.mod_layers is None, "mod_layers", self.mod_layers,
                   "only read with mod_capacity (Mixture-of-Depths): set mod_capacity, or leave it None")
            return
        _check_number("mod_capacity", self.mod_capacity, above=0, none_means="no Mixture-of-Depths")
        _check(self.mod_capacity <= 1, "mod_capacity", self.mod_capacity,
               "must be None (no Mixture-of-Depths) or a fraction of the sequence in (0, 1], e.g. 0.125")
        layers = self.mod_layers
        _check(isinstance(layers, list) and len(layers) > 0
               and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
               and layers == sorted(set(layers)) and 1 <= layers[0] and layers[-1] < self.num_hidden_layers,
               "mod_layers", layers, f"must be a non-empty increasing list of layer indices in [1, "
               f"num_hidden_layers={self.num_hidden_layers}); layer 0 always processes every token (the model reads "
               f"the cache length from it)")
        attention_types = self.attention_layer_types()
        _check(all(attention_types[i] == "full_attention" for i in layers), "mod_layers", layers,
               "routed layers must be 'full_attention' layers (see layer_types / sliding_window)")
        # A routed layer runs its attention on its gathered tokens; the attention experts' router does not record
        # which of those rows are real (RouterDecision.token_mask), so their balancing losses could not count them.
        _check(getattr(self, "num_attention_experts", None) is None, "num_attention_experts",
               getattr(self, "num_attention_experts", None),
               "not available with Mixture-of-Depths (mod_capacity) yet: a routed layer's attention runs on its "
               "chosen tokens only, which the attention experts' balancing losses do not count apart: leave None")

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """A config with the routing and balancing settings of a paper (see `hf_moe.list_presets()`), plus any
        field given in `overrides`."""
        family_presets = {key: preset for key, preset in PRESETS.items() if preset.family == cls.__name__}
        if name not in family_presets:
            owner = PRESETS[name].family if name in PRESETS else None
            hint = f" (it is a preset of {owner})" if owner else ""
            raise ValueError(f"`name`={name!r} is not a preset of {cls.__name__}{hint}: allowed: "
                             f"{sorted(family_presets)}.")
        check_unknown_fields(cls, overrides, strict=True)
        return cls(**{**family_presets[name].settings, **overrides})

    def validate_moe_fields(self):
        """`@strict` class validator: re-checks the fields at save time, after any mutation."""
        self.check_fields()

    num_sparse_layers = FixedField(
        lambda config: sum(layer.count("moe") for layer in config.layer_sub_blocks()),
        "set mlp_layer_types (or first_k_dense_replace and moe_layer_freq) or block_layout of DeepSeekMoEConfig "
        "instead",
        fixed_to="the number of 'sparse' entries of mlp_layer_types (of 'moe' sub-blocks with block_layout)",
    )

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """transformers' expert-parallel plan: experts sharded by expert, with their biases if any. Soft blocks send
        every token (or slot) to every expert, which the expert-parallel dispatch does not do: no plan; nor with null
        experts, whose ids (>= E) the dispatch would read as experts of another rank."""
        if self.moe_block_type != "routed" or self.num_null_experts:
            return {}
        return self.sub_block_plan(_EXPERT_BIAS_EP_PLAN if self.expert_bias else _EP_PLAN)

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """transformers' tensor-parallel plan, with the rules of the modules this config builds and no others
        (transformers warns at load time about a rule that matches nothing)."""
        if self.num_attention_experts is not None:  # attention experts (3D per-expert projections) stay replicated
            plan = {}
        elif self.attention_type == "mla":
            q_projection = "q_proj" if self.q_lora_rank is None else "q_b_proj"
            plan = {f"layers.*.self_attn.{q_projection}": "colwise", **_MLA_TP_PLAN}
        elif self.qk_norm and self.qk_norm_type == "whole_projection":  # every rank computes every head
            plan = dict(_WHOLE_PROJECTION_NORM_TP_PLAN)
        else:
            plan = dict(_ATTENTION_TP_PLAN)
            if self.qk_norm:
                plan.update(_QK_NORM_TP_PLAN)
            if self.attention_sinks:
                plan.update(_SINKS_TP_PLAN)
        sub_blocks = {kind for layer in self.layer_sub_blocks() for kind in layer}
        if "moe" in sub_blocks and self.moe_block_type == "routed":  # soft blocks stay replicated
            if not self.expert_bias:  # no rule shards the expert biases: biased experts stay replicated
                plan.update(_EXPERTS_TP_PLAN)
            if self.n_shared_experts > 0:
                plan.update(_SHARED_EXPERTS_TP_PLAN)
        if "dense" in sub_blocks:
            plan.update(_DENSE_MLP_TP_PLAN)
        return self.sub_block_plan(plan)

    def sub_block_plan(self, plan: dict[str, str]) -> dict[str, str]:
        """A parallel plan's rules, which name a layer's modules (`layers.*.mlp...`), for this config's model: with
        `block_layout` the modules live in the layers' sub-blocks (`layers.*.blocks.*.mlp...`)."""
        if self.block_layout is None:
            return dict(plan)
        return {key.replace("layers.*.", "layers.*.blocks.*.", 1): style for key, style in plan.items()}


@strict
class MixtralMoEConfig(MoEDecoderConfig):
    r"""
    Configuration of a Mixtral-style decoder (`model_type="hf_moe_mixtral"`): every layer is sparse, with
    `num_local_experts` experts of width `intermediate_size` and a top-k softmax router.

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_act,
        max_position_embeddings, initializer_range, rms_norm_eps, use_cache, pad_token_id, bos_token_id,
        eos_token_id, tie_word_embeddings, rope_parameters, attention_dropout:
            As in [`~transformers.MixtralConfig`].
        intermediate_size (`int`, defaults to 14336): width of each expert's SwiGLU FFN.
        sliding_window (`int`, *optional*): sliding-window attention size (Mistral/Mixtral); `None` = full attention.
        layer_types (`list[str]`, *optional*): `"full_attention"` or `"sliding_attention"` (a window of
            `sliding_window` tokens) per layer, e.g. alternating as gpt-oss; None = every layer sliding when
            `sliding_window` is set, else full. RoPE may rotate only part of each head:
            `rope_parameters["partial_rotary_factor"]` (GLM-4.5: 0.5) rotates the first `int(head_dim * factor)` dims
            (the two halves of those, as Llama) and passes the others through.
        num_local_experts (`int`, defaults to 8): experts per layer (also readable as `num_experts`).
        num_experts_per_tok (`int`, defaults to 2): experts each token is routed to (top-k).
        norm_topk_prob (`bool`, defaults to `True`): renormalise the top-k probabilities to sum to one (Mixtral).
        routed_scaling_factor (`float`, defaults to 1.0): multiplies the routed experts' gate weights.
        router_jitter_noise (`float`, defaults to 0.0): multiplicative uniform noise `U(1-eps, 1+eps)` on the
            router's input during training (Switch Transformer); the experts see the clean input.
        output_router_logits (`bool`, defaults to `False`): return router logits and add the load-balancing loss
            to `loss`. Turn it on for training.
        router_aux_loss_coef (`float`, defaults to 0.001): weight of the load-balancing loss.
        num_null_experts (`int`, defaults to 0): AdaMoE's null experts (Zeng et al. 2024). The router scores the E
            true experts and N null experts (one logit each, `mlp.gate.null_weight [N, H]`) with one softmax and takes
            the top `num_experts_per_tok` of all E + N, so a token uses between 0 and k true experts. A null expert
            outputs zero and costs nothing: its slots are not dispatched. With `norm_topk_prob` the chosen true
            experts' weights are renormalised among themselves. The load-balancing loss runs over the E + N experts
            with the null experts' loads averaged, so it sets how often null experts are chosen in all, not per token
            (AdaMoE raises k with null experts, e.g. Mixtral's top-2 of 8 to a top-4 of 8 + 8). Read in a residual
            block, a null expert is a no-op: the token skips the feed-forward, which is the integrated
            Mixture-of-Depths-and-Experts of Raposo et al. (2024), an MoE whose no-op experts give Mixture-of-Depths
            at the feed-forward (`mod_capacity` skips whole blocks). Token choice with a softmax router only; soft
            blocks, expert choice, groups, noise, random routing, selection and router biases, and the balancing
            losses other than `router_aux_loss_coef` and `router_z_loss_coef` are refused with it.
        moe_block_type (`str`, defaults to `"routed"`): what each sparse layer is.
            - `"routed"`: a router sends each token to its top-k experts (every routing knob above).
            - `"soft_moe"`: Soft MoE (Puigcerver et al. 2023). Each expert processes `num_slots` slots. Slot
              logits are `L = scale * l2norm(x) . l2norm(phi_j)`. Each slot is a softmax-over-tokens
              (dispatch) average of the tokens of its sequence, with padding masked out. Each token output is a
              softmax-over-slots (combine) average of the slot outputs. It is NOT causal: a token reads slots that
              mix later tokens, so `generate` refuses it. Use it for sequence classification and bidirectional
              training.
            - `"soft_merging"`: the causal soft variant. Each token merges the experts' weights with its own router
              probabilities, `p = softmax(W_r x)`, then runs one FFN with the merged weights:
              `y = (sum_e p_e D_e) act((sum_e p_e G_e) x) * ((sum_e p_e U_e) x)`. This is SMEAR (Muqeeth et al.
              2023) routed per token rather than per example. It looks at no other token, so it is causal, generates
              with a KV cache, and needs no balancing loss. It costs E dense FFNs per token. Lory's segment-level
              routing was not chosen: it needs its routing decision carried across decoding steps, and its first
              segment needs a convention the paper does not make causal.
            Soft blocks have no top-k router: capacity, noise, random routing, selection bias, groups, sigmoid
            scores and expert choice must stay off, and the balancing losses do not apply (no router decisions are
            recorded). Shared experts and expert biases (DeepSeekMoEConfig) add to both.
        num_slots (`int`, *optional*): slots per expert with `moe_block_type="soft_moe"` (defaults to 1, the paper's
            choice; the paper sizes experts * slots near the number of tokens); None otherwise.
        mod_capacity (`float`, *optional*): Mixture-of-Depths (Raposo et al. 2024); None = off. In each layer of
            `mod_layers` a router `r = w . x` (Linear(H, 1)) picks the tokens that the whole decoder block processes:
            `x + r * f(x)` for a chosen token, where `f(x)` is the block's attention + feed-forward update, and `x`
            (the block skipped) for the others. The block's attention runs among the chosen tokens only (causal by
            position, RoPE at the original positions). In training each sequence chooses its top `ceil(c * S)`
            tokens by `r` (not causal: it compares with later tokens); in evaluation and `generate` each token is
            chosen iff `r > 0` (`sigmoid(r) > 0.5`), a causal decision that the BCE loss (`mod_aux_loss_coef`)
            teaches the router to make like the top-C choice. Only the chosen tokens are computed: each sequence's
            chosen tokens are gathered in their original order, run through the block, and scattered back (rows
            with fewer chosen tokens than the batch's most are padded with tokens whose results are dropped). A
            skipped token's key and value are stored as zeros in the KV cache and zero keys are masked, so a cached
            decoding step equals the full forward; a decoding step whose token is skipped runs nothing in that layer.
            The paper: 0.125.
        mod_layers (`list[int]`, *optional*): the routed layers, increasing, each in [1, num_hidden_layers) and a
            full-attention layer (layer 0 always processes every token). Defaults with `mod_capacity` to every
            other layer from layer 1, as the paper; None without it.
        mod_aux_loss_coef (`float`, defaults to 0.01): weight of the MoD router loss, the mean over the routed
            layers of `BCE(r, 1[token in the sequence's top-C])` over the real tokens (added in training, with
            `output_router_logits`, like the balancing losses).
        num_attention_experts (`int`, *optional*): attention experts per layer (JetMoE's mixture of attention heads,
            Shen et al. 2024, after Zhang et al. 2022); None = one dense attention. Every layer's attention then has
            `num_attention_experts` query projections and as many output projections, each shaped as a dense
            attention's (`num_attention_heads` heads of `head_dim`), and ONE key and value projection shared by the
            experts (`num_key_value_heads` heads): the KV cache is the dense model's. A router per layer picks each
            token's top `num_attention_experts_per_tok` experts, with weights g = softmax of their logits; the token's
            output is `sum_i g_i O_i attention(Q_i x, K, V)` (plus `o_proj_bias`, a bias shared by the experts, with
            DeepSeekMoEConfig). The routing reads only the token itself, so it is causal and generates with the
            cache. JetMoE-8B: 8 experts, top-2, 16 key-value heads of 128 with one query head each per expert
            (`num_attention_heads=num_key_value_heads=16`; transformers' JetMoeConfig counts 32 = 16 x top-2).
            Grouped-query attention only, without q/k/v biases or attention sinks.
        num_attention_experts_per_tok (`int`, *optional*): attention experts per token, between 1 and
            `num_attention_experts` (defaults to 2 with attention experts, JetMoE's; None without).
        attention_router_aux_loss_coef (`float`, defaults to 0.01): weight of the attention routers' Switch
            load-balancing loss (JetMoE's 0.01), added with `output_router_logits` like the balancing losses below
            and reported as `router_losses["attention_router_aux_loss_coef"]`.
        attention_router_z_loss_coef (`float`, defaults to 0.0): weight of the attention routers' z-loss (JetMoE:
            0.001).
        block_layout (`list[list[str]]`, *optional*): heterogeneous layers (Brainformer, Zhou et al. 2023): for each
            layer, its sub-blocks in the order they run, each `"attention"`, `"dense"` or `"moe"`, in any order and
            count (one list alone is every layer's). Each sub-block is a pre-norm residual `x + f(RMSNorm(x))`: f is
            the attention (attention experts if set), a dense SwiGLU MLP of width `intermediate_size`, or the sparse
            block of `moe_block_type` with its router. Every attention sub-block has its own KV-cache layer, numbered
            over the whole model, and its own entry of `layer_types`; the routers of every "moe" sub-block are recorded
            for the balancing losses. Weights live at `layers.N.blocks.J.{norm, self_attn, mlp}`. None (the default)
            is attention, then the layer's feed-forward, with the usual weight names; with a layout,
            `mlp_layer_types` only summarises it ("sparse" for a layer with a "moe" sub-block). Preset
            `brainformer`: the paper's block #1 in every layer. Not with Mixture-of-Depths; native formats cannot
            hold it (export refuses it).

    Example:

    ```python
    >>> from hf_moe import MixtralMoEConfig, MixtralMoEForCausalLM
    >>> config = MixtralMoEConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    >>> model = MixtralMoEForCausalLM(config)
    ```"""

    model_type = "hf_moe_mixtral"
    default_theta = 1000000.0
    attribute_map = {"num_experts": "num_local_experts"}

    max_position_embeddings: int = 4096 * 32
    num_local_experts: int = 8

    # Fields of the shared design space that the Mixtral family fixes: the modeling code reads them from both families.
    moe_intermediate_size = FixedField(
        lambda config: config.intermediate_size,
        "set intermediate_size (the width of every expert), or use DeepSeekMoEConfig for experts of their own width",
        fixed_to="intermediate_size",
    )
    mlp_layer_types = FixedField(
        lambda config: (["sparse"] * config.num_hidden_layers if config.block_layout is None
                        else mlp_layer_types_of(config.block_layout)),
        "use DeepSeekMoEConfig (first_k_dense_replace, moe_layer_freq or mlp_layer_types) for dense layers",
        fixed_to="'sparse' for each of num_hidden_layers (with block_layout: 'sparse' for a layer with a 'moe' "
                 "sub-block, else 'dense')",
    )
    num_sparse_layers = FixedField(
        lambda config: (config.num_hidden_layers if config.block_layout is None
                        else sum(layer.count("moe") for layer in config.block_layout)),
        "set num_hidden_layers (or block_layout), or use DeepSeekMoEConfig for dense layers",
        fixed_to="num_hidden_layers (the 'moe' sub-blocks of block_layout with it)",
    )
    n_shared_experts = FixedField(0, _USE_DEEPSEEK_FOR_SHARED_EXPERTS)
    shared_expert_intermediate_size = FixedField(0, _USE_DEEPSEEK_FOR_SHARED_EXPERTS)
    shared_expert_gate = FixedField(False, _USE_DEEPSEEK_FOR_SHARED_EXPERTS)
    qk_norm = FixedField(False, "use DeepSeekMoEConfig(qk_norm=True) for per-head q/k RMSNorm")
    qkv_bias = FixedField(False, "use DeepSeekMoEConfig(qkv_bias=True) for q/k/v biases")
    attention_type = FixedField("gqa", _USE_DEEPSEEK_FOR_MLA)
    q_lora_rank = FixedField(None, _USE_DEEPSEEK_FOR_MLA)
    kv_lora_rank = FixedField(None, _USE_DEEPSEEK_FOR_MLA)
    qk_nope_head_dim = FixedField(None, _USE_DEEPSEEK_FOR_MLA)
    qk_rope_head_dim = FixedField(None, _USE_DEEPSEEK_FOR_MLA)
    v_head_dim = FixedField(None, _USE_DEEPSEEK_FOR_MLA)
    rope_interleave = FixedField(None, _USE_DEEPSEEK_FOR_MLA)
    qk_norm_type = FixedField("per_head", _use_deepseek_for("qk_norm=True, qk_norm_type='whole_projection'"))
    clip_qkv = FixedField(None, _use_deepseek_for("clip_qkv=...") + " (clamped q/k/v projections)")
    o_proj_bias = FixedField(False, _use_deepseek_for("o_proj_bias=True"))
    attention_sinks = FixedField(False, _use_deepseek_for("attention_sinks=True"))
    router_bias = FixedField(False, _use_deepseek_for("router_bias=True"))
    expert_bias = FixedField(False, _use_deepseek_for("expert_bias=True"))
    experts_activation = FixedField("glu", _use_deepseek_for("experts_activation='clamped_swiglu'"))
    swiglu_alpha = FixedField(None, _use_deepseek_for("experts_activation='clamped_swiglu', swiglu_alpha=..."))
    swiglu_limit = FixedField(None, _use_deepseek_for("experts_activation='clamped_swiglu', swiglu_limit=..."))


@strict
class DeepSeekMoEConfig(MoEDecoderConfig):
    r"""
    Configuration of a DeepSeekMoE-style decoder (`model_type="hf_moe_deepseek"`): fine-grained routed experts
    plus always-on shared experts. Defaults follow DeepSeekMoE 16B.

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_act,
        max_position_embeddings, initializer_range, rms_norm_eps, use_cache, pad_token_id, bos_token_id,
        eos_token_id, tie_word_embeddings, rope_parameters, attention_dropout, sliding_window, layer_types:
            As in [`MixtralMoEConfig`].
        intermediate_size (`int`, defaults to 10944): width of the dense FFN of dense layers.
        moe_intermediate_size (`int`, defaults to 1408): width of each routed expert.
        n_routed_experts (`int`, defaults to 64): routed experts per sparse layer (also `num_experts`,
            `num_local_experts`).
        num_experts_per_tok (`int`, defaults to 6): routed experts per token.
        n_shared_experts (`int`, defaults to 2): always-on shared experts, fused into one FFN of width
            `shared_expert_intermediate_size`.
        shared_expert_intermediate_size (`int`, *optional*): width of the fused shared FFN; defaults to
            `n_shared_experts * moe_intermediate_size`.
        shared_expert_gate (`bool`, defaults to `False`): scale the shared experts' output by
            `sigmoid(Linear(H, 1)(x))`, as Qwen2-MoE.
        first_k_dense_replace (`int`, defaults to 1): the first k layers are dense.
        moe_layer_freq (`int`, defaults to 1): after the first k, layer i is sparse when `i % moe_layer_freq == 0`
            (2 = GShard's "every other layer").
        mlp_layer_types (`list[str]`, *optional*): explicit `"sparse"`/`"dense"` per layer; overrides the two
            fields above, which are then set to None unless they describe the same pattern.
        norm_topk_prob (`bool`, defaults to `False`): renormalise the top-k probabilities.
        routed_scaling_factor (`float`, defaults to 1.0): multiplies the routed experts' gate weights.
        qk_norm (`bool`, defaults to `False`): RMSNorm on q and k before RoPE, per head or over the whole
            projection (`qk_norm_type`).
        qkv_bias (`bool`, defaults to `False`): biases on the q/k/v projections (Qwen2-MoE).
        attention_type (`str`, defaults to `"gqa"`): `"gqa"`, grouped-query attention (`num_key_value_heads` from 1
            to `num_attention_heads`), or `"mla"`, multi-head latent attention (DeepSeek-V2/V3): keys and values are
            up-projected from a `kv_lora_rank` latent, the only thing the KV cache stores besides one shared rotary
            key. The fields below are MLA's (None with `"gqa"`); MLA needs `num_key_value_heads` None or equal to
            `num_attention_heads`, and sets `head_dim` to `qk_rope_head_dim`, the rotary dimension.
        q_lora_rank (`int`, *optional*): rank of the query's low-rank projection `q_b_proj(norm(q_a_proj(x)))`; None
            = one full-rank `q_proj` (DeepSeek-V2-Lite). DeepSeek-V2/V3: 1536.
        kv_lora_rank (`int`, *optional*): rank of the compressed key-value latent (DeepSeek-V2/V3: 512).
        qk_nope_head_dim (`int`, *optional*): per-head query/key dimensions without position (DeepSeek: 128).
        qk_rope_head_dim (`int`, *optional*): per-head query/key dimensions that RoPE rotates, even; the key's are
            shared by all heads (DeepSeek: 64).
        v_head_dim (`int`, *optional*): per-head value dimension (DeepSeek: 128).
        rope_interleave (`bool`, *optional*): the rotary dimensions of q and k come as interleaved pairs
            `(x0, x1), (x2, x3), ...`, the layout of DeepSeek-V2/V3 checkpoints (defaults to True with MLA); False =
            the two halves, as Llama. YaRN (`rope_parameters` with `mscale` and `mscale_all_dim`) also multiplies the
            softmax scale by `mscale(factor, mscale_all_dim)^2`, as DeepSeek-V2/V3 do.
        qk_norm_type (`str`, defaults to `"per_head"`): with `qk_norm`, `"per_head"` normalises each head of q and k
            (weights `[head_dim]`, Qwen3-MoE, GLM-4.5); `"whole_projection"` normalises q_proj's and k_proj's whole
            outputs before the split into heads (weights `[nH * head_dim]` and `[nKV * head_dim]`, OLMoE).
        clip_qkv (`float`, *optional*): clamp the q, k and v projections (after the q/k norm) to
            `[-clip_qkv, clip_qkv]` (OLMoE); None = no clipping.
        o_proj_bias (`bool`, defaults to `False`): a bias on the attention's output projection (with `qkv_bias`:
            transformers' `attention_bias` of OLMoE and gpt-oss; GLM-4.5 has q/k/v biases only). With attention
            experts: one output bias `self_attn.o_proj_bias [H]` shared by the experts (JetMoE's).
        attention_sinks (`bool`, defaults to `False`): a learned logit per head (`self_attn.sinks [nH]`) joins each
            softmax as one more column whose probability is dropped, so a query may attend to nothing (gpt-oss).
        router_bias (`bool`, defaults to `False`): a learned bias on the router's logits (`mlp.gate.bias [E]`,
            gpt-oss), which also enters the balancing losses; not the selection-only `router_selection_bias`.
        router_in_fp32 (`bool`, defaults to `False`): keep the router weight in float32 when the model loads in
            bf16/fp16 and compute its logits in float32 (DeepSeek-V2/V3, GLM-4.5); identical in float32.
        expert_bias (`bool`, defaults to `False`): biases on the routed experts' projections,
            `gate_up_proj_bias [E, 2I]` ([gate; up], as `gate_up_proj`) and `down_proj_bias [E, H]` (gpt-oss).
        experts_activation (`str`, defaults to `"glu"`): the routed experts' gated unit: `"glu"`,
            `act(gate) * up` with `hidden_act`; or `"clamped_swiglu"` (gpt-oss),
            `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)` with `g = clamp(gate, max=limit)`. Shared
            experts and dense layers always use `"glu"`.
        swiglu_alpha, swiglu_limit (`float`, *optional*): alpha and limit of `"clamped_swiglu"` (defaults 1.702 and
            7.0, gpt-oss); None with `"glu"`.
        router_jitter_noise, output_router_logits, router_aux_loss_coef, num_null_experts, moe_block_type, num_slots,
            mod_capacity, mod_layers, mod_aux_loss_coef, num_attention_experts, num_attention_experts_per_tok,
            attention_router_aux_loss_coef, attention_router_z_loss_coef, block_layout: as in
            [`MixtralMoEConfig`]; `moe_block_type` applies to the "sparse" layers of `mlp_layer_types` (Soft MoE in
            the second half of the layers, as the paper: `first_k_dense_replace=num_hidden_layers // 2`); attention
            experts apply to every layer, dense layers included. With `block_layout`, `mlp_layer_types` is its
            summary and `first_k_dense_replace` and `moe_layer_freq` are None.

    Example:

    ```python
    >>> from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM
    >>> config = DeepSeekMoEConfig(vocab_size=256, hidden_size=64, intermediate_size=256, moe_intermediate_size=32,
    ...                            num_hidden_layers=3, num_attention_heads=4, n_routed_experts=8,
    ...                            num_experts_per_tok=2, n_shared_experts=1)
    >>> model = DeepSeekMoEForCausalLM(config)
    ```"""

    model_type = "hf_moe_deepseek"
    default_theta = 10000.0
    attribute_map = {"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts"}

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None  # None = num_attention_heads (multi-head attention)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    first_k_dense_replace: int | None = 1
    moe_layer_freq: int | None = 1
    mlp_layer_types: list[str] | None = None
    norm_topk_prob: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    attention_type: str = "gqa"
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool | None = None
    qk_norm_type: str = "per_head"
    clip_qkv: float | int | None = None
    o_proj_bias: bool = False
    attention_sinks: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    experts_activation: str = "glu"
    swiglu_alpha: float | int | None = None
    swiglu_limit: float | int | None = None

    def __post_init__(self, **kwargs):
        if self.attention_type == "mla" and self.rope_interleave is None:
            self.rope_interleave = True  # DeepSeek-V2/V3 checkpoints (transformers' DeepseekV3Config default)
        if self.experts_activation == "clamped_swiglu":
            for name, default in CLAMPED_SWIGLU_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        _check(isinstance(self.num_hidden_layers, int) and self.num_hidden_layers > 0, "num_hidden_layers",
               self.num_hidden_layers, "must be a positive integer")
        if self.block_layout is not None:  # it names every layer's sub-blocks: the schedule fields give way to it
            self.expand_block_layout()
            self.check_block_layout_entries()
            defaults = {f.name: f.default for f in fields(self)}
            for name in ("first_k_dense_replace", "moe_layer_freq"):
                _check(getattr(self, name) in (None, defaults[name]), name, getattr(self, name),
                       "block_layout names every layer's sub-blocks ('dense' or 'moe' feed-forwards): leave it unset")
                setattr(self, name, None)
            if self.mlp_layer_types is None:
                self.mlp_layer_types = mlp_layer_types_of(self.block_layout)
        schedule = None
        if self.first_k_dense_replace is not None or self.mlp_layer_types is None:
            _check(
                isinstance(self.first_k_dense_replace, int)
                and 0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                "first_k_dense_replace", self.first_k_dense_replace,
                f"must be between 0 and num_hidden_layers={self.num_hidden_layers}",
            )
            _check(isinstance(self.moe_layer_freq, int) and self.moe_layer_freq >= 1, "moe_layer_freq",
                   self.moe_layer_freq, "must be an integer >= 1")
            schedule = [
                "sparse" if i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0 else "dense"
                for i in range(self.num_hidden_layers)
            ]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = schedule
        elif schedule != self.mlp_layer_types:
            # an explicit per-layer list that the two schedule fields do not describe: they would mislead readers
            self.first_k_dense_replace, self.moe_layer_freq = None, None
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.n_shared_experts * self.moe_intermediate_size
        super().__post_init__(**kwargs)


@dataclass(frozen=True)
class Preset:
    family: str  # the config class it belongs to
    summary: str  # one line: paper and what it fixes
    settings: dict = field(default_factory=dict)


# The published attention of DeepSeek-V2 and V3 (both papers, and transformers' DeepseekV2/V3Config defaults).
# V2's complex-pair RoPE and V3's rope_interleave=True rotate the same pairs: the same attention on the same weights.
_DEEPSEEK_MLA = {"attention_type": "mla", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                 "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True}

PRESETS = {
    "mixtral": Preset("MixtralMoEConfig", "Mixtral (Jiang et al. 2024): top-2 of 8, softmax over the chosen two "
                      "(renormalised), Switch load-balancing loss 0.02.",
                      dict(num_local_experts=8, num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.02)),
    "switch": Preset("MixtralMoEConfig", "Switch Transformer (Fedus et al. 2021): top-1, gate = router probability, "
                     "jitter 0.01, capacity factor 1.25 in training (dropless inference), load-balancing loss 0.01.",
                     dict(num_experts_per_tok=1, norm_topk_prob=False, router_jitter_noise=0.01,
                          capacity_factor=1.25, router_aux_loss_coef=0.01)),
    "gshard": Preset("MixtralMoEConfig", "GShard (Lepikhin et al. 2020): top-2 with random routing of the second "
                     "expert, capacity 2N/E per group in training (dropless inference), load-balancing loss 0.01.",
                     dict(num_experts_per_tok=2, norm_topk_prob=True, random_routing=True, capacity_factor=1.0,
                          router_aux_loss_coef=0.01)),
    "noisy_topk": Preset("MixtralMoEConfig", "Sparsely-gated MoE (Shazeer et al. 2017): noisy top-4 gating, "
                         "softmax over the kept logits, importance and load CV^2 losses 0.1 each.",
                         dict(num_experts_per_tok=4, norm_topk_prob=True, noisy_gating=True,
                              router_importance_loss_coef=0.1, router_load_loss_coef=0.1, router_aux_loss_coef=0.0)),
    "st_moe": Preset("MixtralMoEConfig", "ST-MoE (Zoph et al. 2022): top-2, capacity factor 1.25 in training "
                     "(dropless inference), load-balancing loss 0.01, router z-loss 0.001.",
                     dict(num_experts_per_tok=2, norm_topk_prob=False, capacity_factor=1.25,
                          router_aux_loss_coef=0.01, router_z_loss_coef=0.001)),
    "expert_choice": Preset("MixtralMoEConfig", "Expert choice (Zhou et al. 2022): each expert takes its top "
                            "T*2/E tokens; no balancing loss needed; not causal, so it cannot generate.",
                            dict(router_type="expert_choice", capacity_factor=2.0, router_aux_loss_coef=0.0)),
    "deepseek_moe": Preset("DeepSeekMoEConfig", "DeepSeekMoE (Dai et al. 2024): 64 fine-grained experts, top-6, "
                           "2 shared, softmax without renormalisation, expert-level balance loss 0.001.",
                           dict(n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, norm_topk_prob=False,
                                expert_balance_loss_coef=0.001, router_aux_loss_coef=0.0)),
    "deepseek_v2": Preset("DeepSeekMoEConfig", "DeepSeek-V2 (2024): multi-head latent attention (kv rank 512, q rank "
                          "1536; q_lora_rank=None for V2-Lite), top-6 limited to the best 3 of 8 expert groups, "
                          "2 shared, routed scaling 16, expert- (0.003) and device-level (0.05, 8 groups) losses.",
                          dict(n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, norm_topk_prob=False,
                               n_group=8, topk_group=3, routed_scaling_factor=16.0, expert_balance_loss_coef=0.003,
                               device_balance_loss_coef=0.05, num_device_groups=8, router_aux_loss_coef=0.0,
                               **_DEEPSEEK_MLA)),
    "deepseek_v3": Preset("DeepSeekMoEConfig", "DeepSeek-V3 (2024): multi-head latent attention as V2, sigmoid "
                          "scores, selection bias updated loss-free (gamma 0.001), top-8 within the best 4 of 8 "
                          "groups, renormalised, scaling 2.5, 1 shared, sequence-wise balance loss 0.0001.",
                          dict(n_routed_experts=64, num_experts_per_tok=8, n_shared_experts=1, scoring_func="sigmoid",
                               router_selection_bias=True, router_bias_update_rate=0.001, n_group=8, topk_group=4,
                               norm_topk_prob=True, routed_scaling_factor=2.5, sequence_balance_loss_coef=0.0001,
                               router_aux_loss_coef=0.0, **_DEEPSEEK_MLA)),
    "qwen2_moe": Preset("DeepSeekMoEConfig", "Qwen1.5/2-MoE: top-4 of 60, one gated shared expert 4x wide, no "
                        "renormalisation, q/k/v biases, all layers sparse, load-balancing loss 0.001.",
                        dict(n_routed_experts=60, num_experts_per_tok=4, n_shared_experts=1, shared_expert_gate=True,
                             first_k_dense_replace=0, norm_topk_prob=False, qkv_bias=True,
                             router_aux_loss_coef=0.001)),
    "glam": Preset("DeepSeekMoEConfig", "GLaM (Du et al. 2022): every other layer sparse, the first one "
                   "included, 64 experts top-2 renormalised (GShard gating), no shared experts, load-balancing "
                   "loss 0.01; its FFNs are gated GELU (hidden_act='gelu') and its experts as wide as the dense FFN "
                   "(moe_intermediate_size=intermediate_size).",
                   {"n_routed_experts": 64, "num_experts_per_tok": 2, "n_shared_experts": 0, "first_k_dense_replace": 0,
                    "moe_layer_freq": 2, "norm_topk_prob": True, "router_aux_loss_coef": 0.01}),
    "soft_moe": Preset("MixtralMoEConfig", "Soft MoE (Puigcerver et al. 2023): 1 slot per expert, dispatch softmax "
                       "over the tokens of each sequence and combine softmax over slots, L2-normalised logits with a "
                       "learned scale, no balancing loss; not causal, so it cannot generate.",
                       {"moe_block_type": "soft_moe", "num_slots": 1, "router_aux_loss_coef": 0.0}),
    "soft_moe_causal": Preset("MixtralMoEConfig", "Causal soft MoE: each token merges the experts' weights with its "
                              "own router softmax (SMEAR per token), then runs one FFN; no balancing loss; generates.",
                              {"moe_block_type": "soft_merging", "router_aux_loss_coef": 0.0}),
    "mixture_of_depths": Preset("MixtralMoEConfig", "Mixture-of-Depths (Raposo et al. 2024): every other block "
                                "processes the top 12.5% of each sequence's tokens (router weight times the block "
                                "update), BCE router loss 0.01 so that decoding decides per token (r > 0); "
                                "generates.",
                                {"mod_capacity": 0.125, "mod_aux_loss_coef": 0.01}),
    "jetmoe": Preset("MixtralMoEConfig", "JetMoE-8B (Shen et al. 2024): every layer has 8 attention experts top-2 "
                     "sharing their keys and values (the dense KV cache) and 8 FFN experts top-2, each router "
                     "softmaxed over its chosen two, Switch loss 0.01 and z-loss 0.001 on both; its sizes: 24 layers, "
                     "hidden 2048, num_attention_heads=num_key_value_heads=16 of 128 (one query head per key-value "
                     "head and expert), experts 5632 wide, tied embeddings.",
                     {"num_attention_experts": 8, "num_attention_experts_per_tok": 2,
                      "attention_router_aux_loss_coef": 0.01, "attention_router_z_loss_coef": 0.001,
                      "num_local_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
                      "router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001}),
    "brainformer": Preset("DeepSeekMoEConfig", "Brainformer (Zhou et al. 2023), block #1: every layer is the searched "
                          "block of 8 pre-norm residual sub-layers, attention, moe, dense, attention, moe, dense, moe, "
                          "dense (block_layout); expert choice at capacity factor 1 (one expert per token on "
                          "average), 64 experts, no shared experts, no balancing loss; not causal, so it cannot "
                          "generate (router_type='token_choice' on the same weights can).",
                          {"block_layout": BRAINFORMER_BLOCK, "n_routed_experts": 64, "n_shared_experts": 0,
                           "router_type": "expert_choice", "capacity_factor": 1.0, "num_experts_per_tok": 1,
                           "router_aux_loss_coef": 0.0}),
}


def list_presets() -> dict[str, str]:
    """Preset name -> `Family: one-line summary`."""
    return {name: f"{preset.family}: {preset.summary}" for name, preset in PRESETS.items()}


__all__ = ["MixtralMoEConfig", "DeepSeekMoEConfig", "PRESETS", "list_presets"]
