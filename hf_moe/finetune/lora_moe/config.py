"""Configurations of the LoRA-expert methods: every hyperparameter is a field saved in adapter_config.json.

Each method: its config (`peft_type`); where its experts live; how it routes; its auxiliary loss.

- `MixLoraConfig` (MIXLORA): each FFN block, expert e = the frozen FFN + its own LoRA on gate/up/down, plain LoRA on
  the targeted attention projections; top-k per token, renormalised (Mixtral); Switch load balancing,
  `router_aux_loss_coef`.
- `LoraMoeConfig` (LORAMOE): each targeted Linear, frozen W + N LoRA experts; dense softmax over all experts;
  Localized Balancing Constraint, `lbc_weight` / `lbc_delta`.
- `MolaConfig` (MOLA): each targeted Linear, frozen W + E_l LoRA experts, E_l per layer; top-k per token,
  renormalised; Switch load balancing per layer (off by default).
- `MoeLoraConfig` (MOELORA): each targeted Linear, frozen W + N LoRA experts of rank r / N; dense softmax of a
  task-id gate, one per sequence, the gate per Linear or one for the model (`gate_sharing`); no auxiliary loss.
- `PescConfig` (PESC, `pesc.py`): each FFN block, expert e = the frozen FFN followed by its own bottleneck adapter,
  y + A_e(y), plain LoRA on the targeted attention projections; top-k per token, softmax over the k logits
  (= renormalised); Switch load balancing, `router_aux_loss_coef`.
- `MixtureOfLorasConfig` (MIXTURE_OF_LORAS, `mixture_of_loras.py`): each targeted Linear, frozen W + one LoRA expert
  per task; one expert per sequence, its task id (stage 1) or its router's top-1 on the prompt (stage 2); stage 2:
  the routers' cross-entropy with the task ids, `router_loss_coef`.
- `MocleConfig` (MOCLE, `mocle.py`): each targeted Linear, frozen W + E LoRA experts + a universal LoRA expert; one
  expert per sequence, the top-1 of a gate on the learned embedding of its prompt's k-means cluster (centroids
  fitted on the training prompts, `fit_clusters`), plus the universal expert; no auxiliary loss.
- `ExpertGateConfig` (EXPERT_GATE, `expert_gate.py`): each targeted Linear, frozen W + one LoRA expert per task, and
  one undercomplete autoencoder per task for the whole model; one expert per sequence, its task id (training
  forwards with task ids) or the autoencoder with the smallest reconstruction error of the prompt's frozen features
  (relevance softmax(-error / `temperature`)); the task autoencoders' reconstruction loss, `autoencoder_loss_coef`.

MixLoRA, LoRAMoE and MoLA can route each task with its own router (MMoE gates, `TaskGateFields.task_gates`, off by
default: the router [E, in] becomes [num_tasks, E, in] and the model takes `task_ids`), and can add MoELoRA's
contrastive loss among experts (`ContrastiveLossFields`, off by default). MOELoRA cannot add that loss: its gate is
a function of the task id alone, so no token is routed, and the loss's purpose (telling experts apart so that a token
router can choose between them) does not arise.

Defaults follow the papers' reference code (see each class). `target_modules=None` picks the method's default
modules for Llama, Mistral, Qwen2, Qwen3 and Gemma bases (`model.TARGET_MODULES`).
"""

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig

from .peft_types import LORAMOE, MIXLORA, MOELORA, MOLA

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# MixLoRA's routing strategies, named as in MoE-PEFT: top-k (Mixtral), top-p (dynamic), top-1 (Switch)
MIXLORA_ROUTING = ("mixlora", "mixlora-dynamic", "mixlora-switch")

# MOELoRA's gate: one per adapted Linear (the authors' MMOELoraLinear) or one for the whole model (MMOELoraLinearS)
GATE_SHARING = ("per_layer", "global")

# MoLA's layer-wise allocations (Gao et al. 2024), expert counts for the four quarters of the layers, lowest first.
# Every preset spends the same 20 experts per quarter-set, as in the paper's equal-budget comparison.
MOLA_PRESETS = {
    "uniform": (5, 5, 5, 5),  # MoLA-□
    "triangle": (2, 4, 6, 8),  # fewer experts in lower layers (the paper's best arXiv variant, "2-4-6-8")
    "inverted": (8, 6, 4, 2),  # more experts in lower layers
    "hourglass": (8, 2, 2, 8),  # MoLA-⋈: most experts in the lowest and highest layers
}


def _require(condition: bool, name: str, value, allowed: str) -> None:
    """Raise a ValueError naming the field, the value it got and what is allowed."""
    if not condition:
        raise ValueError(f"`{name}`={value!r} is invalid: {allowed}.")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class LoraExpertConfig(PeftConfig):
    """Fields shared by the three methods: LoRA shape, which modules are adapted, and initialisation."""

    r: int = field(default=8, metadata=_help("Rank of every LoRA (each expert and each plain LoRA)."))
    lora_alpha: int = field(default=16, metadata=_help("LoRA scaling numerator: delta = lora_alpha / r * B A x."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA inputs (one mask per layer "
                                                              "call, shared by that call's experts)."))
    target_modules: list[str] | str | None = field(
        default=None, metadata=_help("Module names (suffix match) or one regex to adapt; None = the method's "
                                     "default for the base's model_type."))
    exclude_modules: list[str] | str | None = field(
        default=None, metadata=_help("Module names (suffix match) or one regex never to adapt."))
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata=_help("Only adapt these decoder layer indices (None = all)."))
    layers_pattern: list[str] | str | None = field(
        default=None, metadata=_help("Name of the layer list used with layers_to_transform, e.g. 'layers'."))
    modules_to_save: list[str] | None = field(
        default=None, metadata=_help("Extra modules trained in full and saved (e.g. a classification head)."))
    init_lora_weights: bool = field(
        default=True, metadata=_help("True: A kaiming-uniform, B zero (the adapter starts as the base model). "
                                     "False: B random too (tests)."))
    router_init_std: float | None = field(
        default=None, metadata=_help("Router weights ~ N(0, std); None = kaiming-uniform(a=sqrt(5)), nn.Linear's "
                                     "default."))
    use_rslora: bool = field(
        default=False, metadata=_help("Rank-stabilised LoRA (Kalajdzievski 2023, arXiv 2312.03732): scale by "
                                      "lora_alpha / sqrt(r) instead of lora_alpha / r."))

    def __post_init__(self):
        super().__post_init__()
        _require(_positive_int(self.r), "r", self.r, "must be a positive integer")
        _require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "must be > 0")
        _require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _require(isinstance(self.use_rslora, bool), "use_rslora", self.use_rslora, "must be true or false")
        _require(self.router_init_std is None or self.router_init_std > 0, "router_init_std", self.router_init_std,
                 "must be None (kaiming-uniform) or > 0")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def scaling(self) -> float:
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)


@dataclass
class ContrastiveLossFields:
    """MoELoRA's contrastive loss among experts (Luo et al. 2024, arXiv 2402.12851), for the methods whose router
    chooses experts per token (MixLoRA, LoRAMoE, MoLA). Outputs of one expert, on different tokens, are positives;
    outputs of other experts are negatives. `losses.expert_contrastive_loss` states the formula; the layers compute
    the expert outputs it reads only when `contrastive_loss_coef` > 0, so the default leaves the method unchanged.
    The temperature and the token sample are our choices (the paper's values were not checked here): 0.07 is the
    usual InfoNCE temperature; sweep 0.05-0.2 and coefficients 0.01-0.1."""

    contrastive_loss_coef: float = field(
        default=0.0, metadata=_help("Weight of the contrastive loss among experts in the training loss; 0 = off."))
    contrastive_temperature: float = field(
        default=0.07, metadata=_help("Temperature tau of the contrastive loss: logits = cosine similarity / tau."))
    contrastive_max_tokens: int = field(
        default=64, metadata=_help("Tokens per sequence whose expert outputs enter the loss, per adapted module (a "
                                   "random subset of the real tokens of a longer sequence): bounds the memory, "
                                   "quadratic in this number times the experts per token."))

    def _check_contrastive_fields(self) -> None:
        _require(_number(self.contrastive_loss_coef) and self.contrastive_loss_coef >= 0, "contrastive_loss_coef",
                 self.contrastive_loss_coef, "must be >= 0 (0 = off)")
        _require(_number(self.contrastive_temperature) and self.contrastive_temperature > 0,
                 "contrastive_temperature", self.contrastive_temperature, "must be > 0")
        _require(_positive_int(self.contrastive_max_tokens), "contrastive_max_tokens", self.contrastive_max_tokens,
                 "must be a positive integer")


@dataclass
class TaskFields:
    """The tasks of the methods that read each sample's task id (MOELoRA, Mixture-of-LoRAs, and MixLoRA, LoRAMoE and
    MoLA with MMoE gates, `TaskGateFields`): how many there are, and their names by id. The ids are a model input,
    `task_ids` in forward and generate (`model.install_task_ids_hook`); in a recipe, `data.task_field` names the
    column whose values become `task_names`."""

    num_tasks: int | None = field(
        default=None, metadata=_help("Number of tasks; None = len(task_names). One of the two is needed before the "
                                     "adapter is built."))
    task_names: list[str] | None = field(
        default=None, metadata=_help("Task names by id (task_names[i] has id i), e.g. the values of a dataset's task "
                                     "column; saved so that the ids keep their meaning."))

    def _check_task_fields(self) -> None:
        if self.task_names is not None:
            names = self.task_names
            _require(isinstance(names, (list, tuple)) and len(names) > 0
                     and all(isinstance(name, str) and name for name in names) and len(set(names)) == len(names),
                     "task_names", names, "must be None or a non-empty list of distinct non-empty strings")
            self.task_names = list(names)
            if self.num_tasks is None:
                self.num_tasks = len(self.task_names)
            _require(self.num_tasks == len(self.task_names), "num_tasks", self.num_tasks,
                     f"must equal the number of task_names ({len(self.task_names)})")
        _require(self.num_tasks is None or _positive_int(self.num_tasks), "num_tasks", self.num_tasks,
                 "must be None (= len(task_names)) or a positive integer")

    def task_id(self, name: str) -> int:
        """The id of the task `name` in `task_names`."""
        _require(self.task_names is not None and name in self.task_names, "task_names", self.task_names,
                 f"has no task {name!r}")
        return self.task_names.index(name)

    @property
    def uses_task_ids(self) -> bool:
        """Does the model take `task_ids`? Always for MOELoRA and Mixture-of-LoRAs; `TaskGateFields` decides for the
        methods where tasks are an option. (`model.uses_task_ids` reads it from any config.)"""
        return True


@dataclass
class TaskGateFields(TaskFields):
    """MMoE gates (Ma et al. 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts"), an option of the methods whose router chooses experts per token (MixLoRA, LoRAMoE, MoLA):
    with `task_gates`, each router becomes one router per task over the same experts, and every token of a sample of
    task t is routed by router t,

        logits[b, s] = W_{g, task_ids[b]} x[b, s]          W_g [num_tasks, E, in] instead of [E, in]

    Everything after the logits is unchanged: top-k / top-p / dense softmax, renormalisation, the recorded logits,
    and the auxiliary losses (the Switch loss still pools every token of the batch, whatever its task; LoRAMoE's LBC
    and the contrastive loss are per sequence anyway). The model then takes `task_ids` as MOELoRA does (forward,
    once in generate; a recipe's `data.task_field`)."""

    task_gates: bool = field(
        default=False, metadata=_help("MMoE gates: one router per task (num_tasks or task_names needed), each sample's "
                                      "tokens routed by its task's router; the model then takes `task_ids`."))

    def _check_task_gate_fields(self) -> None:
        _require(isinstance(self.task_gates, bool), "task_gates", self.task_gates, "must be true or false")
        if not self.task_gates:
            for name in ("num_tasks", "task_names"):
                _require(getattr(self, name) is None, name, getattr(self, name),
                         "tasks are only read with task_gates=True (one router per task): set task_gates, or leave "
                         "it None")
        self._check_task_fields()

    @property
    def uses_task_ids(self) -> bool:
        return self.task_gates

    def router_shape(self, num_experts: int, in_features: int) -> tuple[int, ...]:
        """The shape of one router: [num_tasks, E, in] with task gates, [E, in] otherwise."""
        return (self.num_tasks, num_experts, in_features) if self.task_gates else (num_experts, in_features)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class MixLoraConfig(LoraExpertConfig, ContrastiveLossFields, TaskGateFields):
    """MixLoRA (Li et al. 2024, arXiv 2404.15159): each targeted FFN block becomes a sparse MoE whose experts share the
    frozen FFN and add their own LoRA on gate/up/down; targeted Linears (attention projections) get plain LoRA.

        expert e:  y_e = (W_down + dW_down^e) [act((W_gate + dW_gate^e) x) * (W_up + dW_up^e) x]
        block:     y = sum_{e in top-k} w_e y_e,   w = top-k of softmax(W_router x), renormalised

    `target_modules` may name FFN blocks (modules with gate_proj/up_proj/down_proj/act_fn, e.g. "mlp") and Linears:
    the type of each matched module decides. Defaults: r 8, alpha 16, dropout 0.05, 8 experts, top-2 (the published
    MixLoRA adapters), router N(0, 0.02) and Switch loss 0.001 (MoE-PEFT's code default; its README examples use 0.01).

    `routing_strategy` (the names and rules of MoE-PEFT's `moe_peft/adapters/mixlora/model.py`),
    p = softmax(W_router x):
        "mixlora"          top-k of p, renormalised to sum to one (as above)
        "mixlora-dynamic"  top-p: sort p descending, keep every expert whose cumulative sum is <= top_p plus the first
                           one past it (the smallest set with mass > top_p, no cap on its size); the weights are the
                           kept p, NOT renormalised
        "mixlora-switch"   top-1 (Switch Transformer): weight max(p), not renormalised; loss adds
                           router_z_loss_coef * z-loss (mean over tokens of logsumexp(logits)^2)
    `jitter_noise` eps (training only): the block input is multiplied by U(1 - eps, 1 + eps) per element; the router
    and the experts see the jittered input, except with "mixlora-switch", where only the router does (both as
    MoE-PEFT and as transformers' Mixtral and SwitchTransformers). The experts' LoRA can have its own rank and alpha
    (`expert_r`, `expert_lora_alpha`; the attention LoRA keeps `r`, `lora_alpha`), and `expert_projections` picks
    which FFN projections carry expert LoRA (the others stay frozen and shared). `task_gates`: one router per task
    (MMoE, `TaskGateFields`); `materialize` refuses such an adapter (an MoE checkpoint has one router per layer).
    """

    num_experts: int = field(default=8, metadata=_help("LoRA experts per FFN block."))
    top_k: int = field(default=2, metadata=_help("Experts per token (Mixtral-style, weights renormalised)."))
    router_init_std: float | None = field(default=0.02, metadata=_help("Router weights ~ N(0, std)."))
    router_aux_loss_coef: float = field(
        default=0.001, metadata=_help("Weight of the Switch load-balancing loss, computed over the router logits of "
                                      "all layers together (Mixtral's load_balancing_loss_func)."))
    routing_strategy: str = field(
        default="mixlora", metadata=_help(f"Routing of the FFN experts: one of {list(MIXLORA_ROUTING)} (top-k, "
                                          "top-p, top-1)."))
    top_p: float = field(
        default=0.8, metadata=_help("Probability mass of 'mixlora-dynamic' routing, in (0, 1]."))
    router_z_loss_coef: float = field(
        default=0.001, metadata=_help("Weight of the router z-loss of 'mixlora-switch' routing (ignored otherwise)."))
    jitter_noise: float = field(
        default=0.0, metadata=_help("Training only: multiply the block input by U(1 - eps, 1 + eps); 0 = off "
                                    "(MoE-PEFT uses 0.01 with 'mixlora-switch')."))
    expert_r: int | None = field(
        default=None, metadata=_help("Rank of the FFN experts' LoRA; None = r."))
    expert_lora_alpha: int | None = field(
        default=None, metadata=_help("Scaling numerator of the FFN experts' LoRA; None = lora_alpha."))
    expert_projections: list[str] | None = field(
        default=None, metadata=_help(f"FFN projections that carry expert LoRA, a non-empty subset of "
                                     f"{list(FFN_PROJECTIONS)}; None = all three."))

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MIXLORA
        self._check_contrastive_fields()
        self._check_task_gate_fields()
        _require(_positive_int(self.num_experts), "num_experts", self.num_experts, "must be a positive integer")
        _require(_positive_int(self.top_k) and self.top_k <= self.num_experts, "top_k", self.top_k,
                 f"must be between 1 and num_experts={self.num_experts}")
        _require(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", self.router_aux_loss_coef, "must be >= 0")
        _require(self.routing_strategy in MIXLORA_ROUTING, "routing_strategy", self.routing_strategy,
                 f"allowed: {list(MIXLORA_ROUTING)}")
        _require(_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _require(_number(self.router_z_loss_coef) and self.router_z_loss_coef >= 0, "router_z_loss_coef",
                 self.router_z_loss_coef, "must be >= 0")
        _require(_number(self.jitter_noise) and 0 <= self.jitter_noise < 1, "jitter_noise", self.jitter_noise,
                 "must be in [0, 1)")
        _require(self.expert_r is None or _positive_int(self.expert_r), "expert_r", self.expert_r,
                 "must be None (= r) or a positive integer")
        _require(self.expert_lora_alpha is None or (_number(self.expert_lora_alpha) and self.expert_lora_alpha > 0),
                 "expert_lora_alpha", self.expert_lora_alpha, "must be None (= lora_alpha) or > 0")
        if self.expert_projections is not None:
            projections = self.expert_projections
            _require(isinstance(projections, (list, tuple)) and len(projections) > 0
                     and set(projections) <= set(FFN_PROJECTIONS) and len(set(projections)) == len(projections),
                     "expert_projections", projections,
                     f"must be None (all) or a non-empty list of distinct names from {list(FFN_PROJECTIONS)}")
            self.expert_projections = [name for name in FFN_PROJECTIONS if name in projections]  # canonical order

    @property
    def expert_rank(self) -> int:
        return self.expert_r if self.expert_r is not None else self.r

    @property
    def expert_scaling(self) -> float:
        """Scaling of the FFN experts' LoRA: expert_lora_alpha / expert_r (or / sqrt(expert_r) with rsLoRA)."""
        alpha = self.expert_lora_alpha if self.expert_lora_alpha is not None else self.lora_alpha
        return lora_scaling(alpha, self.expert_rank, self.use_rslora)

    @property
    def projections_with_experts(self) -> tuple[str, ...]:
        return tuple(self.expert_projections) if self.expert_projections is not None else FFN_PROJECTIONS


@dataclass
class LoraMoeConfig(LoraExpertConfig, ContrastiveLossFields, TaskGateFields):
    """LoRAMoE (Dou et al. 2024, arXiv 2312.09979): every targeted Linear gets N LoRA experts and a dense router.

        y = W x + b + lora_alpha / r * sum_e softmax(W_route x)_e B_e A_e x

    Localized Balancing Constraint (LBC), exactly as the reference code (`peft/tuners/lora.py` of Ablustrund/LoRAMoE):
    the experts form `lbc_num_types` contiguous groups; group g serves samples of type `lbc_num_types - 1 - g` (with
    two types, experts [0, N/2) serve type 1, e.g. world-knowledge samples, and [N/2, N) serve type 0). For one Linear
    and a batch of B samples of types t_b:

        Q[b, e] = sum over the sequence (padding included) of softmax(W_route x)_e          importance  [B, N]
        I[b, e] = 1 + lbc_delta if expert e serves type t_b else 1 - lbc_delta                            [B, N]
        lbc = Var(I * Q) / (Mean(I * Q)^2 + 1e-10)          (unbiased variance over all B*N entries; 0 if B*N = 1)

    summed over every LoRAMoE Linear of the model and added to the loss as `lbc_weight * sum`. Types come from the
    forward kwarg `lora_moe_type_ids` ([B] ints); without it the LBC is skipped, as in the reference.
    Defaults: 6 experts, r 4, alpha 32, dropout 0.05, delta 0.1, weight 0.1 (the paper; the repository's
    `run_loramoe.sh` uses 8 experts and delta = weight = 0), on gate/up/down. `task_gates`: one router per task
    (MMoE, `TaskGateFields`).
    """

    r: int = field(default=4, metadata=_help("Rank of every LoRA expert."))
    lora_alpha: int = field(default=32, metadata=_help("Expert scaling numerator: lora_alpha / r."))
    num_experts: int = field(default=6, metadata=_help("LoRA experts per targeted Linear."))
    lbc_num_types: int = field(default=2, metadata=_help("Number of sample types = expert groups of the LBC; "
                                                         "must divide num_experts."))
    lbc_delta: float = field(default=0.1, metadata=_help("delta of the LBC type matrix: 1 +- delta."))
    lbc_weight: float = field(default=0.1, metadata=_help("beta, the weight of the LBC in the loss."))

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = LORAMOE
        self._check_contrastive_fields()
        self._check_task_gate_fields()
        _require(_positive_int(self.num_experts), "num_experts", self.num_experts, "must be a positive integer")
        _require(_positive_int(self.lbc_num_types) and self.num_experts % self.lbc_num_types == 0, "lbc_num_types",
                 self.lbc_num_types, f"must be a positive divisor of num_experts={self.num_experts}")
        _require(0 <= self.lbc_delta < 1, "lbc_delta", self.lbc_delta, "must be in [0, 1)")
        _require(self.lbc_weight >= 0, "lbc_weight", self.lbc_weight, "must be >= 0")


@dataclass
class MolaConfig(LoraExpertConfig, ContrastiveLossFields, TaskGateFields):
    """MoLA (Gao et al. 2024, arXiv 2402.08562): every targeted Linear gets E_l LoRA experts with a top-k router,
    with a number of experts that depends on the decoder layer l.

        y = W x + b + lora_alpha / r * sum_{e in top-k} w_e B_e A_e x,   w = top-k of softmax(W_router x), renormalised

    `num_experts`: an int (every layer), a list with one int per decoder layer, or a preset from `MOLA_PRESETS`
    (counts for the four quarters of the layers, lowest first): "uniform" 5-5-5-5, "triangle" 2-4-6-8 (the
    reference's default, fewer experts in lower layers), "inverted" 8-6-4-2, "hourglass" 8-2-2-8. `top_k`: an int or
    one per layer. Optional load balancing as the reference's `--obalance`: per layer the Switch loss over that
    layer's routers, divided by k_l, summed over layers (coefficient 0.001 there; off by default).
    Defaults: r 8, alpha 16, dropout 0.05, top-2, all seven projections. `task_gates`: one router per task (MMoE,
    `TaskGateFields`).
    """

    num_experts: int | list[int] | str = field(
        default="triangle", metadata=_help("Experts per targeted Linear: an int, one int per layer, or a preset: "
                                           f"{sorted(MOLA_PRESETS)}."))
    top_k: int | list[int] = field(default=2, metadata=_help("Experts per token: an int or one per layer."))
    router_aux_loss_coef: float = field(
        default=0.0, metadata=_help("Weight of the per-layer Switch load-balancing loss (the reference's "
                                    "--obalance uses 0.001)."))

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MOLA
        self._check_contrastive_fields()
        self._check_task_gate_fields()
        if isinstance(self.num_experts, str):
            _require(self.num_experts in MOLA_PRESETS, "num_experts", self.num_experts,
                     f"allowed presets: {sorted(MOLA_PRESETS)}, or an int, or one int per layer")
        else:
            counts = self.num_experts if isinstance(self.num_experts, list) else [self.num_experts]
            _require(len(counts) > 0 and all(map(_positive_int, counts)), "num_experts", self.num_experts,
                     "must be a positive int, a non-empty list of positive ints, or a preset name")
        top_k = self.top_k if isinstance(self.top_k, list) else [self.top_k]
        _require(len(top_k) > 0 and all(map(_positive_int, top_k)), "top_k", self.top_k,
                 "must be a positive int or a non-empty list of positive ints")
        _require(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", self.router_aux_loss_coef, "must be >= 0")

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """E_l for every decoder layer l: quarter q of the layers is [q L / 4, (q + 1) L / 4)."""
        if isinstance(self.num_experts, int):
            return [self.num_experts] * num_layers
        if isinstance(self.num_experts, str):
            quarters = MOLA_PRESETS[self.num_experts]
            return [quarters[layer * 4 // num_layers] for layer in range(num_layers)]
        _require(len(self.num_experts) == num_layers, "num_experts", self.num_experts,
                 f"a list needs one entry per decoder layer (the model has {num_layers})")
        return list(self.num_experts)

    def top_k_per_layer(self, num_layers: int) -> list[int]:
        """k_l for every decoder layer, checked against E_l."""
        experts = self.experts_per_layer(num_layers)
        if isinstance(self.top_k, int):
            top_k = [self.top_k] * num_layers
        else:
            _require(len(self.top_k) == num_layers, "top_k", self.top_k,
                     f"a list needs one entry per decoder layer (the model has {num_layers})")
            top_k = list(self.top_k)
        for layer, (k, count) in enumerate(zip(top_k, experts)):
            _require(k <= count, "top_k", self.top_k, f"layer {layer} has {count} experts, so k must be <= {count}")
        return top_k


@dataclass
class MoeLoraConfig(LoraExpertConfig, TaskFields):
    """MOELoRA (Liu et al. 2024, arXiv 2310.18339): every targeted Linear gets N LoRA experts that split the rank r
    (each expert has rank r / N) and a task-motivated gate: the sample's task id picks a learned task embedding, and a
    Linear without bias followed by a softmax turns it into expert weights. Every token of a sample uses its sample's
    weights (no token routing), so decoding is causal by construction.

        w_b = softmax(W_gate e[task_b])                                     [N]   e: Embedding(num_tasks, dim)
        y   = W x + b + lora_alpha / r * sum_i w_b,i B_i A_i dropout(x)      A_i [r/N, in], B_i [out, r/N]

    As the reference code (`MMOELoraLinear` of liuqidong07/MOELoRA-peft): the scaling uses the total rank r; A ~
    N(0, 0.01), B = 0; the task embedding ~ N(0, 1) (nn.Embedding), the gate kaiming-uniform (nn.Linear).
    `gate_sharing`: "per_layer" (the reference's `MMOELoraLinear`): each adapted Linear owns its task embedding and
    gate; "global" (its `MMOELoraLinearS` with `PeftModelForCausalLMShared`): one task embedding and gate for the whole
    model, whose weights w_b every adapted Linear uses (held, and saved, by the first adapted Linear). Task ids are
    a model input: pass `task_ids` ([batch_size] ints in [0, num_tasks)) to forward and once to `generate`; a
    forward without them raises (there is no default task).
    `task_names` maps names to ids (task_names[i] has id i) and is saved with the adapter.
    Defaults: the reference's experiment script (r 16 split over 8 experts, dropout 0.1; alpha 32 and task embedding
    dim 64 from its argument defaults), on every attention and FFN projection.
    """

    r: int = field(default=16, metadata=_help("Total LoRA rank of a Linear, split over the experts: each expert has "
                                              "rank r / num_experts."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling numerator: lora_alpha / r (total rank)."))
    lora_dropout: float = field(default=0.1, metadata=_help("Dropout on the LoRA inputs."))
    num_experts: int = field(default=8, metadata=_help("LoRA experts per targeted Linear; must divide r."))
    task_embedding_dim: int = field(default=64, metadata=_help("Dimension of the task embedding fed to the gate."))
    gate_sharing: str = field(
        default="per_layer", metadata=_help(f"One of {list(GATE_SHARING)}: every adapted Linear has its own task "
                                            "embedding and gate, or one of each serves the whole model."))

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MOELORA
        _require(_positive_int(self.num_experts), "num_experts", self.num_experts, "must be a positive integer")
        _require(self.r % self.num_experts == 0, "r", self.r,
                 f"must be a multiple of num_experts={self.num_experts} (each expert has rank r / num_experts)")
        _require(_positive_int(self.task_embedding_dim), "task_embedding_dim", self.task_embedding_dim,
                 "must be a positive integer")
        _require(self.gate_sharing in GATE_SHARING, "gate_sharing", self.gate_sharing,
                 f"allowed values: {list(GATE_SHARING)}")
        self._check_task_fields()

    @property
    def expert_rank(self) -> int:
        return self.r // self.num_experts
