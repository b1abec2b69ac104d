"""PESC, Parameter-Efficient Sparsity Crafting (Wu et al. 2024, arXiv 2401.02731, the Camelidae models): each targeted
FFN block of a dense decoder becomes a sparse MoE whose E experts share the frozen dense FFN and differ only by a
bottleneck adapter applied to its output.

    y       = FFN(x)                                      the frozen dense FFN, run once per token     [T, H]
    g, idx  = top-k of the router logits W_r x, softmax over those k logits                               [T, k]
    A_e(y)  = s * U_e act(D_e dropout(y))                 D_e [d, H], U_e [H, d]: adapter e, width d
    out     = sum_{e in idx} g_e (y + A_e(y))  =  y + sum_{e in idx} g_e A_e(y)          (the k weights sum to one)

Expert e is the adapter with its residual, y + A_e(y), placed after the shared FFN; the router reads the FFN's input
x, the adapters its output y. Targeted Linears (attention projections) get plain LoRA, which stands in for the
reference's QLoRA on the attention projections. The balancing loss is the Switch load-balancing loss over the router
logits of all layers pooled, E * sum_e f_e P_e (see `PescModel`).

What the authors' code (github wuhy68/Parameter-Efficient-MoE, `camelidae/modeling_camelidae.py` and `train_moe.py`)
was read to settle: adapter placement (on the FFN output, residual included), GELU, dropout 0.1 on the adapter input,
no biases, top-k then softmax over the k logits (identical to a softmax over all experts renormalised over the top-k,
`functional.top_k_gates`), and the init (U_e = 0, D_e and the router kaiming-uniform(a=sqrt(5))), so that a fresh
adapter is exactly the base model. Its training script sets top-2, 8 experts, d = 64 and s = 1 (the config class's
default scale is 0.25), with LoRA r 64, alpha 16, dropout 0.1 on every projection. Where we differ:

- the shared FFN stays frozen: the reference also puts (Q)LoRA on gate/up/down_proj; here `target_modules` may not
  name FFN projections (the block is the expert, as with MixLoRA);
- the balancing loss: the reference's `load_balancing_loss_func` takes P from the softmax over the top-k logits and
  averages it over the k slots, which is 1/k for every token, so its loss is the constant E with no gradient (and
  `train_moe.py` turns router logits off, so it is not added at all). We compute the Switch loss it names, with P the
  router's full softmax, and keep the reference's coefficient 0.01;
- dropout masks are drawn per (token, expert) slot, as the reference's per-expert calls draw them.

A PESC adapter cannot be merged nor materialized as one of our MoE checkpoints: see `MATERIALIZE_REFUSAL`.
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from .config import LoraExpertConfig, _help, _number, _positive_int, _require
from .functional import _grouped, permute_rows, top_k_gates
from .layer import LoraExpertLayer, PlainLoraLinear, _batch_size
from .losses import AuxLossContext, switch_loss
from .model import ATTENTION, SUPPORTED_MODEL_TYPES, LoraExpertTuner, refuse_ffn_projections
from .peft_types import add_peft_type

PESC = add_peft_type("PESC")
# activations of the adapters (transformers' ACT2FN names): "gelu" is the exact erf GELU of the reference (nn.GELU())
PESC_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "relu", "silu")
# default target_modules per base model_type: every FFN block, and plain LoRA on the attention projections
TARGET_MODULES = {model_type: ["mlp", *ATTENTION] for model_type in SUPPORTED_MODEL_TYPES}

MATERIALIZE_REFUSAL = (
    "a PESC adapter cannot be materialized as an hf_moe MoE checkpoint, because no expert of ours computes it: PESC's "
    "expert e is y + s U_e act(D_e y) with y = FFN(x) the shared FFN's output, a bottleneck adapter with its own "
    "nonlinearity stacked after the FFN, while each expert of an hf_moe model is one FFN, W_down (act(W_gate x) * "
    "W_up x). Folding the adapter into per-expert FFN weights would need it to be linear (U_e D_e merged into "
    "W_down), which it is not, so any such checkpoint would only approximate the adapter. Use the adapter as it is: "
    "`import hf_moe` then `PeftModel.from_pretrained(base, ADAPTER)`")


@dataclass
class PescConfig(LoraExpertConfig):
    """PESC (Wu et al. 2024, arXiv 2401.02731): every targeted FFN block becomes a sparse MoE of E experts that share
    the frozen FFN and each add a bottleneck adapter to its output; targeted Linears (attention) get plain LoRA.

        expert e:  y + A_e(y),   y = FFN(x),   A_e(y) = adapter_scaling * U_e act(D_e dropout(y))
        block:     sum_{e in top-k} g_e (y + A_e(y)),   g = softmax over the k largest router logits W_r x

    `target_modules` may name FFN blocks (e.g. "mlp": any module whose input and output have the hidden size; it is
    run as is, once per token) and Linears (plain LoRA with `r`, `lora_alpha`, `lora_dropout`); the type of each
    matched module decides. FFN projections (gate_proj, ...) cannot be named: the FFN is shared and frozen.
    Defaults: the reference's training script (github wuhy68/Parameter-Efficient-MoE, train_moe.py): 8 experts,
    top-2, adapter width 64, GELU, adapter dropout 0.1, scale 1, router and D_e kaiming-uniform, U_e zero (the adapter
    starts as the base model), LoRA r 64, alpha 16, dropout 0.1; load-balancing coefficient 0.01 (its modeling code).
    """

    r: int = field(default=64, metadata=_help("Rank of the plain LoRA on the targeted Linears (attention)."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA scaling numerator: lora_alpha / r."))
    lora_dropout: float = field(default=0.1, metadata=_help("Dropout on the plain LoRA's inputs."))
    num_experts: int = field(default=8, metadata=_help("Adapter experts per FFN block."))
    top_k: int = field(default=2, metadata=_help("Experts per token; their weights are the softmax of their k "
                                                 "router logits."))
    adapter_dim: int = field(default=64, metadata=_help("Bottleneck width d of every adapter: D_e [d, H], "
                                                        "U_e [H, d]."))
    adapter_act: str = field(default="gelu", metadata=_help(f"Activation inside the adapters, one of "
                                                            f"{list(PESC_ACTIVATIONS)} (the reference: exact GELU)."))
    adapter_dropout: float = field(default=0.1, metadata=_help("Dropout on the adapters' input y = FFN(x), one mask "
                                                               "per (token, expert) slot."))
    adapter_scaling: float = field(default=1.0, metadata=_help("s, the factor of every adapter's output (the "
                                                               "reference's moe_scaling)."))
    router_aux_loss_coef: float = field(
        default=0.01, metadata=_help("Weight of the Switch load-balancing loss, over the router logits of all layers "
                                     "together."))

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PESC
        _require(_positive_int(self.num_experts), "num_experts", self.num_experts, "must be a positive integer")
        _require(_positive_int(self.top_k) and self.top_k <= self.num_experts, "top_k", self.top_k,
                 f"must be an integer between 1 and num_experts={self.num_experts}")
        _require(_positive_int(self.adapter_dim), "adapter_dim", self.adapter_dim, "must be a positive integer")
        _require(self.adapter_act in PESC_ACTIVATIONS, "adapter_act", self.adapter_act,
                 f"allowed: {list(PESC_ACTIVATIONS)}")
        _require(_number(self.adapter_dropout) and 0 <= self.adapter_dropout < 1, "adapter_dropout",
                 self.adapter_dropout, "must be in [0, 1)")
        _require(_number(self.adapter_scaling) and math.isfinite(self.adapter_scaling) and self.adapter_scaling > 0,
                 "adapter_scaling", self.adapter_scaling, "must be a finite number > 0")
        _require(_number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0, "router_aux_loss_coef",
                 self.router_aux_loss_coef, "must be >= 0 (0 = off)")


class PescLayer(LoraExpertLayer):
    """Base of PESC's two layers (the tuner's `tuner_layer_cls`)."""


class PescLinear(PlainLoraLinear, PescLayer):
    """PESC's plain LoRA on a Linear (attention projections)."""

    adapter_layer_names = ("pesc_lora_A", "pesc_lora_B")


def feed_forward_width(module: nn.Module, name: str = "the module") -> int:
    """The hidden size H of an FFN block: the in_features of its first Linear, which some Linear of the block must
    also have as out_features (the block maps [.., H] to [.., H])."""
    linears = [child for child in module.modules() if isinstance(child, nn.Linear)]
    hidden = linears[0].in_features if linears else None
    if hidden is None or not any(linear.out_features == hidden for linear in linears):
        raise ValueError(f"PESC puts its adapters on the output of FFN blocks, but {name} ({type(module).__name__}) "
                         f"does not look like one (nn.Linear layers from and back to the hidden size): target FFN "
                         f"blocks, e.g. target_modules=['mlp'], and Linears for plain LoRA.")
    return hidden


class PescFeedForward(nn.Module, PescLayer):
    """A frozen FFN block turned into PESC's sparse MoE of E adapter experts over its output:

        y = FFN(x);   g, idx = softmax of the top-k logits of W_r x
        out = y + sum_{e in idx} g_e s U_e act(D_e dropout(y))                                       [T, H]

    The FFN runs once per token whatever k (it is the wrapped module, called as is); only the rank-d adapters run per
    (token, expert) slot, grouped by expert as one grouped matmul each. Tensors: `pesc_router` W_r [E, H],
    `pesc_adapter_A` the down-projections D_e [E, d, H] and `pesc_adapter_B` the up-projections U_e [E, H, d] (named
    like LoRA's A and B: B starts at zero, so the block starts as the FFN).
    """

    adapter_layer_names = ("pesc_router", "pesc_adapter_A", "pesc_adapter_B")
    other_param_names = (*LoraExpertLayer.other_param_names, "adapter_act")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, num_experts: int, top_k: int,
                 layer_index: int | None = None):
        super().__init__()
        self.hidden_size = feed_forward_width(base_layer)
        self._init_layer(base_layer, layer_index)
        self.adapter_act: dict[str, str] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts=num_experts, top_k=top_k)

    def update_layer(self, adapter_name: str, config, num_experts: int, top_k: int) -> None:
        hidden, width = self.hidden_size, config.adapter_dim
        shapes = {"pesc_router": (num_experts, hidden), "pesc_adapter_A": (num_experts, width, hidden),
                  "pesc_adapter_B": (num_experts, hidden, width)}
        self.adapter_act[adapter_name] = config.adapter_act
        self._add_adapter(adapter_name, config, shapes, num_experts, top_k, scaling=config.adapter_scaling)
        # the adapters' own dropout, on y (LoraExpertLayer made one from lora_dropout, the attention LoRA's)
        dropout = config.adapter_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _adapter_to_run(self) -> str | None:
        adapters = self._adapters_to_run()
        if len(adapters) > 1:
            raise ValueError(f"PESC runs one adapter per FFN block at a time, but {adapters} are active: choose "
                             f"one with `set_adapter(name)`.")
        return adapters[0] if adapters else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ffn_output = self.base_layer(hidden_states)  # y: the shared frozen FFN, once per token
        adapter_name = self._adapter_to_run()
        if adapter_name is None:
            return ffn_output
        weights = self.adapter_tensors(adapter_name)
        dtype = weights["router"].dtype
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(dtype)  # [T, H]: the router reads the FFN input
        logits = F.linear(x, weights["router"])  # [T, E]
        gate_weights, top_k_index = top_k_gates(logits, self.top_k[adapter_name])  # [T, k], sum to one
        self._record(adapter_name, logits, top_k_index, _batch_size(hidden_states))
        y = ffn_output.reshape(-1, ffn_output.shape[-1]).to(dtype)
        mix = self._mix_adapters(y, gate_weights, top_k_index, adapter_name)  # sum_e g_e A_e(y)
        return ffn_output + mix.view(ffn_output.shape).to(ffn_output.dtype)

    def _mix_adapters(self, y, gate_weights, top_k_index, adapter_name) -> torch.Tensor:
        """sum_{e in idx} g_e A_e(y) [T, H]: the T * k (token, expert) slots sorted by expert, each adapter's two
        projections one grouped matmul over all experts (`functional._grouped`), back to token order, then the
        gate-weighted sum over each token's k slots as one batched matmul."""
        weights, scaling = self.adapter_tensors(adapter_name), self.scaling[adapter_name]
        act_fn = ACT2FN[self.adapter_act[adapter_name]]
        num_tokens, top_k = top_k_index.shape
        experts = top_k_index.reshape(-1)  # [S], S = T * k slots in token order
        sorted_slots = experts.argsort(stable=True)  # the slot at each sorted position
        sorted_position = sorted_slots.argsort()  # the sorted position of each slot
        offsets = torch.bincount(experts, minlength=weights["router"].shape[0]).cumsum(0).to(torch.int32)
        inputs = self.lora_dropout[adapter_name](y[sorted_slots // top_k])  # [S, H], one mask per slot
        hidden = act_fn(_grouped(inputs, weights["adapter_A"].transpose(1, 2), offsets))  # [S, d]
        outputs = _grouped(hidden * scaling, weights["adapter_B"].transpose(1, 2), offsets)  # [S, H]
        slots = permute_rows(outputs, sorted_position, sorted_slots).view(num_tokens, top_k, -1)  # [T, k, H]
        return torch.bmm(gate_weights.to(slots.dtype).unsqueeze(1), slots).squeeze(1)


class PescModel(LoraExpertTuner):
    """PESC: FFN blocks -> `PescFeedForward` (E adapter experts over the frozen FFN's output, top-k routed), Linears
    -> `PescLinear` (plain LoRA). Aux loss: the Switch load-balancing loss over all layers' router logits pooled,

        router_aux_loss = E * sum_e f_e P_e,   f_e = (top-k slots routed to e) / T,   P_e = mean_t softmax(W_r x_t)_e

    (T counts the real tokens of every layer; k when perfectly balanced), weighted by `router_aux_loss_coef`.
    Neither merging nor `materialize` is possible (`MATERIALIZE_REFUSAL`)."""

    prefix = "pesc_"
    tuner_layer_cls = PescLayer
    target_module_mapping = TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: PescConfig, model_config: dict) -> PescConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        refuse_ffn_projections(peft_config, "PESC shares the frozen FFN among its experts and adapts its output")
        return peft_config

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        if isinstance(target, nn.Linear):
            return PescLinear(target, adapter_name, config, layer_index)
        feed_forward_width(target, f"`{key}`")
        return PescFeedForward(target, adapter_name, config, layer_index=layer_index, **options)

    @classmethod
    def aux_losses(cls, config: PescConfig, records, context: AuxLossContext) -> dict:
        if config.router_aux_loss_coef == 0:
            return {}
        return {"router_aux_loss": (config.router_aux_loss_coef, switch_loss(records, context.token_mask(records)))}

    def _check_merge_allowed(self):
        raise ValueError(f"PescModel: the adapter cannot be merged into the base weights (the experts' mix depends on "
                         f"the input), and {MATERIALIZE_REFUSAL}.")
