# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Mixtral-style and DeepSeekMoE-style decoders: one implementation, read top to bottom.

embed -> for each layer: RMSNorm -> attention -> residual -> RMSNorm -> (MoE block | dense MLP) -> residual
      -> RMSNorm -> lm_head
With `block_layout` (Brainformer) a layer is its own sequence of sub-blocks instead, each x + f(RMSNorm(x)) with f an
attention, a dense MLP or the MoE block (MoESubBlock).

MoE block: router (routing.py) -> routed experts (fused 3D weights, kernel chosen by `@use_experts_implementation`)
           + shared experts (optionally gated).
Attention: grouped-query (MoEAttention), multi-head latent (MoEMultiLatentAttention), or attention experts
           (MoEAttentionExperts: a router picks per-token query/output projections over shared keys and values).

Shapes: B batch, S sequence, T = B*S tokens, H hidden, E experts, k experts per token, I expert width,
nH / nKV attention / key-value heads, D head dim.

This file is copied next to every saved checkpoint so that `trust_remote_code=True` loads it without hf_moe
installed: it imports torch, transformers and, with single-dot imports, the files of this folder only.
"""

import math
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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_hf_moe import DeepSeekMoEConfig, MixtralMoEConfig, MoEDecoderConfig
from .experts_kernels import AUTO, SORTED_MM  # importing it registers "sorted_mm" and "auto"
from .routing import (
    AttentionExpertsRouter,
    TopKRouter,
    accumulate_router_statistics,
    attention_router_losses,
    depth_router_loss,
    micro_batch_share,
    router_losses,
    router_statistics,
    token_mask_for_router_rows,
)
from .transformers_compat import CACHE_NAME, slice_logits_to_keep  # the transformers versions the saved copies run on


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


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gated unit: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=limit).
    The clamps bound the activations; alpha = 1.702 makes g * sigmoid(alpha * g) the sigmoid approximation of GELU."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@use_experts_implementation
class MoEExperts(nn.Module):
    """The routed experts of one layer, as fused 3D weights (the layout transformers 5 uses in memory).

    This forward is the readable `eager` path; transformers' kernels (`grouped_mm`, `batched_mm`) and ours
    (`sorted_mm`, and "auto", the default: experts_kernels.py) replace it when selected with
    `experts_implementation=...`; every one of them calls `_apply_gate` for the gated unit. Expert ids >= num_experts
    (experts living on another rank under expert parallelism) are skipped; the routers never emit them (dropped slots
    keep a valid id with weight 0).
    """

    def __init__(self, config: MoEDecoderConfig):
        super().__init__()
        self.num_experts = config.num_experts
        hidden, width = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * width, hidden))  # [E, 2I, H], [gate; up]
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, width))  # [E, H, I]
        self.register_parameter("gate_up_proj_bias", None)  # [E, 2I] and [E, H] in MoEBiasedExperts
        self.register_parameter("down_proj_bias", None)
        self.act_fn = ACT2FN[config.hidden_act]
        self.experts_activation = config.experts_activation
        self.swiglu_alpha, self.swiglu_limit = config.swiglu_alpha, config.swiglu_limit

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:  # [S, 2I] -> [S, I]
        gate, up = gate_up.chunk(2, dim=-1)
        if self.experts_activation == "clamped_swiglu":
            return clamped_swiglu(gate, up, self.swiglu_alpha, self.swiglu_limit)
        return self.act_fn(gate) * up

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
            gate_up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx],
                               _expert_row(self.gate_up_proj_bias, expert_idx))
            expert_out = F.linear(self._apply_gate(gate_up), self.down_proj[expert_idx],
                                  _expert_row(self.down_proj_bias, expert_idx))
            expert_out = expert_out * top_k_weights[token_idx, k_slot, None]
            output.index_add_(0, token_idx, expert_out.to(output.dtype))
        return output


def _expert_row(bias: torch.Tensor | None, expert_idx: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias[expert_idx]


@use_experts_implementation(has_bias=True)
class MoEBiasedExperts(MoEExperts):
    """[`MoEExperts`] with a bias on each expert's projections (gpt-oss): `gate_up_proj_bias [E, 2I]` ([gate; up], as
    `gate_up_proj`) and `down_proj_bias [E, H]`. A class of its own because transformers' kernels read `has_bias`
    from the `use_experts_implementation` decorator."""

    def __init__(self, config: MoEDecoderConfig):
        super().__init__(config)
        hidden, width = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj_bias = nn.Parameter(torch.empty(self.num_experts, 2 * width))  # [E, 2I]
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, hidden))  # [E, H]


def experts_on_true_slots(experts: MoEExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:  # [T, H], [T, k], [T, k] -> [T, H]
    """The routed experts with AdaMoE's null experts (ids >= E), which output zero: only the (token, slot) pairs
    routed to a true expert reach the experts, as P = #pairs rows of one slot each ([P, H], [P, 1], [P, 1], through
    whichever experts implementation is set), and their outputs are summed back per token. A null pair is never
    computed; a token with null experts only gets 0."""
    token_idx, slot = (top_k_index < experts.num_experts).nonzero(as_tuple=True)  # [P] each
    output = torch.zeros_like(hidden_states)
    if token_idx.numel() == 0:
        return output
    pair_output = experts(hidden_states[token_idx], top_k_index[token_idx, slot, None],
                          top_k_weights[token_idx, slot, None])
    return output.index_add(0, token_idx, pair_output.to(output.dtype))


class MoESparseBlock(nn.Module):
    """Router -> routed experts (+ shared experts, optionally scaled by sigmoid(Linear(H, 1)) as Qwen2-MoE)."""

    def __init__(self, config: MoEDecoderConfig):
        super().__init__()
        self.gate = TopKRouter(config)
        self.experts = MoEBiasedExperts(config) if config.expert_bias else MoEExperts(config)
        self.shared_experts = (
            MoEMLP(config, config.shared_expert_intermediate_size) if config.n_shared_experts > 0 else None
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        # hidden_states [B, S, H]; token_mask [B, S] (1 at real tokens, optional) is recorded for the balancing losses
        input_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, input_shape[-1])  # [T, H]
        _, top_k_weights, top_k_index, _ = self.gate(hidden_states, token_mask)  # [T, k], [T, k]
        if self.gate.num_null_experts:
            output = experts_on_true_slots(self.experts, hidden_states, top_k_index, top_k_weights)
        else:
            output = self.experts(hidden_states, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            shared_output = self.shared_experts(hidden_states)
            if self.shared_expert_gate is not None:
                shared_output = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared_output
            output = output + shared_output
        return output.reshape(input_shape)


class MoESoftBlock(nn.Module):
    """Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts"), per sequence.

    For the m tokens X [m, H] of one sequence, n experts of p = `num_slots` slots and slot parameters phi [H, n*p]:
        L = scale * l2norm_rows(X) @ l2norm_cols(phi)                       [m, n*p]  (the paper's normalisation)
        D = softmax over tokens of L (each column; padding masked out)      dispatch
        C = softmax over slots of L (each row)                              combine
        slot s = D[:, s]^T X, processed by expert s // p;    Y = C @ expert outputs
    No token is dropped and there is no auxiliary loss. NOT causal: every slot mixes every token of the sequence,
    so `generate` refuses it.
    """

    def __init__(self, config: MoEDecoderConfig):
        super().__init__()
        self.num_experts, self.num_slots = config.num_experts, config.num_slots
        self.slot_embeds = nn.Parameter(torch.empty(config.hidden_size, self.num_experts * self.num_slots))  # [H, n*p]
        self.scale = nn.Parameter(torch.ones(()))  # learned scalar of the normalised logits, init 1
        self.experts = MoEBiasedExperts(config) if config.expert_bias else MoEExperts(config)
        self.shared_experts = (
            MoEMLP(config, config.shared_expert_intermediate_size) if config.n_shared_experts > 0 else None
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, hidden = hidden_states.shape  # [B, S, H]; token_mask [B, S], 0 at padding
        # without the normalisation the logits grow with H and both softmaxes collapse to one-hot (the paper, 2.3)
        logits = torch.einsum("bsh,hn->bsn", F.normalize(hidden_states, dim=-1),
                              self.scale * F.normalize(self.slot_embeds, dim=0))  # [B, S, n*p]
        dispatch_logits = logits
        if token_mask is not None:  # padding takes no part in any slot (a finite fill: no NaN for an all-pad row)
            dispatch_logits = logits.masked_fill(~token_mask.bool()[..., None], torch.finfo(logits.dtype).min)
        dispatch = dispatch_logits.softmax(dim=1, dtype=torch.float32).to(hidden_states.dtype)
        combine = logits.softmax(dim=-1, dtype=torch.float32).to(hidden_states.dtype)
        slots = torch.einsum("bsn,bsh->bnh", dispatch, hidden_states)  # [B, n*p, H]
        # slot s goes to expert s // p, with weight 1: the routed experts' kernels run it
        expert_of_slot = torch.arange(self.num_experts, device=slots.device).repeat_interleave(self.num_slots)
        expert_of_slot = expert_of_slot.repeat(batch)[:, None]  # [B*n*p, 1]
        slot_outputs = self.experts(slots.reshape(-1, hidden), expert_of_slot,
                                    torch.ones(expert_of_slot.shape, dtype=slots.dtype, device=slots.device))
        output = torch.einsum("bsn,bnh->bsh", combine, slot_outputs.reshape(batch, -1, hidden))
        return output + _shared_output(self, hidden_states)


class MoESoftMergingBlock(nn.Module):
    """Causal soft mixture: each token merges the experts' weights with its own router probabilities, then runs one
    FFN with the merged weights (SMEAR, Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive Routing", which
    routes once per example; here per token, so that no token reads another and the block is causal).

        p = softmax(W_r x)                                                  [E]
        y = (sum_e p_e D_e) act((sum_e p_e G_e) x) * ((sum_e p_e U_e) x)    (+ sum_e p_e b_e for expert biases)

    The merged matrices are never built: a linear map is linear in its weights, so (sum_e p_e W_e) v =
    sum_e p_e (W_e v). That costs E dense FFNs per token, but memory [T, E, 2I] rather than [T, 2I, H].
    """

    def __init__(self, config: MoEDecoderConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # W_r [E, H]
        self.experts = MoEBiasedExperts(config) if config.expert_bias else MoEExperts(config)
        self.shared_experts = (
            MoEMLP(config, config.shared_expert_intermediate_size) if config.n_shared_experts > 0 else None
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, S, H]
        experts = self.experts
        probs = self.gate(hidden_states).softmax(dim=-1, dtype=torch.float32).to(hidden_states.dtype)  # [B, S, E]
        gate_up = torch.einsum("bse,bsei->bsi", probs,
                               torch.einsum("bsh,eih->bsei", hidden_states, experts.gate_up_proj))  # [B, S, 2I]
        if experts.gate_up_proj_bias is not None:
            gate_up = gate_up + probs @ experts.gate_up_proj_bias
        intermediate = experts._apply_gate(gate_up)  # [B, S, I]
        output = torch.einsum("bse,bseh->bsh", probs,
                              torch.einsum("bsi,ehi->bseh", intermediate, experts.down_proj))  # [B, S, H]
        if experts.down_proj_bias is not None:
            output = output + probs @ experts.down_proj_bias
        return output + _shared_output(self, hidden_states)


def _shared_output(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | float:
    """The always-on shared experts of a soft block (0 without), gated as in MoESparseBlock."""
    if block.shared_experts is None:
        return 0.0
    shared_output = block.shared_experts(hidden_states)
    if block.shared_expert_gate is not None:
        shared_output = torch.sigmoid(block.shared_expert_gate(hidden_states)) * shared_output
    return shared_output


SPARSE_BLOCK_CLASSES = {"routed": MoESparseBlock, "soft_moe": MoESoftBlock, "soft_merging": MoESoftMergingBlock}


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


class MoEHeadRMSNorm(MoERMSNorm):
    """RMSNorm over each head of a [..., heads * head_dim] projection (Qwen3-MoE, GLM-4.5): one weight [head_dim]
    shared by the heads."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        heads = hidden_states.unflatten(-1, (-1, self.weight.shape[0]))
        return super().forward(heads).flatten(-2)


def qk_norms(config: MoEDecoderConfig, head_dim: int) -> tuple[nn.Module, nn.Module]:
    """The q and k norms of `config.qk_norm_type`, each applied to a whole projection output: per head (weights
    [head_dim]) or over the whole projection (OLMoE: weights [nH * head_dim] and [nKV * head_dim]); identities
    without `qk_norm`."""
    if not config.qk_norm:
        return nn.Identity(), nn.Identity()
    if config.qk_norm_type == "per_head":
        return MoEHeadRMSNorm(head_dim, config.rms_norm_eps), MoEHeadRMSNorm(head_dim, config.rms_norm_eps)
    return (MoERMSNorm(config.num_attention_heads * head_dim, config.rms_norm_eps),
            MoERMSNorm(config.num_key_value_heads * head_dim, config.rms_norm_eps))


class MoERotaryEmbedding(nn.Module):
    """RoPE with every scaling type of `config.rope_parameters["rope_type"]` (transformers' ROPE_INIT_FUNCTIONS), over
    `config.head_dim` dimensions: the head dim, or qk_rope_head_dim under multi-head latent attention (the config sets
    head_dim to it, which is what transformers' initialisers read)."""

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
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))  # the rotated dims
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
    """q, k: [B, heads, S, D]; cos, sin: [B, S, R], R <= D. Rotates the halves of the first R dims (all of them, or
    partial RoPE: GLM-4.5's first half) and passes the other D - R through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < q.shape[-1]:
        q_embed, k_embed = apply_rotary_pos_emb(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
        return torch.cat((q_embed, q[..., rotary_dim:]), dim=-1), torch.cat((k_embed, k[..., rotary_dim:]), dim=-1)
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
    s_aux: torch.Tensor | None = None,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention; `s_aux` [nH] (attention sinks, gpt-oss) adds one logit per head to every row of the softmax,
    whose probability is then dropped: P_ij = exp(l_ij) / (sum_j exp(l_ij) + exp(s_aux[h]))."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    if s_aux is not None:
        sinks = s_aux.to(attn_weights.dtype).reshape(1, -1, 1, 1).expand(*attn_weights.shape[:-1], 1)
        attn_weights = torch.cat([attn_weights, sinks], dim=-1)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = attn_weights[..., : key_states.shape[-2]]
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # [B, S, nH, D]
    return attn_output, attn_weights


def sdpa_attention_with_sinks(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """torch's scaled_dot_product_attention with attention sinks, which it cannot take (transformers' sdpa silently
    ignores `s_aux`): the sink is one more key, with value 0, whose additive mask entry is the head's sink logit; its
    logit q . 0 + s_aux[h] = s_aux[h] joins the softmax and adds nothing to the output, as in
    `eager_attention_forward`. The boolean or None mask of transformers' sdpa mask functions is made additive
    (None: causal, aligned to the last key, or every key for one query)."""
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    batch, heads, query_len, _ = query.shape
    kv_len = key.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones(query_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - query_len)
    if attention_mask.dtype == torch.bool:
        blocked = torch.finfo(query.dtype).min
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(~attention_mask, blocked)
    attention_mask = attention_mask[..., :kv_len].expand(batch, heads, query_len, kv_len)
    sinks = s_aux.to(query.dtype).reshape(1, -1, 1, 1).expand(batch, heads, query_len, 1)
    attn_output = F.scaled_dot_product_attention(
        query,
        F.pad(key, (0, 0, 0, 1)),  # [B, nH, S_kv + 1, D]: the sink's key and value are zero
        F.pad(value, (0, 0, 0, 1)),
        attn_mask=torch.cat([attention_mask, sinks], dim=-1),
        dropout_p=dropout,
        scale=scaling,
    )
    return attn_output.transpose(1, 2).contiguous(), None


# Attention kernels that apply `s_aux` (attention sinks); transformers' other flash kernels drop it silently
_KERNELS_WITH_SINKS = ("eager", "sdpa", "flex_attention", "flash_attention_4", "kernels-community/vllm-flash-attn3")


def attention_function(implementation: str, sinks: torch.Tensor | None) -> Callable:
    """The kernel of `config._attn_implementation` from transformers' attention interface, ours for eager; with
    attention sinks, `sdpa_attention_with_sinks` for sdpa, and a ValueError for kernels that would drop them."""
    if sinks is not None:
        if implementation not in _KERNELS_WITH_SINKS:
            raise ValueError(
                f"`attn_implementation`={implementation!r} cannot apply attention sinks (`attention_sinks`=True): "
                f"allowed: {_KERNELS_WITH_SINKS}."
            )
        if implementation == "sdpa":
            return sdpa_attention_with_sinks
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


def clip(states: torch.Tensor, limit: float | None) -> torch.Tensor:
    """OLMoE's `clip_qkv`: clamp to [-limit, limit]; None = no clipping."""
    return states if limit is None else states.clamp(min=-limit, max=limit)


class MoEAttention(nn.Module):
    """Grouped-query attention with RoPE (optionally on part of each head, GLM-4.5), optional biases on q/k/v
    (Qwen2-MoE, GLM-4.5) and o (OLMoE, gpt-oss), q/k RMSNorm per head (Qwen3-MoE) or over the whole projection
    (OLMoE), q/k/v clipping (OLMoE), a sliding window on all or some layers (Mistral, gpt-oss) and attention sinks
    (gpt-oss). The kernel comes from transformers' attention interface (eager, sdpa, flex, flash)."""

    def __init__(self, config: MoEDecoderConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        sliding = config.attention_layer_types()[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                bias=config.o_proj_bias)
        self.q_norm, self.k_norm = qk_norms(config, self.head_dim)
        self.sinks = nn.Parameter(torch.empty(config.num_attention_heads)) if config.attention_sinks else None  # [nH]

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
        query_states = clip(self.q_norm(self.q_proj(hidden_states)), self.config.clip_qkv)  # [B, S, nH * D]
        query_states = query_states.view(*input_shape, -1, self.head_dim).transpose(1, 2)  # [B, nH, S, D]
        attn_output, attn_weights = self.attend(query_states, hidden_states, position_embeddings, attention_mask,
                                                cache, **kwargs)  # [B, S, nH, D]
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights

    def attend(
        self,
        query_states: torch.Tensor,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The queries [B, nQ, S, D] attend to the keys and values of `hidden_states` [B, S, H] (projected, RoPE,
        cached): -> ([B, S, nQ, D], weights). Query head j reads key-value head j // num_key_value_groups."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        key_states = clip(self.k_norm(self.k_proj(hidden_states)), self.config.clip_qkv)  # [B, S, nKV * D]
        value_states = clip(self.v_proj(hidden_states), self.config.clip_qkv)
        key_states = key_states.view(hidden_shape).transpose(1, 2)  # [B, nKV, S, D]
        value_states = value_states.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface = attention_function(self.config._attn_implementation, self.sinks)
        return attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            s_aux=self.sinks,
            **kwargs,
        )


def per_expert_linear(inputs: torch.Tensor, expert_index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[t, j] = weight[expert_index[t, j]] @ inputs[t, j]: [T, k, in], [T, k], [E, out, in] -> [T, k, out].
    One matrix product per expert on the rows routed to it (the eager loop of `MoEExperts`, without the sum over a
    token's slots)."""
    rows, index = inputs.reshape(-1, inputs.shape[-1]), expert_index.reshape(-1)  # [T * k, in], [T * k]
    output = rows.new_zeros(index.shape[0], weight.shape[1])  # [T * k, out]
    for expert in index.unique().tolist():
        routed = (index == expert).nonzero().squeeze(-1)
        output.index_copy_(0, routed, F.linear(rows[routed], weight[expert]))
    return output.view(*expert_index.shape, -1)


class MoEAttentionExperts(MoEAttention):
    """Attention experts with shared keys and values: JetMoE's mixture of attention heads (Shen et al. 2024, "JetMoE:
    Reaching Llama2 Performance with 0.1M Dollars"), after Zhang et al. 2022, "Mixture of Attention Heads".

    Each of the E_a experts owns a query projection Q_i and an output projection O_i shaped as a dense attention's
    (nH = `num_attention_heads` heads of D); ONE key and value projection (nKV heads) serves every expert, so the KV
    cache is the dense model's. Per token t, with the router's top-k experts and weights g_t (summing to 1):

        q_{t,i} = RoPE(Q_i x_t)                                                [nH, D]  for each chosen expert i
        a_{t,i} = softmax(q_{t,i} K^T * D^-0.5 + causal mask) V                K = RoPE(k_proj X), V = v_proj X
        y_t     = sum_i g_{t,i} O_i a_{t,i}   (+ `o_proj_bias` b, shared by the experts)

    Head h of every expert reads key-value head h // (nH / nKV), as in the dense attention: the k chosen experts'
    heads run as one grouped-query attention of k * nH query heads (transformers' attention interface, any kernel).
    The router reads only x_t, so a decoding step routes its token as the full forward does. With every expert a copy
    of a dense attention's q_proj and o_proj, the layer computes that dense attention.
    """

    def __init__(self, config: MoEDecoderConfig, layer_idx: int):
        super().__init__(config, layer_idx)  # the shared k_proj and v_proj (and q/k norms), RoPE and kernel settings
        num_experts, hidden = config.num_attention_experts, config.hidden_size
        width = config.num_attention_heads * self.head_dim
        self.top_k = config.num_attention_experts_per_tok
        self.num_key_value_groups *= self.top_k  # each key-value head serves its heads of all k chosen experts
        self.gate = AttentionExpertsRouter(config)
        # the dense q_proj and o_proj become one per expert, in nn.Linear's [out, in] layout
        self.q_proj = nn.Parameter(torch.empty(num_experts, width, hidden))  # [E_a, nH * D, H]
        self.o_proj = nn.Parameter(torch.empty(num_experts, hidden, width))  # [E_a, H, nH * D]
        self.o_proj_bias = nn.Parameter(torch.empty(hidden)) if config.o_proj_bias else None  # [H]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, hidden = hidden_states.shape
        groups = self.config.num_attention_heads // self.config.num_key_value_heads  # each expert's heads per kv head
        tokens = hidden_states.reshape(-1, hidden)  # [T, H]
        _, top_k_weights, top_k_index, _ = self.gate(tokens)  # [T, k], [T, k]

        # map: each chosen expert's query, [T, k, nH * D], then the heads ordered by the key-value head they read
        query_states = per_expert_linear(tokens[:, None].expand(-1, self.top_k, -1), top_k_index, self.q_proj)
        query_states = clip(self.q_norm(query_states), self.config.clip_qkv)
        query_states = query_states.view(batch, seq_len, self.top_k, -1, groups, self.head_dim)  # [B, S, k, nKV, g, D]
        query_states = query_states.permute(0, 3, 2, 4, 1, 5)  # [B, nKV, k, g, S, D]
        query_states = query_states.reshape(batch, -1, seq_len, self.head_dim)  # [B, k * nH, S, D]
        attn_output, attn_weights = self.attend(query_states, hidden_states, position_embeddings, attention_mask,
                                                cache, **kwargs)  # [B, S, k * nH, D]

        # reduce: each expert's heads back together, through its output projection, weighted by the router
        attn_output = attn_output.reshape(batch, seq_len, -1, self.top_k, groups, self.head_dim)  # [B,S,nKV,k,g,D]
        attn_output = attn_output.transpose(2, 3).reshape(batch * seq_len, self.top_k, -1)  # [T, k, nH * D]
        expert_outputs = per_expert_linear(attn_output, top_k_index, self.o_proj)  # [T, k, H]
        output = (top_k_weights[..., None] * expert_outputs).sum(dim=1)  # [T, H]
        if self.o_proj_bias is not None:
            output = output + self.o_proj_bias
        return output.view(batch, seq_len, hidden), attn_weights


def apply_interleaved_rotary_pos_emb(q, k, cos, sin):
    """RoPE on dimensions stored as interleaved pairs (x0, x1), (x2, x3), ..., pair i rotated by frequency i: the
    layout of DeepSeek-V2/V3 checkpoints (V2 multiplies the pairs as complex numbers). The output lists the rotated
    first elements of the pairs, then the rotated second elements, as transformers' DeepseekV3 does: q and k are
    reordered alike, so q . k is V2's. q, k: [B, heads, S, D]; cos, sin: [B, S, D], each half = the D/2 angles."""
    cos, sin = cos[..., : cos.shape[-1] // 2].unsqueeze(1), sin[..., : sin.shape[-1] // 2].unsqueeze(1)
    q1, q2 = q[..., 0::2], q[..., 1::2]
    k1, k2 = k[..., 0::2], k[..., 1::2]
    q_embed = torch.cat((q1 * cos - q2 * sin, q2 * cos + q1 * sin), dim=-1)
    k_embed = torch.cat((k1 * cos - k2 * sin, k2 * cos + k1 * sin), dim=-1)
    return q_embed, k_embed


def mla_softmax_scale(config: MoEDecoderConfig) -> float:
    """(qk_nope_head_dim + qk_rope_head_dim)^-0.5, times mscale^2 = (0.1 * mscale_all_dim * ln(factor) + 1)^2 when a
    scaled RoPE (YaRN) sets `mscale_all_dim` and factor > 1: DeepSeek-V2/V3 stretch every dimension of the logits, not
    only the rotary ones that YaRN's attention factor scales (transformers' `yarn_apply_mscale`)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    rope = config.rope_parameters
    mscale_all_dim = rope.get("mscale_all_dim") or 0
    if rope.get("rope_type", "default") != "default" and mscale_all_dim and rope["factor"] > 1:
        mscale = 0.1 * mscale_all_dim * math.log(rope["factor"]) + 1.0
        scale = scale * mscale * mscale
    return scale


class MoEMultiLatentAttention(nn.Module):
    """Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024, section 2.1), as DeepSeek-V2/V3 and
    transformers' DeepseekV3Attention compute it. Keys and values of all heads come from one low-rank latent c_kv
    per token, plus one rotary key k_rope shared by all heads:

        q            = q_b_proj(RMSNorm(q_a_proj(x)))  or  q_proj(x)            [nH, d_nope + d_rope]
        c_kv, k_rope = kv_a_proj_with_mqa(x);  c_kv = RMSNorm(c_kv)             [r], [d_rope]
        k_nope, v    = kv_b_proj(c_kv)                                          [nH, d_nope], [nH, d_v]
        head h:  softmax(([q_nope; RoPE(q_rope)] . [k_nope; RoPE(k_rope)]) * scale) v

    The cache holds (c_kv, RoPE(k_rope)) as one "head" each, r + d_rope numbers per token and layer instead of
    nH * (d_nope + d_rope + d_v), and the keys and values are up-projected from it at every step (transformers'
    DeepseekV3 layout, so its caches and ours hold the same tensors). scale: `mla_softmax_scale`. The kernel comes
    from transformers' attention interface; flash attention pads v to the key's head dim itself.
    """

    def __init__(self, config: MoEDecoderConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.num_key_value_groups = 1  # every query head has its own key and value
        self.scaling = mla_softmax_scale(config)
        self.attention_dropout = config.attention_dropout
        sliding = config.attention_layer_types()[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        self.is_causal = True
        hidden, num_heads = config.hidden_size, config.num_attention_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=False)
            self.q_a_layernorm = MoERMSNorm(self.q_lora_rank)  # eps 1e-6, not rms_norm_eps, as DeepSeek's code
            self.q_b_proj = nn.Linear(self.q_lora_rank, num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = MoERMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, hidden, bias=False)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            query_states = self.q_proj(hidden_states)
        else:
            query_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        query_states = query_states.view(batch_size, seq_len, -1, self.qk_head_dim).transpose(1, 2)  # [B, nH, S, Dqk]
        q_nope, q_rope = query_states.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent).view(batch_size, 1, seq_len, self.kv_lora_rank)  # [B, 1, S, r]
        k_rope = k_rope.view(batch_size, 1, seq_len, self.qk_rope_head_dim)  # [B, 1, S, d_rope], shared by the heads

        cos, sin = position_embeddings
        rotate = apply_interleaved_rotary_pos_emb if self.config.rope_interleave else apply_rotary_pos_emb
        q_rope, k_rope = rotate(q_rope, k_rope, cos, sin)
        if cache is not None:  # the latent of every token so far: [B, 1, S_kv, r], [B, 1, S_kv, d_rope]
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx, kwargs=kwargs)

        kv_len = latent.shape[2]
        key_value = self.kv_b_proj(latent).view(batch_size, kv_len, -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value_states = key_value.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key_states = torch.cat((k_nope, k_rope.expand(*k_nope.shape[:-1], -1)), dim=-1)  # [B, nH, S_kv, Dqk]
        query_states = torch.cat((q_nope, q_rope), dim=-1)  # [B, nH, S, Dqk]; value_states: [B, nH, S_kv, d_v]

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
        )  # [B, S, nH, d_v]
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_len, -1).contiguous())
        return attn_output, attn_weights


ATTENTION_CLASSES = {"gqa": MoEAttention, "mla": MoEMultiLatentAttention}


class MoDRouter(nn.Module):
    """Mixture-of-Depths router (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating compute in
    transformer-based language models"): one scalar `r_i = w . x_i` per token (Linear(H, 1), no bias).

    Which tokens the block processes:
        training:          the top C = ceil(mod_capacity * S) real tokens of each sequence by r (not causal)
        evaluation/decode: every real token with r_i > 0, i.e. sigmoid(r_i) > 0.5 (causal: token i alone decides)
    Padding is never chosen. The loss `routing.depth_router_loss` teaches the second rule to follow the first.
    Returns (logits [B, S], chosen [B, S] bool, the decision recorded for that loss)."""

    def __init__(self, config: MoEDecoderConfig):
        super().__init__()
        self.capacity = config.mod_capacity
        self.proj = nn.Linear(config.hidden_size, 1, bias=False)  # w [1, H]

    def top_c(self, seq_len: int) -> int:
        """C = ceil(mod_capacity * S) tokens per sequence in training (at most S)."""
        return min(seq_len, math.ceil(self.capacity * seq_len))

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        logits = self.proj(hidden_states).squeeze(-1)  # [B, S]
        real = torch.ones_like(logits, dtype=torch.bool) if token_mask is None else token_mask.bool()
        if self.training:
            capacity = self.top_c(logits.shape[1])
            scores = logits.detach().masked_fill(~real, -torch.inf)
            chosen = torch.zeros_like(real).scatter(1, scores.topk(capacity, dim=1).indices, True) & real
        else:
            chosen = (logits > 0) & real
        return logits, chosen, (logits, chosen, real, self.training)


def depth_attention_mask(query_pos: torch.Tensor, key_chosen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive [B, 1, C, K] mask of a Mixture-of-Depths layer's attention: query c (at position query_pos[b, c])
    sees key j (at position j) iff j <= query_pos and key j was chosen (`key_chosen [B, K]`), so the chosen tokens
    attend among themselves, causally. A query that was not chosen (a row's padding slot) sees only itself, so that no
    softmax row is empty; its output is dropped."""
    key_pos = torch.arange(key_chosen.shape[1], device=key_chosen.device)[None, None, :]
    query_pos = query_pos[:, :, None]
    allowed = (key_pos <= query_pos) & (key_chosen[:, None, :] | (key_pos == query_pos))  # [B, C, K]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_chosen.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def depth_cached_layer(cache: Cache | None, layer_idx: int):
    """The cache layer of a Mixture-of-Depths layer once it holds keys, else None."""
    layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
    if layer is not None and getattr(layer, "is_initialized", False) and layer.keys.numel() > 0:
        return layer
    return None


class DepthRoutedCache:
    """The cache as a Mixture-of-Depths layer's attention sees it while it runs on the C gathered tokens of this
    forward's S: `update` scatters their keys and values to their positions in zeros [B, heads, S, D] (the padding
    slots of a row write nothing) before the real cache appends them, and returns every cached key and value. A
    skipped token thus keeps a zero key, the mark that later steps read (`depth_attention_mask`), and every layer's
    cache keeps one entry per token (which the cache's reordering and cropping preserve). Anything else is the
    real cache's."""

    def __init__(self, cache: Cache, index: torch.Tensor, valid: torch.Tensor, seq_len: int):
        self.cache, self.index, self.valid, self.seq_len = cache, index, valid, seq_len  # index, valid: [B, C]

    def scatter(self, states: torch.Tensor) -> torch.Tensor:  # [B, heads, C, D] -> [B, heads, S, D]
        batch, heads, _, dim = states.shape
        index = self.index[:, None, :, None].expand(-1, heads, -1, dim)
        states = states.masked_fill(~self.valid[:, None, :, None], 0)
        return states.new_zeros(batch, heads, self.seq_len, dim).scatter(2, index, states)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.cache.update(self.scatter(key_states), self.scatter(value_states), layer_idx, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def attention_block(config: MoEDecoderConfig, attention_idx: int) -> nn.Module:
    """The attention of `config.attention_type`, or attention experts; `attention_idx` numbers the model's attentions
    (its KV-cache layer): the layer index, or the attention sub-block's index over the whole `block_layout`."""
    if config.num_attention_experts is not None:  # routed query and output projections, shared keys and values
        return MoEAttentionExperts(config, attention_idx)
    return ATTENTION_CLASSES[config.attention_type](config, attention_idx)


def feed_forward_block(config: MoEDecoderConfig, sparse: bool) -> nn.Module:
    """The sparse block of `config.moe_block_type`, or a dense MLP of width `intermediate_size`."""
    return SPARSE_BLOCK_CLASSES[config.moe_block_type](config) if sparse else MoEMLP(config, config.intermediate_size)


def run_feed_forward(mlp: nn.Module, hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """A feed-forward block on normed hidden states; the blocks that read the padding mask get it."""
    if isinstance(mlp, (MoESoftBlock, MoESparseBlock)):
        return mlp(hidden_states, token_mask)
    return mlp(hidden_states)


def causal_mask_for(attention_mask: torch.Tensor | dict | None, layer_type: str) -> torch.Tensor | None:
    """The mask of an attention of `layer_type` ("full_attention" or "sliding_attention"): `attention_mask` itself,
    or its entry when it holds one mask per type (what the model passes)."""
    return attention_mask[layer_type] if isinstance(attention_mask, dict) else attention_mask


class MoESubBlock(nn.Module):
    """One sub-block of a `block_layout` layer (Brainformer, Zhou et al. 2023: attention, dense FFN or sparsely gated
    FFN in any order and count), a pre-norm residual branch: returns f(norm(x)), which the layer adds to x. Its
    module is `self_attn` (an attention, numbered `attention_idx` over the whole model for the KV cache) or `mlp`
    (a dense MLP or the sparse block), the names of a standard layer's modules."""

    def __init__(self, config: MoEDecoderConfig, kind: str, attention_idx: int | None = None):
        super().__init__()
        self.kind = kind
        self.norm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if kind == "attention":
            self.self_attn = attention_block(config, attention_idx)
            self.attention_type = config.attention_layer_types()[attention_idx]
        else:
            self.mlp = feed_forward_block(config, sparse=kind == "moe")

    def forward(self, hidden_states, attention_mask, position_embeddings, position_ids, cache, token_mask, **kwargs):
        hidden_states = self.norm(hidden_states)
        if self.kind != "attention":
            return run_feed_forward(self.mlp, hidden_states, token_mask)
        update, _ = self.self_attn(
            hidden_states,  # positional: PEFT's `target_parameters` wrapper takes the input as `x`
            position_embeddings=position_embeddings,
            attention_mask=causal_mask_for(attention_mask, self.attention_type),
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        return update


class MoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoEDecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.blocks = None
        if config.block_layout is None:  # attention, then the feed-forward of mlp_layer_types
            self.self_attn = attention_block(config, layer_idx)
            self.attention_type = config.attention_layer_types()[layer_idx]
            self.mlp = feed_forward_block(config, sparse=config.mlp_layer_types[layer_idx] == "sparse")
            self.input_layernorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_attention_layernorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:  # the layer's own sequence of sub-blocks; attentions numbered over the whole model (KV-cache layers)
            attention_idx = sum(layer.count("attention") for layer in config.block_layout[:layer_idx])
            blocks = []
            for kind in config.block_layout[layer_idx]:
                blocks.append(MoESubBlock(config, kind, attention_idx))
                if kind == "attention":
                    attention_idx += 1
            self.blocks = nn.ModuleList(blocks)
        # Mixture-of-Depths: this block processes only the tokens its router chooses (MoDRouter)
        self.mod_router = MoDRouter(config) if layer_idx in (config.mod_layers or ()) else None

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        r"""
        attention_mask (`torch.Tensor` or `dict[str, torch.Tensor]`, *optional*):
            The causal mask, or one per attention layer type ("full_attention", "sliding_attention"), of which each
            attention takes its own.
        token_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 at real tokens, 0 at padding: Soft MoE keeps padding out of its slots; a routed block's router records
            it for the balancing losses (other blocks ignore it).
        """
        if self.mod_router is not None:
            return self.depth_routed_forward(hidden_states, position_embeddings, position_ids, cache, token_mask,
                                             **kwargs)
        if self.blocks is not None:  # block_layout: x + f(norm(x)) for each sub-block in turn
            for block in self.blocks:
                hidden_states = hidden_states + block(hidden_states, attention_mask, position_embeddings,
                                                      position_ids, cache, token_mask, **kwargs)
            return hidden_states
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states,  # positional: PEFT's `target_parameters` wrapper takes the input as `x`
            position_embeddings=position_embeddings,
            attention_mask=causal_mask_for(attention_mask, self.attention_type),
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.feed_forward(hidden_states, token_mask)

    def feed_forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        return run_feed_forward(self.mlp, self.post_attention_layernorm(hidden_states), token_mask)

    def depth_routed_forward(self, hidden_states, position_embeddings, position_ids, cache, token_mask, **kwargs):
        """Mixture-of-Depths (Raposo et al. 2024): x + r * f(x~) for a chosen token, x for the others. x~ are the
        chosen tokens of the sequence, gathered in their original order; f(x~) = a + m is the block's update on them
        alone (a: attention among them, causal, at their original positions; m: the feed-forward of x~ + a), and r
        the router logit (`MoDRouter`), which puts the router on the gradient path. The skipped tokens are not
        computed: the block runs on [B, C] gathered tokens and the result is scattered back.

        Training gathers each sequence's top C; evaluation and decoding gather each row's tokens with r > 0, as many
        as the row with the most, the rows with fewer padded with unchosen tokens whose results are dropped (they
        are no key of any query). With a KV cache the chosen queries attend to the chosen keys of every step so far:
        `DepthRoutedCache` stores a skipped token's key and value as zeros, and a step in which no row chooses a token
        only appends those zeros."""
        implementation = self.self_attn.config._attn_implementation
        if implementation not in ("eager", "sdpa"):
            raise ValueError(f"`attn_implementation`={implementation!r} cannot run a Mixture-of-Depths layer "
                             "(`mod_layers`), whose attention mask depends on the router: use 'eager' or 'sdpa'.")
        if getattr(cache, "is_compileable", False):  # a static cache holds zeros at the positions not yet written
            raise ValueError(f"A Mixture-of-Depths layer (`mod_layers`) reads a skipped token as a zero key in a cache "
                             f"that grows one entry per token; {type(cache).__name__} is preallocated: decode with "
                             f"the default dynamic cache (`cache_implementation`: allowed None or 'dynamic').")
        router_logits, chosen, _ = self.mod_router(hidden_states, token_mask)
        batch, seq_len, hidden = hidden_states.shape
        # C: fixed in training (no host sync); the largest row's count at inference
        capacity = self.mod_router.top_c(seq_len) if self.training else int(chosen.sum(dim=1).max())
        cached = depth_cached_layer(cache, self.layer_idx)
        if capacity == 0:
            if cached is not None:  # nothing to compute: the cache only records that these tokens were skipped
                cache.update(cached.keys.new_zeros(*cached.keys.shape[:2], seq_len, cached.keys.shape[-1]),
                             cached.values.new_zeros(*cached.values.shape[:2], seq_len, cached.values.shape[-1]),
                             self.layer_idx)
                return hidden_states
            capacity = 1  # one padding slot, so that the cache layer learns its shapes (its keys are stored as zeros)
        # each row's chosen tokens first, in their original order, then its unchosen ones: the first C are gathered
        index = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices[:, :capacity]  # [B, C]
        valid = chosen.gather(1, index)  # [B, C]: False at a row's padding slots

        def gather(states: torch.Tensor) -> torch.Tensor:  # [B or 1, S, D] -> [B, C, D]
            states = states.expand(batch, -1, -1)
            return states.gather(1, index[..., None].expand(-1, -1, states.shape[-1]))

        selected = gather(hidden_states)  # x~ [B, C, H]
        if cache is None:  # the gathered tokens are the keys, in position order
            past = 0
            query_pos, key_chosen = torch.arange(capacity, device=index.device).expand(batch, -1), valid
        else:  # the keys are every cached token and this forward's S: chosen iff not a zero key
            past_chosen = (cached.keys.ne(0).any(dim=-1).any(dim=1) if cached is not None
                           else chosen.new_zeros(batch, 0))  # [B, P]
            past = past_chosen.shape[1]
            query_pos, key_chosen = index + past, torch.cat((past_chosen, chosen), dim=1)
        attention, _ = self.self_attn(
            self.input_layernorm(selected),  # positional, as in MoEDecoderLayer.forward
            position_embeddings=tuple(gather(states) for states in position_embeddings),
            attention_mask=depth_attention_mask(query_pos, key_chosen, hidden_states.dtype),
            position_ids=index + past,
            cache=None if cache is None else DepthRoutedCache(cache, index, valid, seq_len),
            **kwargs,
        )
        update = attention + self.feed_forward(selected + attention, valid)
        router_weight = router_logits.gather(1, index)[..., None].to(update.dtype)
        routed = torch.where(valid[..., None], selected + router_weight * update, selected)
        return hidden_states.scatter(1, index[..., None].expand(-1, -1, hidden), routed)


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
        "depth_decisions": OutputRecorder(MoDRouter, index=2),  # Mixture-of-Depths, for its router loss
        "attention_router_decisions": OutputRecorder(AttentionExpertsRouter, index=3),  # attention experts' losses
        "hidden_states": MoEDecoderLayer,
        "attentions": [MoEAttention, MoEMultiLatentAttention],
    }

    def post_init(self):
        # kept in fp32 when loading in bf16/fp16: the selection bias, and the router weight with `router_in_fp32`
        config = self.config
        self._keep_in_fp32_modules_strict = (["e_score_correction_bias"] if config.router_selection_bias else []) + (
            ["mlp.gate.weight"] if config.router_in_fp32 else []) + (
            ["mlp.gate.null_weight"] if config.router_in_fp32 and config.num_null_experts else [])
        super().post_init()

    def save_pretrained(self, *args, save_original_format: bool = False, **kwargs):
        # Our checkpoints keep the fused experts on disk (what remote code, `hf-moe export` and Trainer's resume
        # read). `import hf_moe` registers transformers' per-expert conversion for our model types so that
        # per-expert folders load; transformers would then write that layout back by default: opt-in here.
        return super().save_pretrained(*args, save_original_format=save_original_format, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # where transformers would default to its `grouped_mm`, default to "auto": on a CPU the kernel measured
        # fastest on this machine for the call's shapes, `grouped_mm` elsewhere (experts_kernels.py)
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
            if module.gate_up_proj_bias is not None:  # gpt-oss: zeros
                init.zeros_(module.gate_up_proj_bias)
                init.zeros_(module.down_proj_bias)
        elif isinstance(module, MoESoftBlock):
            init.normal_(module.slot_embeds, mean=0.0, std=module.slot_embeds.shape[0] ** -0.5)  # LeCun normal
            init.ones_(module.scale)
        elif isinstance(module, MoEAttentionExperts):
            init.normal_(module.q_proj, mean=0.0, std=std)
            init.normal_(module.o_proj, mean=0.0, std=std)
            if module.o_proj_bias is not None:  # JetMoE: zeros
                init.zeros_(module.o_proj_bias)
        elif isinstance(module, AttentionExpertsRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoEAttention) and module.sinks is not None:
            init.normal_(module.sinks, mean=0.0, std=std)  # gpt-oss
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.normal_(module.bias, mean=0.0, std=std)  # gpt-oss
            if module.null_weight is not None:
                init.normal_(module.null_weight, mean=0.0, std=std)
            if hasattr(module, "noise_weight"):
                init.zeros_(module.noise_weight)  # Shazeer et al.: no signal, uniform noise at init
            if hasattr(module, "e_score_correction_bias"):
                init.zeros_(module.e_score_correction_bias)


MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def causal_masks_by_type(config: MoEDecoderConfig, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor, cache: Cache | None) -> dict[str, torch.Tensor | None]:
    """One mask per attention layer type of the model (`config.attention_layer_types()`): full causal, or causal
    within the window."""
    return {
        layer_type: MASK_FUNCTIONS[layer_type](config=config, inputs_embeds=inputs_embeds,
                                               attention_mask=attention_mask, position_ids=position_ids,
                                               **{CACHE_NAME: cache})
        for layer_type in dict.fromkeys(config.attention_layer_types())
    }


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
        """The router of every routed sparse block (sparse layer or 'moe' sub-block), in the order they run (the
        order of captured router outputs)."""
        return [module.gate for module in self.layers.modules() if isinstance(module, MoESparseBlock)]

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
        r"""
        cache (`Cache`, *optional*):
            Key and value states of the earlier tokens, for decoding step by step (documented here for transformers
            < 5.24, which calls it `past_key_values`: a name the forward still takes).
        """
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

        # one mask per attention layer type; generate makes them ahead for a static cache (`create_masks_for_generate`)
        causal_masks = attention_mask
        if not isinstance(causal_masks, dict):
            causal_masks = causal_masks_by_type(self.config, inputs_embeds, attention_mask, position_ids, cache)

        # the padding mask of this forward's tokens, for Soft MoE's slots (4D masks given by the caller have none)
        token_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -inputs_embeds.shape[1]:]
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_masks,  # each attention takes the mask of its layer type
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                token_mask=token_mask,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_NAME: cache})


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
            output_depth_decisions=bool(output_router_logits and self.config.mod_capacity is not None),
            output_attention_router_decisions=bool(output_router_logits
                                                   and self.config.num_attention_experts is not None),
            **model_kwargs,
        )
        losses, statistics = self.routing_outputs(
            outputs, attention_mask, outputs.last_hidden_state.shape[0], output_router_logits, output_router_stats
        )
        return outputs, losses, statistics

    def routing_outputs(self, outputs, attention_mask, batch_size, output_router_logits, output_router_stats):
        """-> (losses, statistics). In training, also adds this forward's counts to each router's counters (for
        aux-loss-free bias updates and logged metrics; read with `routing.collect_router_statistics`)."""
        losses = {}
        depth_loss = depth_router_loss(outputs.get("depth_decisions") or ()) if output_router_logits else None
        if depth_loss is not None:
            losses["mod_aux_loss_coef"] = depth_loss
        if output_router_logits:  # attention experts' routers (none without them)
            losses.update(attention_router_losses(outputs.get("attention_router_decisions") or (), self.config,
                                                  attention_mask))
        decisions = outputs.get("router_decisions") or ()
        if not decisions:
            return losses, None
        token_mask = token_mask_for_router_rows(attention_mask, decisions[0].probs.shape[0])
        if self.training:
            accumulate_router_statistics(self.model.routers(), decisions, token_mask)
        if output_router_logits:
            losses = {**router_losses(decisions, self.config, attention_mask, batch_size), **losses}
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
        cache (`Cache`, *optional*):
            Key and value states of the earlier tokens, for decoding step by step (documented here for transformers
            < 5.24, which calls it `past_key_values`: a name the forward still takes).
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
            **{CACHE_NAME: outputs.get(CACHE_NAME)},
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
        if self.config.moe_block_type == "soft_moe" and "sparse" in self.config.mlp_layer_types:
            raise ValueError(
                "`moe_block_type`='soft_moe' cannot generate: each Soft MoE slot averages ALL tokens of the sequence "
                "(dispatch softmax over tokens), so a token's output depends on later tokens (not causal). Use it for "
                "sequence classification and bidirectional training, or moe_block_type='soft_merging' (preset "
                "'soft_moe_causal') for a soft mixture that generates."
            )
        if self.config.eval_capacity_factor is not None:
            raise ValueError(
                f"`eval_capacity_factor`={self.config.eval_capacity_factor} cannot generate: expert capacity is "
                "shared by all tokens of a forward, so whether a token is dropped depends on the other tokens and "
                "rows (a cached decoding step drops differently from a full forward). Set eval_capacity_factor=None "
                "(dropless inference) to generate."
            )
        return super().generate(*args, **kwargs)

    def create_masks_for_generate(self, config: MoEDecoderConfig, inputs_embeds: torch.Tensor,
                                  attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                                  **kwargs) -> dict[str, torch.Tensor | None]:
        """The masks `generate` makes ahead of each step for a static cache: one per attention layer type, as the
        model makes them (transformers' own function reads `config.layer_types`, whose None it does not take)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return causal_masks_by_type(config, inputs_embeds, attention_mask, position_ids, cache)

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
        cache (`Cache`, *optional*):
            Key and value states of the earlier tokens, for decoding step by step (documented here for transformers
            < 5.24, which calls it `past_key_values`: a name the forward still takes).
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
            **{CACHE_NAME: outputs.get(CACHE_NAME)},
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
        cache (`Cache`, *optional*):
            Key and value states of the earlier tokens, for decoding step by step (documented here for transformers
            < 5.24, which calls it `past_key_values`: a name the forward still takes).
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
        cache (`Cache`, *optional*):
            Key and value states of the earlier tokens, for decoding step by step (documented here for transformers
            < 5.24, which calls it `past_key_values`: a name the forward still takes).
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
