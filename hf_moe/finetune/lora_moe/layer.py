"""The layers of the LoRA-expert methods: what each adapted module computes.

| layer | wraps | used by |
|---|---|---|
| `LoraMoeLinear`, `MolaLinear` (one `RoutedLoraLinear`) | an nn.Linear | LoRAMoE (dense gates), MoLA (top-k gates) |
| `MixLoraFeedForward` | an FFN block (gate_proj, up_proj, down_proj, act_fn) | MixLoRA's experts |
| `MixLoraLinear` | an nn.Linear | MixLoRA's plain LoRA on attention projections |
| `MoeLoraLinear` | an nn.Linear | MOELoRA (rank split over experts, per-sample task gates, per layer or global) |

Every adapter's weights are stacked over experts: `*_A` [E, r, in], `*_B` [E, out, r], `*_router` [E, in] (with MMoE
task gates, `config.TaskGateFields`, one router per task: [num_tasks, E, in]), held in
`nn.ParameterDict`s keyed by adapter name whose attribute names start with the method's prefix (`mixlora_`,
`loramoe_`, `mola_`, `moelora_`), so peft saves exactly these tensors. While recording is on (see `aux_loss.py`),
every router call appends a `RoutingRecord` that the auxiliary losses read after the forward; with MoELoRA's
contrastive loss on (`contrastive_loss_coef` > 0), the record also carries the Gram matrix of sampled expert outputs
(`ExpertOutputSample`), computed in that forward.
"""

import math
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from ...modeling.routing import token_mask_for_router_rows
from .config import FFN_PROJECTIONS
from .functional import (
    expert_gates,
    grouped_lora,
    lora,
    lora_mixture,
    permute_rows,
    switch_gates,
    top_k_gates,
    top_p_gates,
)


@dataclass
class ExpertOutputSample:
    """What MoELoRA's contrastive loss reads of one router call: for each sequence b, N (token, expert) pairs o_n =
    the output of expert experts[b, n] on one of the sampled tokens, given by their dot products."""

    gram: torch.Tensor  # [B, N, N] fp32: gram[b, n, m] = o_n . o_m
    experts: torch.Tensor  # [B, N] the expert of each pair
    valid: torch.Tensor  # [B, N] bool: a real token and one of its routed experts (False: padding, unused top-p slot)


@dataclass
class RoutingRecord:
    """One router call of one layer during a forward."""

    adapter: str
    layer_index: int | None  # decoder layer of the module (MoLA's per-layer loss), None if unknown
    logits: torch.Tensor  # [T, E] router logits
    top_k_index: torch.Tensor | None  # [T, k] chosen experts; None for dense routing (LoRAMoE)
    batch_size: int  # B, with T = B * S
    valid: torch.Tensor | None = None  # [T, k] bool: the slot is one of the token's choices (top-p); None = all
    contrastive: ExpertOutputSample | None = None  # with the contrastive loss on: sampled expert outputs


def _saved_as_usual(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


_SAMPLING_GENERATORS: dict[torch.device, torch.Generator] = {}


def sampling_generator(device: torch.device) -> torch.Generator:
    """The random numbers of the contrastive loss's token sample, one generator per device seeded from torch's seed
    at first use. Not torch's default generator: drawing from it would shift the dropout masks that follow, and the
    recomputation of activation checkpointing, which draws no sample, would replay other masks than the forward's."""
    if device not in _SAMPLING_GENERATORS:
        _SAMPLING_GENERATORS[device] = torch.Generator(device).manual_seed(torch.initial_seed())
    return _SAMPLING_GENERATORS[device]


def outside_activation_checkpointing():
    """Tensors that autograd saves inside this block are kept as usual, even within an activation-checkpointed
    region: the recomputation in the backward pass runs with recording off, so it does not redo what a layer computes
    only while recording (the contrastive loss's sample), and must not be asked to."""
    return torch.autograd.graph.saved_tensors_hooks(_saved_as_usual, _saved_as_usual)


def checked_task_ids(task_ids: torch.Tensor | None, batch_size: int | None, num_tasks: int, who: str,
                     device: torch.device) -> torch.Tensor:
    """The task ids a layer was given (`model.install_task_ids_hook`), checked: one int per sample (`batch_size`
    None: any number), each in [0, num_tasks); a ValueError saying what is wrong, in the words of `who` (the method),
    otherwise. Returns them as a long tensor [B] on `device`."""
    if task_ids is None:
        raise ValueError(f"{who}: every sample needs its task: pass `task_ids` ([batch_size] ints in [0, "
                         f"num_tasks)) to the model's forward, or once to `generate`.")
    if task_ids.dim() != 1 or task_ids.dtype.is_floating_point or task_ids.is_complex():
        raise ValueError(f"{who}: `task_ids` must be a 1-D integer tensor [batch_size], got dtype {task_ids.dtype} "
                         f"and shape {tuple(task_ids.shape)}.")
    if batch_size is not None and task_ids.shape[0] != batch_size:
        raise ValueError(f"{who}: `task_ids` has shape {tuple(task_ids.shape)}, but the batch has {batch_size} "
                         f"samples: give one task id per sample.")
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(f"{who}: `task_ids`={task_ids.tolist()} are invalid: ids must be in [0, "
                         f"num_tasks={num_tasks}).")
    return task_ids.to(device=device, dtype=torch.long)


class LoraExpertLayer(BaseTunerLayer):
    """Plumbing shared by every layer of the three methods: per-adapter settings, creation and initialisation of the
    stacked parameters, and recording of router outputs. Subclasses list their containers in `adapter_layer_names`
    (router first when there is one)."""

    other_param_names = ("lora_dropout", "scaling", "num_experts", "top_k", "contrastive_tokens")

    def _init_layer(self, base_layer: nn.Module, layer_index: int | None) -> None:
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.num_experts: dict[str, int] = {}
        self.top_k: dict[str, int | None] = {}
        self.contrastive_tokens: dict[str, int] = {}  # tokens per sequence sampled for the contrastive loss; 0 = off
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self._disable_adapters = False
        self.merged_adapters = []
        self._records: list[RoutingRecord] | None = None
        self._attention_mask: torch.Tensor | None = None  # of the forward being recorded
        self.task_ids: torch.Tensor | None = None  # [B], set before every forward by model.install_task_ids_hook

    def _reference_weight(self) -> torch.Tensor:
        """A weight of the wrapped module: new adapter tensors take its device and dtype."""
        return next(self.get_base_layer().parameters())

    def _add_adapter(self, adapter_name: str, config, shapes: dict[str, tuple[int, ...]], num_experts: int,
                     top_k: int | None, scaling: float | None = None) -> None:
        reference = self._reference_weight()
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        for name, shape in shapes.items():
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shape, device=reference.device, dtype=dtype))
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling[adapter_name] = config.scaling if scaling is None else scaling
        self.num_experts[adapter_name] = num_experts
        self.top_k[adapter_name] = top_k
        contrastive = getattr(config, "contrastive_loss_coef", 0) > 0  # a method without the fields has no such loss
        self.contrastive_tokens[adapter_name] = config.contrastive_max_tokens if contrastive else 0
        self.reset_parameters(adapter_name, config)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, config) -> None:
        """Routers ~ N(0, router_init_std) or kaiming-uniform(a=sqrt(5)); every expert's A kaiming-uniform (as an
        nn.Linear(in, r)); B zero, so that the adapted model starts as the base (random with init_lora_weights=False).
        """
        for name in self.adapter_layer_names:
            if adapter_name not in getattr(self, name):  # a projection without expert LoRA (MixLoRA)
                continue
            param = getattr(self, name)[adapter_name]
            if name.endswith("router") and config.router_init_std is not None:
                nn.init.normal_(param, std=config.router_init_std)
            elif name.endswith("_B") and config.init_lora_weights:
                nn.init.zeros_(param)
            else:  # one matrix per expert, so that the fan-in is the matrix's own
                for matrix in param.view(-1, *param.shape[-2:]):
                    nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))

    def parameter_group(self, layer_name: str) -> str:
        """The group of a recipe's `parameter_groups` (router, experts or other) that the tensors of the container
        `layer_name` (one of `adapter_layer_names`) belong to: routers are "router", LoRA experts "experts"."""
        return "router" if layer_name.endswith("router") else "experts"

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's parameters by attribute name without the method prefix (`router`, `A`, `gate_A`, ...)."""
        return {name.split("_", 1)[1]: getattr(self, name)[adapter_name] for name in self.adapter_layer_names
                if adapter_name in getattr(self, name)}

    def _adapters_to_run(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [name for name in self.active_adapters
                if any(name in getattr(self, container) for container in self.adapter_layer_names)]

    def _router_logits(self, tokens: torch.Tensor, router: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Router logits [T, E] of tokens [T, in], the T = B * S tokens of B samples: W_g x with one router [E, in],
        or W_{g, task_ids[b]} x[b, s] with MMoE task gates (`TaskGateFields`; router [num_tasks, E, in]), where
        each token is routed by the router of its sample's task."""
        if router.dim() == 2:
            return F.linear(tokens, router)
        task_ids = checked_task_ids(self.task_ids, batch_size, router.shape[0], "MMoE task gates (`task_gates`=True)",
                                    router.device)
        per_sample = router[task_ids].transpose(1, 2)  # [B, in, E]
        return torch.bmm(tokens.view(batch_size, -1, tokens.shape[-1]), per_sample).flatten(0, 1)

    # Recording (driven by the hooks of aux_loss.py)
    def start_recording(self, attention_mask: torch.Tensor | None = None) -> None:
        self._records = []
        self._attention_mask = attention_mask

    def stop_recording(self) -> list[RoutingRecord]:
        records, self._records, self._attention_mask = self._records or [], None, None
        return records

    @property
    def last_record(self) -> RoutingRecord | None:
        """The routing of this layer's latest router call while recording is on (None when off or before a call)."""
        return self._records[-1] if self._records else None

    def _record(self, adapter_name: str, logits: torch.Tensor, top_k_index: torch.Tensor | None, batch_size: int,
                valid: torch.Tensor | None = None) -> RoutingRecord | None:
        """Append this router call's record while recording is on, and return it (None when off)."""
        if self._records is None:
            return None
        self._records.append(RoutingRecord(adapter_name, self.layer_index, logits, top_k_index, batch_size, valid))
        return self._records[-1]

    def _wants_contrastive_sample(self, record: RoutingRecord | None) -> bool:
        return record is not None and self.contrastive_tokens.get(record.adapter, 0) > 0

    def _contrastive_slots(self, adapter_name: str, num_tokens: int, batch_size: int,
                           top_k_index: torch.Tensor | None, valid: torch.Tensor | None = None):
        """The (token, expert) pairs whose expert outputs enter the contrastive loss: up to `contrastive_max_tokens`
        tokens m of each sequence (all of a shorter one; a uniformly random subset of the real tokens of a longer
        one), each with the experts it was routed to (its top-k, or every expert with dense routing).

        Returns rows [B, m] (the tokens' rows among the T = B * S), experts [B, m, k] and valid [B, m, k] (False
        for padding and unused top-p slots)."""
        device = top_k_index.device if top_k_index is not None else self._reference_weight().device
        seq_len = num_tokens // batch_size
        real = token_mask_for_router_rows(self._attention_mask, num_tokens)
        if real is None or real.numel() != num_tokens:
            real = torch.ones(num_tokens, dtype=torch.bool, device=device)
        real = real.to(device=device, dtype=torch.bool).view(batch_size, seq_len)
        limit = self.contrastive_tokens[adapter_name]
        if seq_len <= limit:
            positions = torch.arange(seq_len, device=device).expand(batch_size, -1)
        else:
            scores = torch.rand(batch_size, seq_len, device=device, generator=sampling_generator(device))
            positions = scores.masked_fill(~real, -1.0).topk(limit).indices
        rows = positions + seq_len * torch.arange(batch_size, device=device)[:, None]
        real = real.gather(1, positions)
        if top_k_index is None:
            experts = torch.arange(self.num_experts[adapter_name], device=device).expand(*rows.shape, -1)
            return rows, experts, real[..., None].expand_as(experts)
        slot_valid = real[..., None] if valid is None else real[..., None] & valid[rows]
        return rows, top_k_index[rows], slot_valid.expand(*rows.shape, top_k_index.shape[-1])


def _batch_size(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 2 else 1


class LinearWithExperts(nn.Module, LoraExpertLayer):
    """A frozen nn.Linear plus the LoRA experts of each active adapter: y = base(x) + sum of `_experts(x, adapter)`.
    Subclasses create the adapters' tensors and compute `_experts`."""

    def _init_linear(self, base_layer: nn.Module, layer_index: int | None) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__} adapts nn.Linear modules, got {type(base_layer).__name__}: "
                            f"check `target_modules`.")
        self._init_layer(base_layer, layer_index)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in self._adapters_to_run():
            result = result + self._experts(x, adapter_name).to(result.dtype)
        return result


class RoutedLoraLinear(LinearWithExperts):
    """A frozen Linear plus routed LoRA experts (LoRAMoE and MoLA):

        y = W x + b + (alpha / r) * sum_e g_e(x) B_e A_e dropout(x),   g = gates of softmax(W_router x)

    with g the dense softmax (`top_k` None, LoRAMoE) or its renormalised top-k (MoLA). x [..., in] -> y [..., out].
    """

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, num_experts: int, top_k: int | None,
                 layer_index: int | None = None):
        super().__init__()
        self._init_linear(base_layer, layer_index)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts=num_experts, top_k=top_k)

    def update_layer(self, adapter_name: str, config, num_experts: int, top_k: int | None) -> None:
        base = self.get_base_layer()
        router, lora_a, lora_b = self.adapter_layer_names
        shapes = {router: config.router_shape(num_experts, base.in_features),  # [E, in], or [num_tasks, E, in]
                  lora_a: (num_experts, config.r, base.in_features), lora_b: (num_experts, base.out_features, config.r)}
        self._add_adapter(adapter_name, config, shapes, num_experts, top_k)

    def _experts(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weights = self.adapter_tensors(adapter_name)
        tokens = x.reshape(-1, x.shape[-1]).to(weights["A"].dtype)  # [T, in]
        logits = self._router_logits(tokens, weights["router"], _batch_size(x))  # [T, E]
        gates, top_k_index = expert_gates(logits, self.top_k[adapter_name])
        record = self._record(adapter_name, logits, top_k_index, _batch_size(x))
        if self._wants_contrastive_sample(record):
            with outside_activation_checkpointing():
                record.contrastive = self._contrastive_sample(tokens, top_k_index, _batch_size(x), adapter_name)
        dropped = self.lora_dropout[adapter_name](tokens)
        delta = lora_mixture(dropped, weights["A"], weights["B"], gates) * self.scaling[adapter_name]
        return delta.view(*x.shape[:-1], -1)

    def _contrastive_sample(self, tokens, top_k_index, batch_size, adapter_name) -> ExpertOutputSample:
        """The outputs B_e A_e x of the sampled (token, expert) pairs (without LoRA dropout and the alpha / r scale,
        which a cosine similarity does not see), as their Gram matrix. The outputs [N, out] are never built: with u_n
        the rank-r activation A_e x placed in expert e's block of the E * r stacked ranks and B_s = [B_1 .. B_E]
        [out, E * r], o_n . o_m = u_n^T (B_s^T B_s) u_m."""
        weights = self.adapter_tensors(adapter_name)
        lora_a, lora_b = weights["A"], weights["B"]  # [E, r, in], [E, out, r]
        num_experts, rank = lora_a.shape[:2]
        rows, experts, valid = self._contrastive_slots(adapter_name, tokens.shape[0], batch_size, top_k_index)
        hidden = F.linear(tokens[rows], lora_a.reshape(num_experts * rank, -1)).float()  # [B, m, E * r]
        hidden = hidden.view(*rows.shape, num_experts, rank)
        picked = hidden.gather(2, experts[..., None].expand(-1, -1, -1, rank))  # [B, m, k, r]
        blocks = F.one_hot(experts, num_experts).to(picked.dtype)  # [B, m, k, E]
        stacked = (blocks[..., None] * picked[..., None, :]).flatten(-2).flatten(1, 2)  # [B, N, E * r]
        stacked_b = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], num_experts * rank).float()  # [out, E * r]
        gram = stacked @ (stacked_b.T @ stacked_b) @ stacked.transpose(1, 2)
        return ExpertOutputSample(gram, experts.flatten(1), valid.flatten(1))


class LoraMoeLinear(RoutedLoraLinear):
    """LoRAMoE's layer: dense softmax gates over all experts."""

    adapter_layer_names = ("loramoe_router", "loramoe_A", "loramoe_B")


class MolaLinear(RoutedLoraLinear):
    """MoLA's layer: top-k gates over this decoder layer's E_l experts."""

    adapter_layer_names = ("mola_router", "mola_A", "mola_B")


class MixLoraLayer(LoraExpertLayer):
    """Base of MixLoRA's two layers (the tuner's `tuner_layer_cls`)."""


class PlainLoraLinear(nn.Module):
    """A method's plain LoRA on a Linear (attention projections): y = W x + b + (alpha / r) B A dropout(x). Mixed into
    a method's layer class, whose `adapter_layer_names` name its A and B."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, layer_index: int | None = None):
        super().__init__()
        self._init_layer(base_layer, layer_index)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def parameter_group(self, layer_name: str) -> str:
        return "other"  # a plain LoRA: neither router nor expert

    def update_layer(self, adapter_name: str, config, **_) -> None:
        base = self.get_base_layer()
        a_name, b_name = self.adapter_layer_names
        shapes = {a_name: (config.r, base.in_features), b_name: (base.out_features, config.r)}
        self._add_adapter(adapter_name, config, shapes, num_experts=1, top_k=None)

    def lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of this adapter."""
        a_name, b_name = self.adapter_layer_names
        return getattr(self, a_name)[adapter_name], getattr(self, b_name)[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for adapter_name in self._adapters_to_run():
            lora_a, lora_b = self.lora_weights(adapter_name)
            dropped = self.lora_dropout[adapter_name](x.to(lora_a.dtype))
            delta = lora(dropped, lora_a, lora_b) * self.scaling[adapter_name]
            result = result + delta.to(result.dtype)
        return result

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """(alpha / r) B A, [out, in]: what merging adds to W."""
        lora_a, lora_b = self.lora_weights(adapter_name)
        return lora_b @ lora_a * self.scaling[adapter_name]


class MixLoraLinear(PlainLoraLinear, MixLoraLayer):
    """MixLoRA's plain LoRA on a Linear (attention projections)."""

    adapter_layer_names = ("mixlora_A", "mixlora_B")


def check_feed_forward(module: nn.Module, name: str = "the module") -> None:
    """MixLoRA needs a SwiGLU-style FFN: Linear gate_proj/up_proj [I, H], down_proj [H, I] and act_fn."""
    missing = [attr for attr in FFN_PROJECTIONS if not isinstance(getattr(module, attr, None), nn.Linear)]
    missing += [] if callable(getattr(module, "act_fn", None)) else ["act_fn"]
    if missing:
        raise ValueError(f"MixLoRA turns FFN blocks into MoEs, but {name} ({type(module).__name__}) has no "
                         f"{missing}: target FFN blocks with nn.Linear gate_proj, up_proj, down_proj and an act_fn "
                         f"(Llama, Mistral, Qwen2/3, Gemma MLPs), e.g. target_modules=['mlp'].")


def _dropout_per_token(dropout: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Dropout of hidden [T, k, n] with one mask per token, shared by its k expert slots (as the mask on x is shared
    by every expert of the call)."""
    if not (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0):
        return hidden
    return hidden * dropout(hidden.new_ones(hidden.shape[0], 1, hidden.shape[-1]))


@dataclass(frozen=True)
class MixLoraRouting:
    """The routing settings of one MixLoRA adapter (see `MixLoraConfig`)."""

    strategy: str = "mixlora"  # "mixlora" (top-k) | "mixlora-dynamic" (top-p) | "mixlora-switch" (top-1)
    top_p: float = 0.8
    jitter_noise: float = 0.0


class MixLoraFeedForward(nn.Module, MixLoraLayer):
    """A frozen FFN block turned into a sparse MoE of E experts that share it (MixLoRA):

        w, idx = gates of softmax(W_router x): top-k renormalised, top-p or top-1 (`MixLoraConfig.routing_strategy`)
        h_e = act(W_gate x + s B^g_e A^g_e x') * (W_up x + s B^u_e A^u_e x')                      [T, I]
        y   = W_down (sum_{e in idx} w_e h_e) + (sum w) b_down + sum_{e in idx} w_e s B^d_e A^d_e h_e'   [T, H]

    (s = expert alpha / expert r, or / sqrt(r) with rsLoRA; x' and h_e' after LoRA dropout, whose mask on h_e is one
    per token, shared by its k experts; a projection left out of `expert_projections` has no LoRA term).
    This equals sum_e w_e FFN_e(x) with FFN_e the FFN whose weights carry expert e's LoRA, because down_proj is
    linear. W_gate x and W_up x are computed once per token and shared by all experts, and W_down runs once per token
    on the gate-weighted mix; only the rank-r LoRA products run per expert.
    """

    adapter_layer_names = ("mixlora_router", "mixlora_gate_A", "mixlora_gate_B", "mixlora_up_A", "mixlora_up_B",
                           "mixlora_down_A", "mixlora_down_B")
    other_param_names = (*LoraExpertLayer.other_param_names, "routing")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, num_experts: int, top_k: int,
                 layer_index: int | None = None):
        super().__init__()
        check_feed_forward(base_layer)
        self._init_layer(base_layer, layer_index)
        self.routing: dict[str, MixLoraRouting] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_experts=num_experts, top_k=top_k)

    def update_layer(self, adapter_name: str, config, num_experts: int, top_k: int) -> None:
        ffn, r, experts = self.get_base_layer(), config.expert_rank, num_experts
        hidden, width = ffn.gate_proj.in_features, ffn.gate_proj.out_features
        lora_shapes = {"gate": ((experts, r, hidden), (experts, width, r)),
                       "up": ((experts, r, hidden), (experts, width, r)),
                       "down": ((experts, r, width), (experts, hidden, r))}
        shapes = {"mixlora_router": config.router_shape(experts, hidden)}  # [E, H], or [num_tasks, E, H]
        for projection in config.projections_with_experts:
            name = projection.removesuffix("_proj")
            shapes[f"mixlora_{name}_A"], shapes[f"mixlora_{name}_B"] = lora_shapes[name]
        self.routing[adapter_name] = MixLoraRouting(config.routing_strategy, config.top_p, config.jitter_noise)
        self._add_adapter(adapter_name, config, shapes, num_experts, top_k, scaling=config.expert_scaling)

    def _adapter_to_run(self) -> str | None:
        adapters = self._adapters_to_run()
        if len(adapters) > 1:
            raise ValueError(f"MixLoRA runs one adapter per FFN block at a time, but {adapters} are active: choose "
                             f"one with `set_adapter(name)`.")
        return adapters[0] if adapters else None

    def route(self, logits: torch.Tensor, adapter_name: str):
        """-> (weights [T, k] fp32, index [T, k], valid [T, k] bool or None) for the adapter's routing strategy."""
        routing = self.routing[adapter_name]
        if routing.strategy == "mixlora-dynamic":
            return top_p_gates(logits, routing.top_p)
        if routing.strategy == "mixlora-switch":
            return (*switch_gates(logits), None)
        return (*top_k_gates(logits, self.top_k[adapter_name]), None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        adapter_name = self._adapter_to_run()
        if adapter_name is None:
            return self.base_layer(hidden_states)
        ffn, weights, routing = self.base_layer, self.adapter_tensors(adapter_name), self.routing[adapter_name]
        x = router_input = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        if self.training and routing.jitter_noise > 0:
            eps = routing.jitter_noise
            router_input = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
            if routing.strategy != "mixlora-switch":  # Mixtral jitters the experts' input too; Switch only the router's
                x = router_input
        dtype = weights["router"].dtype
        logits = self._router_logits(router_input.to(dtype), weights["router"], _batch_size(hidden_states))  # [T, E]
        gate_weights, top_k_index, valid = self.route(logits, adapter_name)  # [T, k]
        record = self._record(adapter_name, logits, top_k_index, _batch_size(hidden_states), valid)
        gate, up = ffn.gate_proj(x).to(dtype), ffn.up_proj(x).to(dtype)  # shared by every expert: once per token
        if self._wants_contrastive_sample(record):
            with outside_activation_checkpointing():
                record.contrastive = self._contrastive_sample(x.to(dtype), gate, up, top_k_index, valid,
                                                              _batch_size(hidden_states), adapter_name)
        mix, down_lora = self._mix_experts(x.to(dtype), gate, up, gate_weights, top_k_index, adapter_name)
        out = ffn.down_proj(mix.to(hidden_states.dtype))
        if down_lora is not None:
            out = out + down_lora.to(hidden_states.dtype)
        if ffn.down_proj.bias is not None and routing.strategy != "mixlora":  # weights need not sum to one
            out = out + (gate_weights.sum(dim=-1, keepdim=True) - 1).to(out.dtype) * ffn.down_proj.bias
        return out.view(hidden_states.shape)

    def _mix_experts(self, x, gate, up, gate_weights, top_k_index, adapter_name):
        """-> (sum_e w_e h_e [T, I], sum_e w_e s B^d_e A^d_e h_e' [T, H] or None without down_proj LoRA).

        The LoRA products run on the T * k (token, expert) slots sorted by expert, each as one grouped matmul over
        all experts (`grouped_lora`). The elementwise work runs in token order on [T, k, I], where W_gate x and
        W_up x broadcast over a token's k slots and the gate-weighted sums are one batched matmul."""
        weights, scaling = self.adapter_tensors(adapter_name), self.scaling[adapter_name]
        dropout, act_fn = self.lora_dropout[adapter_name], self.base_layer.act_fn
        num_tokens, top_k = top_k_index.shape
        experts = top_k_index.reshape(-1)  # [S], S = T * k slots in token order
        sorted_slots = experts.argsort(stable=True)  # the slot at each sorted position
        sorted_position = sorted_slots.argsort()  # the sorted position of each slot
        offsets = torch.bincount(experts, minlength=self.num_experts[adapter_name]).cumsum(0).to(torch.int32)

        def to_tokens(rows):  # [S, n] sorted by expert -> [T, k, n]
            return permute_rows(rows, sorted_position, sorted_slots).view(num_tokens, top_k, -1)

        def to_experts(slots):  # [T, k, n] -> [S, n] sorted by expert
            return permute_rows(slots.reshape(num_tokens * top_k, -1), sorted_slots, sorted_position)

        def with_lora(base, name):  # [T, I] -> [T, k, I], plus the expert's LoRA when the projection has one
            if f"{name}_A" not in weights:
                return base.unsqueeze(1).expand(-1, top_k, -1)
            return base.unsqueeze(1) + to_tokens(grouped_lora(x_sorted, weights[f"{name}_A"], weights[f"{name}_B"],
                                                              offsets, scaling))

        x_sorted = dropout(x)[sorted_slots // top_k]  # [S, H]
        hidden = act_fn(with_lora(gate, "gate")) * with_lora(up, "up")  # [T, k, I]
        slot_weights = gate_weights.to(hidden.dtype).unsqueeze(1)  # [T, 1, k]
        mix = torch.bmm(slot_weights, hidden).squeeze(1)
        if "down_A" not in weights:
            return mix, None
        down_input = to_experts(_dropout_per_token(dropout, hidden))  # [S, I]
        down_lora = to_tokens(grouped_lora(down_input, weights["down_A"], weights["down_B"], offsets, scaling))
        return mix, torch.bmm(slot_weights, down_lora).squeeze(1)

    def _contrastive_sample(self, x, gate, up, top_k_index, valid, batch_size, adapter_name) -> ExpertOutputSample:
        """What each sampled (token t, expert e) pair's expert adds to the frozen FFN, FFN_e(x_t) - FFN(x_t) [H]
        (without LoRA dropout), as the Gram matrix of these outputs:

            h_e = act(W_gate x + s B^g_e A^g_e x) * (W_up x + s B^u_e A^u_e x),   h = act(W_gate x) * (W_up x)
            o   = W_down (h_e - h) + s B^d_e A^d_e h_e

        The shared W_gate x and W_up x are this forward's; the LoRA products run on the sampled rows only, grouped by
        expert as in `_mix_experts`."""
        weights, scaling, ffn = self.adapter_tensors(adapter_name), self.scaling[adapter_name], self.base_layer
        rows, experts, valid = self._contrastive_slots(adapter_name, x.shape[0], batch_size, top_k_index, valid)
        token_rows = rows[..., None].expand_as(experts).reshape(-1)
        order = experts.reshape(-1).argsort(stable=True)  # the pairs sorted by expert
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts[adapter_name])
        offsets = counts.cumsum(0).to(torch.int32)
        sorted_rows = token_rows[order]

        def with_lora(inputs, name, base=0.0):
            if f"{name}_A" not in weights:
                return base
            return base + grouped_lora(inputs, weights[f"{name}_A"], weights[f"{name}_B"], offsets, scaling)

        inputs, gate, up = x[sorted_rows], gate[sorted_rows], up[sorted_rows]
        hidden = ffn.act_fn(with_lora(inputs, "gate", gate)) * with_lora(inputs, "up", up)
        difference = hidden - ffn.act_fn(gate) * up
        down = ffn.down_proj.weight
        outputs = with_lora(hidden, "down", F.linear(difference.to(down.dtype), down).to(hidden.dtype))
        outputs = outputs[order.argsort()].view(*experts.shape[:2], -1, outputs.shape[-1]).flatten(1, 2).float()
        return ExpertOutputSample(outputs @ outputs.transpose(1, 2), experts.flatten(1), valid.flatten(1))

    @torch.no_grad()
    def expert_weights(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Every expert's FFN with its LoRA merged: gate, up [E, I, H] and down [E, H, I], W + s B_e A_e."""
        ffn, weights, scaling = self.base_layer, self.adapter_tensors(adapter_name), self.scaling[adapter_name]
        merged = {}
        for name in ("gate", "up", "down"):
            base = getattr(ffn, f"{name}_proj").weight.to(weights["router"].dtype)
            if f"{name}_A" not in weights:  # no expert LoRA on this projection: every expert shares it
                merged[name] = base.unsqueeze(0).expand(self.num_experts[adapter_name], -1, -1).clone()
                continue
            merged[name] = base + scaling * torch.bmm(weights[f"{name}_B"], weights[f"{name}_A"])
        return merged


class MoeLoraLinear(LinearWithExperts):
    """MOELoRA's layer: a frozen Linear plus N LoRA experts of rank r / N mixed by per-sample task weights,

        w_b = softmax(W_gate e[task_ids[b]])                                       [B, N]
        y[b, s] = W x[b, s] + b + (alpha / r) * sum_i w_b,i B_i A_i dropout(x[b, s])

    Since the experts split one rank-r LoRA, the mix is one rank-r LoRA whose r inner features are scaled by their
    expert's weight: two matmuls, whatever N. `task_ids` [B] is set by the tuner's forward pre-hook on the model
    (`model.install_task_ids_hook`) before every forward; a forward without it raises.

    With `gate_sharing="global"` only the model's first adapted Linear holds the adapter's task embedding and gate
    (so peft saves them once, with that layer); every other layer reads them through `task_gate_owner` and computes
    the same w_b from them (a [B, dim] x [dim, N] product: evaluated in each layer rather than cached across them, so
    that activation checkpointing, which recomputes one decoder layer at a time, needs nothing else).
    """

    adapter_layer_names = ("moelora_task_embedding", "moelora_gate", "moelora_A", "moelora_B")
    other_param_names = (*LoraExpertLayer.other_param_names, "task_gate_owner")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, layer_index: int | None = None):
        super().__init__()
        self._init_linear(base_layer, layer_index)
        self.task_gate_owner: dict[str, MoeLoraLinear] = {}  # adapter -> the layer holding its global gate
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def parameter_group(self, layer_name: str) -> str:
        return "router" if layer_name in ("moelora_task_embedding", "moelora_gate") else "experts"  # the task gate

    def update_layer(self, adapter_name: str, config, **_) -> None:
        base, experts, rank = self.get_base_layer(), config.num_experts, config.expert_rank
        shapes = {"moelora_task_embedding": (config.num_tasks, config.task_embedding_dim),
                  "moelora_gate": (experts, config.task_embedding_dim),
                  "moelora_A": (experts, rank, base.in_features), "moelora_B": (experts, base.out_features, rank)}
        self._add_adapter(adapter_name, config, shapes, num_experts=experts, top_k=None)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, config) -> None:
        """As the reference: task embedding ~ N(0, 1) (nn.Embedding), gate kaiming-uniform(a=sqrt(5)) (nn.Linear) or
        N(0, router_init_std), A ~ N(0, 0.01), B zero (N(0, 0.01) too with init_lora_weights=False)."""
        nn.init.normal_(self.moelora_task_embedding[adapter_name])
        gate = self.moelora_gate[adapter_name]
        if config.router_init_std is not None:
            nn.init.normal_(gate, std=config.router_init_std)
        else:
            nn.init.kaiming_uniform_(gate, a=math.sqrt(5))
        nn.init.normal_(self.moelora_A[adapter_name], std=0.01)
        if config.init_lora_weights:
            nn.init.zeros_(self.moelora_B[adapter_name])
        else:
            nn.init.normal_(self.moelora_B[adapter_name], std=0.01)

    def use_task_gate_of(self, adapter_name: str, owner: "MoeLoraLinear") -> None:
        """gate_sharing="global": drop this layer's task embedding and gate of the adapter and use `owner`'s (the
        tuner calls it on every adapted Linear but the first, which holds the model's one gate)."""
        del self.moelora_task_embedding[adapter_name]
        del self.moelora_gate[adapter_name]
        self.task_gate_owner[adapter_name] = owner

    def expert_weights(self, adapter_name: str, task_ids: torch.Tensor | None,
                       batch_size: int | None = None) -> torch.Tensor:
        """w = softmax(W_gate e[task_ids]) in fp32, [B, N], from this layer's gate or, with gate_sharing="global",
        the model's one gate. The ids are checked first (`checked_task_ids`; `batch_size` None: any number)."""
        gate_layer = self.task_gate_owner.get(adapter_name, self)
        task_embedding = gate_layer.moelora_task_embedding[adapter_name]  # [num_tasks, dim]
        gate = gate_layer.moelora_gate[adapter_name]  # [N, dim]
        task_ids = checked_task_ids(task_ids, batch_size, task_embedding.shape[0], "MOELoRA", task_embedding.device)
        return torch.softmax(F.linear(F.embedding(task_ids, task_embedding), gate).float(), dim=-1)

    def _experts(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        batch = _batch_size(x)
        weights = self.adapter_tensors(adapter_name)
        lora_a, lora_b = weights["A"], weights["B"]  # [N, r/N, in], [N, out, r/N]
        experts, rank = lora_a.shape[:2]
        gates = self.expert_weights(adapter_name, self.task_ids, batch).to(lora_a.device, lora_a.dtype)  # [B, N]
        tokens = x.reshape(batch, -1, x.shape[-1]).to(lora_a.dtype)  # [B, S, in]
        hidden = F.linear(self.lora_dropout[adapter_name](tokens), lora_a.reshape(experts * rank, -1))  # [B, S, r]
        hidden = hidden * gates.repeat_interleave(rank, dim=-1).unsqueeze(1)
        delta = F.linear(hidden, lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], -1)) * self.scaling[adapter_name]
        return delta.view(*x.shape[:-1], -1)
