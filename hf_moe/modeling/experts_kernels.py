# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""`sorted_mm`: an experts implementation for fused 3D expert weights with its own backward.

Registered in transformers' `ExpertsInterface` as "sorted_mm", so any model with `@use_experts_implementation`
experts can select it (`experts_implementation="sorted_mm"`). It is not the default: on this project's CPU
benchmarks (BENCHMARKS.md) it beats transformers' `grouped_mm` for training steps on very few tokens but not at
every measured point, and the default must never be slower.

The (token, slot) pairs are sorted by expert; each expert that received tokens runs two plain matrix products on
its contiguous block of rows:

    x_s  = hidden[token_of[s]]                      [S, H]      S = T * k pairs, sorted by expert
    gu_s = x_s @ gate_up_proj[e]^T                  [S, 2I]     per expert e, on its block of rows
    a_s  = act(gate_s) * up_s                       [S, I]
    y_s  = a_s @ down_proj[e]^T                     [S, H]
    out  = sum over the pairs of each token of w_s * y_s   [T, H]

Why not autograd through `gate_up_proj[e]`: slicing a parameter inside a loop makes autograd allocate a full-size
[E, ...] gradient for every slice. The backward below writes each expert's gradient block into one [E, ...]
buffer instead, left uninitialised since one matrix product writes each block whole (only the blocks of experts
without pairs are zeroed). It recomputes act(gate) rather than storing it, keeps the expert outputs y_s [S, H] to
take the pair weights' gradient <grad, y_s> on H-wide rows, and has SiLU's backward write into the gate half of
the [S, 2I] gradient in place. Work is proportional to the pairs routed plus the number of experts that received
tokens; there is no [T, E, ...] intermediate. Expert ids >= num_experts (tokens owned by another rank under expert
parallelism) are skipped. Under `torch.compile` the data-dependent loop would break the graph, so compiled code runs
transformers' `grouped_mm` instead.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward

SORTED_MM = "sorted_mm"


def _expert_blocks(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start row, end row) for every expert with at least one pair, in sorted-row order."""
    blocks, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            blocks.append((expert, start, start + count))
            start += count
    return blocks


def _sum_into_tokens(pair_rows: torch.Tensor, token_of: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[S, H] rows of sorted pairs -> [T, H] sums per token. (scatter_add_: index_add_ costs milliseconds even for a
    handful of rows on this CPU build.)"""
    index = token_of[:, None].expand(-1, pair_rows.shape[1])
    return torch.zeros_like(like).scatter_add_(0, index, pair_rows.to(like.dtype))


def _is_silu(act_fn) -> bool:
    return act_fn is F.silu or isinstance(act_fn, (nn.SiLU, SiLUActivation))


def _weight_gradient(weight: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
    """An uninitialised [E, ...] gradient whose blocks of experts without pairs are zeroed: every other block is
    written whole by one matrix product, so zeroing the full buffer first would be a wasted pass over it."""
    gradient = torch.empty_like(weight)
    for expert in set(range(weight.shape[0])) - {expert for expert, _, _ in blocks}:
        gradient[expert].zero_()
    return gradient


def _experts_forward(hidden_states, pair_weights, gate_up_proj, down_proj, token_of, blocks, act_fn):
    """The forward products: returns the [T, H] output and what the backward keeps, [gate; up] and y_s."""
    # hidden_states [T, H]; pair_weights [S] (sorted); gate_up_proj [E, 2I, H]; down_proj [E, H, I]
    # token_of [S] token of each sorted pair; blocks: (expert, start, end) of each expert with pairs
    num_pairs = token_of.shape[0]
    x_sorted = hidden_states[token_of]  # [S, H]
    gate_up = x_sorted.new_empty(num_pairs, gate_up_proj.shape[1])  # [S, 2I]
    for expert, start, end in blocks:
        torch.mm(x_sorted[start:end], gate_up_proj[expert].t(), out=gate_up[start:end])
    gate, up = gate_up.chunk(2, dim=-1)
    activated = act_fn(gate).mul_(up)  # [S, I]
    expert_out = x_sorted.new_empty(num_pairs, down_proj.shape[1])  # [S, H] y_s, before the pair weight
    for expert, start, end in blocks:
        torch.mm(activated[start:end], down_proj[expert].t(), out=expert_out[start:end])
    output = _sum_into_tokens(expert_out * pair_weights[:, None].to(expert_out.dtype), token_of, hidden_states)
    return output, gate_up, expert_out


class _SortedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, pair_weights, gate_up_proj, down_proj, token_of, blocks, act_fn):
        output, gate_up, expert_out = _experts_forward(
            hidden_states, pair_weights, gate_up_proj, down_proj, token_of, blocks, act_fn
        )
        ctx.save_for_backward(hidden_states, pair_weights, gate_up_proj, down_proj, token_of, gate_up, expert_out)
        ctx.blocks, ctx.act_fn = blocks, act_fn
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, pair_weights, gate_up_proj, down_proj, token_of, gate_up, expert_out = ctx.saved_tensors
        blocks, act_fn = ctx.blocks, ctx.act_fn
        width = gate_up.shape[1] // 2
        gate, up = gate_up[:, :width], gate_up[:, width:]
        grad_output = grad_output.contiguous()
        grad_pair_out = grad_output[token_of]  # [S, H], d loss / d (w_s * y_s)
        grad_pair_weights = (grad_pair_out * expert_out).sum(dim=-1)  # d loss / d w_s = <grad, y_s>, on [S, H]
        weighted_grad = grad_pair_out.mul_(pair_weights[:, None].to(grad_pair_out.dtype))  # d loss / d y_s

        # d loss / d a_s = (d loss / d y_s) @ down_proj[e], per expert
        grad_activated = torch.empty_like(gate)  # [S, I]
        for expert, start, end in blocks:
            torch.mm(weighted_grad[start:end], down_proj[expert], out=grad_activated[start:end])

        silu = _is_silu(act_fn)  # SiLU has a backward op of its own (below); other activations take autograd's
        with torch.set_grad_enabled(not silu):
            gate_leaf = gate.detach().requires_grad_(not silu)
            activated_gate = act_fn(gate_leaf)  # [S, I], recomputed rather than stored
        if ctx.needs_input_grad[3]:
            activated = activated_gate.detach() * up  # [S, I] a_s
            grad_down_proj = _weight_gradient(down_proj, blocks)
            for expert, start, end in blocks:
                torch.mm(weighted_grad[start:end].t(), activated[start:end], out=grad_down_proj[expert])
            del activated
        else:
            grad_down_proj = None

        grad_gate_up = torch.empty_like(gate_up)  # [S, 2I]: d loss / d gate, d loss / d up, written in place
        torch.mul(grad_activated, activated_gate.detach(), out=grad_gate_up[:, width:])
        grad_activated_gate = grad_activated.mul_(up)
        if silu:
            torch.ops.aten.silu_backward.grad_input(grad_activated_gate, gate, grad_input=grad_gate_up[:, :width])
        else:
            grad_gate_up[:, :width] = torch.autograd.grad(activated_gate, gate_leaf, grad_activated_gate)[0]

        grad_hidden = grad_gate_up_proj = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[0]:
            x_sorted = hidden_states[token_of]  # [S, H]
        if ctx.needs_input_grad[0]:
            grad_x_sorted = torch.empty_like(x_sorted)
            for expert, start, end in blocks:
                torch.mm(grad_gate_up[start:end], gate_up_proj[expert], out=grad_x_sorted[start:end])
            grad_hidden = _sum_into_tokens(grad_x_sorted, token_of, hidden_states)
        if ctx.needs_input_grad[2]:
            grad_gate_up_proj = _weight_gradient(gate_up_proj, blocks)
            for expert, start, end in blocks:
                torch.mm(grad_gate_up[start:end].t(), x_sorted[start:end], out=grad_gate_up_proj[expert])
        return grad_hidden, grad_pair_weights.to(pair_weights.dtype), grad_gate_up_proj, grad_down_proj, None, None, None


def sorted_mm_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts forward for `@use_experts_implementation` modules with gated, bias-free, non-transposed weights
    (`gate_up_proj [E, 2I, H]` as [gate; up], `down_proj [E, H, I]`)."""
    if not self.has_gate or self.has_bias or self.is_transposed or getattr(self, "has_post_expert_norm", False):
        raise ValueError(
            "`experts_implementation`='sorted_mm' supports gated experts without biases, transposed weights or "
            "post-expert norms; use 'grouped_mm' or 'eager' for this model."
        )
    if torch.compiler.is_compiling():
        # the per-expert loop depends on the data (counts per expert): let compiled graphs use one grouped op
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    top_k = top_k_index.shape[1]
    sorted_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)  # [S] pairs by expert, token order within
    counts = torch.bincount(sorted_ids, minlength=self.num_experts)[: self.num_experts]
    # ids >= num_experts (experts on other ranks under expert parallelism) sort last: keep the local prefix
    blocks = _expert_blocks(counts)
    num_local = blocks[-1][2] if blocks else 0
    order = order[:num_local]
    token_of = order // top_k
    pair_weights = top_k_weights.reshape(-1)[order]
    weights = (self.gate_up_proj, self.down_proj)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, pair_weights, *weights)):
        return _SortedExpertsFunction.apply(hidden_states, pair_weights, *weights, token_of, blocks, self.act_fn)
    return _experts_forward(hidden_states, pair_weights, *weights, token_of, blocks, self.act_fn)[0]


ExpertsInterface.register(SORTED_MM, sorted_mm_experts_forward)
