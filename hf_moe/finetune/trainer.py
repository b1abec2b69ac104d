"""MoE-aware Trainer pieces.

`MoERouterCallback` runs after every optimizer step: it reads the routing counts that the model accumulated over
the step's forwards (every gradient-accumulation micro-batch, summed across data-parallel ranks), applies the
auxiliary-loss-free bias update where the config asks for it (DeepSeek-V3), and adds router metrics to the logs
Trainer writes (per layer and averaged over layers: load max-violation, routing entropy, dropped fraction, z-loss).

    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    add_router_callback(trainer)
    trainer.train()

The bias buffers are part of the model's state dict, so checkpoints save them and `resume_from_checkpoint`
restores them.
"""

import torch
from transformers import Trainer, TrainerCallback

from ..modeling.routing import collect_router_statistics, update_router_bias

METRICS = ("max_violation", "entropy", "dropped_fraction", "z_loss")


class MoERouterCallback(TrainerCallback):
    """Aux-loss-free bias updates after each optimizer step, and router metrics in Trainer's logs."""

    def __init__(self, update_bias: bool = True, log_metrics: bool = True, per_layer_metrics: bool = True):
        self.update_bias = update_bias
        self.log_metrics = log_metrics
        self.per_layer_metrics = per_layer_metrics
        self._since_log: list[dict[str, torch.Tensor]] = []  # per layer: summed metrics over steps, and a count
        self._steps_since_log = 0

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
        if not self.log_metrics or logs is None or self._steps_since_log == 0:
            return
        steps = self._steps_since_log
        metrics = {}
        for name in METRICS:
            per_layer = [float(totals[name]) / steps for totals in self._since_log]
            metrics[f"router/{name}"] = sum(per_layer) / len(per_layer)
            if self.per_layer_metrics:
                for layer, value in enumerate(per_layer):
                    metrics[f"router/layer_{layer}/{name}"] = value
        logs.update(metrics)
        # Trainer.log appends its copy of `logs` to the history before calling on_log: complete that entry too
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        self._since_log, self._steps_since_log = [], 0


def add_router_callback(trainer: Trainer, **options) -> MoERouterCallback:
    """Add a `MoERouterCallback` in FIRST position, so that the router metrics it adds to the logs reach the
    reporting callbacks (TensorBoard, W&B, ...) that Trainer registered before it."""
    callback = MoERouterCallback(**options)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
