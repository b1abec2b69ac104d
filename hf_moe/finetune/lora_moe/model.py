"""The tuners of the LoRA-expert methods: which modules get which layer, and which auxiliary losses each method adds.

Everything else comes from peft's `BaseTuner`: target matching (`target_modules`, `exclude_modules`,
`layers_to_transform`), freezing the base, several adapters and `set_adapter`, `delete_adapter`, `unload`, and the
adapter state dict (every tensor on our layers except the wrapped base module), saved as safetensors.
"""

import re
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .aux_loss import install_aux_loss_hooks, remove_aux_loss_hooks
from .config import LoraExpertConfig, LoraMoeConfig, MixLoraConfig, MoeLoraConfig, MolaConfig
from .layer import (
    FFN_PROJECTIONS,
    LoraExpertLayer,
    LoraMoeLinear,
    MixLoraFeedForward,
    MixLoraLayer,
    MixLoraLinear,
    MoeLoraLinear,
    MolaLinear,
)
from .losses import AuxLossContext, contrastive_loss, layerwise_switch_loss, lbc_loss, pooled_z_loss, switch_loss
from .prompt_routing import install_prompt_routing_hooks, remove_prompt_routing_hooks

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = list(FFN_PROJECTIONS)
# Default target_modules per method and base model_type (all share the Llama module names).
TARGET_MODULES = {
    "MIXLORA": {model_type: ["mlp", *ATTENTION] for model_type in SUPPORTED_MODEL_TYPES},
    "LORAMOE": {model_type: FFN for model_type in SUPPORTED_MODEL_TYPES},
    "MOLA": {model_type: ATTENTION + FFN for model_type in SUPPORTED_MODEL_TYPES},
    "MOELORA": {model_type: ATTENTION + FFN for model_type in SUPPORTED_MODEL_TYPES},
}
TASK_IDS_KWARG = "task_ids"
FORWARDED_TASK_IDS_KWARG = "moelora_task_ids"  # how PeftModelForCausalLM.forward hands task_ids on (registration.py)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def decoder_layer_index(key: str) -> int | None:
    """The decoder layer of a module name: its first numbered segment (`model.layers.3.mlp` -> 3)."""
    match = _LAYER_INDEX.search(f".{key}.")
    return int(match.group(1)) if match else None


def uses_task_ids(config) -> bool:
    """Does the adapter of `config` (any PEFT config) read each sample's task id, a `task_ids` model input? MOELoRA,
    Mixture-of-LoRAs, and MixLoRA, LoRAMoE and MoLA with MMoE gates (`config.TaskFields.uses_task_ids`)."""
    return getattr(config, "uses_task_ids", False) is True


def require_tasks(config, who: str) -> None:
    """An adapter that reads task ids is built for `num_tasks` tasks: refuse one that has neither it nor
    `task_names` (a recipe fills `task_names` from the data's task column before building the adapter)."""
    if config.num_tasks is None:
        raise ValueError(f"{who}: `num_tasks` is None and so is `task_names`: set one of them (the number of tasks, "
                         f"or their names by id).")


def refuse_ffn_projections(peft_config, reason: str) -> None:
    """Methods that adapt whole FFN blocks refuse `target_modules` naming an FFN projection, saying why (`reason`)."""
    if isinstance(peft_config.target_modules, str):
        return
    projections = sorted(set(peft_config.target_modules) & set(FFN_PROJECTIONS))
    if projections:
        raise ValueError(f"`target_modules`={sorted(peft_config.target_modules)} names FFN projections "
                         f"{projections}: {reason}; target the FFN block instead (e.g. 'mlp').")


class LoraExpertTuner(BaseTuner):
    """What the tuners share: default targets, the aux-loss hooks, the task-id hook of adapters that read task ids
    (`uses_task_ids`), and refusing to merge (the routing depends on the input). Subclasses say which layer a module
    gets (`_new_layer`, `_layer_options`) and which auxiliary losses the method adds (`aux_losses`)."""

    def _prepare_adapter_config(self, peft_config: LoraExpertConfig, model_config: dict) -> LoraExpertConfig:
        self.num_decoder_layers = model_config.get("num_hidden_layers")
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(f"`target_modules` is None and the base's model_type={model_type!r} has no default "
                                 f"for {peft_config.peft_type}: set target_modules (defaults exist for "
                                 f"{sorted(self.target_module_mapping)}).")
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        if getattr(peft_config, "task_gates", False):
            require_tasks(peft_config, f"{peft_config.peft_type} with `task_gates`=True (one router per task)")
        return peft_config

    def _post_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        install_aux_loss_hooks(model)
        if uses_task_ids(config):
            install_task_ids_hook(model)
        if getattr(config, "routes_per_sequence", False):  # decisions taken on the prompt (prompt_routing.py)
            install_prompt_routing_hooks(model)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layer_index = decoder_layer_index(current_key)
        options = self._layer_options(peft_config, current_key, layer_index)
        if isinstance(target, LoraExpertLayer):  # adapted already, by another adapter of this method
            target.update_layer(adapter_name, peft_config, **options)
            return
        new_module = self._new_layer(peft_config, adapter_name, target, current_key, layer_index, options)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Our layers create their tensors on the wrapped module's device (layer._add_adapter), and an FFN block has
        # no `weight` for BaseTuner's version to copy: swapping the attribute is all there is to do.
        setattr(parent, child_name, new_module)

    def _layer_options(self, config, key: str, layer_index: int | None) -> dict:
        """num_experts and top_k of the module `key`."""
        return {"num_experts": config.num_experts, "top_k": config.top_k}

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def aux_losses(cls, config, records, context: AuxLossContext) -> dict:
        """{name: (coefficient, unweighted value)} for one adapter's records of one forward; a term is computed only
        when its coefficient is non-zero."""
        return {}

    @staticmethod
    def contrastive_term(config, records) -> dict:
        """MoELoRA's contrastive loss among experts, {"contrastive_loss": (coefficient, value)}, when the config has
        it on (`ContrastiveLossFields`); {} otherwise."""
        if getattr(config, "contrastive_loss_coef", 0) == 0:
            return {}
        return {"contrastive_loss": (config.contrastive_loss_coef,
                                     contrastive_loss(records, config.contrastive_temperature))}

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"{type(self).__name__} does not support mixed-adapter batches (`adapter_names`): "
                             f"run one adapter per forward, chosen with `set_adapter`.")
        yield

    def _check_merge_allowed(self):
        raise ValueError(f"{type(self).__name__}: routed LoRA experts cannot be merged into the base weights (the "
                         f"experts' mix depends on the input). For MixLoRA, `hf_moe.finetune.lora_moe.materialize` "
                         f"writes an equivalent standalone MoE checkpoint instead.")

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_merge_allowed()
        remove_aux_loss_hooks(self.model)
        remove_task_ids_hook(self.model)
        remove_prompt_routing_hooks(self.model)
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)


class MixLoraModel(LoraExpertTuner):
    """MixLoRA: FFN blocks -> `MixLoraFeedForward` (a sparse MoE of LoRA experts over the frozen FFN), Linears ->
    `MixLoraLinear` (plain LoRA). Aux loss: Switch load balancing over all layers' router logits, plus the router
    z-loss with "mixlora-switch" routing, plus MoELoRA's contrastive loss among the FFN experts when
    `contrastive_loss_coef` > 0 (an expert's output: what it adds to the frozen FFN)."""

    prefix = "mixlora_"
    tuner_layer_cls = MixLoraLayer
    target_module_mapping = TARGET_MODULES["MIXLORA"]

    def _prepare_adapter_config(self, peft_config: MixLoraConfig, model_config: dict) -> MixLoraConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        refuse_ffn_projections(peft_config, "MixLoRA adapts them through its experts")
        return peft_config

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        if isinstance(target, nn.Linear):
            return MixLoraLinear(target, adapter_name, config, layer_index)
        return MixLoraFeedForward(target, adapter_name, config, layer_index=layer_index, **options)

    @classmethod
    def aux_losses(cls, config: MixLoraConfig, records, context: AuxLossContext) -> dict:
        terms = {}
        if config.router_aux_loss_coef != 0:
            terms["router_aux_loss"] = (config.router_aux_loss_coef, switch_loss(records, context.token_mask(records)))
        if config.routing_strategy == "mixlora-switch" and config.router_z_loss_coef != 0:
            terms["router_z_loss"] = (config.router_z_loss_coef, pooled_z_loss(records, context.token_mask(records)))
        return {**terms, **cls.contrastive_term(config, records)}


class LoraMoeModel(LoraExpertTuner):
    """LoRAMoE: Linears -> `LoraMoeLinear` (dense softmax over N LoRA experts). Aux loss: the Localized Balancing
    Constraint, when the forward gets `lora_moe_type_ids`; MoELoRA's contrastive loss when `contrastive_loss_coef`
    > 0 (dense routing: every expert's output on every sampled token)."""

    prefix = "loramoe_"
    tuner_layer_cls = LoraMoeLinear
    target_module_mapping = TARGET_MODULES["LORAMOE"]

    def _layer_options(self, config: LoraMoeConfig, key, layer_index) -> dict:
        return {"num_experts": config.num_experts, "top_k": None}

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        return LoraMoeLinear(target, adapter_name, config, layer_index=layer_index, **options)

    @classmethod
    def aux_losses(cls, config: LoraMoeConfig, records, context: AuxLossContext) -> dict:
        terms = cls.contrastive_term(config, records)
        if config.lbc_weight == 0 or context.type_ids is None:
            return terms
        value = lbc_loss(records, context.type_ids, config.lbc_delta, config.lbc_num_types)
        return {"lbc_loss": (config.lbc_weight, value), **terms}


class MolaModel(LoraExpertTuner):
    """MoLA: Linears -> `MolaLinear` (top-k over E_l LoRA experts, E_l and k_l per decoder layer). Aux loss:
    the per-layer Switch loss, when `router_aux_loss_coef` > 0; MoELoRA's contrastive loss when
    `contrastive_loss_coef` > 0."""

    prefix = "mola_"
    tuner_layer_cls = MolaLinear
    target_module_mapping = TARGET_MODULES["MOLA"]

    def _prepare_adapter_config(self, peft_config: MolaConfig, model_config: dict) -> MolaConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if self.num_decoder_layers is None:
            raise ValueError("MoLA allocates experts per decoder layer, but the base model's config has no "
                             "`num_hidden_layers`.")
        peft_config.top_k_per_layer(self.num_decoder_layers)  # validates num_experts and top_k against the depth
        return peft_config

    def _layer_options(self, config: MolaConfig, key, layer_index) -> dict:
        if layer_index is None or layer_index >= self.num_decoder_layers:
            raise ValueError(f"MoLA needs the decoder layer of `{key}` (its first numbered segment, below "
                             f"num_hidden_layers={self.num_decoder_layers}): check target_modules.")
        experts = config.experts_per_layer(self.num_decoder_layers)[layer_index]
        return {"num_experts": experts, "top_k": config.top_k_per_layer(self.num_decoder_layers)[layer_index]}

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        return MolaLinear(target, adapter_name, config, layer_index=layer_index, **options)

    @classmethod
    def aux_losses(cls, config: MolaConfig, records, context: AuxLossContext) -> dict:
        terms = cls.contrastive_term(config, records)
        if config.router_aux_loss_coef == 0:
            return terms
        value = layerwise_switch_loss(records, context.token_mask(records))
        return {"router_aux_loss": (config.router_aux_loss_coef, value), **terms}


def _set_task_ids(model, args, kwargs):
    """Forward pre-hook: pop `task_ids` (or its forwarded name) and hand it to every LoRA-expert layer (read by
    MOELoRA's, Mixture-of-LoRAs' and MMoE task-gated routers); None when absent, so that a forward without it raises
    rather than reusing an earlier batch's ids. The ids stay set after the forward, for the recomputation of
    activation checkpointing in the backward pass."""
    task_ids = kwargs.pop(TASK_IDS_KWARG, None)
    forwarded = kwargs.pop(FORWARDED_TASK_IDS_KWARG, None)
    task_ids = forwarded if forwarded is not None else task_ids
    if task_ids is None:
        task_ids = _generation_task_ids(model, args, kwargs)
    if task_ids is not None and not isinstance(task_ids, torch.Tensor):
        task_ids = torch.as_tensor(task_ids)
    for module in model.modules():
        if isinstance(module, LoraExpertLayer) and hasattr(module, "task_ids"):
            module.task_ids = task_ids
    return args, kwargs


_GENERATION_ATTRIBUTE = "_moelora_generation_task_ids"


def _generation_task_ids(model, args, kwargs):
    """The ids given to `generate` (see `generation_task_ids`), repeated for the beams and `num_return_sequences`
    as generate repeats the inputs (repeat_interleave); None outside generate."""
    task_ids = model.__dict__.get(_GENERATION_ATTRIBUTE)
    inputs = kwargs.get("input_ids", args[0] if args else None)
    inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
    if task_ids is None or inputs is None or task_ids.numel() == 0 or inputs.shape[0] % task_ids.shape[0]:
        return task_ids
    return task_ids.repeat_interleave(inputs.shape[0] // task_ids.shape[0], dim=0)


@contextmanager
def generation_task_ids(model: nn.Module, task_ids):
    """Within the block, every forward of `model` without `task_ids` uses these (one per prompt). transformers'
    generate refuses model kwargs its model's forward does not name, so `task_ids` is taken out of generate's
    arguments (registration.py) and given to the decoding steps here: the same ids for the prefill and every new
    token, with or without a cache."""
    if not isinstance(task_ids, torch.Tensor):
        task_ids = torch.as_tensor(task_ids)
    model.__dict__[_GENERATION_ATTRIBUTE] = task_ids
    try:
        yield
    finally:
        model.__dict__.pop(_GENERATION_ATTRIBUTE, None)


def install_task_ids_hook(model: nn.Module) -> None:
    """Make `model(..., task_ids=...)` reach the layers that read task ids. The hook sits on the adapted transformers
    model, so it sees every forward however the model is called: through `PeftModel` or `PeftModelForCausalLM`, by
    Trainer, and by `generate` at every decoding step (through `generation_task_ids`)."""
    if _set_task_ids not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_set_task_ids, with_kwargs=True)


def remove_task_ids_hook(model: nn.Module) -> None:
    for key in [key for key, hook in model._forward_pre_hooks.items() if hook is _set_task_ids]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)


class MoeLoraModel(LoraExpertTuner):
    """MOELoRA: Linears -> `MoeLoraLinear` (N LoRA experts of rank r / N, mixed by per-sample task gates). The model
    takes `task_ids` ([batch_size] ints) in forward and generate; no auxiliary loss (nor MoELoRA's contrastive loss:
    no token is routed, see config.py). With `gate_sharing="global"` the first adapted Linear (in module order, so
    the same one when the adapter is loaded again) keeps the adapter's task embedding and gate, and every other one
    drops its own and reads that one (`MoeLoraLinear.use_task_gate_of`)."""

    prefix = "moelora_"
    tuner_layer_cls = MoeLoraLinear
    target_module_mapping = TARGET_MODULES["MOELORA"]

    def _prepare_adapter_config(self, peft_config: MoeLoraConfig, model_config: dict) -> MoeLoraConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        require_tasks(peft_config, "MOELoRA")
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        super()._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        if peft_config.gate_sharing == "global":
            layer = getattr(parent, target_name)
            owner = next(module for module in self.model.modules()  # the first layer that kept the adapter's gate
                         if isinstance(module, MoeLoraLinear) and adapter_name in module.moelora_gate)
            if owner is not layer:
                layer.use_task_gate_of(adapter_name, owner)

    def _layer_options(self, config: MoeLoraConfig, key, layer_index) -> dict:
        return {}

    def _new_layer(self, config, adapter_name, target, key, layer_index, options) -> nn.Module:
        return MoeLoraLinear(target, adapter_name, config, layer_index=layer_index)

    def _check_merge_allowed(self):
        raise ValueError("MoeLoraModel: the experts' mix depends on each sample's task id, so the adapter cannot be "
                         "merged into the base weights.")
