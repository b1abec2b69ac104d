# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""ShardWriter writes each tensor to disk inside `add`: safetensors files equal to `save_file`'s, the same shard split
as before, only `.partial` files until `finish()`, and no reference kept to what was added."""

import gc
import json
import struct
import weakref

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_moe.conversion.safetensors_io import ShardWriter, parse_size

MODES = ["planned", "streamed"]


def various_tensors() -> dict[str, torch.Tensor]:
    """Every awkward case at once: dtypes of 1 to 8 bytes, sizes that are not multiples of 8 bytes, 0-dim and empty
    tensors, a transpose, a slice, a strided view, and two views of one storage."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=generator)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=generator).to(torch.float16),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 8, 6, generator=generator).transpose(1, 2),
        "model.layers.0.mlp.gate.weight": torch.randn(3, 8, generator=generator).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.bias": torch.randn(5, generator=generator).to(torch.bfloat16),  # 10 bytes
        "model.layers.0.scale": torch.tensor(0.5, dtype=torch.float16),  # 0-dim, 2 bytes
        "model.layers.1.empty": torch.zeros(0, 8),
        "model.layers.1.first_rows": base[1:3],  # shares storage with the next two
        "model.layers.1.every_other_column": base[:, ::2],
        "model.layers.10.norm.weight": torch.ones(3, dtype=torch.float64),
        "model.layers.2.steps": torch.arange(5, dtype=torch.int64),
        "model.layers.2.mask": torch.tensor([True, False, True]),
        "model.layers.2.codes": torch.randint(-5, 5, (7,), dtype=torch.int8, generator=generator),
        "model.norm.weight": torch.randn(8, generator=generator).to(torch.float8_e5m2),
        "lm_head.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
    }


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def expected_split(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """The split rule: in order, a new shard when the next tensor would push the current one past the limit."""
    shards, size = [], 0
    for name, tensor in tensors.items():
        if not shards or (shards[-1] and size + nbytes(tensor) > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(tensor)
    return shards


def write(folder, tensors: dict[str, torch.Tensor], max_shard_size, mode: str) -> list[str]:
    plan = {name: tensor.to("meta") for name, tensor in tensors.items()} if mode == "planned" else None
    writer = ShardWriter(folder, max_shard_size, plan=plan)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    return writer.finish()


def read_header(path) -> tuple[dict, int]:
    """(JSON header, offset of the data) of a safetensors file."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(length)), 8 + length


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensors(path, tensors: dict[str, torch.Tensor]) -> None:
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert sorted(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            loaded = handle.get_tensor(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, name
            assert torch.equal(as_bytes(loaded), as_bytes(tensor)), name


@pytest.mark.parametrize("max_shard_size", [10**6, 200, 64])
def test_planned_shards_are_byte_for_byte_those_of_save_file(tmp_path, max_shard_size):
    tensors = various_tensors()
    files = write(tmp_path, tensors, max_shard_size, "planned")
    split = expected_split(tensors, max_shard_size)
    assert len(files) == len(split)
    for file_name, names in zip(files, split, strict=True):
        save_file({name: tensors[name].contiguous() for name in names}, tmp_path / "reference.safetensors",
                  metadata={"format": "pt"})
        assert (tmp_path / file_name).read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_planned_files_do_not_depend_on_the_order_of_the_adds(tmp_path):
    tensors = various_tensors()
    plan = {name: tensor.to("meta") for name, tensor in tensors.items()}
    in_order, reversed_order = tmp_path / "in_order", tmp_path / "reversed"
    files = write(in_order.mkdir() or in_order, tensors, 200, "planned")
    reversed_order.mkdir()
    writer = ShardWriter(reversed_order, 200, plan=plan)
    for name in reversed(tensors):
        writer.add(name, tensors[name])
    assert writer.finish() == files
    for name in [*files, "model.safetensors.index.json"]:
        assert (in_order / name).read_bytes() == (reversed_order / name).read_bytes()


@pytest.mark.parametrize("max_shard_size", [10**6, 200, 64])
def test_streamed_shards_hold_save_files_header_and_tensors(tmp_path, max_shard_size):
    tensors = various_tensors()
    files = write(tmp_path, tensors, max_shard_size, "streamed")
    for file_name, names in zip(files, expected_split(tensors, max_shard_size), strict=True):
        save_file({name: tensors[name].contiguous() for name in names}, tmp_path / "reference.safetensors",
                  metadata={"format": "pt"})
        header, data_start = read_header(tmp_path / file_name)
        reference, _ = read_header(tmp_path / "reference.safetensors")
        assert header.pop("__metadata__") == reference.pop("__metadata__") == {"format": "pt"}
        assert {name: (entry["dtype"], entry["shape"]) for name, entry in header.items()} == {
            name: (entry["dtype"], entry["shape"]) for name, entry in reference.items()}
        assert data_start % 8 == 0
        for name, entry in header.items():  # readers view the bytes as the dtype: each tensor must be aligned
            assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name
        assert_same_tensors(tmp_path / file_name, {name: tensors[name] for name in names})


def test_streamed_data_is_save_files_when_added_in_its_order(tmp_path):
    """Only the header's padding differs when the tensors come in safetensors' own layout order."""
    tensors = {f"layer.{i}": torch.randn(4, 4) for i in range(5)}
    write(tmp_path, tensors, "5GB", "streamed")
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    header, data_start = read_header(tmp_path / "model.safetensors")
    reference, reference_start = read_header(tmp_path / "reference.safetensors")
    assert header == reference
    assert (tmp_path / "model.safetensors").read_bytes()[data_start:] == (
        tmp_path / "reference.safetensors").read_bytes()[reference_start:]


def test_streamed_header_that_outgrows_its_room_moves_the_data(tmp_path):
    long_names = {f"model.layers.{i}.a_rather_long_tensor_name_to_fill_the_header.weight": torch.randn(2, 4)
                  for i in range(120)}  # ~11 KB of header for 3.8 KB of data: more than the 4 KB of room
    files = write(tmp_path, long_names, 2000, "streamed")
    assert len(files) == 2
    for file_name, names in zip(files, expected_split(long_names, 2000), strict=True):
        assert_same_tensors(tmp_path / file_name, {name: long_names[name] for name in names})


@pytest.mark.parametrize("mode", MODES)
def test_split_rules_and_index(tmp_path, mode):
    tensors = {"a": torch.zeros(100), "b": torch.zeros(100), "huge": torch.zeros(1000), "c": torch.zeros(50),
               "d": torch.zeros(0), "e": torch.zeros(100)}  # 400, 400, 4000, 200, 0 and 400 bytes
    files = write(tmp_path, tensors, 900, mode)
    # a+b fit; huge exceeds the limit alone: its own shard; c, the empty d and e fit in one
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 1350, "total_size": 5400}
    assert index["weight_map"] == {"a": files[0], "b": files[0], "huge": files[1], "c": files[2], "d": files[2],
                                   "e": files[2]}
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*files, "model.safetensors.index.json"])


@pytest.mark.parametrize("mode", MODES)
def test_one_shard_is_model_safetensors_without_index(tmp_path, mode):
    assert write(tmp_path, various_tensors(), "5GB", mode) == ["model.safetensors"]
    assert [path.name for path in tmp_path.iterdir()] == ["model.safetensors"]
    assert_same_tensors(tmp_path / "model.safetensors", various_tensors())


@pytest.mark.parametrize("mode", MODES)
def test_interrupted_writer_leaves_only_partial_files(tmp_path, mode):
    tensors = various_tensors()
    plan = {name: tensor.to("meta") for name, tensor in tensors.items()} if mode == "planned" else None
    writer = ShardWriter(tmp_path, 64, plan=plan)
    with pytest.raises(NotImplementedError):
        for index, (name, tensor) in enumerate(tensors.items()):
            writer.add(name, tensor.to("meta") if index == 9 else tensor)  # a meta tensor has no data to write
    del writer
    gc.collect()
    names = [path.name for path in tmp_path.iterdir()]
    assert len(names) > 1 and all(name.endswith(".safetensors.partial") for name in names)


@pytest.mark.parametrize("mode", MODES)
def test_writer_keeps_no_reference_to_added_tensors(tmp_path, mode):
    """Memory does not grow with the shard: a tensor's memory is written and let go inside `add` (the old writer held
    the whole shard until it was full). The tensors wrap numpy arrays, whose lifetime a weak reference can watch."""
    arrays = {"big": np.random.rand(256, 256).astype(np.float32), "odd": np.random.rand(5).astype(np.float32),
              "view": np.random.rand(16, 16).astype(np.float32)}  # "odd": 20 bytes, written at the shard's end
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    tensors["view"] = tensors["view"][:8, 2:10]  # non-contiguous: copied, then written
    expected = {name: tensor.clone() for name, tensor in tensors.items()}
    plan = {name: tensor.to("meta") for name, tensor in tensors.items()} if mode == "planned" else None
    alive = {name: weakref.ref(array) for name, array in arrays.items()}
    del arrays
    writer = ShardWriter(tmp_path, "5GB", plan=plan)
    for name in list(tensors):
        writer.add(name, tensors.pop(name))
        gc.collect()
        assert alive[name]() is None, name
    writer.finish()
    assert_same_tensors(tmp_path / "model.safetensors", expected)


@pytest.mark.parametrize("mode", MODES)
def test_an_expanded_block_is_written_from_its_memory_once_per_copy(tmp_path, mode, monkeypatch):
    """Experts that are copies of one block arrive as `block.expand(E, ...)`: each copy is written straight from the
    block's memory (no [E, ...] copy is made), and the file holds E real copies, as save_file writes them."""
    import hf_moe.conversion.safetensors_io as io

    block = torch.randn(1, 512, 512)  # 1 MiB per copy
    tensors = {"experts": block.expand(4, -1, -1), "small": torch.arange(12.0).reshape(1, 3, 4).expand(5, -1, -1)}
    start, end = block.data_ptr(), block.data_ptr() + nbytes(block)
    written_from_block = []
    original = io._pwrite

    def pwrite(fd, data, offset):
        address = np.frombuffer(data, dtype=np.uint8).ctypes.data if len(data) else 0
        written_from_block.append(start <= address < end)
        original(fd, data, offset)

    monkeypatch.setattr(io, "_pwrite", pwrite)
    write(tmp_path, tensors, "5GB", mode)
    assert written_from_block.count(True) == 4
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp_path / "reference.safetensors",
              metadata={"format": "pt"})
    if mode == "planned":
        assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert_same_tensors(tmp_path / "model.safetensors", {name: t.contiguous() for name, t in tensors.items()})


def test_plan_is_enforced(tmp_path):
    writer = ShardWriter(tmp_path, "5GB", plan={"a": torch.empty(2, 3, device="meta"), "b": torch.empty(4)})
    with pytest.raises(ValueError, match="'c' is not in the ShardWriter's plan"):
        writer.add("c", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"'a' has the shape \(3, 2\)"):
        writer.add("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="'a' has the shape .* dtype torch.float16"):
        writer.add("a", torch.zeros(2, 3, dtype=torch.float16))
    writer.add("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="1 tensors of the ShardWriter's plan were not added: b"):
        writer.finish()


def test_refusals(tmp_path):
    writer = ShardWriter(tmp_path, "5GB")
    with pytest.raises(ValueError, match="no tensor was added"):
        writer.finish()
    with pytest.raises(ValueError, match="float8_e8m0fnu, which safetensors cannot store"):
        writer.add("scale", torch.zeros(2, dtype=torch.float8_e8m0fnu))
    writer.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' was added twice"):
        writer.add("a", torch.zeros(2))
    assert writer.finish() == ["model.safetensors"]
    with pytest.raises(RuntimeError, match="after finish"):
        writer.add("b", torch.zeros(2))


def test_shard_size_accepts_units(tmp_path):
    assert ShardWriter(tmp_path, "2GB").max_shard_size == parse_size("2GB") == 2 * 10**9
