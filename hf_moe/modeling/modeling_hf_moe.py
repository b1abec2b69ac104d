# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Mixtral-style and DeepSeekMoE-style decoders: one implementation, read top to bottom.

embed -> for each layer: RMSNorm -> attention -> residual -> RMSNorm -> (MoE block | dense MLP) -> residual
      -> RMSNorm -> lm_head

MoE block: router (routing.py) -> routed experts (fused 3D weights, kernel chosen by `@use_experts_implementation`)
           + shared experts (optionally gated).

Shapes: B batch, S sequence, T = B*S tokens, H hidden, E experts, k experts per token, I expert width,
nH / nKV attention / key-value heads, D head dim.

This file is copied next to every saved checkpoint so that `trust_remote_code=True` loads it without hf_moe
installed: it imports torch, transformers and, with single-dot imports, the files of this folder only.
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_hf_moe import DeepSeekMoEConfig, MixtralMoEConfig, MoEDecoderConfig
from .experts_kernels import AUTO, SORTED_MM  # importing it registers "sorted_mm" and "auto"
from .routing import (
    TopKRouter,
    accumulate_router_statistics,
    micro_batch_share,
    router_losses,
    router_statistics,
    token_mask_for_router_rows,
)


class MoEMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)). Dense layers and the (fused) shared experts."""

    def __init__(self, config: MoEDecoderConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class MoEExperts(nn.Module):
    """The routed experts of one layer, as fused 3D weights (the layout transformers 5 uses in memory).

    This forward is the readable `eager` path; transformers' kernels (`grouped_mm`, `batched_mm`) and ours
    (`sorted_mm`, and "auto", the default: experts_kernels.py) replace it when selected with
    `experts_implementation=...`. Expert ids >= num_experts (experts living on another rank under expert parallelism)
    are skipped; the routers never emit them (dropped slots keep a valid id with weight 0).
    """

    def __init__(self, config: MoEDecoderConfig):
        super().__init__()
        self.num_experts = config.num_experts
        hidden, width = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * width, hidden))  # [E, 2I, H], [gate; up]
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, width))  # [E, H, I]
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:  # [T, H], [T, k], [T, k] -> [T, H]
        output = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # [E + 1, k, T]: the extra slot collects the "no expert" id
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            experts_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in experts_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            k_slot, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            expert_out = expert_out * top_k_weights[token_idx, k_slot, None]
            output.index_add_(0, token_idx, expert_out.to(output.dtype))
        return output


class MoESparseBlock(nn.Module):
    """Router -> routed experts (+ shared experts, optionally scaled by sigmoid(Linear(H, 1)) as Qwen2-MoE)."""

    def __init__(self, config: MoEDecoderConfig):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = MoEExperts(config)
        self.shared_experts = (
            MoEMLP(config, config.shared_expert_intermediate_size) if config.n_shared_experts > 0 else None
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, S, H]
        input_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, input_shape[-1])  # [T, H]
        _, top_k_weights, top_k_index, _ = self.gate(hidden_states)  # [T, k], [T, k]
        output = self.experts(hidden_states, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            shared_output = self.shared_experts(hidden_states)
            if self.shared_expert_gate is not None:
                shared_output = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared_output
            output = output + shared_output
        return output.reshape(input_shape)


class MoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class MoERotaryEmbedding(nn.Module):
    """RoPE with every scaling type of `config.rope_parameters["rope_type"]` (transformers' ROPE_INIT_FUNCTIONS)."""

    def __init__(self, config: MoEDecoderConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MoEDecoderConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """q, k: [B, heads, S, D]; cos, sin: [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, nKV, S, D] -> [B, nKV * n_rep, S, D] (grouped-query attention)."""
    batch, num_key_value_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # [B, S, nH, D]
    return attn_output, attn_weights


class MoEAttention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k biases (Qwen2-MoE), per-head q/k RMSNorm (Qwen3-MoE) and
    sliding window (Mistral); the kernel comes from transformers' attention interface (eager, sdpa, flex, flash)."""

    def __init__(self, config: MoEDecoderConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.sliding_window = config.sliding_window
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = MoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = MoERMSNorm(self.head_dim, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)  # [B, S, nH, D]
        key_states = self.k_proj(hidden_states).view(hidden_shape)  # [B, S, nKV, D]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, nKV, S, D]
        if self.config.qk_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


class MoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoEDecoderConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MoEAttention(config, layer_idx)
        if config.mlp_layer_types[layer_idx] == "sparse":
            self.mlp = MoESparseBlock(config)
        else:
            self.mlp = MoEMLP(config, config.intermediate_size)
        self.input_layernorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


@auto_docstring(custom_intro="Base class of the hf-moe decoders: weight init, output capture, kernel flags.")
class MoEPreTrainedModel(PreTrainedModel):
    config: MoEDecoderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoEDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    # the selection bias of aux-loss-free balancing starts at zero by definition: a checkpoint saved without it (an
    # upcycled dense model, a model trained without the bias) loads with zeros and no MISSING report
    _keys_to_ignore_on_load_missing = [r"e_score_correction_bias"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(TopKRouter, index=0),
        "router_decisions": OutputRecorder(TopKRouter, index=3),  # RouterDecision, for losses and statistics
        "hidden_states": MoEDecoderLayer,
        "attentions": MoEAttention,
    }

    def post_init(self):
        if not self.config.router_selection_bias:  # no e_score_correction_bias to keep in fp32
            self._keep_in_fp32_modules_strict = []
        super().post_init()

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # where transformers would default to its `grouped_mm`, default to "auto": `sorted_mm` where that is faster
        # (fp32 on x86-64 CPUs), `grouped_mm` elsewhere (experts_kernels.py)
        if requested_experts is None and super().get_correct_experts_implementation(None) == "grouped_mm":
            return AUTO
        return super().get_correct_experts_implementation(requested_experts)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if hasattr(module, "noise_weight"):
                init.zeros_(module.noise_weight)  # Shazeer et al.: no signal, uniform noise at init
            if hasattr(module, "e_score_correction_bias"):
                init.zeros_(module.e_score_correction_bias)


@auto_docstring(custom_intro="The bare MoE decoder, outputting raw hidden states (and router logits on request).")
class MoEModel(MoEPreTrainedModel):
    def __init__(self, config: MoEDecoderConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def routers(self) -> list[TopKRouter]:
        """The router of every sparse layer, in layer order (the order of captured router outputs)."""
        return [layer.mlp.gate for layer in self.layers if isinstance(layer.mlp, MoESparseBlock)]

    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, S, H]
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


@dataclass
class MoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    router_losses (`dict[str, torch.Tensor]`, *optional*):
        Every balancing loss that is on, unweighted, keyed by the name of its config coefficient.
    router_stats (`list[dict[str, torch.Tensor]]`, *optional*):
        Per sparse layer: `load`, `max_violation`, `entropy`, `dropped_fraction`, `z_loss` (with `output_router_stats`).
    """

    router_losses: dict | None = None
    router_stats: list | None = None


@dataclass
class MoESequenceClassifierOutputWithPast(SequenceClassifierOutputWithPast):
    r"""
    aux_loss (`torch.Tensor`, *optional*): the Switch load-balancing loss (with `output_router_logits`).
    router_logits (`tuple[torch.Tensor]`, *optional*): router logits of every sparse layer, each `[B*S, E]`.
    router_losses, router_stats: as in [`MoECausalLMOutputWithPast`].
    """

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    router_losses: dict | None = None
    router_stats: list | None = None


@dataclass
class MoETokenClassifierOutput(TokenClassifierOutput):
    r"""
    aux_loss (`torch.Tensor`, *optional*): the Switch load-balancing loss (with `output_router_logits`).
    router_logits (`tuple[torch.Tensor]`, *optional*): router logits of every sparse layer, each `[B*S, E]`.
    router_losses, router_stats: as in [`MoECausalLMOutputWithPast`].
    """

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    router_losses: dict | None = None
    router_stats: list | None = None


@dataclass
class MoEQuestionAnsweringModelOutput(QuestionAnsweringModelOutput):
    r"""
    aux_loss (`torch.Tensor`, *optional*): the Switch load-balancing loss (with `output_router_logits`).
    router_logits (`tuple[torch.Tensor]`, *optional*): router logits of every sparse layer, each `[B*S, E]`.
    router_losses, router_stats: as in [`MoECausalLMOutputWithPast`].
    """

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    router_losses: dict | None = None
    router_stats: list | None = None


class _RouterLossMixin:
    """Balancing losses, router statistics and load counting, computed once per forward from captured decisions.
    The losses are weighted by `routing.micro_batch_share` so that gradient accumulation does not multiply them."""

    def decoder_forward(self, attention_mask, output_router_logits, output_router_stats, **model_kwargs):
        """The decoder, with router outputs captured where needed -> (outputs, balancing losses, statistics)."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            attention_mask=attention_mask,
            output_router_logits=output_router_logits,
            output_router_decisions=self.wants_router_decisions(output_router_logits, output_router_stats),
            **model_kwargs,
        )
        losses, statistics = self.routing_outputs(
            outputs, attention_mask, outputs.last_hidden_state.shape[0], output_router_logits, output_router_stats
        )
        return outputs, losses, statistics

    def routing_outputs(self, outputs, attention_mask, batch_size, output_router_logits, output_router_stats):
        """-> (losses, statistics). In training, also adds this forward's counts to each router's counters (for
        aux-loss-free bias updates and logged metrics; read with `routing.collect_router_statistics`)."""
        decisions = outputs.get("router_decisions") or ()
        if not decisions:
            return {}, None
        token_mask = token_mask_for_router_rows(attention_mask, decisions[0].probs.shape[0])
        if self.training:
            accumulate_router_statistics(self.model.routers(), decisions, token_mask)
        losses = router_losses(decisions, self.config, attention_mask, batch_size) if output_router_logits else {}
        statistics = router_statistics(decisions, token_mask) if output_router_stats else None
        return losses, statistics

    def add_router_losses(self, loss, losses, share):
        if loss is None or not losses:
            return loss
        weighted = sum(getattr(self.config, name) * value.to(loss.device) for name, value in losses.items())
        return loss + share * weighted

    def wants_router_decisions(self, output_router_logits, output_router_stats) -> bool:
        return bool(output_router_logits or output_router_stats or self.training)


@auto_docstring(custom_intro="The MoE decoder with a language-modeling head and the router load-balancing loss.")
class MoEForCausalLM(_RouterLossMixin, MoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}
    base_model_class = MoEModel

    def __init__(self, config: MoEDecoderConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_stats: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoECausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside); -100 is ignored.
        output_router_logits (`bool`, *optional*):
            Collect the router logits of every sparse layer and add to `loss` every balancing loss whose
            coefficient is non-zero, e.g. `router_aux_loss_coef * aux_loss`. Defaults to
            `config.output_router_logits`.
        output_router_stats (`bool`, *optional*, defaults to `False`):
            Also compute per-layer router statistics (load, max-violation, entropy, dropped fraction, z-loss).
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            Compute logits for the last `logits_to_keep` positions only (0 = all), or for the given indices.
        """
        outputs, losses, statistics = self.decoder_forward(
            attention_mask,
            output_router_logits,
            output_router_stats,
            input_ids=input_ids,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))


        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            share = micro_batch_share(labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels"))
            loss = self.add_router_losses(loss, losses, share)

        return MoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=losses.get("router_aux_loss_coef"),
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            router_losses=losses or None,
            router_stats=statistics,
        )

    def generate(self, *args, **kwargs):
        # Routing that looks at other tokens is not causal: a cached decoding step would route differently from a
        # full forward over the same text.
        if self.config.router_type == "expert_choice":
            raise ValueError(
                "`router_type`='expert_choice' cannot generate: each expert picks its tokens among ALL tokens of the "
                "batch, so a token's routing depends on later tokens (not causal). Use it for training and "
                "sequence classification, or set router_type='token_choice' (e.g. a copy of the config with "
                "capacity_factor=None) to generate with the same weights."
            )
        if self.config.eval_capacity_factor is not None:
            raise ValueError(
                f"`eval_capacity_factor`={self.config.eval_capacity_factor} cannot generate: expert capacity is "
                "shared by all tokens of a forward, so whether a token is dropped depends on the other tokens and "
                "rows (a cached decoding step drops differently from a full forward). Set eval_capacity_factor=None "
                "(dropless inference) to generate."
            )
        return super().generate(*args, **kwargs)

    @contextmanager
    def _optimize_model_for_decode(self):
        # generate() runs transformers' `batched_mm` for the decoding steps of a model set to `grouped_mm` on a GPU
        # (fewer launches for a few tokens). `sorted_mm` is a training kernel, slower there than `batched_mm`
        # (BENCHMARKS.md, decode on the H100), and "auto" runs `grouped_mm` on a GPU: hand both over the same way.
        original, ours = self.get_experts_implementation(), (SORTED_MM, AUTO)
        swap = self.device.type != "cpu" and any(value in ours for value in original.values())
        if swap:
            self.set_experts_implementation({key: "grouped_mm" if value in ours else value
                                             for key, value in original.items()})
        try:
            with super()._optimize_model_for_decode():
                yield
        finally:
            if swap:
                self.set_experts_implementation(original)


@auto_docstring(
    custom_intro="The MoE decoder with a classification head on the last non-padding token of each sequence."
)
class MoEForSequenceClassification(_RouterLossMixin, MoEPreTrainedModel):
    # The classification losses are per-micro-batch means (regression and multi-label ignore `num_items_in_batch`),
    # so Trainer must average micro-batches itself: it then divides every term, the balancing losses included.
    accepts_loss_kwargs = False
    base_model_class = MoEModel

    def __init__(self, config: MoEDecoderConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_stats: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoESequenceClassifierOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices (or float targets for regression / multi-label, per `config.problem_type`).
        output_router_logits (`bool`, *optional*):
            Add every balancing loss whose coefficient is non-zero to `loss`. Defaults to
            `config.output_router_logits`.
        output_router_stats (`bool`, *optional*, defaults to `False`):
            Also compute per-layer router statistics (load, max-violation, entropy, dropped fraction, z-loss).
        """
        outputs, losses, statistics = self.decoder_forward(
            attention_mask,
            output_router_logits,
            output_router_stats,
            input_ids=input_ids,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # [B, S, num_labels]
        batch_size = logits.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot classify a batch of several sequences without `config.pad_token_id`.")
        if self.config.pad_token_id is None or input_ids is None:
            last_token = torch.full((batch_size,), -1, device=logits.device)
        else:
            # the rightmost token that is not padding (works for left and right padding)
            non_pad = (input_ids != self.config.pad_token_id).to(logits.device, torch.int32)
            positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last_token = (positions * non_pad).argmax(-1)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]  # [B, num_labels]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
            share = micro_batch_share(labels, kwargs.get("num_items_in_batch"), shifted=False)
            loss = self.add_router_losses(loss, losses, share)
        return MoESequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=losses.get("router_aux_loss_coef"),
            router_logits=outputs.router_logits,
            router_losses=losses or None,
            router_stats=statistics,
        )


@auto_docstring(custom_intro="The MoE decoder with a per-token classification head (e.g. named-entity recognition).")
class MoEForTokenClassification(_RouterLossMixin, MoEPreTrainedModel):
    base_model_class = MoEModel

    def __init__(self, config: MoEDecoderConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.base_model_class(config)
        # transformers' token-classification heads: dropout `classifier_dropout` (0.1 when unset), biased score
        classifier_dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if classifier_dropout is None else classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_stats: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoETokenClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            A class index per token; -100 is ignored.
        output_router_logits (`bool`, *optional*):
            Add every balancing loss whose coefficient is non-zero to `loss`. Defaults to
            `config.output_router_logits`.
        output_router_stats (`bool`, *optional*, defaults to `False`):
            Also compute per-layer router statistics (load, max-violation, entropy, dropped fraction, z-loss).
        """
        outputs, losses, statistics = self.decoder_forward(
            attention_mask,
            output_router_logits,
            output_router_stats,
            input_ids=input_ids,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))  # [B, S, num_labels]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config, **kwargs)
            share = micro_batch_share(labels, kwargs.get("num_items_in_batch"), shifted=False)
            loss = self.add_router_losses(loss, losses, share)
        return MoETokenClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=losses.get("router_aux_loss_coef"),
            router_logits=outputs.router_logits,
            router_losses=losses or None,
            router_stats=statistics,
        )


@auto_docstring(
    custom_intro="The MoE decoder with a span-extraction head (start and end logits per token), e.g. for SQuAD."
)
class MoEForQuestionAnswering(_RouterLossMixin, MoEPreTrainedModel):
    # the loss is a per-micro-batch mean: Trainer averages micro-batches itself (see MoEForSequenceClassification)
    accepts_loss_kwargs = False
    base_model_class = MoEModel

    def __init__(self, config: MoEDecoderConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        output_router_stats: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoEQuestionAnsweringModelOutput:
        r"""
        start_positions, end_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            The answer span's first and last token; positions past the sequence are ignored.
        output_router_logits (`bool`, *optional*):
            Add every balancing loss whose coefficient is non-zero to `loss`. Defaults to
            `config.output_router_logits`.
        output_router_stats (`bool`, *optional*, defaults to `False`):
            Also compute per-layer router statistics (load, max-violation, entropy, dropped fraction, z-loss).
        """
        outputs, losses, statistics = self.decoder_forward(
            attention_mask,
            output_router_logits,
            output_router_stats,
            input_ids=input_ids,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(dim=-1)  # [B, S] each
        start_logits, end_logits = start_logits.contiguous(), end_logits.contiguous()

        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
            loss = self.add_router_losses(loss, losses, share=1.0)
        return MoEQuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=losses.get("router_aux_loss_coef"),
            router_logits=outputs.router_logits,
            router_losses=losses or None,
            router_stats=statistics,
        )


# The two registered families: the same classes, bound to their config.


class MixtralMoEModel(MoEModel):
    """[`MoEModel`] for the `hf_moe_mixtral` model type."""

    config: MixtralMoEConfig


class MixtralMoEForCausalLM(MoEForCausalLM, GenerationMixin):
    """[`MoEForCausalLM`] for the `hf_moe_mixtral` model type."""

    config: MixtralMoEConfig
    base_model_class = MixtralMoEModel


class MixtralMoEForSequenceClassification(MoEForSequenceClassification):
    """[`MoEForSequenceClassification`] for the `hf_moe_mixtral` model type."""

    config: MixtralMoEConfig
    base_model_class = MixtralMoEModel


class MixtralMoEForTokenClassification(MoEForTokenClassification):
    """[`MoEForTokenClassification`] for the `hf_moe_mixtral` model type."""

    config: MixtralMoEConfig
    base_model_class = MixtralMoEModel


class MixtralMoEForQuestionAnswering(MoEForQuestionAnswering):
    """[`MoEForQuestionAnswering`] for the `hf_moe_mixtral` model type."""

    config: MixtralMoEConfig
    base_model_class = MixtralMoEModel


class DeepSeekMoEModel(MoEModel):
    """[`MoEModel`] for the `hf_moe_deepseek` model type."""

    config: DeepSeekMoEConfig


class DeepSeekMoEForCausalLM(MoEForCausalLM, GenerationMixin):
    """[`MoEForCausalLM`] for the `hf_moe_deepseek` model type."""

    config: DeepSeekMoEConfig
    base_model_class = DeepSeekMoEModel


class DeepSeekMoEForSequenceClassification(MoEForSequenceClassification):
    """[`MoEForSequenceClassification`] for the `hf_moe_deepseek` model type."""

    config: DeepSeekMoEConfig
    base_model_class = DeepSeekMoEModel


class DeepSeekMoEForTokenClassification(MoEForTokenClassification):
    """[`MoEForTokenClassification`] for the `hf_moe_deepseek` model type."""

    config: DeepSeekMoEConfig
    base_model_class = DeepSeekMoEModel


class DeepSeekMoEForQuestionAnswering(MoEForQuestionAnswering):
    """[`MoEForQuestionAnswering`] for the `hf_moe_deepseek` model type."""

    config: DeepSeekMoEConfig
    base_model_class = DeepSeekMoEModel


__all__ = [
    "MixtralMoEModel",
    "MixtralMoEForCausalLM",
    "MixtralMoEForSequenceClassification",
    "MixtralMoEForTokenClassification",
    "MixtralMoEForQuestionAnswering",
    "DeepSeekMoEModel",
    "DeepSeekMoEForCausalLM",
    "DeepSeekMoEForSequenceClassification",
    "DeepSeekMoEForTokenClassification",
    "DeepSeekMoEForQuestionAnswering",
]
