"""How the auxiliary losses reach the loss: two forward hooks on the adapted transformers model.

Installed once per model when an adapter of the three methods is injected (`install_aux_loss_hooks`), they work
however the model is called: `PeftModel` / `PeftModelForCausalLM`, transformers' own `load_adapter`, a plain
forward, `generate`, `Trainer`:

1. before the forward: pop `lora_moe_type_ids` from the kwargs (LoRAMoE's per-sample types, [batch_size] ints; the
   model never sees it) and switch recording on in every LoRA-expert layer;
2. after the forward: switch recording off, let each active adapter's tuner turn its records into named losses
   (`<Tuner>.aux_losses`), and

       aux = sum over terms of coefficient * term                       (per micro-batch, like each term)
       outputs.loss += aux * share,   share = items in this micro-batch / num_items_in_batch  (1 without the kwarg)
       outputs.aux_loss = aux;  outputs.aux_losses = {name: unweighted term}

   Trainer, when the model consumes `num_items_in_batch` (as transformers' causal LMs do), sums the micro-batch
   losses of an optimizer step instead of averaging them; weighting each per-micro-batch mean by its share of the
   label tokens makes the sum the token-weighted mean, whatever the number of accumulation steps. Items are counted
   as Trainer counts them: `labels[..., 1:] != -100` for causal LMs (or `shift_labels`), `labels != -100` otherwise.

Recording is off outside these two hooks, so activation-checkpointing recomputation in the backward pass records
nothing; use non-reentrant checkpointing (transformers' default), with which the forward builds the router graph.
For logging, training forwards add their values to a running mean that `LoraMoeLossCallback` writes to Trainer's
logs as `lora_moe/aux_loss` and `lora_moe/<term>`.

With a tuple output (`return_dict=False`) only the loss is updated.
"""

import torch
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from transformers import Trainer, TrainerCallback
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

from ...modeling.routing import micro_batch_share
from ..trainer import RunningMeans, add_to_logs
from .layer import LoraExpertLayer
from .losses import AuxLossContext

TYPE_IDS_KWARG = "lora_moe_type_ids"
_LOG_ATTRIBUTE = "_lora_moe_aux_log"
_TYPE_IDS_ATTRIBUTE = "_lora_moe_type_ids"


def expert_layers(model: torch.nn.Module) -> list[LoraExpertLayer]:
    return [module for module in model.modules() if isinstance(module, LoraExpertLayer)]


def install_aux_loss_hooks(model: torch.nn.Module) -> None:
    """Add the two hooks to `model` unless it has them already."""
    if _begin_forward in model._forward_pre_hooks.values():
        return
    model.register_forward_pre_hook(_begin_forward, with_kwargs=True)
    model.register_forward_hook(_end_forward, with_kwargs=True, always_call=True)


def remove_aux_loss_hooks(model: torch.nn.Module) -> None:
    for hooks, extras in ((model._forward_pre_hooks, (model._forward_pre_hooks_with_kwargs,)),
                          (model._forward_hooks, (model._forward_hooks_with_kwargs,
                                                  model._forward_hooks_always_called))):
        for key in [key for key, hook in hooks.items() if hook in (_begin_forward, _end_forward)]:
            del hooks[key]
            for extra in extras:
                extra.pop(key, None)


def _begin_forward(model, args, kwargs):
    model.__dict__[_TYPE_IDS_ATTRIBUTE] = kwargs.pop(TYPE_IDS_KWARG, None)
    for layer in expert_layers(model):
        layer.start_recording(kwargs.get("attention_mask"))
    return args, kwargs


def _end_forward(model, args, kwargs, output):
    records = [record for layer in expert_layers(model) for record in layer.stop_recording()]
    type_ids = model.__dict__.pop(_TYPE_IDS_ATTRIBUTE, None)
    if not records or output is None:
        return None
    context = AuxLossContext(attention_mask=kwargs.get("attention_mask"), type_ids=type_ids)
    terms, aux = compute_aux_losses(model.peft_config, records, context)
    if aux is None:
        return None
    labels = kwargs.get("labels")
    if labels is not None:
        output = _add_to_loss(output, aux * _micro_batch_share(model, labels, kwargs))
    if not isinstance(output, tuple):
        if getattr(output, "aux_loss", None) is None:  # an MoE base keeps its own aux_loss
            output.aux_loss = aux
        output.aux_losses = terms
    if model.training:
        _log_values(model, {"aux_loss": aux, **terms})
    return output


def compute_aux_losses(peft_config: dict, records, context: AuxLossContext):
    """-> ({name: unweighted term}, sum of coefficient * term or None). Names get an `adapter/` prefix when several
    adapters recorded in this forward."""
    by_adapter: dict[str, list] = {}
    for record in records:
        by_adapter.setdefault(record.adapter, []).append(record)
    terms, aux = {}, None
    for adapter_name, adapter_records in by_adapter.items():
        config = peft_config[adapter_name]
        tuner = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
        for name, (coefficient, value) in tuner.aux_losses(config, adapter_records, context).items():
            terms[name if len(by_adapter) == 1 else f"{adapter_name}/{name}"] = value
            aux = coefficient * value if aux is None else aux + coefficient * value
    return terms, aux


def _micro_batch_share(model, labels: torch.Tensor, kwargs: dict):
    """`routing.micro_batch_share` for the wrapped model's own loss: labels are shifted for causal-LM losses."""
    shifted = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    return micro_batch_share(labels, kwargs.get("num_items_in_batch"), kwargs.get("shift_labels"), shifted=shifted)


def _add_to_loss(output, value: torch.Tensor):
    loss = output[0] if isinstance(output, tuple) else output.loss
    if not isinstance(loss, torch.Tensor):  # labels the model did not turn into a loss
        return output
    if isinstance(output, tuple):
        return (loss + value.to(loss.device),) + output[1:]
    output.loss = loss + value.to(loss.device)
    return output


def _log_values(model, values: dict[str, torch.Tensor]) -> None:
    model.__dict__.setdefault(_LOG_ATTRIBUTE, RunningMeans()).add(values)


def pop_logged_aux_losses(model: torch.nn.Module) -> dict[str, float]:
    """Mean of every logged value over the training forwards since the last call, then reset."""
    means = {}
    for module in model.modules():
        if _LOG_ATTRIBUTE in module.__dict__:
            means.update(module.__dict__.pop(_LOG_ATTRIBUTE).pop())
    return means


class LoraMoeLossCallback(TrainerCallback):
    """Writes `lora_moe/aux_loss` (mean over micro-batches of the weighted auxiliary term) and `lora_moe/<term>`
    (each unweighted term) into Trainer's logs (averaged over data-parallel ranks)."""

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return
        add_to_logs(state, logs, {f"lora_moe/{name}": value for name, value in pop_logged_aux_losses(model).items()})


def add_lora_moe_callback(trainer: Trainer) -> LoraMoeLossCallback:
    """Add a `LoraMoeLossCallback` in first position, so that the reporting callbacks see its metrics."""
    callback = LoraMoeLossCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
