# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Does a converted checkpoint compute what its dense source computes? Logits of both, in fp32, compared.

The dense model is loaded with transformers' own class (LlamaForCausalLM, ...), the converted one with whatever
class its config names (ours, or MixtralForCausalLM / Qwen2MoeForCausalLM / Qwen3MoeForCausalLM for native
formats), both with the same attention implementation, and run on the same few prompts: fixed sentences when the
dense folder has a tokenizer, otherwise seeded random token ids. Reported:

    max_abs_error   max |logits_moe - logits_dense|
    max_rel_error   max_abs_error / max |logits_dense|   (the "relative logit error" that exact modes bound)
    top1_agreement  fraction of positions whose arg-max token is the same

Two modes, chosen by `mode="auto"` from the models' fp32 size and the available memory:
- `full`: both models are loaded whole, one after the other, with their own classes (transformers' LlamaForCausalLM
  for the dense model, ours or MixtralForCausalLM / Qwen2MoeForCausalLM / Qwen3MoeForCausalLM for the converted
  one); peak memory is the larger model in fp32.
- `layerwise`: both checkpoints are run one decoder layer at a time by hf_moe's own decoder layer
  (`LayerwiseModel`, native names mapped back to ours), so memory stays near one layer in fp32 whatever the size.
  It checks the conversion of the weights; the full mode also checks that the classes compute the same thing.
"""

import copy
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.utils import logging

from ..cards import VERIFICATION_FILE, format_report, quiet_loading  # noqa: F401 (format_report: importable from here too)
from ..modeling.configuration_hf_moe import MoEDecoderConfig
from ..modeling.modeling_hf_moe import MoEDecoderLayer, MoERMSNorm, MoERotaryEmbedding
from .dense import SUPPORTED_SOURCES, dense_config, dense_fields
from .gguf import dense_source_folder
from .layout import (
    EXPORT_FORMATS,
    OUR_CONFIG_CLASSES,
    load_our_config,
    native_config_to_ours,
    our_tensor_shapes,
    tensor_plan,
)
from .safetensors_io import CheckpointReader, ConversionError, read_config_dict

logger = logging.get_logger(__name__)

DEFAULT_TOLERANCE = 1e-5
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1905, Albert Einstein published four papers that changed physics, starting with",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
MODES = ("auto", "full", "layerwise")
NUM_PROMPTS, PROMPT_LENGTH = 3, 32  # default prompts: at most 3 sentences, or random ids of this length
# `auto` loads whole models when the larger one takes at most this share of the machine's memory in fp32
FULL_MODE_MEMORY_SHARE = 0.4
HEAD_ROWS = 8192  # vocabulary rows of the head converted to fp32 at a time by the layer-by-layer mode


class VerificationError(RuntimeError):
    """A conversion that must be exact is not (or its output does not load): the output is not published."""


def verification_prompts(dense: Path, vocab_size: int, num_prompts: int = NUM_PROMPTS,
                         prompt_length: int = PROMPT_LENGTH, seed: int = 0):
    """(list of [1, S] id tensors, description). Tokenizer prompts when `dense` has a tokenizer, else random ids."""
    if any((dense / name).is_file() for name in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(dense)
            prompts = [tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS[:num_prompts]]
            if all(0 < ids.shape[1] and int(ids.max()) < vocab_size for ids in prompts):
                return prompts, f"{len(prompts)} fixed sentences, tokenized with the source's tokenizer"
        except Exception as error:  # a tokenizer that needs a missing package, or a broken file: fall back
            logger.warning(f"cannot use the tokenizer of {dense} ({type(error).__name__}: {error}); "
                           f"verifying on random token ids")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_prompts, prompt_length), generator=generator)
    return list(ids.split(1)), f"{num_prompts} x {prompt_length} random token ids (seed {seed})"


@torch.no_grad()
def _logits(folder: Path, prompts: list[torch.Tensor], attn_implementation: str,
            moe: bool) -> tuple[torch.Tensor, str]:
    """Logits of every prompt, concatenated [sum of S, V], and the class name; `moe` also checks the loading and
    uses the readable eager experts loop."""
    extra = {"experts_implementation": "eager"} if moe else {}
    with quiet_loading():
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=attn_implementation, output_loading_info=True, **extra
        )
    if moe and (info["missing_keys"] or info["unexpected_keys"] or info.get("mismatched_keys")):
        raise VerificationError(
            f"{folder} does not load cleanly into {type(model).__name__}: missing {sorted(info['missing_keys'])[:4]}, "
            f"unexpected {sorted(info['unexpected_keys'])[:4]}, mismatched {list(info.get('mismatched_keys', []))[:4]}"
        )
    model.eval()
    logits = torch.cat([model(input_ids=ids).logits[0] for ids in prompts])
    name, large = type(model).__name__, model.num_parameters() > 10**8
    del model
    if large:  # free it before the other model is loaded (a full collection is slow in big processes)
        gc.collect()
    return logits, name


class LayerwiseModel:
    """A decoder run one layer at a time with hf_moe's decoder layer, in fp32 with eager attention and experts.

    Holds only the hidden states of the prompts (`token_chunks`, one [S] id tensor each) between layers; each layer
    is built on the meta device and given its weights by `run_layer`, then dropped. Serves the calibration passes of
    `upcycle` (router inputs and FFN activations of the dense source) and the layer-by-layer verification.
    """

    def __init__(self, config: MoEDecoderConfig, embed_tokens: torch.Tensor, token_chunks: list[torch.Tensor]):
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = "eager"
        self.config._experts_implementation = "eager"
        self.hidden = [embed_tokens[ids][None].float() for ids in token_chunks]  # [1, S, H] each
        rotary = MoERotaryEmbedding(self.config)
        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        self.positions, self.rotary, self.masks = [], [], []
        for hidden in self.hidden:
            positions = torch.arange(hidden.shape[1])[None]
            self.positions.append(positions)
            self.rotary.append(rotary(hidden, positions))
            self.masks.append(mask_function(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                            cache=None, position_ids=positions,
                                            allow_is_causal_skip=False))

    @torch.no_grad()
    def run_layer(self, layer_idx: int, tensors: dict[str, torch.Tensor], capture: bool = False,
                  activations: bool = False):
        """Advance the hidden states through layer `layer_idx` (`tensors`: its weights, names relative to
        `model.layers.N.`). With `capture`, returns the layer's router inputs (post-attention RMSNorm output) [N, H]
        and, with `activations`, its dense FFN activations act(gate) * up [N, I] (else None)."""
        with torch.device("meta"):
            layer = MoEDecoderLayer(self.config, layer_idx)
        layer.load_state_dict({name: tensor.float() for name, tensor in tensors.items()}, strict=True, assign=True)
        inputs, acts, hooks = [], [], []
        if capture:
            hooks.append(layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: inputs.append(out[0])))
        if activations:
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: acts.append(args[0][0])))
        for i, hidden in enumerate(self.hidden):
            self.hidden[i] = layer(hidden, position_embeddings=self.rotary[i], attention_mask=self.masks[i],
                                   position_ids=self.positions[i])
        for hook in hooks:
            hook.remove()
        return (torch.cat(inputs) if capture else None), (torch.cat(acts) if activations else None)

    @torch.no_grad()
    def logits(self, norm_weight: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm and head on every prompt, concatenated: [sum of S, V]."""
        norm = MoERMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight.data = norm_weight.float()
        hidden = torch.cat([norm(hidden)[0] for hidden in self.hidden])
        # the head in fp32 a block of vocabulary rows at a time, never all of it
        return torch.cat([F.linear(hidden, rows.float()) for rows in lm_head.split(HEAD_ROWS)], dim=1)


def _our_view(folder: Path) -> tuple[MoEDecoderConfig, Callable[[CheckpointReader, str], torch.Tensor], str]:
    """(our config, a reader of our tensor names, a description) for a dense source, one of our checkpoints or a
    native MoE export."""
    config_dict = read_config_dict(folder)
    model_type = config_dict.get("model_type")
    if model_type in SUPPORTED_SOURCES:
        return dense_config(dense_fields(config_dict)), CheckpointReader.get, f"{model_type} (dense)"
    if model_type in OUR_CONFIG_CLASSES:
        return load_our_config(folder), CheckpointReader.get, model_type
    if model_type in EXPORT_FORMATS:
        config = native_config_to_ours(config_dict)
        mappings = {mapping.ours: mapping for mapping in tensor_plan(config, model_type)}

        def read(reader: CheckpointReader, name: str) -> torch.Tensor:
            return mappings[name].to_ours([reader.get(native) for native in mappings[name].native])

        return config, read, f"{model_type} (native names)"
    raise ConversionError(f"`model_type`={model_type!r} in {folder} cannot be verified layer by layer (allowed: "
                          f"{', '.join((*SUPPORTED_SOURCES, *OUR_CONFIG_CLASSES, *EXPORT_FORMATS))})")


def _layerwise_logits(folder: Path, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, str]:
    config, read, description = _our_view(folder)
    with CheckpointReader(folder) as reader:
        model = LayerwiseModel(config, read(reader, "model.embed_tokens.weight"), [ids[0] for ids in prompts])
        names = list(our_tensor_shapes(config))

        def fp32(name: str) -> torch.Tensor:
            tensor = read(reader, name).float()
            reader.close()  # the memory-mapped pages just read are released: the layer is held once, in fp32
            return tensor

        for layer_idx in range(config.num_hidden_layers):
            prefix = f"model.layers.{layer_idx}."
            model.run_layer(layer_idx, {name.removeprefix(prefix): fp32(name) for name in names
                                        if name.startswith(prefix)})
        tied = config.tie_word_embeddings and "lm_head.weight" not in reader
        head = read(reader, "model.embed_tokens.weight" if tied else "lm_head.weight")
        logits = model.logits(read(reader, "model.norm.weight"), head)
    return logits, f"hf_moe layer by layer: {description}"


def _fp32_bytes(folder: Path) -> int:
    with CheckpointReader(folder) as reader:
        return 4 * sum(int(torch.Size(reader.shape(name)).numel()) for name in reader.keys())


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_mode(dense: Path, moe: Path) -> str:
    """`full` when the larger model takes at most 40% of the machine's memory in fp32, else `layerwise`. (Total, not
    currently free, memory: the choice, recorded in verification.json, is the same on every run on one machine.)"""
    largest = max(_fp32_bytes(dense), _fp32_bytes(moe))
    return "full" if largest <= FULL_MODE_MEMORY_SHARE * _physical_memory() else "layerwise"


def verify(
    dense: str | os.PathLike, moe: str | os.PathLike, num_prompts: int = NUM_PROMPTS,
    prompt_length: int = PROMPT_LENGTH, seed: int = 0,
    tolerance: float | None = None, attn_implementation: str = "eager", mode: str = "auto",
) -> dict:
    """Compare the fp32 logits of the converted checkpoint `moe` with those of its dense source `dense`.

    `mode`: `full` (whole models, their own classes), `layerwise` (bounded memory, hf_moe's decoder layer) or
    `auto` (full when it fits in memory). Returns a dict with `max_abs_error`, `max_rel_error`, `top1_agreement`,
    the prompts, the mode, both classes, and, when `tolerance` is given, `passed` (max_rel_error <= tolerance).
    Non-finite logits on either side fail it whatever the tolerance: `passed` is False and `non_finite_logits`
    counts them per side (DENSE, MOE).
    Raises `ConversionError` when a folder is not a readable safetensors checkpoint (`hf_moe.preflight`) or the
    vocabularies differ, and `VerificationError`
    when `moe` does not load cleanly.
    `dense` may also be a GGUF file, or a folder holding one: the comparison is then with its dequantized (fp32)
    weights, read through a temporary checkpoint (`hf_moe.conversion.gguf`).
    """
    with dense_source_folder(dense) as dense_folder:
        return _verify(Path(dense_folder), Path(moe), num_prompts, prompt_length, seed, tolerance, attn_implementation,
                       mode)


def _verify(dense: Path, moe: Path, num_prompts: int, prompt_length: int, seed: int, tolerance: float | None,
            attn_implementation: str, mode: str) -> dict:
    from ..preflight import check_checkpoint_folder

    if mode not in MODES:
        raise ConversionError(f"`mode`={mode!r} is invalid (allowed: {', '.join(MODES)})")
    configs = {role: check_checkpoint_folder(path, role) for role, path in (("DENSE", dense), ("MOE", moe))}
    vocab_sizes = {role: config.get("vocab_size") for role, config in configs.items()}
    if vocab_sizes["DENSE"] != vocab_sizes["MOE"] or not vocab_sizes["DENSE"]:
        raise ConversionError(f"DENSE and MOE must share one vocabulary (vocab_size {vocab_sizes['DENSE']} vs "
                              f"{vocab_sizes['MOE']})")
    prompts, description = verification_prompts(dense, vocab_sizes["DENSE"], num_prompts, prompt_length, seed)
    if mode == "auto":
        mode = choose_mode(dense, moe)
    if mode == "full":
        reference, dense_class = _logits(dense, prompts, attn_implementation, moe=False)
        converted, moe_class = _logits(moe, prompts, attn_implementation, moe=True)
    else:
        attn_implementation = "eager"
        reference, dense_class = _layerwise_logits(dense, prompts)
        converted, moe_class = _layerwise_logits(moe, prompts)
    non_finite = {side: int((~logits.isfinite()).sum()) for side, logits in (("DENSE", reference), ("MOE", converted))}
    max_abs_error = (converted - reference).abs().max().item()
    scale = reference.abs().max().item()
    report = {
        "max_abs_error": max_abs_error,
        "max_rel_error": max_abs_error / scale if scale > 0 else float(max_abs_error > 0),
        "top1_agreement": (converted.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        "max_abs_logit": scale,
        "num_positions": int(reference.shape[0]),
        "prompts": description,
        "mode": mode,
        "dtype": "float32",
        "attn_implementation": attn_implementation,
        "dense_class": dense_class,
        "moe_class": moe_class,
    }
    if any(non_finite.values()):  # NaN compares false with everything: no error figure can pass such logits
        report["non_finite_logits"] = non_finite
        report["max_rel_error"] = float("nan")
        report["passed"] = False
    if tolerance is not None:
        report["tolerance"] = tolerance
        report["passed"] = report.get("passed", True) and report["max_rel_error"] <= tolerance
    return report


def write_verification(report: dict, folder: str | os.PathLike) -> Path:
    path = Path(folder) / VERIFICATION_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
