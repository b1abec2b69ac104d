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
"""

import torch
from transformers import Trainer, TrainerCallback, TrainerState

from ..modeling.routing import collect_router_statistics, update_router_bias

METRICS = ("max_violation", "entropy", "dropped_fraction", "z_loss")


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
