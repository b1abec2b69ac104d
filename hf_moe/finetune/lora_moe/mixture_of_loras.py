"""Mixture-of-LoRAs (Feng et al. 2024, arXiv 2403.03432, LREC-COLING 2024; the paper calls it MoA): one LoRA expert
per task (domain), trained first on that task's data alone, then put together under routers trained on the mixed
data that pick one expert per sequence.

For a targeted Linear W with the experts (A_i, B_i), i < N = the number of tasks (expert i serves task_names[i]):

    y[b, s] = W x[b, s] + bias + (lora_alpha / r) * B_e A_e dropout(x[b, s]),   e = e_b, one expert per sequence b

    stage 1:  e_b = task_ids[b]                                 the sample's domain label selects its expert
    stage 2:  l_b = W_router pool_b(x)                          [N] router logits of the sequence, from its prompt
              e_b = argmax_i l_b,i                              top-1, weight 1: the expert adds what it learnt alone
              L   = L_LM + router_loss_coef * mean over routers of CE(l_b, task_ids[b])

pool_b(x) is the mean of x[b, s] over the prompt tokens s of sequence b (`router_input="prompt_mean"`) or x at its
last prompt token ("prompt_last"). The prompt is every real token before the first one with a label (labels != -100;
every real token of a forward without labels), so a training forward on prompt + response routes as the inference
forward on the prompt does, and every decoding step keeps the experts chosen on the prompt: through
`PeftModel.generate` (`generation_routing`, with or without a cache) and through a cache returned by the prompt's
forward (so also transformers' own `generate` with its cache, on a model given the adapter by `load_adapter`).

In stage 1 the routers exist but do not run and do not train; a training batch may mix tasks, and each example's
loss reaches only its task's expert (the other experts get a zero gradient), as if each expert trained alone on its
task's examples, except that the experts share the optimizer's schedule, its gradient clipping (one norm over all
of them) and, since each Linear's experts are one tensor, its weight decay. In stage 2 the routers train on their
cross-entropy with the domain labels (`task_ids`); with `stage2_routing="label"` a training forward still applies
each sample's own expert (the labels keep the tasks from interfering), and evaluation and inference apply the
router's choice; with "router" training applies the router's choice too. The experts keep training in stage 2 unless
`stage2_train_experts=False` (then only the routers train). A stage-2 adapter starts from a stage-1 adapter's
experts: `load_experts(model, stage1_folder)`, or a recipe's `init_adapter`.

What was checked of the paper: its abstract (one LoRA per domain trained separately on that domain's data, then
combined "using an explicit routing strategy" with domain labels, to prevent interference between tasks); its body
was not available here. Sequence-level top-1 routing from the prompt, one router per adapted module, the router's
input, the cross-entropy router loss and its coefficient 1, training the experts in stage 2 and routing stage-2
training forwards by the labels are our reading of it, not checked against the paper; each is a field that can be
changed (but the router placement).
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .config import LoraExpertConfig, TaskFields, _help, _number, _require
from .functional import sequence_lora
from .layer import LinearWithExperts, LoraExpertLayer, RoutingRecord, _batch_size, outside_activation_checkpointing
from .losses import AuxLossContext
from .model import ATTENTION, FFN, SUPPORTED_MODEL_TYPES, LoraExpertTuner, require_tasks
from .peft_types import add_peft_type
from .prompt_routing import (
    PromptRouting,
    SequenceRoutedLayer,
    pool_prompt,
)

MIXTURE_OF_LORAS = add_peft_type("MIXTURE_OF_LORAS")
STAGES = (1, 2)
STAGE2_ROUTING = ("label", "router")  # what selects the expert of a stage-2 training forward that has task ids
ROUTER_INPUTS = ("prompt_mean", "prompt_last")
TARGET_MODULES = {model_type: ATTENTION + FFN for model_type in SUPPORTED_MODEL_TYPES}  # default: every projection
# the fields that shape the experts: a stage-2 adapter takes them from the stage-1 adapter it starts from
EXPERT_FIELDS = ("r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "layers_to_transform",
                 "layers_pattern", "task_names", "num_tasks")


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class MixtureOfLorasConfig(LoraExpertConfig, TaskFields):
    """Mixture-of-LoRAs: every targeted Linear gets one LoRA expert of rank r per task (N = num_tasks experts) and a
    router `[N, in]` that picks one expert per sequence from its prompt (see the module's docstring for the formula).

    `stage` 1 trains each task's expert on its own examples (the model needs `task_ids`, [batch_size] ints below
    num_tasks, in forward and once in generate); `stage` 2 trains the routers on mixed data with their cross-entropy
    against the task ids (`router_loss_coef`) and routes by them at inference, where no task id is needed. The task
    names (`task_names[i]` has id i and expert i) are saved with the adapter.
    Defaults: r 8, alpha 16, dropout 0.05 on every attention and FFN projection (the paper's values were not
    checked), router loss coefficient 1.
    """

    r: int = field(default=8, metadata=_help("Rank of each task's LoRA expert."))
    stage: int = field(
        default=1, metadata=_help(f"Training stage, one of {list(STAGES)}: 1 = each example trains its task's expert "
                                  "(routers frozen), 2 = the routers train on mixed data and choose the experts."))
    router_input: str = field(
        default="prompt_mean", metadata=_help(f"What a router reads of a sequence, one of {list(ROUTER_INPUTS)}: the "
                                              "mean of the adapted module's input over the prompt tokens, or that "
                                              "input at the last prompt token."))
    router_loss_coef: float = field(
        default=1.0, metadata=_help("Stage 2: weight of the routers' cross-entropy with the task ids in the loss."))
    stage2_routing: str = field(
        default="label", metadata=_help(f"Stage 2, training forwards with task ids, one of {list(STAGE2_ROUTING)}: "
                                        "'label' applies each sample's own expert, 'router' the router's choice. "
                                        "Evaluation and inference always apply the router's choice."))
    stage2_train_experts: bool = field(
        default=True, metadata=_help("Stage 2: train the experts too (True) or only the routers (False)."))

    routes_per_sequence = True  # decisions taken on the prompt, kept while generating (prompt_routing.py)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = MIXTURE_OF_LORAS
        self._check_task_fields()
        _require(self.stage in STAGES and not isinstance(self.stage, bool), "stage", self.stage,
                 f"allowed values: {list(STAGES)}")
        _require(self.router_input in ROUTER_INPUTS, "router_input", self.router_input,
                 f"allowed values: {list(ROUTER_INPUTS)}")
        _require(_number(self.router_loss_coef) and self.router_loss_coef >= 0, "router_loss_coef",
                 self.router_loss_coef, "must be >= 0")
        _require(self.stage2_routing in STAGE2_ROUTING, "stage2_routing", self.stage2_routing,
                 f"allowed values: {list(STAGE2_ROUTING)}")
        _require(isinstance(self.stage2_train_experts, bool), "stage2_train_experts", self.stage2_train_experts,
                 "must be true or false")

    @property
    def frozen_containers(self) -> tuple[str, ...]:
        """The layer containers this stage leaves untrained (peft's `frozen_peft_weight_names`)."""
        if self.stage == 1:
            return ("mixture_of_loras_router",)
        return () if self.stage2_train_experts else ("mixture_of_loras_A", "mixture_of_loras_B")


# ----------------------------------------------------------------------------------------------------------------
# Routing records


@dataclass
class SequenceRoutingRecord(RoutingRecord):
    """A stage-2 router call: `logits` [B, N] per sequence, `top_k_index` [B, 1] its choice."""

    targets: torch.Tensor | None = None  # [B] the samples' task ids, the router's labels; None without task ids


# ----------------------------------------------------------------------------------------------------------------
# Layer


@dataclass(frozen=True)
class MixtureOfLorasSettings:
    """The routing settings of one adapter (see `MixtureOfLorasConfig`)."""

    stage: int = 1
    router_input: str = "prompt_mean"
    stage2_routing: str = "label"


class MixtureOfLorasLinear(LinearWithExperts, SequenceRoutedLayer):
    """A frozen Linear plus N LoRA experts of rank r, one per task, of which each sequence uses one:

        y[b, s] = W x[b, s] + bias + (alpha / r) * B_{e_b} A_{e_b} dropout(x[b, s])

    with e_b the sample's task id (stage 1) or its router's top-1 choice on the prompt (stage 2). A [N, r, in],
    B [N, out, r], router [N, in]. `task_ids` [B] is set by the tuner's task-id hook (`model.install_task_ids_hook`),
    `prompt_routing` by its prompt-routing hook, before every forward of the model.
    """

    adapter_layer_names = ("mixture_of_loras_router", "mixture_of_loras_A", "mixture_of_loras_B")
    other_param_names = (*LoraExpertLayer.other_param_names, "settings")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: MixtureOfLorasConfig,
                 layer_index: int | None = None):
        super().__init__()
        self._init_linear(base_layer, layer_index)
        self.task_ids: torch.Tensor | None = None
        self.prompt_routing: PromptRouting | None = None
        self.settings: dict[str, MixtureOfLorasSettings] = {}
        self.frozen_peft_weight_names = {}  # per layer: peft's class-level default is shared
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: MixtureOfLorasConfig, **_) -> None:
        base, experts = self.get_base_layer(), config.num_tasks
        self.settings[adapter_name] = MixtureOfLorasSettings(config.stage, config.router_input, config.stage2_routing)
        self.frozen_peft_weight_names[adapter_name] = config.frozen_containers  # before _add_adapter's set_adapter
        shapes = {"mixture_of_loras_router": (experts, base.in_features),
                  "mixture_of_loras_A": (experts, config.r, base.in_features),
                  "mixture_of_loras_B": (experts, base.out_features, config.r)}
        self._add_adapter(adapter_name, config, shapes, num_experts=experts, top_k=1)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's parameters without the method prefix: `router`, `A`, `B` (the prefix has underscores)."""
        return {name.removeprefix(MixtureOfLorasModel.prefix): getattr(self, name)[adapter_name]
                for name in self.adapter_layer_names if adapter_name in getattr(self, name)}

    def _experts(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weights = self.adapter_tensors(adapter_name)
        batch = _batch_size(x)
        tokens = x.reshape(batch, -1, x.shape[-1]).to(weights["A"].dtype)  # [B, S, in]
        experts = self.choose_experts(tokens, adapter_name)  # [B]
        delta = sequence_lora(self.lora_dropout[adapter_name](tokens), weights["A"], weights["B"], experts,
                              self.scaling[adapter_name])  # [B, S, out]
        return delta.view(*x.shape[:-1], -1)

    def choose_experts(self, tokens: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The expert of every sequence, [B] long: kept from the prompt's forward when this forward continues one,
        else the task ids (stage 1) or the router's top-1 (stage 2; recorded for the router loss)."""
        routing, key = self.prompt_routing, (id(self), adapter_name)
        if routing is not None and key in routing.choices:
            experts = routing.choices[key]
            if experts.shape[0] != tokens.shape[0]:
                raise ValueError(f"Mixture-of-LoRAs chose experts for {experts.shape[0]} sequences on the prompt, "
                                 f"but this forward has {tokens.shape[0]}.")
            return experts
        settings = self.settings[adapter_name]
        task_ids = self._checked_task_ids(tokens.shape[0], adapter_name, required=settings.stage == 1)
        if settings.stage == 1:
            experts = task_ids
        else:
            if routing is not None and routing.continuing:
                raise ValueError("Mixture-of-LoRAs decides each sequence's expert on its prompt, but this forward "
                                 "continues a cache that no prompt forward of this model returned: decode with "
                                 "`generate`, or pass the cache returned by the prompt's forward.")
            with outside_activation_checkpointing():  # a recomputation reuses the choice: it runs no router
                logits = self.router_logits(tokens, adapter_name)  # [B, N]
            experts = logits.argmax(dim=-1)
            if self._records is not None:
                self._records.append(SequenceRoutingRecord(adapter_name, self.layer_index, logits, experts[:, None],
                                                           tokens.shape[0], targets=task_ids))
            if self.training and settings.stage2_routing == "label" and task_ids is not None:
                experts = task_ids
        if routing is not None:
            routing.choices[key] = experts
        return experts

    def router_logits(self, tokens: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """W_router pool(x) per sequence, [B, N] fp32: pool = mean over the prompt tokens or the last prompt token."""
        mask = self.prompt_routing.prompt_mask if self.prompt_routing is not None else None
        pooled = pool_prompt(tokens, mask, self.settings[adapter_name].router_input)  # [B, in]
        router = self.mixture_of_loras_router[adapter_name]
        return F.linear(pooled.to(router.dtype), router).float()

    def _checked_task_ids(self, batch: int, adapter_name: str, required: bool) -> torch.Tensor | None:
        task_ids, num_tasks = self.task_ids, self.num_experts[adapter_name]
        if task_ids is None:
            if required:
                raise ValueError("Mixture-of-LoRAs stage 1 selects each sample's expert by its task: pass `task_ids` "
                                 "([batch_size] ints in [0, num_tasks)) to the model's forward, or once to `generate`.")
            return None
        if task_ids.dim() != 1 or task_ids.dtype.is_floating_point or task_ids.is_complex():
            raise ValueError(f"Mixture-of-LoRAs' `task_ids` must be a 1-D integer tensor [batch_size], got dtype "
                             f"{task_ids.dtype} and shape {tuple(task_ids.shape)}.")
        if task_ids.shape[0] != batch:
            raise ValueError(f"Mixture-of-LoRAs' `task_ids` has {task_ids.shape[0]} entries, but the batch has "
                             f"{batch} samples: give one task id per sample.")
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
            raise ValueError(f"Mixture-of-LoRAs' `task_ids`={task_ids.tolist()} are invalid: ids must be in [0, "
                             f"num_tasks={num_tasks}).")
        return task_ids.to(device=self.mixture_of_loras_A[adapter_name].device, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# Tuner


def router_loss(records) -> torch.Tensor | None:
    """Mean over the stage-2 router calls that have targets of the cross-entropy of their per-sequence logits with
    the task ids (each call: mean over its sequences); None when no call has them."""
    losses = [F.cross_entropy(record.logits.float(), record.targets) for record in records
              if isinstance(record, SequenceRoutingRecord) and record.targets is not None]
    return torch.stack(losses).mean() if losses else None


class MixtureOfLorasModel(LoraExpertTuner):
    """Mixture-of-LoRAs: Linears -> `MixtureOfLorasLinear` (one LoRA expert per task, one expert per sequence). The
    model takes `task_ids` ([batch_size] ints) in forward and generate (needed in stage 1, the router's labels in
    stage 2). Aux loss (stage 2, with task ids): `router_loss_coef` * the routers' cross-entropy, `router_loss`."""

    prefix = "mixture_of_loras_"
    tuner_layer_cls = MixtureOfLorasLinear
    target_module_mapping = TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: MixtureOfLorasConfig, model_config: dict) -> MixtureOfLorasConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        require_tasks(peft_config, "Mixture-of-LoRAs (one expert per task)")
        return peft_config

    def _layer_options(self, config, key, layer_index) -> dict:
        return {}

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        return MixtureOfLorasLinear(target, adapter_name, config, layer_index=layer_index)

    @classmethod
    def aux_losses(cls, config: MixtureOfLorasConfig, records, context: AuxLossContext) -> dict:
        if config.router_loss_coef == 0:
            return {}
        value = router_loss(records)
        return {} if value is None else {"router_loss": (config.router_loss_coef, value)}

    def _check_merge_allowed(self):
        raise ValueError("MixtureOfLorasModel: each sequence uses the expert of its task or of its router's choice, "
                         "so the experts cannot be merged into the base weights.")


# ----------------------------------------------------------------------------------------------------------------
# From stage 1 to stage 2


def stage2_options(peft: dict, init_adapter: str) -> dict:
    """A stage-2 recipe's `peft` options completed from the stage-1 adapter it starts from: the fields that shape the
    experts (`EXPERT_FIELDS`) and lora_dropout come from init_adapter's adapter_config.json; a recipe value that
    contradicts them is an error naming the field."""
    import json
    import os

    with open(os.path.join(init_adapter, "adapter_config.json"), encoding="utf-8") as file:
        saved = json.load(file)
    inherited = {name: saved[name] for name in (*EXPERT_FIELDS, "lora_dropout") if name in saved}
    for name in EXPERT_FIELDS:
        if name in peft and name in inherited and not _same_field(name, peft[name], inherited[name]):
            raise ValueError(f"recipe field `peft.{name}`={peft[name]!r} is invalid: stage 2 starts from the experts "
                             f"of init_adapter={init_adapter!r}, which have {name}={inherited[name]!r}; leave it out.")
    return {**inherited, **peft}


def _same_field(name: str, value, saved) -> bool:
    """Module lists are sets (saved as lists, in any order); every other field compares as it is."""
    if name in ("target_modules", "exclude_modules") and isinstance(value, (list, tuple, set)) \
            and isinstance(saved, (list, tuple, set)):
        return set(value) == set(saved)
    return value == saved


def recipe_problems(recipe: dict) -> list[str]:
    """What is wrong with a recipe's Mixture-of-LoRAs stage-2 fields, as far as the recipe alone tells: stage 2 needs
    `init_adapter` (the folder of the adapter whose experts it starts from, checked by `check_init_adapter` when the
    run starts, since stage 1 may write it after the recipe is written) and prompt/response or chat data (its routers
    read the prompt); no other recipe takes `init_adapter`."""
    folder, peft, data = recipe.get("init_adapter"), recipe.get("peft") or {}, recipe.get("data")
    stage = peft.get("stage", 1) if isinstance(peft, dict) else 1
    if recipe.get("method") != "mixture_of_loras" or stage != 2:
        if folder is None:
            return []
        message = (f"recipe field `init_adapter`={folder!r} is invalid: only Mixture-of-LoRAs stage 2 (method "
                   f"mixture_of_loras with peft.stage 2) starts from an adapter.")
        return [message]
    problems = []
    if not isinstance(folder, str) or not folder:
        problems.append(f"recipe field `init_adapter`={folder!r} is invalid: Mixture-of-LoRAs stage 2 starts from the "
                        f"experts of a stage-1 adapter: give its folder (the stage-1 recipe's output_dir).")
    if isinstance(data, dict) and "text_field" in data:
        problems.append(f"recipe field `data.text_field`={data['text_field']!r} is invalid: Mixture-of-LoRAs stage 2 "
                        f"routes each sequence from its prompt; give prompt_field and response_field, or "
                        f"messages_field.")
    return problems


def check_init_adapter(recipe: dict) -> None:
    """A stage-2 recipe's `init_adapter` holds a Mixture-of-LoRAs adapter whose expert fields the recipe does not
    contradict; a ValueError naming the field otherwise. Nothing to check for other recipes."""
    import json
    import os

    folder = recipe.get("init_adapter")
    if folder is None:
        return

    def fail(allowed: str):
        raise ValueError(f"recipe field `init_adapter`={folder!r} is invalid: {allowed}.")

    config_file = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(config_file):
        fail("no adapter_config.json there: run stage 1 first (its output_dir is the folder to give)")
    try:
        with open(config_file, encoding="utf-8") as file:
            saved = json.load(file)
    except (OSError, ValueError):
        fail("its adapter_config.json cannot be read as JSON")
    if not isinstance(saved, dict) or saved.get("peft_type") != MIXTURE_OF_LORAS:
        fail(f"it holds a {saved.get('peft_type') if isinstance(saved, dict) else None} adapter, not a "
             f"MIXTURE_OF_LORAS one")
    if not os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        fail("it has no adapter_model.safetensors")
    stage2_options(recipe.get("peft") or {}, folder)


def load_experts(model: nn.Module, folder: str, adapter_name: str = "default") -> int:
    """Copy the experts (A and B of every adapted module) of the Mixture-of-LoRAs adapter in `folder` into the
    adapter `adapter_name` of `model` (a `PeftModel`), leaving its routers as they are: how stage 2 starts from
    stage 1. Returns the number of tensors copied; the two adapters must target the same modules with the same
    shapes."""
    from safetensors.torch import load_file

    saved = load_file(f"{folder}/adapter_model.safetensors")
    copied = 0
    for name, module in model.named_modules():
        if not isinstance(module, MixtureOfLorasLinear) or adapter_name not in module.mixture_of_loras_A:
            continue
        for container in ("mixture_of_loras_A", "mixture_of_loras_B"):
            key = f"{name}.{container}"
            param = getattr(module, container)[adapter_name]
            if key not in saved or saved[key].shape != param.shape:
                found = tuple(saved[key].shape) if key in saved else "nothing"
                raise ValueError(f"the adapter in {folder} does not fit: {key} should be {tuple(param.shape)}, "
                                 f"it holds {found} (stage 2 needs the stage-1 adapter's target_modules, r and tasks).")
            with torch.no_grad():
                param.copy_(saved[key])
            copied += 1
    return copied
