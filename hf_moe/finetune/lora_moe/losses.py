"""The auxiliary losses of the three methods, computed once per forward from the layers' `RoutingRecord`s.

The Switch load-balancing loss is `routing.load_balancing_loss`, the formula our MoE models use; the LBC's squared
coefficient of variation is `routing.cv_squared`; MoELoRA's contrastive loss among experts, which only LoRA experts
use, is `expert_contrastive_loss` here. Which loss a method adds, with which coefficient, is decided by its tuner
(`model.py`, `aux_losses`).
"""

from collections import defaultdict
from dataclasses import dataclass

import torch

from ...modeling.routing import (
    RouterDecision,
    cv_squared,
    load_balancing_loss,
    scores_from_logits,
    token_mask_for_router_rows,
    z_loss,
)


@dataclass
class AuxLossContext:
    """What the losses need besides the records: the [B, S] attention mask and LoRAMoE's per-sample types [B]."""

    attention_mask: torch.Tensor | None = None
    type_ids: torch.Tensor | None = None

    def token_mask(self, records) -> torch.Tensor | None:
        """[T] mask of the real (non-padding) tokens of the records' rows."""
        return token_mask_for_router_rows(self.attention_mask, records[0].logits.shape[0])


def router_decision(record) -> RouterDecision:
    """A top-k record as the `RouterDecision` that routing.py's balancing losses read."""
    probs = scores_from_logits(record.logits, "softmax")
    valid = torch.ones_like(record.top_k_index, dtype=torch.bool) if record.valid is None else record.valid
    return RouterDecision(logits=record.logits, probs=probs, top_k_index=record.top_k_index,
                          top_k_weights=probs.gather(1, record.top_k_index) * valid, valid=valid, dispatched=valid)


def switch_loss(records, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch / Mixtral load balancing over the router logits of all records pooled (MixLoRA; MoE-PEFT concatenates
    every layer's logits): E * sum_e f_e P_e, f_e the number of (token, slot) choices of expert e over the number of
    tokens (sums to k; with top-p, to the mean set size), P_e the mean router probability; padding masked."""
    return load_balancing_loss([router_decision(record) for record in records], token_mask)


def pooled_z_loss(records, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Router z-loss (ST-MoE) of MixLoRA's Switch routing: mean over layers of the mean over (real) tokens of
    logsumexp(logits)^2; with the same tokens in every layer, MoE-PEFT's mean over all layers' rows."""
    return z_loss([router_decision(record) for record in records], token_mask)


def layerwise_switch_loss(records, token_mask: torch.Tensor | None) -> torch.Tensor:
    """MoLA's balance loss: for each decoder layer l, the Switch loss over that layer's routers pooled, divided by
    k_l (the reference normalises f to sum to one), summed over layers: 1 per layer when perfectly balanced."""
    by_layer = defaultdict(list)
    for record in records:
        by_layer[record.layer_index].append(router_decision(record))
    losses = [load_balancing_loss(decisions, token_mask) / decisions[0].top_k_index.shape[-1]
              for decisions in by_layer.values()]
    return torch.stack(losses).sum()


def expert_types(num_experts: int, num_types: int, device=None) -> torch.Tensor:
    """[E] the sample type each expert serves: contiguous groups, group g serving type num_types - 1 - g (LoRAMoE's
    code: with two types, the first half serves type 1)."""
    group = torch.arange(num_experts, device=device) // (num_experts // num_types)
    return num_types - 1 - group


def localized_balancing_loss(route_weights: torch.Tensor, type_ids: torch.Tensor, delta: float,
                             num_types: int) -> torch.Tensor:
    """LoRAMoE's Localized Balancing Constraint of one layer, as its reference code computes it:

        Q[b, e] = sum_s route_weights[b, s, e]             (padding included)       [B, E]
        I[b, e] = 1 + delta if expert e serves type_ids[b] else 1 - delta           [B, E]
        loss = Var(I * Q) / (Mean(I * Q)^2 + 1e-10)         over all B*E entries, unbiased variance; 0 for one entry

    route_weights [B, S, E] (dense softmax gates), type_ids [B] integers (a type no group serves gets 1 - delta)."""
    importance = route_weights.float().sum(dim=1)  # [B, E]
    serves = expert_types(importance.shape[-1], num_types, importance.device)
    matches = type_ids.to(importance.device).view(-1, 1) == serves.view(1, -1)
    coefficients = torch.where(matches, 1.0 + delta, 1.0 - delta)
    weighted = (importance * coefficients).flatten()
    if weighted.numel() == 1:
        return weighted.new_zeros(())
    return cv_squared(weighted)


def lbc_loss(records, type_ids: torch.Tensor, delta: float, num_types: int) -> torch.Tensor:
    """The LBC summed over every recorded LoRAMoE Linear (gate, up and down of every layer)."""
    losses = []
    for record in records:
        route_weights = scores_from_logits(record.logits, "softmax").view(record.batch_size, -1,
                                                                          record.logits.shape[-1])
        if type_ids.numel() != record.batch_size:
            raise ValueError(f"`lora_moe_type_ids` has {type_ids.numel()} entries but the batch has "
                             f"{record.batch_size} samples: pass one type id per sample, shape [batch_size].")
        losses.append(localized_balancing_loss(route_weights, type_ids, delta, num_types))
    return torch.stack(losses).sum()


def expert_contrastive_loss(gram: torch.Tensor, experts: torch.Tensor, valid: torch.Tensor,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoELoRA's contrastive loss among experts (Luo et al. 2024, arXiv 2402.12851, "Contrastive Learning Guided
    Mixture of Experts on Parameter-Efficient Fine-Tuning"): outputs of the same expert are positives, outputs of
    different experts negatives, in the multi-positive InfoNCE form (Khosla et al. 2020, "Supervised Contrastive
    Learning"). For one sequence with the valid expert outputs o_1..o_N (o_n from expert y_n):

        s_nm  = cos(o_n, o_m) / temperature
        P(n)  = {m != n : y_m = y_n}                            positives: the same expert on other tokens
        l_n   = -1/|P(n)| sum_{p in P(n)} log( exp(s_np) / sum_{m != n} exp(s_nm) )
        loss  = mean of l_n over the anchors n with a non-empty P(n)

    gram [B, N, N] holds o_n . o_m per sequence, experts [B, N] the y_n, valid [B, N] which pairs exist. Returns
    (loss [B], has_anchor [B] bool); a sequence without anchors has loss 0. An output of norm 0 (a LoRA expert whose
    B is still zero) is similar to nothing and gets no gradient."""
    gram = gram.float()
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-24).sqrt()  # clamped before the root: finite gradients
    logits = gram / (norms[..., :, None] * norms[..., None, :]) / temperature
    others = valid[..., :, None] & valid[..., None, :] & ~torch.eye(gram.shape[-1], dtype=torch.bool,
                                                                      device=gram.device)
    positives = others & (experts[..., :, None] == experts[..., None, :])
    log_prob = logits - logits.masked_fill(~others, torch.finfo(logits.dtype).min).logsumexp(dim=-1, keepdim=True)
    count = positives.sum(dim=-1)
    per_anchor = -torch.where(positives, log_prob, 0.0).sum(dim=-1) / count.clamp_min(1)
    anchors = count > 0
    loss = torch.where(anchors, per_anchor, 0.0).sum(dim=-1) / anchors.sum(dim=-1).clamp_min(1)
    return loss, anchors.any(dim=-1)


def contrastive_loss(records, temperature: float) -> torch.Tensor:
    """MoELoRA's contrastive loss of one forward: `expert_contrastive_loss` of every recorded router call (every
    adapted module of every layer) and every sequence, averaged over the (call, sequence) pairs that have an anchor
    (0 when none has, e.g. a decoding step, whose one token has k distinct experts)."""
    losses, has_anchor = [], []
    for record in records:
        if record.contrastive is not None:
            sample = record.contrastive
            loss, anchored = expert_contrastive_loss(sample.gram, sample.experts, sample.valid, temperature)
            losses.append(loss)
            has_anchor.append(anchored)
    if not losses:
        return records[0].logits.new_zeros((), dtype=torch.float32)
    losses, has_anchor = torch.cat(losses), torch.cat(has_anchor)
    return torch.where(has_anchor, losses, 0.0).sum() / has_anchor.sum().clamp_min(1)
