# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""GGUF files (llama.cpp's format) as dense sources: upcycle, verify and the quickstart read them through a
temporary safetensors checkpoint.

A GGUF source is a `.gguf` file, or a folder without config.json that holds exactly one. Its header is checked first
with the `gguf` package's reader, without dequantizing anything: `general.architecture` must be a dense family that
hf-moe upcycles and every tensor type one that transformers can dequantize. Then transformers reads the file
(`from_pretrained(..., gguf_file=...)`, which dequantizes every tensor to fp32) and the model, its config (without the
`quantization_config` transformers attaches) and its tokenizer are saved as an ordinary fp32 safetensors checkpoint in
a temporary folder, which the streaming pipeline reads like any other source and which is removed afterwards, on
errors and interrupts too. Memory is one whole fp32 model (not one layer at a time, as for a safetensors source), and
the temporary folder needs the model's fp32 size on disk (in the system's temporary folder: TMPDIR).
"""

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..cards import quiet_loading
from .safetensors_io import ConversionError

# `general.architecture` values that transformers reads into the dense families of `dense.SOURCE_CLASSES`
# (llama.cpp writes Mistral models as `llama`; transformers tells them apart by `general.name`).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
INSTALL_HINT = 'reading GGUF files needs the gguf package: pip install "hf-moe[gguf]"'


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConversionError(INSTALL_HINT) from None
    return gguf


def supported_tensor_types() -> tuple[str, ...]:
    """The GGML tensor types that the installed `gguf` package dequantizes (what transformers calls to read them)."""
    gguf = _gguf()
    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}
    return tuple(kind.name for kind in gguf.GGMLQuantizationType if kind in readable)


def find_gguf_file(src: str | os.PathLike) -> Path | None:
    """The GGUF file SRC names: SRC itself when it is a `.gguf` file, the single `.gguf` file of a folder that has
    no config.json, else None (not a GGUF source). A folder with several is refused."""
    path = Path(src)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(file for file in path.iterdir() if file.is_file() and file.suffix.lower() == ".gguf")
    if len(found) > 1:
        raise ConversionError(f"{path} holds {len(found)} GGUF files ({', '.join(file.name for file in found)}): "
                              f"give the file to read")
    return found[0] if found else None


def check_gguf_file(path: Path) -> str:
    """Refuse a GGUF file that cannot be upcycled, from its header alone; returns `general.architecture`."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as error:  # truncated file, bad magic, unknown tensor type
        raise ConversionError(f"{path} is not a readable GGUF file: {' '.join(str(error).split())}") from None
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture not in GGUF_ARCHITECTURES:
        raise ConversionError(f"{path}: `general.architecture`={architecture!r} cannot be upcycled (allowed: "
                              f"{', '.join(GGUF_ARCHITECTURES)})")
    allowed = supported_tensor_types()
    unreadable = sorted({tensor.tensor_type.name for tensor in reader.tensors} - set(allowed))
    if unreadable:
        raise ConversionError(f"{path}: tensor type {', '.join(unreadable)} cannot be dequantized (allowed: "
                              f"{', '.join(allowed)})")
    return architecture


def write_dense_checkpoint(path: Path, folder: Path) -> None:
    """Dequantize the GGUF file `path` to fp32 and save it at `folder` as config.json, model.safetensors and the
    tokenizer files (one whole model in memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # transformers' notes about the GGUF keys that it does not map
    try:
        with quiet_loading():  # (the dequantization keeps its progress bar: the slow step on a big model)
            gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            # transformers refuses to save a model read from GGUF: its weights go into a plain model of its class
            config = gguf_model.config
            del config.quantization_config
            with torch.device("meta"):
                model = type(gguf_model)(config)
            model.load_state_dict(gguf_model.state_dict(), assign=True)
            model.tie_weights()
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    finally:
        logging.set_verbosity(verbosity)


@contextmanager
def dense_source_folder(src: str | os.PathLike) -> Iterator[str | os.PathLike]:
    """SRC unchanged, or for a GGUF source the temporary fp32 checkpoint of it (checked first; removed on exit)."""
    path = find_gguf_file(src)
    if path is None:
        yield src
        return
    check_gguf_file(path)
    with tempfile.TemporaryDirectory(prefix="hf-moe-gguf-") as folder:
        write_dense_checkpoint(path, Path(folder))
        yield Path(folder)
