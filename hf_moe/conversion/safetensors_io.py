# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint-folder I/O shared by every converter: read lazily, write in shards (published by `hf_moe.outputs`).

- `CheckpointReader`: lazy access to the tensors of a folder holding `model.safetensors`, or shards listed in
  `model.safetensors.index.json`. Names, shapes and dtypes come from the file headers; a tensor's data is read
  only when `get(name)` is called. Pickle-based weights (`.bin`, `.pt`, ...) are never opened.
- `ShardWriter`: `add(name, tensor)` one tensor at a time; a shard is flushed to disk when the next tensor would
  push it past `max_shard_size`. `finish()` names the shards `model-0000i-of-0000n.safetensors` and writes
  `model.safetensors.index.json` (or a single `model.safetensors` when everything fits in one shard), with the
  metadata `{"format": "pt"}` that transformers writes.
- `copy_side_files(src, dst)`: copies the non-weight files of a checkpoint (tokenizer, generation config, ...), not
  its card and the card's record.
"""

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# Weight files of other serialisations. We never open them: most are pickles, which can run arbitrary code.
FOREIGN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf", ".npz")
# Index files that list weights (ours are rewritten, the others belong to weights we do not copy).
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json", ".pt.index.json")

# safetensors header dtype -> torch dtype
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ConversionError(ValueError):
    """Invalid input to a conversion. The message is one line naming the file or field, its value and what is
    allowed; the command line prints it without a traceback."""


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string such as "5GB", "500MB", "1.5GiB", "20KB" (decimal and binary units)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise ConversionError(
                f"max_shard_size={size!r} is invalid: use a number of bytes or a number with a unit "
                f"(KB, MB, GB, KiB, MiB, GiB), e.g. '5GB' or '500MB'"
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ConversionError(f"max_shard_size={size!r} is invalid: must be > 0 bytes")
    return value


def natural_key(name: str) -> list:
    """Sort key that orders `layers.10` after `layers.9` and `experts.10` after `experts.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_config_dict(folder: str | os.PathLike) -> dict:
    """The parsed `config.json` of a checkpoint folder."""
    return read_json_object(Path(folder) / "config.json", "a checkpoint folder (config.json + weights)",
                            "the JSON object save_pretrained writes next to the weights")


def read_json_object(file: Path, folder_expected: str, expected: str) -> dict:
    """The JSON object in `file`; a one-line `ConversionError` naming the file otherwise: `folder_expected` when the
    file is missing, `expected` when it does not parse or holds another kind of JSON value."""
    if not file.is_file():
        raise ConversionError(f"{file.parent} has no {file.name}: expected {folder_expected}")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{file} is not valid JSON ({error}): expected {expected}") from None
    if not isinstance(value, dict):
        kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
        raise ConversionError(f"{file} holds a JSON {kinds.get(type(value), type(value).__name__)}: expected "
                              f"{expected}")
    return value


class CheckpointReader:
    """Lazy, read-only access to the tensors of a safetensors checkpoint folder.

    The folder holds either `model.safetensors`, or shards plus `model.safetensors.index.json`
    (`{"weight_map": {tensor name: shard file name}}`). Use as a context manager, or call `close()`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"{folder} is not a folder: expected a checkpoint folder")
        self._handles = {}  # file name -> safe_open handle
        self._file_of = self._locate_tensors()  # tensor name -> file name

    def _locate_tensors(self) -> dict[str, str]:
        index_path = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text(encoding="utf-8"))
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConversionError(f"{index_path} is not valid JSON: {error}") from None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no `weight_map`: expected {{tensor name: shard file}}")
            for file_name in sorted(set(weight_map.values())):
                if not (self.folder / file_name).is_file():
                    raise ConversionError(
                        f"{index_path} lists the shard {file_name}, which is missing from {self.folder}"
                    )
            return dict(weight_map)
        if (self.folder / SAFE_WEIGHTS_NAME).is_file():
            return dict.fromkeys(self._open(SAFE_WEIGHTS_NAME).keys(), SAFE_WEIGHTS_NAME)
        raise ConversionError(self._missing_weights_message())

    def _open(self, file_name: str):
        """The (cached) safe_open handle of one weight file."""
        if file_name not in self._handles:
            try:
                self._handles[file_name] = safe_open(self.folder / file_name, framework="pt")
            except (OSError, SafetensorError) as error:
                raise ConversionError(f"cannot read {self.folder / file_name}: {error}") from None
        return self._handles[file_name]

    def _missing_weights_message(self) -> str:
        foreign = sorted(p.name for p in self.folder.iterdir() if p.name.endswith(FOREIGN_WEIGHT_SUFFIXES))
        if foreign:
            return (
                f"{self.folder} has weights only in non-safetensors files ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); these are pickles, which hf-moe never loads because "
                f"unpickling can run arbitrary code. Convert them to safetensors first (e.g. load them in a trusted "
                f"environment and call save_pretrained(..., safe_serialization=True))"
            )
        return f"{self.folder} has no {SAFE_WEIGHTS_NAME} and no {SAFE_WEIGHTS_INDEX_NAME}"

    def _handle(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.folder}")
        return self._open(self._file_of[name])

    def keys(self) -> list[str]:
        """All tensor names, in natural order (layer 2 before layer 10)."""
        return sorted(self._file_of, key=natural_key)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header, without reading the data."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Dtype from the file header, without reading the data."""
        header_dtype = self._handle(name).get_slice(name).get_dtype()
        if header_dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {name!r} has the dtype {header_dtype}, which hf-moe does not handle")
        return SAFETENSORS_DTYPES[header_dtype]

    def meta(self, name: str) -> torch.Tensor:
        """A tensor on the meta device with the shape and dtype of `name` (no data), to check a plan's shapes."""
        return torch.empty(self.shape(name), dtype=self.dtype(name), device="meta")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU)."""
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _owned_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a contiguous tensor that owns its whole storage (safetensors refuses views of shared storage)."""
    tensor = tensor.detach()
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_size` bytes, in the order they are added.

    A tensor bigger than `max_shard_size` gets a shard of its own. Call `finish()` once, after the last `add`: it
    gives the shards their final names and writes the index. Only the tensors of the shard being filled are held
    in memory.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
        self.folder = Path(folder)
        self.max_shard_size = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._names: set[str] = set()
        self._total_bytes = 0
        self._total_parameters = 0
        self._finished = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes the current shard first when `tensor` would not fit in it."""
        if self._finished:
            raise RuntimeError("ShardWriter.add() called after finish()")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_size:
            self._flush()
        self._pending[name] = _owned_contiguous(tensor)
        self._pending_bytes += size
        self._total_bytes += size
        self._total_parameters += tensor.numel()

    def _flush(self) -> None:
        temporary_name = f"shard-{len(self._shards) + 1:05d}.safetensors.partial"
        save_file(self._pending, self.folder / temporary_name, metadata={"format": "pt"})
        self._shards.append((temporary_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush the last shard, rename the shards to their final names and write the index (when sharded).

        Returns the weight file names, in order.
        """
        if self._finished:
            raise RuntimeError("ShardWriter.finish() called twice")
        if self._pending:
            self._flush()
        if not self._shards:
            raise ValueError("no tensor was added: refusing to write an empty checkpoint")
        self._finished = True
        count = len(self._shards)
        final_names = (
            [SAFE_WEIGHTS_NAME] if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        for (temporary_name, _), final_name in zip(self._shards, final_names, strict=True):
            os.replace(self.folder / temporary_name, self.folder / final_name)
        if count > 1:
            self._write_index(final_names)
        return final_names

    def _write_index(self, final_names: list[str]) -> None:
        weight_map = {
            name: final_name for (_, names), final_name in zip(self._shards, final_names, strict=True) for name in names
        }
        index = {
            "metadata": {"total_parameters": self._total_parameters, "total_size": self._total_bytes},
            "weight_map": dict(sorted(weight_map.items(), key=lambda item: natural_key(item[0]))),
        }
        (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def is_weight_file(name: str) -> bool:
    """True for weight files and weight indexes (safetensors or any other serialisation)."""
    return name.endswith((".safetensors", *FOREIGN_WEIGHT_SUFFIXES, *WEIGHT_INDEX_SUFFIXES))


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Copy the top-level non-weight files of `src` (tokenizer, generation config, ...) into `dst`.

    Skips weight files and indexes, hidden files, sub-folders, the card and its record (`cards.PROVENANCE_FILES`)
    and the names in `exclude`. Returns the copied names.
    """
    from ..cards import PROVENANCE_FILES

    excluded = {*exclude, *PROVENANCE_FILES}
    copied = []
    for path in sorted(Path(src).iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in excluded or is_weight_file(path.name):
            continue
        shutil.copy2(path, Path(dst) / path.name)
        copied.append(path.name)
    return copied
