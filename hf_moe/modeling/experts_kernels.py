# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""`sorted_mm`: an experts implementation for fused 3D expert weights with its own backward; and "auto".

Registered in transformers' `ExpertsInterface` as "sorted_mm", so any model with `@use_experts_implementation`
experts can select it (`experts_implementation="sorted_mm"`). In fp32 on x86-64 CPUs all its products (forward,
input and weight gradients) go through oneDNN rather than the MKL that torch's fp32 `mm` calls. It keeps 14-25% less
memory for the backward than transformers' `grouped_mm`.

"auto", registered too and the default of this project's models, runs on a CPU whichever kernel was fastest for the
call's shapes on this machine: `sorted_mm` (through oneDNN, and through `torch.mm`), transformers' `grouped_mm`, and
its `batched_mm` for inference on a few tokens, timed once per CPU model, torch version, shapes, token bucket and
training or inference (kernel_choice.py; the decisions are cached on disk). The winner depends on the CPU: on an AMD
EPYC whose MKL ran fp32 products at half oneDNN's rate `sorted_mm` won (BENCHMARKS.md), on an Intel Xeon whose MKL is
fast `grouped_mm` did. `HF_MOE_AUTO_KERNEL=<kernel>` pins it (`auto_experts_forward`). On a GPU "auto" runs
`grouped_mm`, untimed: there `sorted_mm`'s backward ran at 0.83-0.99x of `grouped_mm`'s speed on an H100.

The (token, slot) pairs are sorted by expert; each expert that received tokens runs two matrix products on its
contiguous block of rows, and its backward four (on a CPU one product per expert, through oneDNN in fp32 on x86-64
and `torch.mm` otherwise, where a one-token call's forward runs its experts two at a time; on a CUDA GPU each product
is one call of torch's `grouped_mm` over all experts, with the block offsets on the device):

    x_s  = hidden[token_of[s]]                      [S, H]      S = T * k pairs, sorted by expert
    gu_s = x_s @ gate_up_proj[e]^T                  [S, 2I]     per expert e, on its block of rows
    a_s  = act(gate_s) * up_s                       [S, I]
    y_s  = a_s @ down_proj[e]^T                     [S, H]
    out  = sum over the pairs of each token of w_s * y_s   [T, H]

Why not autograd through `gate_up_proj[e]`: slicing a parameter inside a loop makes autograd allocate a full-size
[E, ...] gradient for every slice. The backward below writes each expert's gradient block into one [E, ...]
buffer instead (only the blocks of experts without pairs are zeroed; each other block is written whole). It
recomputes act(gate) rather than storing it, keeps the expert outputs y_s [S, H] to take the pair weights' gradient
<grad, y_s> on H-wide rows, and has SiLU's backward write into the gate half of the [S, 2I] gradient in place. Work
is proportional to the pairs routed plus the number of experts that received tokens; there is no [T, E, ...]
intermediate. Expert ids >= num_experts (tokens owned by another rank) are skipped under expert parallelism, the
only place they occur; on a GPU, as in transformers' `grouped_mm`, the module's `_is_expert_parallel` flag (set by
transformers' expert-parallel plan) must say so.
Under `torch.compile` the data-dependent loop would break the graph, so compiled code runs
transformers' `grouped_mm` instead.
"""

import platform
from collections.abc import Callable
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations import moe as transformers_moe
from transformers.integrations.moe import ExpertsInterface, batched_mm_experts_forward, grouped_mm_experts_forward

from .kernel_choice import choose_kernel, gradients_needed, pinned_kernel, timeable, token_bucket

SORTED_MM = "sorted_mm"
SORTED_MM_TORCH_MM = "sorted_mm/torch.mm"  # "auto"'s name for `sorted_mm` with its products on `torch.mm`
GROUPED_MM, BATCHED_MM = "grouped_mm", "batched_mm"  # transformers'
AUTO = "auto"
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)  # torch >= 2.10 / 2.8-2.9


def _probed_onednn_linear():
    """torch's oneDNN linear on x86-64 (a private op, the one torch.compile's CPU backend calls), or None where this
    torch lacks it or it no longer takes these arguments: then the loop runs `torch.mm`."""
    if not torch.backends.mkldnn.is_available() or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    try:
        linear(torch.ones(1, 1), torch.ones(1, 1), None, "none", [], "")
    except (TypeError, RuntimeError):  # TypeError: no such op (None) or other arguments
        return None
    return linear


_onednn_linear = _probed_onednn_linear()


def _onednn_runs(rows: torch.Tensor) -> bool:
    """Whether the loop's products go through oneDNN (the weight gradients' where they sum over more than
    `_SHORT_SUM` rows): fp32 on x86-64 CPUs, unless switched off with `torch.backends.mkldnn.flags(enabled=False)`.
    torch's own fp32 `mm` calls MKL there (official wheels), which ran the per-expert row products 1.8-2.5x slower than
    oneDNN on an AMD EPYC (Zen 5) CPU, and 1.05-1.9x on a Zen 4 one (BENCHMARKS.md, "Expert-block matrix products");
    in bf16 torch already calls oneDNN."""
    return (rows.device.type == "cpu" and rows.dtype == torch.float32 and _onednn_linear is not None
            and torch.backends.mkldnn.enabled)


# A weight gradient's sum over at most this many rows runs through `torch.mm` even where oneDNN runs: copying oneDNN's
# result into the gradient costs more than its faster product saves (at T=1 the copy alone is a whole product).
_SHORT_SUM = 16


def _zero_padded(rows: torch.Tensor, count: int) -> torch.Tensor:
    """[n, d] rows with zero rows appended up to `count` >= n."""
    if len(rows) == count:
        return rows
    return torch.cat([rows, rows.new_zeros(count - len(rows), rows.shape[1])])


def _bucketed(rows: int) -> int:
    """`rows` rounded up to one of 16 steps per power of two (exact up to 32): at most 6.25% more rows."""
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 5)  # rows in [2^(b-1), 2^b): steps of 2^(b-5)
    return -(-rows // step) * step


class _LoopProducts:
    """Per-expert products as one matrix product per expert that received pairs, on its contiguous block of rows.
    Needs block ends on the host (one sync); work is proportional to the pairs plus the experts with pairs.

    oneDNN builds (JIT-compiles) a kernel for every new product shape and caches 1024 of them: 0.4-1.1 ms each, as
    much as a whole small product, and per-expert row counts change with every batch and prompt. Its products
    therefore run on windows of a bucketed number of rows from the first row of the expert's block (the rows after the
    block, the next blocks' or zero padding at the end, give results that are dropped): in the training steps of
    BENCHMARKS.md ("oneDNN kernel shapes") 8-20 calls per step met a new shape instead of 76-112, and the cache held
    272-376 shapes after 12 steps instead of 992-1568; prefills of prompts of random lengths met 6-8 instead of
    18-28. The weight gradients' products sum over an expert's rows: there the block is padded with zero rows to the
    bucketed count."""

    def __init__(self, ends: torch.Tensor, onednn: bool = True):
        self.onednn = onednn  # False: `torch.mm` even where oneDNN runs (see `_onednn_runs`)
        self.num_experts = ends.shape[0]
        self.blocks, start = [], 0  # (expert, start row, end row) of every expert with pairs, in sorted-row order
        for expert, end in enumerate(ends.tolist()):
            if end > start:
                self.blocks.append((expert, start, end))
            start = end
        self.num_rows = start

    def rows_times(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """rows [S, in] @ weight[e] [in, out] on each expert's block -> [S, out]"""
        out = rows.new_empty(rows.shape[0], weight.shape[-1])
        if self.onednn and _onednn_runs(rows):  # oneDNN's linear computes rows @ W^T, for W [out, in]; no `out=`
            for expert, start, end in self.blocks:
                count = _bucketed(end - start)
                window = _zero_padded(rows[start:start + count], count)  # [count, in]: fewer rows at the end
                out[start:end] = _onednn_linear(window, weight[expert].t(), None, "none", [], "")[: end - start]
        elif self._pairs_apply(weight):
            self._pairs_times(rows, weight, out)
        else:
            for expert, start, end in self.blocks:
                torch.mm(rows[start:end], weight[expert], out=out[start:end])
        return out

    def _pairs_apply(self, weight: torch.Tensor) -> bool:
        """Whether `_pairs_times` runs: every block one row (decoding one token: S = k distinct experts), weight rows
        [E, out, in] contiguous along `in` (the forward's transposed views), plain tensors (not a DTensor's shard)."""
        return (len(self.blocks) > 1 and self.num_rows == len(self.blocks) and weight.stride(1) == 1
                and type(weight) in (torch.Tensor, nn.Parameter))

    def _pairs_times(self, rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        """The experts' matrix-vector products two at a time: experts a < b as one batched product whose batch of two
        is a strided view of `weight` (stride b - a experts: no copy), W_e [out, in] @ x_s [in, 1]. torch's batched
        product runs the two on the cores side by side; a decoding step's products of about a megabyte each ran 1.5-2x
        faster so than one after the other with every core on each (fp32, 2 cores of an AMD EPYC Zen 4, BENCHMARKS.md
        "Decode at batch 1"), as the products of one token stream their weights at one core's bandwidth."""
        by_row = weight.transpose(1, 2)  # [E, out, in], contiguous rows
        for first in range(0, len(self.blocks) - 1, 2):  # one row per block: block i is row i
            (a, row, _), (b, _, _) = self.blocks[first], self.blocks[first + 1]
            pair = expert_pair(by_row, a, b)  # [2, out, in]: experts a and b
            # the rows as [2, in, 1] of strides (in, 1, in), `.mT` of [2, 1, in]: with strides (in, 1, 1)
            # (`[..., None]`) torch took a path 4-5x slower for the same product (one-off timing)
            torch.bmm(pair, rows[row:row + 2, None, :].mT, out=out[row:row + 2, None, :].mT)
        if len(self.blocks) % 2:
            expert, row, _ = self.blocks[-1]
            torch.mm(rows[row:row + 1], weight[expert], out=out[row:row + 1])

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """left[rows of e]^T @ right[rows of e] for every expert e -> [E, a, b] (a weight gradient), for left [S, a]
        and right [S, b]. Left uninitialised and filled block by block: one product (`torch.mm`'s, or oneDNN's copied
        in) writes each block whole, so only the blocks of experts without pairs are zeroed (zeroing the whole buffer
        first would be a wasted pass). With the copy, oneDNN ran an expert block's weight-gradient products 1.2-1.8x
        faster than `torch.mm` on an AMD EPYC (Zen 5) CPU (BENCHMARKS.md, "Expert-block matrix products")."""
        out = left.new_empty(self.num_experts, left.shape[1], right.shape[1])
        for expert in set(range(self.num_experts)) - {expert for expert, _, _ in self.blocks}:
            out[expert].zero_()
        onednn = self.onednn and _onednn_runs(left)
        for expert, start, end in self.blocks:
            if onednn and end - start > _SHORT_SUM:  # src @ W^T for src = left^T, W = right^T: sums over the rows
                count = _bucketed(end - start)  # the block's rows and zero rows
                left_rows, right_rows = _zero_padded(left[start:end], count), _zero_padded(right[start:end], count)
                out[expert] = _onednn_linear(left_rows.t(), right_rows.t(), None, "none", [], "")  # no `out=`: a copy
            else:
                torch.mm(left[start:end].t(), right[start:end], out=out[expert])
        return out


class _GroupedProducts:
    """Each product as one call of torch's `grouped_mm` over all experts (CUDA), the row offsets staying on the
    device. Where torch has a fused kernel (bf16 on Hopper-class GPUs) that is one launch and no host sync, which
    dominate a per-expert loop on a GPU; for other dtypes and GPUs torch loops over the experts itself."""

    def __init__(self, ends: torch.Tensor):
        self.offsets = ends  # [E] int32

    def rows_times(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _grouped_mm(rows, weight, offs=self.offsets)

    @cached_property
    def no_pairs(self) -> torch.Tensor:  # [E, 1, 1], only the backward needs it (once for both weight gradients)
        return (self.offsets.diff(prepend=self.offsets.new_zeros(1)) == 0)[:, None, None]

    def outer(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        # some GPUs' kernels leave the blocks of experts without rows unwritten (pytorch#172439): zero them
        return _grouped_mm(left.t(), right, offs=self.offsets).masked_fill_(self.no_pairs, 0)


def expert_pair(weights: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Experts a < b of weights [E, ...] as one [2, ...] view whose batch stride is b - a experts: no copy."""
    stride = weights.stride()
    return weights.as_strided((2, *weights.shape[1:]), ((b - a) * stride[0], *stride[1:]),
                              weights.storage_offset() + a * stride[0])


def _grouped_kernel_applies(hidden_states: torch.Tensor, gate_up_proj: torch.Tensor) -> bool:
    """torch's `grouped_mm` runs on CUDA GPUs from Ampere on (torch >= 2.10; the older private op only in bf16 on
    Hopper), and needs every stride but the unit one (H, I and 2I elements here) to be a multiple of 16 bytes."""
    if _grouped_mm is None or hidden_states.device.type != "cuda":
        return False
    hidden, width = gate_up_proj.shape[2], gate_up_proj.shape[1] // 2
    if not all(size * gate_up_proj.element_size() % 16 == 0 for size in (hidden, width)):
        return False
    capability = torch.cuda.get_device_capability(hidden_states.device)
    if hasattr(F, "grouped_mm"):
        return capability >= (8, 0)
    return capability[0] == 9 and gate_up_proj.dtype == torch.bfloat16


def _sum_into_tokens(pair_rows: torch.Tensor, token_of: torch.Tensor, unsort: torch.Tensor | None,
                     like: torch.Tensor) -> torch.Tensor:
    """[S, H] rows of sorted pairs -> [T, H] sums per token. With `unsort` (the inverse of the sort, when every pair
    is present) the rows go back to (token, slot) order and each token sums its k rows: deterministic, no atomic adds
    (a GPU's). Otherwise scatter_add_ (index_add_ costs milliseconds even for a handful of rows on a CPU)."""
    if unsort is not None:
        top_k = pair_rows.shape[0] // max(like.shape[0], 1)  # pairs per token; max(): an empty batch has no rows
        return pair_rows[unsort].view(like.shape[0], top_k, pair_rows.shape[1]).sum(dim=1).to(like.dtype)
    index = token_of[:, None].expand(-1, pair_rows.shape[1])
    return torch.zeros_like(like).scatter_add_(0, index, pair_rows.to(like.dtype))


def _is_silu(act_fn) -> bool:
    return act_fn is F.silu or isinstance(act_fn, (nn.SiLU, SiLUActivation))


def _experts_forward(hidden_states, pair_weights, gate_up_proj, down_proj, token_of, unsort, products, act_fn):
    """The forward products: returns the [T, H] output and what the backward keeps, [gate; up] and y_s."""
    # hidden_states [T, H]; pair_weights [S] (sorted); gate_up_proj [E, 2I, H]; down_proj [E, H, I]
    # token_of [S] token of each sorted pair; unsort [S] or None: see _sum_into_tokens
    # products: the per-expert matrix products over the sorted rows
    x_sorted = hidden_states[token_of]  # [S, H]
    gate_up = products.rows_times(x_sorted, gate_up_proj.transpose(1, 2))  # [S, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    activated = act_fn(gate).mul_(up)  # [S, I]
    expert_out = products.rows_times(activated, down_proj.transpose(1, 2))  # [S, H] y_s, before the pair weight
    weighted_out = expert_out * pair_weights[:, None].to(expert_out.dtype)  # [S, H]
    output = _sum_into_tokens(weighted_out, token_of, unsort, hidden_states)
    return output, gate_up, expert_out


class _SortedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, pair_weights, gate_up_proj, down_proj, token_of, unsort, products, act_fn):
        output, gate_up, expert_out = _experts_forward(
            hidden_states, pair_weights, gate_up_proj, down_proj, token_of, unsort, products, act_fn
        )
        ctx.save_for_backward(
            hidden_states, pair_weights, gate_up_proj, down_proj, token_of, unsort, gate_up, expert_out
        )
        ctx.products, ctx.act_fn = products, act_fn
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, pair_weights, gate_up_proj, down_proj, token_of, unsort, gate_up, expert_out = ctx.saved_tensors
        products, act_fn = ctx.products, ctx.act_fn
        width = gate_up.shape[1] // 2
        gate, up = gate_up[:, :width], gate_up[:, width:]
        grad_output = grad_output.contiguous()
        grad_pair_out = grad_output[token_of]  # [S, H], d loss / d (w_s * y_s)
        grad_pair_weights = (grad_pair_out * expert_out).sum(dim=-1)  # d loss / d w_s = <grad, y_s>, on [S, H]
        weighted_grad = grad_pair_out.mul_(pair_weights[:, None].to(grad_pair_out.dtype))  # d loss / d y_s

        grad_activated = products.rows_times(weighted_grad, down_proj)  # [S, I] d loss / d a_s = (d / d y_s) @ W_e

        silu = _is_silu(act_fn)  # SiLU has a backward op of its own (below); other activations take autograd's
        with torch.set_grad_enabled(not silu):
            gate_leaf = gate.detach().requires_grad_(not silu)
            activated_gate = act_fn(gate_leaf)  # [S, I], recomputed rather than stored
        grad_down_proj = None
        if ctx.needs_input_grad[3]:
            activated = activated_gate.detach() * up  # [S, I] a_s
            grad_down_proj = products.outer(weighted_grad, activated)  # [E, H, I]
            del activated

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
            grad_x_sorted = products.rows_times(grad_gate_up, gate_up_proj)  # [S, H]
            grad_hidden = _sum_into_tokens(grad_x_sorted, token_of, unsort, hidden_states)
        if ctx.needs_input_grad[2]:
            grad_gate_up_proj = products.outer(grad_gate_up, x_sorted)  # [E, 2I, H]
        grad_pair_weights = grad_pair_weights.to(pair_weights.dtype)
        return grad_hidden, grad_pair_weights, grad_gate_up_proj, grad_down_proj, None, None, None, None


def _grad_needed(*tensors: torch.Tensor) -> bool:
    """Whether autograd records this call: grad mode is on and one of the inputs requires a gradient."""
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def _takes_layout(experts: nn.Module) -> bool:
    """Whether `sorted_mm` takes this experts module's weight layout (transformers' `use_experts_implementation`
    flags) and gated unit: act(gate) * up, as transformers' default `_apply_gate` (its backward is written for it)."""
    if hasattr(experts, "experts_activation"):  # this project's MoEExperts, whose `_apply_gate` follows the config
        act_times_up = experts.experts_activation == "glu"
    else:
        default_gate = getattr(transformers_moe, "_default_apply_gate", None)  # private: absent in some versions
        act_times_up = getattr(type(experts), "_apply_gate", default_gate) is default_gate
    return (act_times_up and experts.has_gate and not experts.has_bias and not experts.is_transposed
            and getattr(experts, "is_concatenated", True) and not getattr(experts, "has_post_expert_norm", False))


def sorted_mm_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor, onednn: bool = True) -> torch.Tensor:
    """Experts forward for `@use_experts_implementation` modules with gated, bias-free, non-transposed weights
    (`gate_up_proj [E, 2I, H]` as [gate; up], `down_proj [E, H, I]`). `onednn=False`: the CPU products on `torch.mm`
    even where they would go through oneDNN (`_onednn_runs`)."""
    if not _takes_layout(self):
        raise ValueError(
            "`experts_implementation`='sorted_mm' supports gated experts act(gate) * up with [gate; up] weights and "
            "without biases (`expert_bias`), other gated units (`experts_activation`='clamped_swiglu'), transposed "
            "weights or post-expert norms; use 'grouped_mm', 'batched_mm' or 'eager' for this model."
        )
    if torch.compiler.is_compiling():
        # the per-expert loop depends on the data (counts per expert): let compiled graphs use one grouped op
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    top_k = top_k_index.shape[1]
    sorted_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)  # [S] pairs by expert, token order within
    # ends[e]: the end row of expert e's block of sorted pairs. Ids >= num_experts (experts on other ranks under
    # expert parallelism) sort after every block: only the prefix up to ends[-1] is local.
    experts = torch.arange(self.num_experts, device=sorted_ids.device)
    ends = torch.searchsorted(sorted_ids, experts, right=True, out_int32=True)  # [E], on the device: no sync
    unsort = None
    if not _grouped_kernel_applies(hidden_states, self.gate_up_proj):
        products = _LoopProducts(ends, onednn)
        order = order[: products.num_rows]
    else:
        products = _GroupedProducts(ends)
        if getattr(self, "_is_expert_parallel", False):  # one sync, that only expert parallelism pays
            order = order[: int(ends[-1])]
        else:  # every pair is local
            unsort = torch.argsort(order)
    token_of = order // top_k
    pair_weights = top_k_weights.reshape(-1)[order]
    weights = (self.gate_up_proj, self.down_proj)
    arguments = (hidden_states, pair_weights, *weights, token_of, unsort, products, self.act_fn)
    if _grad_needed(hidden_states, pair_weights, *weights):
        return _SortedExpertsFunction.apply(*arguments)
    return _experts_forward(*arguments)[0]


def sorted_mm_torch_mm_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """`sorted_mm` with its products on `torch.mm` (MKL for fp32 on x86-64) even where oneDNN would run them."""
    return sorted_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights, onednn=False)


def auto_kernels() -> dict[str, Callable]:
    """The kernels "auto" chooses from, by the names `HF_MOE_AUTO_KERNEL` takes (read at each call, so that tests can
    replace them)."""
    return {SORTED_MM: sorted_mm_experts_forward, SORTED_MM_TORCH_MM: sorted_mm_torch_mm_experts_forward,
            GROUPED_MM: grouped_mm_experts_forward, BATCHED_MM: batched_mm_experts_forward}


# `batched_mm` copies one [2I, H] and one [H, I] weight per (token, expert) pair: a candidate for decoding-sized
# inference calls only (up to this many pairs in the token bucket), where it saves the sort
_BATCHED_MM_PAIRS = 8


def auto_candidates(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    gradients: str) -> list[str]:
    """The kernels "auto" times for this call: `sorted_mm` where it takes the layout (also on `torch.mm` where its
    products would otherwise go through oneDNN: the faster library depends on the CPU), transformers' `grouped_mm`,
    and its `batched_mm` for inference on a few tokens."""
    names = []
    if _takes_layout(experts):
        names.append(SORTED_MM)
        if _onednn_runs(hidden_states):
            names.append(SORTED_MM_TORCH_MM)
    names.append(GROUPED_MM)
    if gradients == "none" and token_bucket(hidden_states.shape[0]) * top_k_index.shape[-1] <= _BATCHED_MM_PAIRS:
        names.append(BATCHED_MM)
    return names


def auto_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """"auto", the default of this project's models. On a CPU it runs whichever of `auto_candidates` was fastest on
    this machine for the call's shapes, timed at the first call of each (kernel_choice.py; cached on disk): which
    kernel and matrix library win depends on the CPU (`sorted_mm` through oneDNN on an AMD EPYC, `grouped_mm` on an
    Intel Xeon whose MKL is fast, BENCHMARKS.md). Elsewhere transformers' `grouped_mm`: on GPUs (where `sorted_mm`'s
    backward is slower), for DTensor weights, under `torch.compile` and for an empty batch.
    `HF_MOE_AUTO_KERNEL=<name>` pins the kernel (the names of `auto_kernels`; `sorted_mm` falls back to `grouped_mm`
    for layouts it does not take)."""
    if torch.compiler.is_compiling():  # no timing, no file or environment access inside a traced graph
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    kernels = auto_kernels()
    name = pinned_kernel(kernels)
    if name is not None:
        if name in (SORTED_MM, SORTED_MM_TORCH_MM) and not _takes_layout(self):
            name = GROUPED_MM
    elif not timeable(self, hidden_states) or hidden_states.shape[0] == 0:
        name = GROUPED_MM
    else:
        gradients = gradients_needed(self, hidden_states, top_k_weights)
        candidates = {each: kernels[each] for each in auto_candidates(self, hidden_states, top_k_index, gradients)}
        name = choose_kernel(self, hidden_states, top_k_index.shape[-1], gradients, candidates, fallback=GROUPED_MM)
    return kernels[name](self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(SORTED_MM, sorted_mm_experts_forward)
ExpertsInterface.register(AUTO, auto_experts_forward)
