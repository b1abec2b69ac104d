# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint-folder I/O shared by every converter: read lazily, write in shards (published by `hf_moe.outputs`).

- `CheckpointReader`: lazy access to the tensors of a folder holding `model.safetensors`, or shards listed in
  `model.safetensors.index.json`. Names, shapes and dtypes come from the file headers; a tensor's data is read
  only when `get(name)` is called. Pickle-based weights (`.bin`, `.pt`, ...) are never opened.
- `ShardWriter`: `add(name, tensor)` one tensor at a time, written to disk at once (memory does not grow with the
  shard size); a new shard starts when the next tensor would push the current one past `max_shard_size`. `finish()`
  names the shards `model-0000i-of-0000n.safetensors` and writes `model.safetensors.index.json` (or a single
  `model.safetensors` when everything fits in one shard), with the metadata `{"format": "pt"}` that transformers
  writes. Given the plan's shapes up front, its files are byte for byte those of safetensors' `save_file`.
- `copy_side_files(src, dst)`: copies the non-weight files of a checkpoint (tokenizer, generation config, ...), not
  its card and the card's record.
"""

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..cards import PROVENANCE_FILES

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


def pickle_refusal(folder: Path, names: list[str]) -> str:
    """Why hf-moe refuses a folder whose weights are only in the pickle-based files `names`."""
    listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (f"{folder} has weights only in non-safetensors files ({listed}); these are pickles, which hf-moe never "
            f"loads because unpickling can run arbitrary code. Convert them to safetensors first (e.g. load them in a "
            f"trusted environment and call save_pretrained(..., safe_serialization=True))")


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
            return pickle_refusal(self.folder, foreign)
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


# torch dtype -> safetensors header dtype, in the order safetensors' own serializer lays tensors out in a file (then by
# name): widest first, so that every tensor starts at a multiple of its element size.
_HEADER_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
    torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32",
    torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_HEADER_DTYPES)}
# bytes copied at a time: when a shard's data must move to make room for its header, or a strided tensor is written
_MOVE_CHUNK = 64 * 2**20


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _header_dtype(name: str, dtype: torch.dtype) -> str:
    if dtype not in _HEADER_DTYPES:
        raise ValueError(f"tensor {name!r} has the dtype {dtype}, which safetensors cannot store "
                         f"(allowed: {', '.join(str(d).removeprefix('torch.') for d in _HEADER_DTYPES)})")
    return _HEADER_DTYPES[dtype]


def _tensor_bytes(tensor: torch.Tensor):
    """The bytes of `tensor` in row-major order, as memoryviews of consecutive pieces: a view of its memory when it is
    a contiguous CPU tensor (any view, sharing storage or not); a view of each slice along the first dimension when
    those are contiguous and large (an `expand`ed block, for one: written once per slice, never copied whole); else
    contiguous copies of at most `_MOVE_CHUNK` bytes at a time."""
    tensor = tensor.detach().to("cpu")
    if tensor.is_contiguous() or tensor.dim() < 2 or tensor.numel() == 0:
        yield memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        return
    row_bytes = _nbytes(tensor[0])
    if tensor[0].is_contiguous() and row_bytes >= _MOVE_CHUNK // 64:
        for row in tensor:
            yield from _tensor_bytes(row)
        return
    rows = max(1, _MOVE_CHUNK // max(1, row_bytes))
    for start in range(0, len(tensor), rows):
        yield from _tensor_bytes(tensor[start:start + rows].contiguous())


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (one pwrite call writes at most ~2 GiB on Linux)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _move(fd: int, start: int, end: int, distance: int) -> None:
    """Move the bytes [start, end) of a file `distance` bytes further, last chunk first, in bounded memory."""
    position = end
    while position > start:
        size = min(_MOVE_CHUNK, position - start)
        position -= size
        _pwrite(fd, memoryview(os.pread(fd, size, position)), position + distance)


def _header(entries: list[tuple[str, str, tuple, int, int]], length: int | None = None) -> bytes:
    """The 8-byte header length and the JSON header of a safetensors file, as safetensors writes them: compact JSON
    with the metadata {"format": "pt"} first and the tensors in data order, padded with spaces so that the data starts
    at a multiple of 8 bytes, or at `length` (the format allows any trailing whitespace in the header)."""
    header = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, start, end in sorted(entries, key=lambda entry: entry[3:]):
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    padded = len(text) + -len(text) % 8 if length is None else length - 8
    if len(text) > padded:
        raise ValueError(f"a header of {len(text)} bytes does not fit in {padded}")
    return struct.pack("<Q", padded) + text.ljust(padded, b" ")


def _safetensors_order(item: tuple) -> tuple:
    """Sort key of (name, dtype, ...) items in safetensors' layout order: widest dtype first, then by name."""
    return _DTYPE_RANK[item[1]], item[0]


class _Shard:
    """One shard file being written, `shard-0000i.safetensors.partial` until `finish()` renames it."""

    def __init__(self, path: Path, data_start: int, header: bytes = b""):
        self.path, self.data_start, self.header = path, data_start, header  # header: when planned
        self.names: list[str] = []  # in the order they were added
        self.nbytes = 0  # bytes of its tensors
        self.file = None  # opened at the first write

    def fileno(self) -> int:
        if self.file is None:
            self.file = open(self.path, "w+b", buffering=0)  # noqa: SIM115 (closed by close())
        return self.file.fileno()

    def write(self, offset: int, data: memoryview) -> None:
        """Write `data` at `offset` from the start of the tensor data (negative: into the header)."""
        _pwrite(self.fileno(), data, self.data_start + offset)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_size` bytes, splitting them in the order they are
    added (a tensor bigger than `max_shard_size` gets a shard of its own). Call `finish()` once, after the last `add`:
    it gives the shards their final names and writes the index; until then the folder holds only `.partial` files.

    Each tensor's bytes go to disk inside `add`, and the writer keeps no reference to the tensor: memory does not grow
    with the shard size. Two ways to lay a shard out:

    - `plan` given (`{name: tensor with the shape and dtype to be written}`, in the order they will be added; meta
      tensors are enough): every shard's header is known up front, so it is written first and each tensor straight at
      its offset, in safetensors' own layout (widest dtype first, then by name). The files are byte for byte those of
      `safetensors.torch.save_file(..., metadata={"format": "pt"})`, whatever the order of the `add` calls.
    - No plan: the tensors are written in the order they come, after room left for the header. At the shard's end
      the header goes into that room, padded with spaces (which the format allows), or, when it does not fit, the
      data moves to make room (one copy of that shard, after which the room for the next shards doubles). The few
      tensors whose size is not a multiple of 8 bytes are held (copied) until the shard's end and written last, widest
      dtype first, so that every tensor starts at a multiple of its element size, as safetensors' readers require.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 plan: Mapping[str, torch.Tensor] | None = None):
        self.folder = Path(folder)
        self.max_shard_size = parse_size(max_shard_size)
        self._shards: list[_Shard] = []
        self._names: set[str] = set()
        self._total_bytes = 0
        self._total_parameters = 0
        self._finished = False
        # without a plan: room left for a shard's header, and the shard being filled with its tensors' places
        self._header_room = min(max(self.max_shard_size // 8192, 4096), 2**18) // 8 * 8
        self._entries: list[tuple[str, str, tuple, int, int]] = []  # (name, dtype, shape, start, end), written
        self._held: list[tuple[str, torch.dtype, tuple, memoryview]] = []  # sizes not a multiple of 8, written last
        self._data_end = 0
        self._open: _Shard | None = None
        # with a plan: each planned name's shard and place
        self._plan: dict[str, tuple[_Shard, str, tuple, int, int]] | None = None
        self._unwritten: dict[_Shard, int] = {}  # planned tensors not added yet, per open shard
        if plan is not None:
            self._lay_out(plan)

    # -- with a plan --------------------------------------------------------------------------------------------

    def _lay_out(self, plan: Mapping[str, torch.Tensor]) -> None:
        groups: list[list[tuple[str, torch.dtype, tuple]]] = []
        group_bytes = 0
        for name, meta in plan.items():
            _header_dtype(name, meta.dtype)
            if not groups or group_bytes + _nbytes(meta) > self.max_shard_size:
                groups.append([])
                group_bytes = 0
            groups[-1].append((name, meta.dtype, tuple(meta.shape)))
            group_bytes += _nbytes(meta)
        self._plan = {}
        for group in groups:
            entries, position = [], 0
            for name, dtype, shape in sorted(group, key=_safetensors_order):
                size = math.prod(shape) * dtype.itemsize
                entries.append((name, _HEADER_DTYPES[dtype], shape, position, position + size))
                position += size
            header = _header(entries)
            shard = _Shard(self.folder / f"shard-{len(self._shards) + 1:05d}.safetensors.partial", len(header), header)
            shard.nbytes = position
            self._shards.append(shard)
            self._unwritten[shard] = len(group)
            for entry in entries:
                self._plan[entry[0]] = (shard, *entry[1:])

    def _add_planned(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._plan:
            raise ValueError(f"tensor {name!r} is not in the ShardWriter's plan")
        shard, dtype, shape, start, _ = self._plan[name]
        if (_HEADER_DTYPES.get(tensor.dtype), tuple(tensor.shape)) != (dtype, shape):
            raise ValueError(f"tensor {name!r} has the shape {tuple(tensor.shape)} and dtype {tensor.dtype}, but the "
                             f"ShardWriter's plan says {shape} and {SAFETENSORS_DTYPES.get(dtype, dtype)}")
        if not shard.names:
            shard.write(-shard.data_start, memoryview(shard.header))
        for piece in _tensor_bytes(tensor):
            shard.write(start, piece)
            start += len(piece)
        shard.names.append(name)
        self._unwritten[shard] -= 1
        if not self._unwritten[shard]:
            del self._unwritten[shard]
            shard.close()

    # -- without a plan -----------------------------------------------------------------------------------------

    def _add_streamed(self, name: str, tensor: torch.Tensor) -> None:
        size = _nbytes(tensor)
        if self._open is not None and self._open.nbytes + size > self.max_shard_size:
            self._close_streamed()
        if self._open is None:
            self._open = _Shard(self.folder / f"shard-{len(self._shards) + 1:05d}.safetensors.partial",
                                self._header_room)
            self._shards.append(self._open)
        if size % 8:
            self._held.append((name, tensor.dtype, tuple(tensor.shape), memoryview(b"".join(_tensor_bytes(tensor)))))
        else:
            position = self._data_end
            for piece in _tensor_bytes(tensor):
                self._open.write(position, piece)
                position += len(piece)
            self._entries.append((name, _HEADER_DTYPES[tensor.dtype], tuple(tensor.shape), self._data_end,
                                  self._data_end + size))
            self._data_end += size
        self._open.names.append(name)
        self._open.nbytes += size

    def _close_streamed(self) -> None:
        shard, written = self._open, self._data_end
        held = []  # (start, bytes), placed after the data written, widest dtype first
        for name, dtype, shape, data in sorted(self._held, key=_safetensors_order):
            self._entries.append((name, _HEADER_DTYPES[dtype], shape, self._data_end, self._data_end + len(data)))
            held.append((self._data_end, data))
            self._data_end += len(data)
        header = _header(self._entries)
        if len(header) > shard.data_start:  # no room left for it: move the data written so far
            _move(shard.fileno(), shard.data_start, shard.data_start + written, len(header) - shard.data_start)
            shard.data_start = len(header)
            self._header_room = max(self._header_room, 2 * len(header))
        for start, data in held:
            shard.write(start, data)
        shard.write(-shard.data_start, memoryview(_header(self._entries, shard.data_start)))
        shard.close()
        self._open, self._entries, self._held, self._data_end = None, [], [], 0

    # -- both ---------------------------------------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor into the current shard, after closing it when `tensor` would not fit in it."""
        if self._finished:
            raise RuntimeError("ShardWriter.add() called after finish()")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        _header_dtype(name, tensor.dtype)
        if self._plan is not None:
            self._add_planned(name, tensor)
        else:
            self._add_streamed(name, tensor)
        self._names.add(name)
        self._total_bytes += _nbytes(tensor)
        self._total_parameters += tensor.numel()

    def finish(self) -> list[str]:
        """Close the last shard, rename the shards to their final names and write the index (when sharded).

        Returns the weight file names, in order.
        """
        if self._finished:
            raise RuntimeError("ShardWriter.finish() called twice")
        if not self._names:
            raise ValueError("no tensor was added: refusing to write an empty checkpoint")
        if self._plan is not None:
            missing = [name for name in self._plan if name not in self._names]
            if missing:
                raise ValueError(f"{len(missing)} tensors of the ShardWriter's plan were not added: "
                                 f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
        elif self._open is not None:
            self._close_streamed()
        self._finished = True
        count = len(self._shards)
        final_names = (
            [SAFE_WEIGHTS_NAME] if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        for shard, final_name in zip(self._shards, final_names, strict=True):
            os.replace(shard.path, self.folder / final_name)
        if count > 1:
            self._write_index(final_names)
        return final_names

    def _write_index(self, final_names: list[str]) -> None:
        weight_map = {name: final_name for shard, final_name in zip(self._shards, final_names, strict=True)
                      for name in shard.names}
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
    excluded = {*exclude, *PROVENANCE_FILES}
    copied = []
    for path in sorted(Path(src).iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in excluded or is_weight_file(path.name):
            continue
        shutil.copy2(path, Path(dst) / path.name)
        copied.append(path.name)
    return copied
