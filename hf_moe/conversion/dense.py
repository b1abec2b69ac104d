# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Reading a dense source checkpoint for upcycling: Llama, Mistral, Qwen2 and Qwen3, in safetensors.

The source's config.json is parsed by its own transformers class (so defaults and legacy keys such as
`rope_theta` / `rope_scaling` are read exactly as transformers reads them) and mapped to the fields that our two
configs share:

| source `model_type` | attention in our fields                 | refused                                         |
|---|---|---|
| `llama`   | plain GQA, any `rope_parameters`, `head_dim`       | `attention_bias`, `mlp_bias` (o_proj, MLP bias) |
| `mistral` | + `sliding_window` on every layer                  |                                                 |
| `qwen2`   | + `qkv_bias=True` (biases on q/k/v, not on o_proj) | sliding window on some layers only              |
| `qwen3`   | + `qk_norm=True` (per-head q/k RMSNorm)            | `attention_bias`, partial sliding window        |

A dense source is described by a `DeepSeekMoEConfig` whose every layer is dense (`dense_config`): its tensor names
and shapes (`layout.our_tensor_shapes`) are exactly the source's, so the same name and shape checks serve the dense
source and our MoE output, and its decoder layers run the calibration forward passes.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from transformers import LlamaConfig, MistralConfig, PreTrainedConfig, Qwen2Config, Qwen3Config

from ..cards import is_hub_id
from ..modeling.configuration_hf_moe import DeepSeekMoEConfig
from .layout import (
    IMPORT_FORMATS,
    OUR_CONFIG_CLASSES,
    build_config,
    check_names,
    explicit_layer_fields,
    one_line,
    our_tensor_shapes,
    refuse,
    single_sliding_window,
)
from .safetensors_io import CheckpointReader, ConversionError, read_config_dict

SOURCE_CLASSES: dict[str, type[PreTrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}
SUPPORTED_SOURCES = tuple(SOURCE_CLASSES)
SUPPORTED_MESSAGE = (
    "hf-moe upcycles dense Llama, Mistral, Qwen2 and Qwen3 checkpoints (model_type llama, mistral, qwen2, qwen3) "
    "stored as safetensors"
)

# Fields with the same name and meaning in the four source configs and ours.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout",
)
# Files of the source that the upcycled folder must not carry over (hf-moe writes its own).
SOURCE_FILES_NOT_COPIED = ("config.json",)  # (and the card: see copy_side_files)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*", "README.md"]  # card: license


def check_source_type(config_dict: dict) -> str:
    """The source's `model_type`, refusing anything but the four dense families (with a hint for MoE sources)."""
    model_type = config_dict.get("model_type")
    if model_type in SOURCE_CLASSES:
        if config_dict.get("quantization_config"):
            raise ConversionError(f"{model_type}: `quantization_config` is set: quantized checkpoints cannot be "
                                  f"upcycled (allowed: unquantized weights)")
        return model_type
    if model_type in IMPORT_FORMATS or model_type in OUR_CONFIG_CLASSES:
        hint = "it is already a mixture of experts (use `hf-moe import` for native MoE checkpoints)"
    else:
        hint = "its architecture is not one hf-moe can upcycle exactly"
    raise ConversionError(f"`model_type`={model_type!r} cannot be upcycled: {hint}. {SUPPORTED_MESSAGE}")


def dense_fields(config_dict: dict) -> dict:
    """Our config fields (shared by both families) for a dense source config.json dict."""
    model_type = check_source_type(config_dict)
    try:
        native = SOURCE_CLASSES[model_type].from_dict(config_dict)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"invalid {model_type} config: {one_line(error)}") from None
    fields = {name: getattr(native, name) for name in SHARED_FIELDS}
    fields["rope_parameters"] = dict(native.rope_parameters)
    fields["head_dim"] = getattr(native, "head_dim", None)  # Qwen2 honours one found in config.json
    fields.update(sliding_window=None, qkv_bias=False, qk_norm=False)
    if model_type == "llama":
        for field in ("attention_bias", "mlp_bias"):
            if getattr(native, field):
                raise refuse("llama", field, getattr(native, field),
                             "hf_moe has biases on q/k/v only and none in the MLP (allowed: False)")
    elif model_type == "mistral":
        fields["sliding_window"] = native.sliding_window
    elif model_type == "qwen2":
        fields.update(qkv_bias=True, sliding_window=single_sliding_window(model_type, native))
    elif model_type == "qwen3":
        if native.attention_bias:
            raise refuse("qwen3", "attention_bias", native.attention_bias,
                         "hf_moe has biases on q/k/v only, not on o_proj (allowed: False)")
        fields.update(qk_norm=True, sliding_window=single_sliding_window(model_type, native))
    return fields


def dense_config(fields: dict) -> DeepSeekMoEConfig:
    """A `DeepSeekMoEConfig` with every layer dense: the same tensors, shapes and forward as the dense source."""
    layers = ["dense"] * fields["num_hidden_layers"]
    return build_config(
        DeepSeekMoEConfig, "dense source config", **fields, **explicit_layer_fields(layers),
        moe_intermediate_size=fields["intermediate_size"], n_routed_experts=1, num_experts_per_tok=1,
        n_shared_experts=0,
    )


@dataclass
class DenseSource:
    """A dense checkpoint folder, its config (raw and mapped to our fields) and the names of its tensors."""

    folder: Path
    name: str  # as the user gave it (a folder or a Hub id), recorded in the model card
    model_type: str
    config_dict: dict
    fields: dict
    config: DeepSeekMoEConfig  # all-dense equivalent

    @property
    def num_layers(self) -> int:
        return self.fields["num_hidden_layers"]

    def tensor_names(self, reader: CheckpointReader) -> list[str]:
        """The source's tensor names in layer order (without `lm_head.weight` when tied and absent)."""
        names = list(our_tensor_shapes(self.config))
        if self.fields["tie_word_embeddings"] and "lm_head.weight" not in reader:
            names.remove("lm_head.weight")
        return names

    def check_tensors(self, reader: CheckpointReader) -> None:
        """Refuse a checkpoint whose tensor names or shapes differ from what its config implies (headers only)."""
        names = self.tensor_names(reader)
        check_names(names, reader.keys(), f"the {self.model_type} checkpoint {self.folder}")
        expected = our_tensor_shapes(self.config)
        for name in names:
            if reader.shape(name) != expected[name]:
                raise ConversionError(f"{self.folder}: {name} has the shape {reader.shape(name)}, but the config "
                                      f"implies {expected[name]}")
        dtypes = {reader.dtype(name) for name in names}
        if any(not dtype.is_floating_point for dtype in dtypes):
            raise ConversionError(f"{self.folder} holds non-float weights ({sorted(map(str, dtypes))}): quantized "
                                  f"checkpoints cannot be upcycled (allowed: float32, bfloat16, float16)")


def resolve_source(src: str | os.PathLike, revision: str | None = None, config_only: bool = False) -> Path:
    """The local folder of SRC: itself, or the Hub snapshot of the repository `src` (config.json only when
    `config_only`, otherwise config, safetensors weights and tokenizer files)."""
    if Path(src).is_dir():
        return Path(src)
    if not is_hub_id(str(src)):
        raise ConversionError(f"SRC {src} is neither a checkpoint folder nor a Hub repository id (owner/name)")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if config_only:
            return Path(hf_hub_download(str(src), "config.json", revision=revision)).parent
        return Path(snapshot_download(str(src), revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as error:  # network, authentication, missing repository: one line for the command line
        raise ConversionError(f"cannot download {src} from the Hub: {one_line(error)}") from None


def read_dense_source(src: str | os.PathLike, revision: str | None = None) -> DenseSource:
    """Read and check SRC's config (downloading only config.json for a Hub id); refuses unsupported sources."""
    folder = resolve_source(src, revision, config_only=True)
    config_dict = read_config_dict(folder)
    fields = dense_fields(config_dict)
    return DenseSource(folder, str(src), config_dict["model_type"], config_dict, fields, dense_config(fields))


def layer_prefix(layer_idx: int) -> str:
    return f"model.layers.{layer_idx}."
