"""`hf-moe materialize BASE ADAPTER OUT`: a trained MixLoRA adapter plus its dense base -> a standalone MoE checkpoint.

A MixLoRA block is exactly a Mixtral-style sparse MoE layer: expert e is the base FFN with expert e's LoRA merged,

    gate_e = W_gate + s B^g_e A^g_e,   up_e = W_up + s B^u_e A^u_e,   down_e = W_down + s B^d_e A^d_e   (s = alpha / r)

the router is copied, and routing is softmax -> top-k -> renormalised (`norm_topk_prob=True`). MixLoRA's plain LoRA
on attention projections is merged into those weights (W + s B A). The result is written in our format
(`MixtralMoEForCausalLM`: fused `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]), loadable with
`AutoModelForCausalLM` after `import hf_moe`, or with `trust_remote_code=True` without hf_moe, and without peft.

Llama and Mistral bases whose every FFN block carries the adapter give a `MixtralMoEConfig`. When the base has q/k/v
biases (Qwen2) or q/k norms (Qwen3), or the adapter skipped some layers' FFN (`layers_to_transform`), the checkpoint
is a `DeepSeekMoEConfig` with no shared expert, dense FFNs where the adapter left them, and the same routing.

PESC adapters are refused (`pesc.MATERIALIZE_REFUSAL` says why): their experts, an FFN followed by a nonlinear
adapter, are not FFNs of ours. So are MixLoRA adapters with MMoE task gates (`task_gates`): a router per task, chosen
by a task id the checkpoint has no input for.
"""

import os
import re
import shutil
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ...modeling.configuration_hf_moe import DeepSeekMoEConfig, MixtralMoEConfig, MoEDecoderConfig
from .layer import MixLoraFeedForward, MixLoraLinear
from .peft_types import MIXLORA
from .pesc import MATERIALIZE_REFUSAL, PESC

_SPARSE_TENSOR = re.compile(r"(.+\.mlp)\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)")
# files of the base that the output folder must not carry over (we write our own)
_NOT_COPIED = {"config.json", "generation_config.json"}


def materialize(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                adapter_name: str = "default", dtype: torch.dtype | None = None, overwrite: bool = False,
                max_shard_size: int | str = "5GB") -> Path:
    """Write BASE + the MixLoRA ADAPTER as one MoE checkpoint folder OUT, with its model card (and the adapter's
    training record when ADAPTER has one: recipe, metrics, pictures); returns OUT.

    `dtype`: of the written weights; default the base config's dtype (float32 if it names none). The merge itself
    runs in float32. Raises `ConversionError` (a ValueError) for an adapter that is not MixLoRA or a base hf_moe
    cannot express, and for a broken BASE or ADAPTER folder (`hf_moe.preflight`: missing config, pickle-only or
    truncated weights), checked before anything is loaded; FileExistsError if OUT exists and `overwrite` is False.
    Nothing is left at OUT on failure.
    """
    from ...conversion.dense import dense_fields
    from ...conversion.layout import our_tensor_shapes, save_our_config
    from ...conversion.safetensors_io import ConversionError, ShardWriter, copy_side_files
    from ...outputs import atomic_output_dir, check_output_dir
    from ...preflight import check_adapter_folder, check_checkpoint_folder, is_hub_repo_id

    check_output_dir(out, overwrite, sources=[base, adapter])
    check_adapter_folder(adapter, "ADAPTER")
    if not is_hub_repo_id(base):  # a local folder (a Hub id is checked as it downloads: safetensors only)
        check_checkpoint_folder(base, "BASE")
    adapter_config = PeftConfig.from_pretrained(str(adapter))
    if adapter_config.peft_type == PESC:
        raise ConversionError(f"{adapter}: {MATERIALIZE_REFUSAL}.")
    if adapter_config.peft_type != MIXLORA:
        raise ConversionError(f"materialize turns MIXLORA adapters into MoE checkpoints; {adapter} is a "
                              f"{adapter_config.peft_type} adapter (allowed: MIXLORA).")
    if adapter_config.routing_strategy != "mixlora":
        raise ConversionError(f"materialize writes top-k routed MoE checkpoints; {adapter} has `routing_strategy`="
                              f"{adapter_config.routing_strategy!r} (allowed: 'mixlora').")
    if adapter_config.task_gates:
        raise ConversionError(f"{adapter} has `task_gates`=True: its routers are one per task, chosen by each sample's "
                              f"task id, and an MoE checkpoint has one router per layer and no task input (allowed: "
                              f"task_gates=False).")
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, use_safetensors=True)
    fields = dense_fields(base_model.config.to_dict())
    out_dtype = dtype or AutoConfig.from_pretrained(str(base)).dtype or torch.float32
    if isinstance(out_dtype, str):
        out_dtype = getattr(torch, out_dtype)
    model = PeftModel.from_pretrained(base_model, str(adapter), adapter_name=adapter_name).get_base_model()
    sparse_layers = _sparse_layers(model, fields["num_hidden_layers"])
    if not any(sparse_layers):
        raise ConversionError(f"{adapter} adapts no FFN block (target_modules without 'mlp'): there is no MoE to "
                              f"materialize.")
    config = moe_config(fields, adapter_config, sparse_layers)
    config.dtype = str(out_dtype).removeprefix("torch.")
    shapes = our_tensor_shapes(config)
    names = [name for name in shapes if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    with atomic_output_dir(out, "materialize", overwrite=overwrite, sources=[base, adapter]) as folder:
        writer = ShardWriter(folder, max_shard_size, plan={
            name: torch.empty(shapes[name], dtype=out_dtype, device="meta") for name in names})
        for name, tensor in our_tensors(model, names, adapter_name):
            writer.add(name, tensor.to(out_dtype))
        writer.finish()
        save_our_config(config, folder)
        if Path(base).is_dir():
            copy_side_files(base, folder, exclude=_NOT_COPIED)
        GenerationConfig.from_model_config(config).save_pretrained(folder)
        _describe(folder, base, adapter, config.dtype, max_shard_size)
    return Path(out)


def _describe(folder: Path, base, adapter, dtype: str, max_shard_size) -> None:
    """conversion.yaml, the adapter's training record (recipe, metrics, pictures: the routing is the adapter's, so
    its expert load holds), and the card of a fine-tuned MoE."""
    from ...cards import TRAINING_RECORD, record_conversion, write_card

    record_conversion(folder, "materialize", base=str(base), adapter=str(adapter), dtype=dtype,
                      max_shard_size=max_shard_size)
    for name in TRAINING_RECORD:
        if Path(adapter, name).is_file():
            shutil.copy2(Path(adapter, name), folder / name)
    write_card(folder, "finetuned")


def _sparse_layers(model, num_layers: int) -> list[bool]:
    """For each decoder layer: is its FFN block a MixLoRA MoE?"""
    sparse = [False] * num_layers
    for module in model.modules():
        if isinstance(module, MixLoraFeedForward):
            sparse[module.layer_index] = True
    return sparse


def moe_config(fields: dict, adapter_config, sparse_layers: list[bool]) -> MoEDecoderConfig:
    """Our config for the base's `fields` (conversion.dense.dense_fields) with MixLoRA's experts and routing."""
    fields = dict(fields)
    routing = {"num_experts_per_tok": adapter_config.top_k, "norm_topk_prob": True,
                   "router_aux_loss_coef": adapter_config.router_aux_loss_coef}
    if all(sparse_layers) and not fields["qkv_bias"] and not fields["qk_norm"]:
        fields.pop("qkv_bias"), fields.pop("qk_norm")
        return MixtralMoEConfig(**fields, num_local_experts=adapter_config.num_experts, **routing)
    layer_types = ["sparse" if sparse else "dense" for sparse in sparse_layers]
    return DeepSeekMoEConfig(**fields, mlp_layer_types=layer_types, first_k_dense_replace=None, moe_layer_freq=None,
                             moe_intermediate_size=fields["intermediate_size"],
                             n_routed_experts=adapter_config.num_experts, n_shared_experts=0, **routing)


@torch.no_grad()
def our_tensors(model, names: list[str], adapter_name: str):
    """(name, tensor) for each of our state-dict `names`, from the model carrying the MixLoRA adapter: merged
    attention weights, stacked merged experts and the router for sparse layers, the base's tensors otherwise."""
    modules = dict(model.named_modules())
    experts: dict[str, dict[str, torch.Tensor]] = {}  # the block being written (its three tensors are consecutive)
    for name in names:
        sparse = _SPARSE_TENSOR.fullmatch(name)
        if sparse:
            block_name, tensor_name = sparse.groups()
            block = modules[block_name]
            if block_name not in experts:
                experts = {block_name: block.expert_weights(adapter_name)}
            merged = experts[block_name]
            if tensor_name == "gate.weight":
                yield name, block.mixlora_router[adapter_name]
            elif tensor_name == "experts.gate_up_proj":
                yield name, torch.cat([merged["gate"], merged["up"]], dim=1)  # [E, 2I, H], gate rows first
            else:
                yield name, merged["down"]
            continue
        module_name, attribute = name.rsplit(".", 1)
        module = modules[module_name]
        if isinstance(module, MixLoraLinear) and attribute == "weight":
            yield name, module.get_base_layer().weight + module.delta_weight(adapter_name)
        else:
            yield name, getattr(module, attribute)
