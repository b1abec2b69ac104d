# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Exact import/export between our checkpoints and the native MoE formats that serving engines read.

Import (`import_native`) reads, from a folder of safetensors weights + config.json:

| source `model_type` | written by | becomes |
|---|---|---|
| `mixtral`   | `MixtralForCausalLM.save_pretrained` (`block_sparse_moe.experts.{e}.w1/w3/w2`) | `hf_moe_mixtral` |
| `qwen2_moe` | `Qwen2MoeForCausalLM.save_pretrained` (gated shared expert, q/k/v biases)     | `hf_moe_deepseek` |
| `qwen3_moe` | `Qwen3MoeForCausalLM.save_pretrained` (per-head q/k RMSNorm)                  | `hf_moe_deepseek` |
| `deepseek`  | DeepSeek-MoE 16B remote code (`mlp.experts.{e}`, `mlp.shared_experts`)         | `hf_moe_deepseek` |
| `deepseek_v2`, `deepseek_v3` | `DeepseekV2/V3ForCausalLM` (MLA, per-expert keys; V3's MTP layers dropped) | `hf_moe_deepseek` |
| `glm4_moe`  | `Glm4MoeForCausalLM` (V3's router, partial RoPE; MTP layers dropped)            | `hf_moe_deepseek` |
| `olmoe`     | `OlmoeForCausalLM` (q/k norm over the whole projection)                        | `hf_moe_deepseek` |
| `gpt_oss`   | `GptOssForCausalLM` (fused experts [E, H, 2I] with gate/up interleaved, sinks) | `hf_moe_deepseek` |

Export (`export_native`) writes any of these formats but `deepseek`, with the key names and the config keys that
transformers, vLLM and llama.cpp read, after checking that our config is representable in that format: for the five
family formats by writing the config in the format and reading it back, every field that comes back different being
named. The config key maps and how tensors map are in `layout.py`.

Every conversion is plan -> stream -> verify -> card: the config mapping, the tensor names and every tensor's shape
are checked before anything is written; tensors are then streamed one layer at a time from a lazy reader into a shard
writer that knows every shard's header up front, inside an atomic output folder (nothing appears at OUT unless the
whole conversion succeeds).

Engine-safe exports. llama.cpp (`convert_hf_to_gguf.py` + `src/models/{llama,qwen2moe,qwen3moe}.cpp`) reads these
formats with a few fixed assumptions, so an export is written the way it reads them whenever an equivalent layout
exists, and otherwise warned about (`engine_warnings`, recorded in conversion.yaml):

| llama.cpp assumption | export writes | otherwise |
|---|---|---|
| qwen2moe needs `output.weight` (no tied head) | qwen2_moe: `lm_head.weight` = a copy of the embeddings, untied | - |
| qwen2moe computes sigmoid(z) as silu(z) / z (0/0 for a zero gate) | a zero `shared_expert_gate` row becomes `constant_shared_gate` (sigmoid exactly 1/2 in fp32) | - |
| qwen2moe never renormalises the top-k weights, qwen3moe and llama (Mixtral) always do | top_k == num_experts: the value llama.cpp assumes (renormalising all E softmax weights is a no-op) | warning |
| every qwen2moe / qwen3moe layer is sparse | - | warning for `mlp_only_layers` / `decoder_sparse_step` |
| no sliding-window attention in llama / qwen3moe | - | warning for `sliding_window` |
"""

import json
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..cards import conversion_heatmap, format_report, record_conversion, write_card
from ..modeling.configuration_hf_moe import MoEDecoderConfig
from ..outputs import atomic_output_dir, check_output_dir
from .layout import (
    EXPORT_FORMATS,
    IMPORT_FORMATS,
    OUR_CONFIG_CLASSES,
    SHARED_GATE_LOGIT_BOUND,
    TensorMapping,
    check_names,
    constant_shared_gate,
    deepseek_layer_rule,
    dtype_name,
    engine_warnings,
    ensure_generation_config,
    fuse_gate_up,
    group_by_layer,
    load_our_config,
    multi_token_prediction_names,
    native_config_dict,
    native_config_to_ours,
    our_model_code_files,
    our_tensor_shapes,
    ours_to_native_config,
    qwen_mlp_layer_types,
    qwen_sparse_rule,
    remote_code_files,
    save_our_config,
    source_format,
    split_gate_up,
    tensor_plan,
)
from .safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointReader,
    ConversionError,
    ShardWriter,
    copy_side_files,
    parse_size,
    read_config_dict,
)
from .verify import DEFAULT_TOLERANCE, VerificationError, verification_prompts, verify, write_verification

# import_native, export_native and their plan checks, and the layout names they are used with (from layout.py).
__all__ = [
    "EXPORT_FORMATS",
    "IMPORT_FORMATS",
    "OUR_CONFIG_CLASSES",
    "SHARED_GATE_LOGIT_BOUND",
    "ConversionError",
    "TensorMapping",
    "check_export_shapes",
    "check_import_shapes",
    "check_names",
    "constant_shared_gate",
    "deepseek_layer_rule",
    "drop_absent_tied_head",
    "engine_warnings",
    "export_native",
    "fuse_gate_up",
    "import_native",
    "load_our_config",
    "native_config_to_ours",
    "our_model_code_files",
    "our_tensor_shapes",
    "ours_to_native_config",
    "qwen_mlp_layer_types",
    "qwen_sparse_rule",
    "save_our_config",
    "source_format",
    "split_gate_up",
    "tensor_plan",
]

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Plan checks: names and shapes, before anything is written
# ---------------------------------------------------------------------------------------------------------------


def drop_absent_tied_head(plan: list[TensorMapping], config: MoEDecoderConfig,
                          reader: CheckpointReader) -> list[TensorMapping]:
    """With tied embeddings a checkpoint may omit `lm_head.weight` (same name in every format): drop it then."""
    if config.tie_word_embeddings and "lm_head.weight" not in reader:
        return [mapping for mapping in plan if mapping.ours != "lm_head.weight"]
    return plan


def check_import_shapes(plan: list[TensorMapping], reader: CheckpointReader, config: MoEDecoderConfig) -> None:
    """Run every mapping on meta tensors (no data read) and compare with the shapes our model expects."""
    expected = our_tensor_shapes(config)
    for mapping in plan:
        sources = [reader.meta(name) for name in mapping.native]
        if len({tensor.dtype for tensor in sources}) > 1:
            raise ConversionError(f"the tensors fused into {mapping.ours} have different dtypes")
        shape = tuple(mapping.to_ours(sources).shape)
        if shape != expected[mapping.ours]:
            raise ConversionError(
                f"{mapping.native[0]}{' (and its siblings)' if len(mapping.native) > 1 else ''} gives "
                f"{mapping.ours} the shape {shape}, but the config implies {expected[mapping.ours]}"
            )


def check_export_shapes(plan: list[TensorMapping], reader: CheckpointReader, config: MoEDecoderConfig) -> None:
    """Compare the shape of every tensor of our checkpoint with the one its config implies."""
    expected = our_tensor_shapes(config)
    for mapping in plan:
        shape = reader.shape(mapping.ours)
        if shape != expected[mapping.ours]:
            raise ConversionError(
                f"{mapping.ours} has the shape {shape}, but its config implies {expected[mapping.ours]}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Streaming and output folders
# ---------------------------------------------------------------------------------------------------------------


def _stream(plan: list[TensorMapping], reader: CheckpointReader, folder: Path, max_shard_size: int | str,
            to_native: bool, desc: str) -> list[str]:
    """Convert and write the plan one layer at a time into shards whose headers are known up front (`_written`
    with meta tensors): each tensor goes to disk as it is made, and at most one tensor's conversion is held.
    Returns the weight file names."""
    written = {name: tensor for mapping in plan for name, tensor in _written(mapping, reader, to_native, meta=True)}
    writer = ShardWriter(folder, max_shard_size, plan=written)
    for group in tqdm(group_by_layer(plan), desc=desc, unit="layer", disable=None):
        for mapping in group:
            for name, tensor in _written(mapping, reader, to_native):
                writer.add(name, tensor)
    return writer.finish()


def _written(mapping: TensorMapping, reader: CheckpointReader, to_native: bool, meta: bool = False):
    """(name, tensor) of what `mapping` writes, in order; with `meta`, tensors on the meta device that have only the
    shapes and dtypes (nothing is read)."""
    if to_native:
        parts = mapping.to_native(_engine_safe(mapping.ours, reader, meta))
        yield from zip(mapping.native, parts, strict=True)
    else:
        read = reader.meta if meta else reader.get
        yield mapping.ours, mapping.to_ours([read(name) for name in mapping.native])


def _engine_safe(name: str, reader: CheckpointReader, meta: bool = False) -> torch.Tensor:
    """Our tensor `name` as an export writes it: a tied head absent from the checkpoint is the embeddings (only
    exported for the formats that need `lm_head.weight`), and an all-zero shared-expert gate becomes
    `constant_shared_gate` (the same gate, 1/2, without llama.cpp's 0/0). With `meta`, only its shape and dtype."""
    read = reader.meta if meta else reader.get
    if name == "lm_head.weight" and name not in reader:
        return read("model.embed_tokens.weight")
    tensor = read(name)
    if not meta and name.endswith(".mlp.shared_expert_gate.weight") and not tensor.any():
        layer_prefix = name.removesuffix("mlp.shared_expert_gate.weight")
        tensor = constant_shared_gate(reader.get(layer_prefix + "post_attention_layernorm.weight"), tensor.dtype)
    return tensor


def _check_paths(src: Path, out: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise ConversionError(f"SRC {src} is not a folder: expected a checkpoint folder (config.json + weights)")
    check_output_dir(out, overwrite, sources=[src])


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------


def _verify_and_describe(src: Path, folder: Path, check: bool, command: str, verbose: bool = True,
                         **record) -> None:
    """conversion.yaml; with `check`, the logits against SRC's (exact: relative error <= 1e-5, else
    VerificationError and nothing is published), printed as `verification: ...` when `verbose` (as `upcycle` does),
    verification.json, and when both models fit in memory the expert load on the verification prompts; then the
    model card."""
    record_conversion(folder, command, src=str(src), **record)
    if check:
        report = verify(src, folder, tolerance=DEFAULT_TOLERANCE)
        # verify() names its sides after upcycling (dense -> moe); here both are MoE checkpoints: name the roles
        report["source_class"], report["converted_class"] = report["dense_class"], report["moe_class"]
        if verbose:
            print(f"verification: {format_report(report)}")
        else:
            logger.info(f"verification: {format_report(report)}")
        if not report["passed"]:
            raise VerificationError(f"the {command}ed checkpoint should compute what {src} computes, but "
                                    f"{format_report(report)}; nothing was written")
        write_verification(report, folder)
        if report["mode"] == "full":
            prompts, description = verification_prompts(src, read_config_dict(src)["vocab_size"])
            ours = folder if command == "import" else src  # the side whose routers hf-moe reads
            conversion_heatmap(folder, prompts, f"the verification prompts: {description}", model_folder=ours)
    write_card(folder, "native")


def import_native(
    src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, verify: bool = True, verbose: bool = True,
) -> Path:
    """Convert the native checkpoint folder `src` (mixtral, qwen2_moe, qwen3_moe or deepseek) to our format in `out`.

    Writes our fused weights (shards of at most `max_shard_size`), config.json, generation_config.json, the flat
    modeling files for `trust_remote_code`, copies the other non-weight files (tokenizer, ...), and writes the
    model card. With `verify`, the logits are compared with the source's first (not for the deepseek layout, whose
    remote code hf-moe does not run), printed when `verbose`, and recorded in verification.json. Raises
    `ConversionError` (before writing
    anything) when the source is not convertible, `FileExistsError` when `out` exists and `overwrite` is False.
    Returns `out`.
    """
    src, out = Path(src), Path(out)
    _check_paths(src, out, overwrite)
    parse_size(max_shard_size)
    source_config = read_config_dict(src)
    fmt = source_format(source_config)
    config = native_config_to_ours(source_config)
    with CheckpointReader(src) as reader:
        plan = drop_absent_tied_head(tensor_plan(config, fmt), config, reader)
        dropped = set(multi_token_prediction_names(source_config, reader.keys()))
        if dropped:
            logger.warning(f"{fmt}: dropping the {source_config['num_nextn_predict_layers']} multi-token-prediction "
                           f"layer(s) ({len(dropped)} tensors), which transformers' model does not run either")
        check_names([name for mapping in plan for name in mapping.native],
                    [name for name in reader.keys() if name not in dropped], f"the {fmt} checkpoint {src}")
        check_import_shapes(plan, reader, config)
        config.dtype = dtype_name(reader.dtype("model.embed_tokens.weight"))
        with atomic_output_dir(out, "import", overwrite=overwrite, sources=[src]) as folder:
            _stream(plan, reader, folder, max_shard_size, to_native=False, desc=f"import {fmt}")
            save_our_config(config, folder)
            copy_side_files(src, folder, exclude={"config.json", *remote_code_files(source_config)})
            ensure_generation_config(folder, config)
            _verify_and_describe(src, folder, verify and fmt != "deepseek", "import", verbose=verbose,
                                 source_format=fmt, max_shard_size=max_shard_size, verify=verify)
    logger.info(f"imported {fmt} checkpoint {src} as {config.model_type} in {out}")
    return out


def export_native(
    src: str | os.PathLike, out: str | os.PathLike, format: str, overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, verify: bool = True, verbose: bool = True,
) -> Path:
    """Convert our checkpoint folder `src` to the native `format` (mixtral, qwen2_moe or qwen3_moe) in `out`.

    Writes per-expert weights under the names the format's native loaders expect, the native config.json,
    generation_config.json, copies the other non-weight files (tokenizer, ...) but not our modeling files, and
    writes the model card. The layout is the one serving engines read (see the module docstring: an untied head for
    qwen2_moe, no zero shared-expert gate); what llama.cpp would still compute differently is logged as a warning
    and recorded as `engine_warnings` in conversion.yaml. With `verify`, the logits are compared with the source's
    first, printed when `verbose`, and recorded. Raises `ConversionError` (before writing anything) when our config
    is not representable in `format`, `FileExistsError` when `out` exists and `overwrite` is False. Returns `out`.
    """
    src, out = Path(src), Path(out)
    _check_paths(src, out, overwrite)
    parse_size(max_shard_size)
    config = load_our_config(src)
    native_config = ours_to_native_config(config, format)
    warnings = engine_warnings(config, native_config)
    with CheckpointReader(src) as reader:
        plan = tensor_plan(config, format)
        if native_config.tie_word_embeddings or not config.tie_word_embeddings:
            plan = drop_absent_tied_head(plan, config, reader)
        present = [mapping.ours for mapping in plan if mapping.ours != "lm_head.weight" or "lm_head.weight" in reader]
        check_names(present, reader.keys(), f"the {config.model_type} checkpoint {src}")
        check_export_shapes([mapping for mapping in plan if mapping.ours in present], reader, config)
        native_config.dtype = dtype_name(reader.dtype("model.embed_tokens.weight"))
        with atomic_output_dir(out, "export", overwrite=overwrite, sources=[src]) as folder:
            _stream(plan, reader, folder, max_shard_size, to_native=True, desc=f"export {format}")
            content = json.dumps(native_config_dict(native_config), indent=2) + "\n"
            (folder / "config.json").write_text(content, encoding="utf-8")
            copy_side_files(src, folder, exclude={"config.json", *our_model_code_files()})
            ensure_generation_config(folder, native_config)
            for warning in warnings:
                logger.warning(warning)
            extra = {"engine_warnings": warnings} if warnings else {}
            _verify_and_describe(src, folder, verify, "export", verbose=verbose, format=format,
                                 max_shard_size=max_shard_size, verify=verify, **extra)
    logger.info(f"exported {config.model_type} checkpoint {src} as {format} in {out}")
    return out
