"""MoE-aware Trainer pieces.

`MoERouterCallback` runs after every optimizer step: it reads the routing counts that the model accumulated over
the step's forwards (every gradient-accumulation micro-batch, summed across data-parallel ranks), applies the
auxiliary-loss-free bias update where the config asks for it (DeepSeek-V3), and adds router metrics to the logs
Trainer writes (per layer and averaged over layers: load max-violation, routing entropy, dropped fraction, z-loss).
Each balancing loss the model adds to its loss (`router_losses` of the output: the Switch aux loss, z-loss,
importance, DeepSeek balance losses, ...) is logged as its own scalar too, unweighted, as `moe/<loss>`, with
`moe/weighted_aux_loss` = the sum of coefficient * loss that reached the training loss (means over the training
forwards since the last log, averaged over data-parallel ranks).

    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    add_router_callback(trainer)
    trainer.train()

The bias buffers are part of the model's state dict, so checkpoints save them and `resume_from_checkpoint`
restores them.

Fine-tuning knobs (ST-MoE, Zoph et al. 2022; the HF blog "Mixture of Experts Explained"): every parameter belongs
to one of three groups (`parameter_groups`): the routers, the experts, and the rest. `freeze_parameter_groups`
freezes whole groups before the Trainer is built, and `MoETrainer` gives groups their own learning rates:

    freeze_parameter_groups(model, ["router", "experts"])    # train only the non-MoE weights
    trainer = MoETrainer(model=model, args=args, train_dataset=dataset, group_learning_rates={"other": 1e-5})
"""

from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState

from ..modeling.routing import collect_router_statistics, update_router_bias

METRICS = ("max_violation", "entropy", "dropped_fraction", "z_loss")
PARAMETER_GROUPS = ("router", "experts", "other")
EXPERT_MODULES = ("experts", "shared_experts", "shared_expert")  # children of an MoE block holding its experts


def add_to_logs(state: TrainerState, logs: dict, metrics: dict[str, float]) -> None:
    """Add `metrics` to the `logs` an `on_log` callback received. Trainer.log appended its copy of `logs` to the
    history before calling on_log: complete that entry too."""
    logs.update(metrics)
    if metrics and state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(metrics)


class RunningMeans:
    """Sums and counts of named scalars, read and reset together. Under data parallelism every rank calls `pop` at
    the same log step (Trainer logs on every process) and gets the mean over ranks of each rank's mean: one
    all-reduce. Ranks run equally many forwards per step, so that is the mean over every forward of the step."""

    def __init__(self):
        self.totals: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            total, count = self.totals.get(name, (0.0, 0))
            self.totals[name] = (total + value.detach().float(), count + 1)

    def pop(self) -> dict[str, float]:
        if not self.totals:
            return {}
        names = sorted(self.totals)
        means = torch.stack([torch.as_tensor(self.totals[name][0]) / self.totals[name][1] for name in names])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(means)
            means /= torch.distributed.get_world_size()
        self.totals = {}
        return dict(zip(names, means.tolist()))


class MoERouterCallback(TrainerCallback):
    """Aux-loss-free bias updates after each optimizer step, and router metrics in Trainer's logs."""

    def __init__(self, update_bias: bool = True, log_metrics: bool = True, per_layer_metrics: bool = True):
        self.update_bias = update_bias
        self.log_metrics = log_metrics
        self.per_layer_metrics = per_layer_metrics
        self._since_log: list[dict[str, torch.Tensor]] = []  # per layer: summed metrics over steps, and a count
        self._steps_since_log = 0
        self._losses = RunningMeans()
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.log_metrics and model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._record_losses)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record_losses(self, model, args, output):
        losses = getattr(output, "router_losses", None)
        if not model.training or not losses:
            return
        config = model.config
        weighted = sum(getattr(config, name) * value.detach() for name, value in losses.items())
        self._losses.add({f"moe/{name.removesuffix('_coef')}": value for name, value in losses.items()})
        self._losses.add({"moe/weighted_aux_loss": weighted})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        statistics = collect_router_statistics(model)
        if not statistics:
            return
        if self.update_bias:
            update_router_bias(model, statistics)
        if self.log_metrics:
            if not self._since_log:
                self._since_log = [{name: torch.zeros(()) for name in METRICS} for _ in statistics]
            for totals, layer_statistics in zip(self._since_log, statistics):
                for name in METRICS:
                    totals[name] += layer_statistics[name].float().cpu()
            self._steps_since_log += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_metrics or logs is None:
            return
        metrics = self._losses.pop()
        if self._steps_since_log == 0:
            add_to_logs(state, logs, metrics)
            return
        steps = self._steps_since_log
        for name in METRICS:
            per_layer = [float(totals[name]) / steps for totals in self._since_log]
            metrics[f"router/{name}"] = sum(per_layer) / len(per_layer)
            if self.per_layer_metrics:
                for layer, value in enumerate(per_layer):
                    metrics[f"router/layer_{layer}/{name}"] = value
        add_to_logs(state, logs, metrics)
        self._since_log, self._steps_since_log = [], 0


def add_router_callback(trainer: Trainer, **options) -> MoERouterCallback:
    """Add a `MoERouterCallback` in FIRST position, so that the router metrics it adds to the logs reach the
    reporting callbacks (TensorBoard, W&B, ...) that Trainer registered before it."""
    callback = MoERouterCallback(**options)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of `model` by group (`PARAMETER_GROUPS`), named as `model.named_parameters()` names it:

    - LoRA-expert layers (MixLoRA, LoRAMoE, MoLA, MOELoRA) say which of their tensors are routers (the routers, and
      MOELoRA's task embedding and gate) and which are experts (the LoRA experts); MixLoRA's plain attention LoRA is
      "other" (`LoraExpertLayer.parameter_group`);
    - an MoE block (a module with an `experts` child: ours, and transformers' Mixtral, Qwen-MoE, DeepSeek, gpt-oss
      blocks) holds experts (`experts`, `shared_experts` / `shared_expert`, with any PEFT LoRA on them) and routing
      parameters (everything else in the block: the router, the shared expert's gate, Soft MoE's slot parameters);
    - a module whose class name ends in "Router" anywhere else (Mixture-of-Depths) is a router;
    - everything else is "other" (attention, embeddings, norms, dense FFNs, heads, their LoRA)."""
    group_of: dict[int, str] = {}

    def assign(params, group: str) -> None:
        for param in params:
            group_of.setdefault(id(param), group)

    for module in model.modules():
        if callable(getattr(module, "parameter_group", None)) and hasattr(module, "adapter_layer_names"):
            for layer_name in module.adapter_layer_names:
                for param in getattr(module, layer_name).values():
                    group_of[id(param)] = module.parameter_group(layer_name)
        elif isinstance(getattr(module, "experts", None), nn.Module):  # an MoE block (before its children)
            for child_name, child in module.named_children():
                assign(child.parameters(), "experts" if child_name in EXPERT_MODULES else "router")
            assign(module.parameters(recurse=False), "router")
        elif type(module).__name__.endswith("Router"):
            assign(module.parameters(), "router")
    groups = {group: [] for group in PARAMETER_GROUPS}
    for name, param in model.named_parameters():
        groups[group_of.get(id(param), "other")].append((name, param))
    return groups


def freeze_parameter_groups(model: nn.Module, groups) -> dict[str, int]:
    """requires_grad_(False) on every parameter of the named groups; returns how many trainable parameters (tensors)
    each group had, so that a caller can tell a group that matched nothing."""
    frozen = {}
    for group, params in parameter_groups(model).items():
        if group in groups:
            trainable = [param for _, param in params if param.requires_grad]
            for param in trainable:
                param.requires_grad_(False)
            frozen[group] = len(trainable)
    return frozen


def split_learning_rates(optimizer: torch.optim.Optimizer, model: nn.Module, learning_rates: dict[str, float]) -> None:
    """Give the parameters of each group in `learning_rates` their own param groups with that learning rate, one per
    param group of `optimizer` they came from (so weight decay and every other setting stay as Trainer chose them);
    each new param group also carries `parameter_group` (its group's name). Call before the scheduler is created:
    its schedule then scales every group's own initial learning rate."""
    group_of = {id(param): group for group, params in parameter_groups(model).items() for _, param in params}
    for param_group in list(optimizer.param_groups):
        kept, moved = [], defaultdict(list)
        for param in param_group["params"]:
            group = group_of.get(id(param), "other")
            (moved[group] if group in learning_rates else kept).append(param)
        if not moved:
            continue
        settings = {key: value for key, value in param_group.items() if key != "params"}
        param_group["params"] = kept
        if not kept:  # by identity: param groups are dicts, and two may compare equal
            optimizer.param_groups[:] = [other for other in optimizer.param_groups if other is not param_group]
        for group, params in moved.items():
            optimizer.add_param_group({**settings, "params": params, "lr": learning_rates[group],
                                       "parameter_group": group})


class MoETrainer(Trainer):
    """transformers' Trainer whose optimizer gives the routers, the experts and the other parameters
    (`parameter_groups`) their own learning rates: `group_learning_rates` = {group: learning rate}; a group left out
    keeps `args.learning_rate`. The optimizer is Trainer's own (`args.optim`, weight decay, ...), its param groups split
    by group; the learning-rate schedule scales each group's rate. Without `group_learning_rates` it is Trainer."""

    def __init__(self, *args, group_learning_rates: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        unknown = sorted(set(group_learning_rates or {}) - set(PARAMETER_GROUPS))
        if unknown:
            raise ValueError(f"group_learning_rates has unknown groups {unknown}: the groups are "
                             f"{list(PARAMETER_GROUPS)}.")
        self.group_learning_rates = dict(group_learning_rates or {})

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and self.group_learning_rates:
            split_learning_rates(optimizer, self.model if model is None else model, self.group_learning_rates)
        return optimizer
