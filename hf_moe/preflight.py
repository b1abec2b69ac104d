# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Checks of a checkpoint or adapter folder before anything heavy is loaded from it (or written because of it).

    from hf_moe.preflight import check_adapter_folder, check_checkpoint_folder

    config = check_checkpoint_folder("my-llama", "BASE")          # -> the parsed config.json
    adapter_config = check_adapter_folder("runs/mixlora", "ADAPTER")  # -> the parsed adapter_config.json

Each raises `ConversionError` (a ValueError) with one line that starts with `role` and names the file and what is
wrong with it: a missing folder, a missing or unparsable config, weights only in pickle files (refused with the
converters' wording: hf-moe never unpickles), a truncated or corrupt safetensors file, or a model type that needs
remote code the caller did not trust. Nothing is unpickled, and of the weights only the safetensors headers are read.
"""

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .conversion.safetensors_io import (
    FOREIGN_WEIGHT_SUFFIXES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    CheckpointReader,
    ConversionError,
    pickle_refusal,
    read_json_object,
)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# safetensors refuses headers larger than this (and so do we, before reading one)
MAX_HEADER_BYTES = 100_000_000
# the Auto classes hf-moe loads through: their auto_map entries must point at code the folder has
_LOADED_AUTO_CLASSES = ("AutoConfig", "AutoModelForCausalLM")


def check_checkpoint_folder(path: str | os.PathLike, role: str = "model", trust_remote_code: bool = False) -> dict:
    """Check a model checkpoint folder; returns its parsed config.json. `role` starts the message (e.g. "BASE",
    "recipe field `model`"). Checked, in order: the folder exists; config.json is a JSON object; its model_type is
    known to transformers or hf-moe, or (with `trust_remote_code`) its auto_map code is in the folder; the weights are
    safetensors (`model.safetensors` or every shard of `model.safetensors.index.json`), each file's header parses and
    the file is as long as the header says."""
    folder = _existing_folder(path, role, "a checkpoint folder (config.json + safetensors weights)")
    config = _json_object(folder / "config.json", role, "the JSON object save_pretrained writes next to the weights")
    _check_model_type(folder, config, role, trust_remote_code)
    single = folder / SAFE_WEIGHTS_NAME
    if single.is_file() and not (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        _check_safetensors_file(single, role)  # before CheckpointReader opens it: a clearer message than safetensors'
    try:
        CheckpointReader(folder).close()  # the index parses and lists present shards; pickle-only weights refused
    except ConversionError as error:
        raise ConversionError(f"{role}: {error}") from None
    for name in _weight_files(folder):
        _check_safetensors_file(folder / name, role)
    return config


def check_adapter_folder(path: str | os.PathLike, role: str = "adapter") -> dict:
    """Check a PEFT adapter folder; returns its parsed adapter_config.json. Checked: the folder exists,
    adapter_config.json is a JSON object with a `peft_type`, and the weights are an `adapter_model.safetensors` whose
    header parses and whose length covers its data (`adapter_model.bin` and other pickles are refused, not read)."""
    folder = _existing_folder(path, role, "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    config = _json_object(folder / ADAPTER_CONFIG_NAME, role,
                          f"the JSON object a PEFT adapter's save_pretrained writes next to {ADAPTER_WEIGHTS_NAME}")
    if not isinstance(config.get("peft_type"), str):
        raise ConversionError(f"{role}: {folder / ADAPTER_CONFIG_NAME} has no `peft_type`: expected the config a "
                              f"PEFT adapter's save_pretrained writes (e.g. \"peft_type\": \"LORA\")")
    weights = folder / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir()  # not a Trainer checkpoint's optimizer.pt, rng_state.pth
                         if p.name.startswith("adapter_model") and p.name.endswith(FOREIGN_WEIGHT_SUFFIXES))
        raise ConversionError(f"{role}: " + (pickle_refusal(folder, pickles) if pickles else
                                             f"{folder} has no {ADAPTER_WEIGHTS_NAME}"))
    _check_safetensors_file(weights, role)
    return config


def is_hub_repo_id(name: str | os.PathLike) -> bool:
    """True when `name` is not a local path and is a valid Hub repo id (`name` or `namespace/name`): the loaders
    would download it. `path/to/model` (two slashes) or `./model` are not repo ids: they can only be local paths."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(name):
        return False
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------


def _existing_folder(path, role: str, expected: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise ConversionError(f"{role}: {path} does not exist: expected {expected}")
    if not folder.is_dir():
        raise ConversionError(f"{role}: {path} is not a folder: expected {expected}")
    return folder


def _json_object(file: Path, role: str, expected: str) -> dict:
    try:
        return read_json_object(file, expected, expected)
    except ConversionError as error:
        raise ConversionError(f"{role}: {error}") from None


def _check_model_type(folder: Path, config: dict, role: str, trust_remote_code: bool) -> None:
    """A model_type transformers (or hf-moe, registered on import) knows loads with local code, even when the config
    also has an auto_map (our own checkpoints carry one). Any other model_type needs the folder's own code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    file = folder / "config.json"
    if not isinstance(auto_map, dict) or "AutoConfig" not in auto_map:
        if model_type is None:
            raise ConversionError(f"{role}: {file} has no model_type (and no auto_map): expected the config "
                                  f"save_pretrained writes, e.g. \"model_type\": \"llama\"")
        raise ConversionError(f"{role}: {file} has model_type {model_type!r}, which neither transformers nor hf-moe "
                              f"knows, and no auto_map with code to load it: use a newer transformers, or fix "
                              f"model_type")
    if not trust_remote_code:
        raise ConversionError(f"{role}: {file} has model_type {model_type!r}, which needs the code in the folder "
                              f"(auto_map {auto_map['AutoConfig']!r}) to load: pass trust_remote_code=True (the "
                              f"recipe's `trust_remote_code: true`) only if you trust that code")
    for auto_class in _LOADED_AUTO_CLASSES:
        reference = auto_map.get(auto_class)
        if isinstance(reference, str) and "--" not in reference:  # "module.Class" in this folder (not another repo)
            module = folder / (reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
            if not module.is_file():
                raise ConversionError(f"{role}: {file} maps {auto_class} to {reference!r}, but {module} is missing")


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files the loaders read: every shard the index lists, or model.safetensors."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():  # CheckpointReader checked that it parses and that its shards exist
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return [SAFE_WEIGHTS_NAME]


def _check_safetensors_file(file: Path, role: str) -> None:
    """The header (8-byte little-endian length, then JSON) parses and the file holds every byte its tensors' data
    offsets reach, exactly: a download or copy cut short is caught here rather than as an mmap error mid-load."""
    size = file.stat().st_size
    hint = "download or copy it again"
    with open(file, "rb") as handle:
        length_bytes = handle.read(8)
        if len(length_bytes) < 8:
            raise ConversionError(f"{role}: {file} is truncated: {size} bytes, too short for a safetensors header; "
                                  f"{hint}")
        header_length = int.from_bytes(length_bytes, "little")
        if header_length > MAX_HEADER_BYTES:
            raise ConversionError(f"{role}: {file} is not a safetensors file: its first 8 bytes give a header of "
                                  f"{header_length} bytes")
        if 8 + header_length > size:
            raise ConversionError(f"{role}: {file} is truncated: its header alone needs {8 + header_length} bytes, "
                                  f"the file has {size}; {hint}")
        try:
            header = json.loads(handle.read(header_length))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
            data_end = 8 + header_length + max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ConversionError(f"{role}: {file} has a corrupt safetensors header (not the JSON table of tensors "
                                  f"and data offsets); {hint}") from None
    if data_end > size:
        raise ConversionError(f"{role}: {file} is truncated: its tensors' data ends at byte {data_end}, the file has "
                              f"{size} bytes; {hint}")
    if data_end < size:
        raise ConversionError(f"{role}: {file} is corrupt: its tensors' data ends at byte {data_end}, but the file "
                              f"has {size} bytes; {hint}")
    try:  # safetensors' own checks (dtypes, shapes against offsets, overlaps)
        with safe_open(file, framework="pt"):
            pass
    except (OSError, SafetensorError) as error:
        raise ConversionError(f"{role}: {file} is not a readable safetensors file: {error}") from None
