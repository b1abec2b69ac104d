# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Routers and balancing losses: the one place where a routing or balancing formula lives.

A router maps the tokens of a sparse layer to experts. It returns `(router_logits, top_k_weights, top_k_index)`:

    router_logits  [T, E]  raw scores, recorded by output capture for the balancing losses
    top_k_weights  [T, k]  gate weight of each chosen expert
    top_k_index    [T, k]  chosen expert ids; the id E (one past the last expert) means "no expert"
                           and always carries weight 0 (the experts module skips it)

This file is copied next to every saved checkpoint (remote code): torch and transformers imports only.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TopKRouter(nn.Module):
    """Token-choice top-k router over a softmax of linear scores.

    p = softmax(x W^T)                                  # [T, E], computed in fp32
    w, i = top_k(p)                                     # Switch / GShard / DeepSeekMoE (softmax, then top-k)
    w = w / sum(w)            if norm_topk_prob          # Mixtral (equivalent to top-k of logits, then softmax)
    w = w * routed_scaling_factor

    With `router_jitter_noise` = eps > 0, the router's input is multiplied by U(1 - eps, 1 + eps) during training
    (Switch Transformer, section 2.4); the experts see the clean input.
    """

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.jitter_noise = config.router_jitter_noise
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))  # [E, H]

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        router_logits = F.linear(hidden_states, self.weight)  # [T, E]
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        top_k_weights = top_k_weights * self.routed_scaling_factor
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index


def token_mask_for_router_rows(attention_mask: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """The [B*S] mask of real (non-padding) tokens for a layer's router rows.

    `attention_mask` is the [B, S_total] mask given to the model; with a KV cache it also covers the past tokens, so
    only its last S = num_rows / B columns belong to the rows routed in this forward.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    batch_size = attention_mask.shape[0]
    seq_len = num_rows // batch_size
    return attention_mask[:, -seq_len:].reshape(-1)


def load_balancing_loss_func(
    router_logits: tuple[torch.Tensor, ...] | None,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6; GShard's l_aux for top-2).

        f_e = (1 / T) * #{(t, j) : expert e is token t's j-th choice}      # sums to k over experts
        P_e = (1 / T) * sum_t softmax(logits_t)_e
        loss = E * sum_e f_e * P_e

    pooled over all sparse layers (T counts every layer's tokens) and over real tokens only when an attention mask
    is given. A perfectly balanced router gives k; this matches transformers' `load_balancing_loss_func`.
    Returns None when there are no router logits.
    """
    if not router_logits:
        return None
    device = router_logits[0].device
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    num_tokens = torch.zeros((), dtype=torch.float32, device=device)
    for layer_logits in router_logits:
        probs = F.softmax(layer_logits.to(device), dim=-1, dtype=torch.float32)  # [T, E]
        selected = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
        token_mask = token_mask_for_router_rows(attention_mask, probs.shape[0])
        token_mask = probs.new_ones(probs.shape[0]) if token_mask is None else token_mask.to(device, torch.float32)
        tokens_per_expert = tokens_per_expert.scatter_add(
            0, selected.reshape(-1), token_mask.repeat_interleave(top_k)
        )
        prob_per_expert = prob_per_expert + (probs * token_mask[:, None]).sum(dim=0)
        num_tokens = num_tokens + token_mask.sum()
    return num_experts * torch.sum((tokens_per_expert / num_tokens) * (prob_per_expert / num_tokens))
