"""The maths shared by the layers of the three methods: router gates and LoRA (expert) products.

Shapes: T tokens, E experts, k experts per token, r LoRA rank, `in` / `out` the features of the adapted Linear.
Router probabilities are always fp32 softmax (`routing.scores_from_logits`, as our MoE models compute them).
"""

import torch
import torch.nn.functional as F
from transformers.integrations.moe import _grouped_mm  # torch's grouped_mm where it runs, a loop of mm otherwise

from ...modeling.routing import scores_from_logits


def top_k_gates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral-style top-k routing: p = softmax(logits) in fp32, keep the k largest, renormalise them to sum to one
    (`routing.TopKRouter` with norm_topk_prob=True). Returns (weights [T, k] fp32, index [T, k])."""
    probs = scores_from_logits(logits, "softmax")
    weights, index = probs.topk(top_k, dim=-1)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), index


def top_p_gates(logits: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic top-p routing (MoE-PEFT's "mixlora-dynamic"): sort p = softmax(logits) (fp32) descending and keep the
    experts whose cumulative sum is <= top_p plus the first one past it, i.e. the smallest set with mass > top_p;
    there is no cap on its size. The weights are the kept probabilities, not renormalised.

    Returns (weights [T, n], index [T, n], kept [T, n] bool) with n the largest set of this call: slots past a
    token's own set have weight 0 and kept False."""
    probs = scores_from_logits(logits, "softmax")
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    over = sorted_probs.cumsum(dim=-1) > top_p
    first_over = F.one_hot(over.long().argmax(dim=-1), probs.shape[-1]).bool()  # all False rows give 0: kept anyway
    kept = ~over | first_over  # a prefix of the sorted order, since the cumulative sum only grows
    width = int(kept.sum(dim=-1).max()) if kept.numel() else 1
    kept = kept[:, :width]
    return sorted_probs[:, :width] * kept, order[:, :width], kept


def switch_gates(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformer top-1 routing (MoE-PEFT's "mixlora-switch"): the argmax expert of p = softmax(logits)
    (fp32) with weight max(p), not renormalised. Returns (weights [T, 1], index [T, 1])."""
    return scores_from_logits(logits, "softmax").max(dim=-1, keepdim=True)


def expert_gates(logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate of every expert for every token, [T, E] fp32: the dense softmax when `top_k` is None (LoRAMoE), else
    the renormalised top-k weights with zeros elsewhere (MoLA). Also returns the top-k index [T, k] (None if dense)."""
    if top_k is None:
        return scores_from_logits(logits, "softmax"), None
    weights, index = top_k_gates(logits, top_k)
    return torch.zeros_like(logits, dtype=weights.dtype).scatter(1, index, weights), index


def lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """B A x for x [..., in], A [r, in], B [out, r] -> [..., out]."""
    return F.linear(F.linear(x, lora_a), lora_b)


def lora_mixture(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sum_e gates[t, e] * B_e A_e x_t for every token at once, [T, out].

    x [T, in], A [E, r, in], B [E, out, r], gates [T, E]. The E rank-r down-projections are one GEMM of width E*r
    (cheap next to the base Linear for small r), scaled by the gates, then one GEMM back up: an expert whose gate is
    0 contributes nothing and gets no gradient, so top-k routing needs no gather. Nothing of size [T, E, out] is built.
    """
    num_experts, rank, _ = lora_a.shape
    hidden = F.linear(x, lora_a.reshape(num_experts * rank, -1)).view(-1, num_experts, rank)  # [T, E, r]
    hidden = hidden * gates.to(hidden.dtype).unsqueeze(-1)
    stacked_b = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_experts * rank)  # [out, E*r]
    return F.linear(hidden.reshape(-1, num_experts * rank), stacked_b)


def sequence_lora(tokens: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, experts: torch.Tensor,
                  scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """scale_b * B_e A_e x[b, s] with one expert e = experts[b] per sequence b, [B, S, out].

    tokens [B, S, in], A [E, r, in], B [E, out, r], experts [B] long, scale a float or [B] (one per sequence). Each
    sequence's expert is gathered ([B, r, in], [B, out, r]: gradients reach only the experts used) and applied by
    two batched matmuls; the scale multiplies the rank-r intermediate, not the wide output."""
    # index_select, not lora_a[experts]: advanced indexing's backward accumulates in a thread-timing order on a CPU,
    # so training would not repeat bit for bit per seed
    hidden = torch.bmm(tokens, lora_a.index_select(0, experts).transpose(1, 2))  # [B, S, r]
    if isinstance(scale, torch.Tensor):
        scale = scale.to(hidden.dtype).view(-1, 1, 1)
    return torch.bmm(hidden * scale, lora_b.index_select(0, experts).transpose(1, 2))


def grouped_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, offsets: torch.Tensor,
                 scaling: float = 1.0) -> torch.Tensor:
    """scaling * B_e A_e x_s for every row s, with rows grouped by expert: [S, out].

    x [S, in] sorted by expert, A [E, r, in], B [E, out, r], offsets [E] int32 cumulative row counts (expert e owns
    rows offsets[e-1]:offsets[e]). Two grouped matmuls over the stacked weights: nothing is sliced per expert, so
    autograd writes each expert's gradient block into one [E, ...] gradient (a slice per expert would allocate a
    full-size gradient for each), and an expert without rows costs nothing. The scaling multiplies the rank-r
    intermediate [S, r], not the wide output."""
    down = _grouped(x, lora_a.transpose(1, 2), offsets)  # [S, r]
    return _grouped(down * scaling, lora_b.transpose(1, 2), offsets)


def _grouped(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, in] @ weight[e] [in, out] per group. torch's kernel needs every stride (but the unit one) of its inputs,
    and of the output's gradient in the backward ([S, out]), to be a multiple of 16 bytes, which a rank like 3 breaks;
    transformers' fallback (one mm per group) takes any layout."""
    strides = [*x.stride(), *weight.stride(), weight.shape[-1]]
    if all(stride * weight.element_size() % 16 == 0 for stride in strides if stride != 1):
        return _grouped_mm(x, weight, offsets)
    return torch.ops.transformers.grouped_mm_fallback(x.to(weight.dtype), weight, offs=offsets)


class _PermuteRows(torch.autograd.Function):
    """rows[perm] whose backward is the gather grad[inverse]: autograd's own backward of an index is a scatter-add
    (index_put with accumulate), which is several times slower on CPU and not needed for a permutation."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """rows[perm] for a permutation `perm` of the rows of `rows` [S, n], with `inverse` its inverse permutation."""
    return _PermuteRows.apply(rows, perm, inverse)
