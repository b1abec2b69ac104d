# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Routers, balancing losses and router statistics: the one place where a routing or balancing formula lives.

A router maps the T tokens of a sparse layer to experts and returns

    router_logits  [T, E + N]  clean linear scores (recorded by output capture as `router_logits`); N = 0 unless
                               `num_null_experts` (AdaMoE) adds N null experts after the E true ones
    top_k_weights  [T, k]  gate weight of each slot; exactly 0 (and no gradient) for slots that are not dispatched
    top_k_index    [T, k]  expert id of each slot, a valid id in [0, E), or a null expert's id in [E, E + N)
    decision       RouterDecision: everything the balancing losses and the statistics need

Slots that are not dispatched (dropped by capacity, by GShard random routing, or padding slots of expert choice)
keep a valid expert id with weight 0, so every experts implementation (eager, grouped_mm, batched_mm) computes the
same result and the token passes through on the residual path for that slot's share. Null-expert slots are not
dispatched either (weight 0); the MoE block leaves them out of the experts' input altogether, so they cost nothing.

This file is copied next to every saved checkpoint (remote code): torch imports only.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_TYPES = ("token_choice", "expert_choice")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass
class RouterDecision:
    """What one sparse layer's router decided (T tokens, E experts, k slots per token)."""

    logits: torch.Tensor  # [T, E] clean router logits
    probs: torch.Tensor  # [T, E] fp32 clean, unbiased routing distribution (rows sum to 1)
    top_k_index: torch.Tensor  # [T, k] chosen experts, before capacity
    top_k_weights: torch.Tensor  # [T, k] gate weights after capacity (0 where not dispatched)
    valid: torch.Tensor  # [T, k] bool: the slot holds a real choice (False only for expert-choice padding)
    dispatched: torch.Tensor  # [T, k] bool: valid and sent to its expert
    load_probs: torch.Tensor | None = None  # [T, E] P(token goes to expert) under noisy gating (Shazeer 2017)
    num_null_experts: int = 0  # N: the last N columns of logits and probs are AdaMoE's null experts
    # [T] the real tokens among these rows when the layer saw its own subset of the forward's tokens (the gathered
    # tokens of a Mixture-of-Depths layer); None: the forward's padding mask applies (`router_losses`' token_mask)
    token_mask: torch.Tensor | None = None


class TopKRouter(nn.Module):
    """The router of one sparse layer; every knob comes from the config.

    Token choice (`router_type="token_choice"`):
        s = softmax(x W^T + c) or sigmoid(x W^T + c)               scores, fp32; c = `router_bias` or 0  [T, E]
        chosen = top_k(s + b) within the best `topk_group` of `n_group` expert groups (DeepSeek-V2/V3);
                 b is the selection bias (aux-loss-free balancing, DeepSeek-V3); it shifts selection only
        w = s[chosen];  w = w / sum(w) if norm_topk_prob;  w = w * routed_scaling_factor
        Mixtral's (and gpt-oss's) top-k-then-softmax is softmax-then-top-k with norm_topk_prob=True (the same
        numbers, to rounding).
    Noisy top-k (Shazeer et al. 2017), training only: logits + N(0, 1) * softplus(x W_noise^T) choose the experts
        and give the gates.
    Jitter (Switch Transformer): the router's input is multiplied by U(1 - eps, 1 + eps) in training.
    GShard random routing (top-2, training): the second expert is dispatched with probability min(1, 2 * w_2).
    Capacity (`capacity_factor` in training, `eval_capacity_factor` in eval; None = dropless): tokens are split into
        `dispatch_groups` contiguous groups; each expert takes at most C = ceil(cf * k * T_group / E) slots per group,
        first choices of all tokens first, then second choices, each in token order (GShard); the rest are dropped.
    Expert choice (Zhou et al. 2022): s = softmax(x W^T); each expert takes its top C = ceil(cf * T_group / E)
        tokens of its group, with gate s[t, e]. It looks at every token of the group, so it is not causal.
    Null experts (AdaMoE, Zeng et al. 2024, `num_null_experts` = N): N more logits x W_null^T [N, H] join the E true
        ones, s = softmax over all E + N, and the top k are taken over E + N, so a token may use fewer than k true
        experts (none at all: the block adds nothing for it). A null expert outputs zero: its slots are chosen but not
        dispatched (weight 0). With norm_topk_prob the chosen true experts' weights are renormalised among themselves,
        w_j = s_j / sum of s over the chosen TRUE experts (the authors' code); without it they stay s_j.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))  # [E, H]
        # [E], gpt-oss: part of the logits (scores, gates and balancing losses), unlike the selection-only bias below
        self.bias = nn.Parameter(torch.empty(self.num_experts)) if config.router_bias else None
        # [N, H] AdaMoE: one logit per null expert, which has no weights of its own (it outputs zero)
        self.num_null_experts = config.num_null_experts
        self.null_weight = (nn.Parameter(torch.empty(self.num_null_experts, config.hidden_size))
                            if self.num_null_experts else None)
        if config.noisy_gating:
            self.noise_weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))  # [E, H]
        if config.router_selection_bias:
            # DeepSeek-V3 name; fp32, persistent (saved in checkpoints), updated by `update_router_bias`
            self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))
        # [E + 6] counts of the training forwards since the last `collect_router_statistics` (load, then the totals
        # of `routing_counts`), None before the first. Not a buffer: DDP broadcasts buffers from rank 0 before a
        # forward, which would overwrite each rank's own counts.
        self.accumulated_counts: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):  # [T, H], [T] or [B, S]
        """`token_mask` (1 at real tokens, optional) is only recorded in the decision, for the balancing losses and
        statistics of a layer that routes its own subset of the forward's tokens (Mixture-of-Depths)."""
        config = self.config
        if self.training and config.router_jitter_noise > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - config.router_jitter_noise,
                                                             1.0 + config.router_jitter_noise)
            hidden_states = hidden_states * noise
        if config.router_in_fp32:  # DeepSeek-V2/V3 and GLM-4.5 route in float32 whatever the model's dtype
            bias = None if self.bias is None else self.bias.float()
            router_logits = F.linear(hidden_states.float(), self.weight.float(), bias)  # [T, E]
        else:
            router_logits = F.linear(hidden_states, self.weight, self.bias)  # [T, E]
        if self.null_weight is not None:  # the null experts' logits follow the true experts': [T, E + N]
            null_logits = F.linear(hidden_states.to(router_logits.dtype), self.null_weight.to(router_logits.dtype))
            router_logits = torch.cat((router_logits, null_logits), dim=-1)
        clean_scores = scores_from_logits(router_logits, config.scoring_func)  # [T, E] fp32
        probs = probabilities_from_scores(clean_scores, config.scoring_func)

        if config.router_type == "expert_choice":
            capacity_factor = capacity_factor_for(config, self.training)
            top_k_index, top_k_weights, valid = expert_choice(probs, capacity_factor, config.dispatch_groups)
            dispatched, load_probs = valid, None
        else:
            scores, load_probs = clean_scores, None
            if self.training and config.noisy_gating:
                noisy_logits, load_probs = self.noisy_logits(hidden_states, router_logits)
                scores = scores_from_logits(noisy_logits, config.scoring_func)
            choice_scores = scores
            if config.router_selection_bias:
                choice_scores = scores + self.e_score_correction_bias
            if config.n_group > 1:
                choice_scores = limit_to_top_groups(
                    choice_scores, config.n_group, config.topk_group, config.scoring_func
                )
            top_k_weights, top_k_index = torch.topk(choice_scores, self.top_k, dim=-1)  # [T, k]
            if choice_scores is not scores:
                top_k_weights = scores.gather(1, top_k_index)  # unbiased scores
            true_slots = top_k_index < self.num_experts  # False: a null expert (AdaMoE), never dispatched
            if config.norm_topk_prob and self.num_null_experts:  # over the chosen true experts only; a token that
                # chose null experts only divides by 1, as the authors' code (its weights are all zeroed below; a
                # tiny divisor would make their gradient 0 * inf = NaN)
                chosen_sum = (top_k_weights * true_slots).sum(dim=-1, keepdim=True)
                top_k_weights = top_k_weights / chosen_sum.masked_fill(chosen_sum == 0, 1.0)
            elif config.norm_topk_prob:
                top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
            valid = torch.ones_like(top_k_index, dtype=torch.bool)
            dispatched = true_slots if self.num_null_experts else valid
            if self.training and config.random_routing:
                dispatched = gshard_random_routing(top_k_weights)
            capacity_factor = capacity_factor_for(config, self.training)
            if capacity_factor is not None:  # null slots are not dispatched: they take no capacity (the clamp only
                # keeps their ids inside the one-hot of the E true experts)
                dispatched = dispatched & within_capacity(
                    top_k_index.clamp(max=self.num_experts - 1), dispatched, self.num_experts, capacity_factor,
                    config.dispatch_groups,
                )
        if config.routed_scaling_factor != 1.0:
            top_k_weights = top_k_weights * config.routed_scaling_factor
        if dispatched is not valid:  # some slots were dropped: weight exactly 0, no gradient
            top_k_weights = torch.where(dispatched, top_k_weights, torch.zeros_like(top_k_weights))

        decision = RouterDecision(
            logits=router_logits,
            probs=probs,
            top_k_index=top_k_index,
            top_k_weights=top_k_weights,
            valid=valid,
            dispatched=dispatched,
            load_probs=load_probs,
            num_null_experts=self.num_null_experts,
            token_mask=None if token_mask is None else token_mask.reshape(-1),
        )
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index, decision

    def noisy_logits(self, hidden_states, clean_logits):
        """H = clean + N(0, 1) * softplus(x W_noise^T), and the smooth load estimator of Shazeer et al. (2017):
        P(t -> e) = Phi((clean_e - kth_excluding_e(H)) / std_e), where kth_excluding_e is the k-th largest noisy
        logit among the other experts (the (k+1)-th of H if e is in H's top-k, else the k-th)."""
        noise_std = F.softplus(F.linear(hidden_states, self.noise_weight)) + 1e-2  # [T, E]
        noisy = clean_logits + torch.randn_like(clean_logits) * noise_std
        k = self.top_k
        if k == self.num_experts:
            # every expert is always chosen: P = 1, a constant (an infinite z would give NaN gradients)
            return noisy, torch.ones_like(clean_logits, dtype=torch.float32)
        top = torch.topk(noisy, k + 1, dim=-1).values  # [T, k+1]
        kth_if_in = top[:, -1:]
        kth_if_out = top[:, k - 1 : k]
        in_top_k = noisy >= kth_if_out
        threshold = torch.where(in_top_k, kth_if_in, kth_if_out)
        load_probs = torch.special.ndtr((clean_logits.float() - threshold.float()) / noise_std.float())  # Phi
        return noisy, load_probs


def scores_from_logits(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits.float())
    return F.softmax(logits, dim=-1, dtype=torch.float32)


def probabilities_from_scores(scores: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """The unbiased routing distribution P[t, e] used by the balancing losses: the softmax scores themselves, or
    sigmoid scores normalised to sum to one (DeepSeek-V3's s')."""
    if scoring_func == "sigmoid":
        return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    return scores


def limit_to_top_groups(scores: torch.Tensor, n_group: int, topk_group: int, scoring_func: str) -> torch.Tensor:
    """Group-limited routing: experts form `n_group` equal groups; only the `topk_group` best groups stay
    selectable. A group's score is its best expert (DeepSeek-V2, softmax) or the sum of its best two
    (DeepSeek-V3, sigmoid)."""
    num_tokens, num_experts = scores.shape
    grouped = scores.view(num_tokens, n_group, num_experts // n_group)
    if scoring_func == "sigmoid":
        group_scores = grouped.topk(min(2, num_experts // n_group), dim=-1).values.sum(dim=-1)  # [T, G]
    else:
        group_scores = grouped.max(dim=-1).values
    top_groups = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, top_groups, True)
    expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
    return scores.masked_fill(~expert_mask, float("-inf"))


def gshard_random_routing(top_k_weights: torch.Tensor) -> torch.Tensor:
    """GShard (Lepikhin et al. 2020): the first expert is always used; the second with probability
    min(1, 2 * w_2 / (w_1 + w_2)). Returns the [T, 2] dispatch mask."""
    normalized = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
    keep_second = torch.rand_like(normalized[:, 1]) < (2 * normalized[:, 1]).clamp(max=1.0)
    return torch.stack([torch.ones_like(keep_second), keep_second], dim=-1)


def capacity_factor_for(config, training: bool) -> float | None:
    if training:
        return config.capacity_factor
    if config.router_type == "expert_choice" and config.eval_capacity_factor is None:
        return config.capacity_factor
    return config.eval_capacity_factor


def group_slices(num_tokens: int, groups: int) -> list[slice]:
    """`groups` contiguous, near-equal token ranges (GShard's local group dispatching)."""
    groups = max(1, min(groups, num_tokens))
    bounds = [num_tokens * g // groups for g in range(groups + 1)]
    return [slice(bounds[g], bounds[g + 1]) for g in range(groups)]


def within_capacity(top_k_index, dispatched, num_experts: int, capacity_factor: float, groups: int):
    """[T, k] mask of the slots that fit in their expert's capacity C = ceil(cf * k * T_group / E), in GShard's
    priority: all first choices in token order, then all second choices, and so on."""
    num_tokens, top_k = top_k_index.shape
    keep = torch.zeros_like(dispatched)
    for tokens in group_slices(num_tokens, groups):
        group_size = tokens.stop - tokens.start
        capacity = max(1, math.ceil(capacity_factor * top_k * group_size / num_experts))
        slots = F.one_hot(top_k_index[tokens], num_experts) * dispatched[tokens, :, None]  # [Tg, k, E]
        slots = slots.transpose(0, 1).reshape(top_k * group_size, num_experts)  # slot-major priority
        position = torch.cumsum(slots, dim=0)  # 1-based position in the expert's buffer
        fits = ((position <= capacity) & (slots > 0)).any(dim=-1)  # [k * Tg]
        keep[tokens] = fits.view(top_k, group_size).transpose(0, 1)
    return keep


def expert_choice(probs: torch.Tensor, capacity_factor: float, groups: int):
    """Expert choice routing (Zhou et al. 2022): in each token group, expert e takes the C = ceil(cf * T_g / E)
    tokens with the highest probs[:, e]. Returns per-token slots [T, k_max] (index, weight, valid), where k_max is
    the largest number of experts that took one token; padding slots are invalid with weight 0."""
    num_tokens, num_experts = probs.shape
    chosen = torch.zeros_like(probs, dtype=torch.bool)  # [T, E]
    for tokens in group_slices(num_tokens, groups):
        group_size = tokens.stop - tokens.start
        capacity = min(group_size, max(1, math.ceil(capacity_factor * group_size / num_experts)))
        picked = probs[tokens].topk(capacity, dim=0).indices  # [C, E] token ids within the group
        chosen[tokens] = torch.zeros_like(chosen[tokens]).scatter(0, picked, True)
    max_slots = max(1, int(chosen.sum(dim=-1).max()))
    top_k_index = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :max_slots]
    valid = chosen.gather(1, top_k_index)
    top_k_weights = probs.gather(1, top_k_index) * valid
    return top_k_index, top_k_weights, valid


class AttentionExpertsRouter(nn.Module):
    """The router of a layer's attention experts (JetMoE's mixture of attention heads, Shen et al. 2024), per token:

        logits = x W^T                                                  [T, E_a]  (no bias)
        chosen = top_k(logits);  w = softmax of the k chosen logits     [T, k]    (= softmax(logits) renormalised)

    k = `num_attention_experts_per_tok` of E_a = `num_attention_experts`. It reads no other token, so it is causal.
    Returns (logits, w, chosen, RouterDecision) as `TopKRouter` does, so the balancing losses take its decisions (with
    their own coefficients, `attention_router_losses`); a class of its own so that output capture records them apart
    from the feed-forward routers' (other expert counts, other coefficients)."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_attention_experts_per_tok
        self.num_experts = config.num_attention_experts
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))  # [E_a, H]

    def forward(self, hidden_states: torch.Tensor):  # [T, H]
        router_logits = F.linear(hidden_states, self.weight)  # [T, E_a]
        probs = scores_from_logits(router_logits, "softmax")  # [T, E_a] fp32
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        every_slot = torch.ones_like(top_k_index, dtype=torch.bool)  # no capacity: every choice is dispatched
        decision = RouterDecision(logits=router_logits, probs=probs, top_k_index=top_k_index,
                                  top_k_weights=top_k_weights, valid=every_slot, dispatched=every_slot)
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index, decision


# ----------------------------------------------------------------------------------------------------------------
# Balancing losses. Each takes the decisions of every sparse layer and a [B*S] mask of real tokens (or None).
# Per-layer losses are averaged over the sparse layers, so a coefficient does not depend on depth.
# Degenerate batches stay finite: a mean over zero real tokens (an all-padding batch) is 0, with a zero gradient,
# and a loss over one expert takes its balanced value (CV^2 = 0; the Switch and DeepSeek losses are then constant).


def _token_weights(decision: RouterDecision, token_mask: torch.Tensor | None) -> torch.Tensor:
    """1 at the real tokens of the decision's rows: its own mask if it has one, else the forward's `token_mask`."""
    rows = decision.probs.shape[0]
    if decision.token_mask is not None:
        token_mask = decision.token_mask
    if token_mask is None:
        return decision.probs.new_ones(rows)
    return token_mask.to(decision.probs.device, torch.float32)


def _divisor(count: torch.Tensor) -> torch.Tensor:
    """A count of real tokens (or sequences) as the divisor of a mean: a sum over none is 0, and 0 / 1 keeps the
    mean 0 (0 / 0 would be NaN, and a NaN loss term makes every gradient NaN)."""
    return count.clamp(min=1)


def _expert_counts(decision: RouterDecision, weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of weights[t] for each slot in `slots` ([T, k] bool), per expert: [E]."""
    num_experts = decision.probs.shape[-1]
    per_slot = (weights[:, None] * slots).reshape(-1)
    return torch.zeros(num_experts, device=per_slot.device).scatter_add(0, decision.top_k_index.reshape(-1), per_slot)


def token_mask_for_router_rows(attention_mask: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """The [B*S] mask of real tokens for a layer's router rows. With a KV cache the [B, S_total] attention mask
    also covers past tokens; only its last S = num_rows / B columns belong to this forward."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    seq_len = num_rows // attention_mask.shape[0]
    return attention_mask[:, -seq_len:].reshape(-1)


def load_balancing_loss(decisions, token_mask=None, per_layer: bool = False) -> torch.Tensor:
    """Switch Transformer / GShard load-balancing loss (Fedus et al. 2021, eqs. 4-6):

        f_e = (1/T) * #{(t, j): expert e is token t's j-th choice}      (sums to k)
        P_e = (1/T) * sum_t P[t, e]
        loss = E * sum_e f_e * P_e                                       (k when perfectly balanced)

    Pooled over layers (T counts every layer's tokens; transformers' `load_balancing_loss_func`), or the mean of
    the per-layer losses with `per_layer=True`.

    With N null experts (AdaMoE, Zeng et al. 2024) the sum runs over all E + N experts, E + N replaces E, and each null
    expert's f is the mean f of the null experts, f_null = (1/N) * sum over the null experts of f_e: the loss balances
    how much the null experts are used in all against the true experts, not how that use splits among identical null
    experts (the authors' code for their LoRA-expert experiments; it normalises f to sum to 1 where this sums to k,
    a factor k)."""
    num_experts = decisions[0].probs.shape[-1]
    counts, prob_sums, totals = [], [], []
    for decision in decisions:
        weights = _token_weights(decision, token_mask)
        counts.append(_null_experts_averaged(_expert_counts(decision, weights, decision.valid),
                                             decision.num_null_experts))
        prob_sums.append((decision.probs * weights[:, None]).sum(dim=0))
        totals.append(weights.sum())
    if per_layer:
        losses = [c.numel() * torch.sum((c / n) * (p / n))
                  for c, p, n in zip(counts, prob_sums, map(_divisor, totals))]
        return torch.stack(losses).mean()
    total = _divisor(torch.stack(totals).sum())
    return num_experts * torch.sum((torch.stack(counts).sum(0) / total) * (torch.stack(prob_sums).sum(0) / total))


def _null_experts_averaged(counts: torch.Tensor, num_null_experts: int) -> torch.Tensor:
    """`counts` [E + N] with the last N (the null experts) replaced by their mean (AdaMoE's balancing loss)."""
    if not num_null_experts:
        return counts
    null = counts[-num_null_experts:]
    return torch.cat((counts[:-num_null_experts], null.mean().expand_as(null)))


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, var / mean^2 (unbiased variance, as in Shazeer et al.'s reference code).
    0 for a single value: one expert is always balanced (the unbiased variance of one value is 0 / 0)."""
    values = values.float()
    if values.numel() < 2:
        return values.sum() * 0.0
    return values.var() / (values.mean() ** 2 + 1e-10)


def importance_loss(decisions, token_mask=None) -> torch.Tensor:
    """Shazeer et al. (2017): CV(Importance)^2 with Importance_e = sum_t gate[t, e]."""
    losses = []
    for decision in decisions:
        weights = _token_weights(decision, token_mask)
        num_experts = decision.probs.shape[-1]
        gates = (decision.top_k_weights.float() * weights[:, None]).reshape(-1)
        importance = torch.zeros(num_experts, device=gates.device).scatter_add(0, decision.top_k_index.reshape(-1),
                                                                               gates)
        losses.append(cv_squared(importance))
    return torch.stack(losses).mean()


def load_loss(decisions, token_mask=None) -> torch.Tensor | None:
    """Shazeer et al. (2017): CV(Load)^2 with the smooth Load_e = sum_t P(t -> e) of noisy top-k gating.
    None when no layer has load probabilities (noisy gating off, or not training)."""
    losses = []
    for decision in decisions:
        if decision.load_probs is None:
            continue
        weights = _token_weights(decision, token_mask)
        losses.append(cv_squared((decision.load_probs * weights[:, None]).sum(dim=0)))
    return torch.stack(losses).mean() if losses else None


def z_loss(decisions, token_mask=None) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits_t)^2."""
    losses = []
    for decision in decisions:
        weights = _token_weights(decision, token_mask)
        log_z = torch.logsumexp(decision.logits.float(), dim=-1)
        losses.append((log_z.square() * weights).sum() / _divisor(weights.sum()))
    return torch.stack(losses).mean()


def _deepseek_f_and_p(decision: RouterDecision, weights: torch.Tensor):
    """DeepSeekMoE: f_i = E / (k T) * sum_t 1(t -> i),  P_i = (1/T) * sum_t P[t, i]."""
    num_tokens = _divisor(weights.sum())
    num_experts, top_k = decision.probs.shape[-1], decision.top_k_index.shape[-1]
    f = _expert_counts(decision, weights, decision.valid) * num_experts / (top_k * num_tokens)
    p = (decision.probs * weights[:, None]).sum(dim=0) / num_tokens
    return f, p


def expert_balance_loss(decisions, token_mask=None) -> torch.Tensor:
    """DeepSeekMoE expert-level balance loss (Dai et al. 2024, eq. 12-14): sum_i f_i P_i."""
    losses = []
    for decision in decisions:
        f, p = _deepseek_f_and_p(decision, _token_weights(decision, token_mask))
        losses.append(torch.sum(f * p))
    return torch.stack(losses).mean()


def device_balance_loss(decisions, num_device_groups: int, token_mask=None) -> torch.Tensor:
    """DeepSeekMoE device-level balance loss (eq. 15-17): experts form D equal contiguous groups (devices);
    f'_d = mean of f_i over the group, P'_d = sum of P_i over the group; loss = sum_d f'_d P'_d."""
    losses = []
    for decision in decisions:
        f, p = _deepseek_f_and_p(decision, _token_weights(decision, token_mask))
        f_device = f.view(num_device_groups, -1).mean(dim=-1)
        p_device = p.view(num_device_groups, -1).sum(dim=-1)
        losses.append(torch.sum(f_device * p_device))
    return torch.stack(losses).mean()


def sequence_balance_loss(decisions, batch_size: int, token_mask=None) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss: per sequence of S real tokens,
    f_i = E / (k S) * sum_t 1(i in TopK_t),  P_i = (1/S) * sum_t s'[t, i]  (s' = scores normalised to sum 1),
    loss = sum_i f_i P_i; averaged over the sequences that hold real tokens (all-padding rows do not count), and
    over layers."""
    losses = []
    for decision in decisions:
        num_experts, top_k = decision.probs.shape[-1], decision.top_k_index.shape[-1]
        weights = _token_weights(decision, token_mask).view(batch_size, -1)  # [B, S]
        chosen = F.one_hot(decision.top_k_index, num_experts) * decision.valid[..., None]  # [T, k, E]
        chosen = chosen.sum(dim=1).view(batch_size, -1, num_experts).float()  # [B, S, E]
        probs = decision.probs.view(batch_size, -1, num_experts)
        seq_len = _divisor(weights.sum(dim=-1))[:, None]  # [B, 1]
        f = (chosen * weights[..., None]).sum(dim=1) * num_experts / (top_k * seq_len)  # [B, E]
        p = (probs * weights[..., None]).sum(dim=1) / seq_len
        real_sequences = (weights.sum(dim=-1) > 0).sum()
        losses.append(torch.sum(f * p, dim=-1).sum() / _divisor(real_sequences))
    return torch.stack(losses).mean()


def micro_batch_share(labels: torch.Tensor, num_items_in_batch, shift_labels: torch.Tensor | None = None,
                      shifted: bool = True):
    """This micro-batch's share of Trainer's global item count: items here / `num_items_in_batch` (1 without it).

    With `num_items_in_batch`, Trainer normalises the task loss by the items of the whole optimizer step and SUMS the
    micro-batch losses (every accumulation step, every rank). A balancing loss is a mean over one micro-batch, so it
    is weighted by this share: the sum over micro-batches is then the item-weighted mean, not a multiple of it.
    Items are counted as Trainer counts them: `shift_labels` if given, else `labels[..., 1:]` for next-token losses
    (`shifted`) or `labels`; -100 is ignored."""
    if num_items_in_batch is None:
        return 1.0
    counted = shift_labels if shift_labels is not None else (labels[..., 1:] if shifted else labels)
    return counted.ne(-100).sum() / num_items_in_batch


def depth_router_loss(decisions) -> torch.Tensor | None:
    """Mixture-of-Depths auxiliary router loss (Raposo et al. 2024, section 3.5, the first of its two causal-sampling
    methods): binary cross-entropy with the router logits r as logits and top-C membership as targets,

        loss = mean over routed layers of  mean over real tokens i of  BCE(sigmoid(r_i), 1[i in its sequence's top-C])

    so that the causal rule `r_i > 0` (`sigmoid(r_i) > 0.5`) learns to agree with the top-C choice. `decisions` are
    the recorded `(logits [B, S], chosen [B, S], real [B, S], top_c)` of the routed layers; only top-C (training)
    decisions have targets. None when there are none."""
    per_layer = []
    for logits, chosen, real, top_c in decisions:
        if not top_c:
            continue
        bce = F.binary_cross_entropy_with_logits(logits.float(), chosen.float(), reduction="none")
        per_layer.append((bce * real).sum() / real.sum().clamp(min=1))
    return torch.stack(per_layer).mean() if per_layer else None


def router_losses(decisions, config, attention_mask=None, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Every balancing loss whose coefficient is non-zero, unweighted, keyed by its config coefficient's name.
    `router_aux_loss_coef` (the Switch loss) is always computed: it is the `aux_loss` of the model output."""
    if not decisions:
        return {}
    token_mask = token_mask_for_router_rows(attention_mask, decisions[0].probs.shape[0])
    losses = {"router_aux_loss_coef": load_balancing_loss(decisions, token_mask, config.aux_loss_per_layer)}
    if config.router_z_loss_coef > 0:
        losses["router_z_loss_coef"] = z_loss(decisions, token_mask)
    if config.router_importance_loss_coef > 0:
        losses["router_importance_loss_coef"] = importance_loss(decisions, token_mask)
    if config.router_load_loss_coef > 0 and (value := load_loss(decisions, token_mask)) is not None:
        losses["router_load_loss_coef"] = value
    if config.expert_balance_loss_coef > 0:
        losses["expert_balance_loss_coef"] = expert_balance_loss(decisions, token_mask)
    if config.device_balance_loss_coef > 0:
        losses["device_balance_loss_coef"] = device_balance_loss(decisions, config.num_device_groups, token_mask)
    if config.sequence_balance_loss_coef > 0:
        losses["sequence_balance_loss_coef"] = sequence_balance_loss(decisions, batch_size, token_mask)
    return losses


def attention_router_losses(decisions, config, attention_mask=None) -> dict[str, torch.Tensor]:
    """The balancing losses of the attention experts' routers (`AttentionExpertsRouter`), unweighted, keyed by their
    config coefficients' names: the Switch loss `load_balancing_loss` (always, pooled over layers as
    `router_aux_loss_coef`'s, or per layer with `aux_loss_per_layer`) and the z-loss when its coefficient is non-zero.
    JetMoE adds both to each router of its attention and feed-forward mixtures (Switch 0.01, z-loss 0.001)."""
    if not decisions:
        return {}
    token_mask = token_mask_for_router_rows(attention_mask, decisions[0].probs.shape[0])
    losses = {"attention_router_aux_loss_coef": load_balancing_loss(decisions, token_mask, config.aux_loss_per_layer)}
    if config.attention_router_z_loss_coef > 0:
        losses["attention_router_z_loss_coef"] = z_loss(decisions, token_mask)
    return losses


# ----------------------------------------------------------------------------------------------------------------
# Router statistics and aux-loss-free balancing.


NUM_ROUTING_TOTALS = 6  # the totals of `routing_counts`


@torch.no_grad()
def routing_counts(decision: RouterDecision, token_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive counts of one forward of one layer: the dispatched load [E] of the true experts, and the totals [6] of
    (tokens, valid slots of true experts, dispatched slots, sum of routing entropies, sum of logsumexp(logits)^2,
    slots of null experts)."""
    weights = _token_weights(decision, token_mask)
    num_true_experts = decision.probs.shape[-1] - decision.num_null_experts
    load = _expert_counts(decision, weights, decision.dispatched)[:num_true_experts]
    probs = decision.probs
    entropy = -(probs * torch.log(probs.clamp(min=1e-20))).sum(dim=-1)
    log_z = torch.logsumexp(decision.logits.float(), dim=-1)
    true_slots = decision.top_k_index < num_true_experts
    totals = torch.stack([
        weights.sum(),
        (decision.valid * true_slots * weights[:, None]).sum(),
        (decision.dispatched * weights[:, None]).sum(),
        (entropy * weights).sum(),
        (log_z.square() * weights).sum(),
        (decision.valid * ~true_slots * weights[:, None]).sum(),
    ])
    return load, totals


def statistics_from_counts(load: torch.Tensor, totals: torch.Tensor) -> dict[str, torch.Tensor]:
    """`load` [E] (dispatched slots per expert), `max_violation` (max load / mean load - 1), `entropy` (mean
    routing entropy, nats), `dropped_fraction` (valid slots of true experts not dispatched), `z_loss` (mean
    logsumexp^2), `null_fraction` (the share of the slots that chose a null expert; 0 without null experts)."""
    tokens, valid, dispatched, entropy_sum, z_sum, null = totals.unbind(0)
    return {
        "load": load,
        "max_violation": load.max() / load.mean().clamp(min=1e-20) - 1,
        "entropy": entropy_sum / _divisor(tokens),
        "dropped_fraction": 1 - dispatched / _divisor(valid),
        "z_loss": z_sum / _divisor(tokens),
        "null_fraction": null / _divisor(valid + null),
    }


def router_statistics(decisions, token_mask=None) -> list[dict[str, torch.Tensor]]:
    """Statistics of one forward, per sparse layer (see `statistics_from_counts`)."""
    return [statistics_from_counts(*routing_counts(decision, token_mask)) for decision in decisions]


@torch.no_grad()
def accumulate_router_statistics(routers, decisions, token_mask=None) -> None:
    """Add one training forward's counts to each router's counters (read by `collect_router_statistics`)."""
    for router, decision in zip(routers, decisions):
        counts = torch.cat(routing_counts(decision, token_mask))
        if router.accumulated_counts is not None:
            counts = counts + router.accumulated_counts
        router.accumulated_counts = counts


def sparse_layer_routers(model) -> list[TopKRouter]:
    return [module for module in model.modules() if isinstance(module, TopKRouter)]


@torch.no_grad()
def collect_router_statistics(model, reset: bool = True) -> list[dict[str, torch.Tensor]]:
    """Per sparse layer, the statistics of every training forward since the last reset, summed over
    data-parallel ranks (one all-reduce)."""
    routers = sparse_layer_routers(model)
    if not routers:
        return []
    num_experts = routers[0].num_experts
    device = routers[0].weight.device  # layers may sit on several devices (device_map)
    no_counts = torch.zeros(num_experts + NUM_ROUTING_TOTALS, device=device)
    counts = torch.stack([
        no_counts if router.accumulated_counts is None else router.accumulated_counts.to(device) for router in routers
    ])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    if reset:
        for router in routers:
            router.accumulated_counts = None
    return [statistics_from_counts(row[:num_experts], row[num_experts:]) for row in counts]


@torch.no_grad()
def update_router_bias(model, statistics=None, update_rate: float | None = None) -> list[dict[str, torch.Tensor]]:
    """Auxiliary-loss-free balancing (DeepSeek-V3; Wang et al. 2024): after an optimizer step,
    b_e += gamma * sign(mean_load - load_e), from the loads of every forward since the last update on every rank.
    gamma defaults to `config.router_bias_update_rate`. For custom loops call it after `optimizer.step()`;
    with Trainer use `hf_moe.finetune.trainer.MoERouterCallback`. Returns the statistics it used."""
    statistics = collect_router_statistics(model) if statistics is None else statistics
    for router, layer_statistics in zip(sparse_layer_routers(model), statistics):
        if not hasattr(router, "e_score_correction_bias"):
            continue
        gamma = router.config.router_bias_update_rate if update_rate is None else update_rate
        load = layer_statistics["load"].to(router.e_score_correction_bias.device)
        router.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
    return statistics
