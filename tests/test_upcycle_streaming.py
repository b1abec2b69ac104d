"""How the converters write: every shard laid out from the plan before its first byte (so each file is the one
safetensors' `save_file` writes), experts that are copies of one block never materialized, and the source's dtypes
kept tensor by tensor."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from test_upcycle import save_dense

from hf_moe.conversion import safetensors_io, upcycle
from hf_moe.conversion.native import export_native, import_native
from hf_moe.conversion.upcycle import build_sparse_mlp, plan_upcycle

FAST = {"verbose": False, "verify": False, "max_shard_size": "40KB"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_dense("llama", tmp_path_factory.mktemp("dense") / "llama")


@pytest.fixture
def plans(monkeypatch) -> list:
    """The plans the converters hand their ShardWriter."""
    seen, original = [], safetensors_io.ShardWriter.__init__

    def init(self, folder, max_shard_size=safetensors_io.DEFAULT_MAX_SHARD_SIZE, plan=None):
        seen.append(plan)
        original(self, folder, max_shard_size, plan=plan)

    monkeypatch.setattr(safetensors_io.ShardWriter, "__init__", init)
    return seen


def assert_files_of_save_file(folder) -> None:
    shards = sorted(folder.glob("*.safetensors"))
    assert shards
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        assert shard.read_bytes() == save(tensors, metadata={"format": "pt"}), shard.name


@pytest.mark.parametrize("options", [
    {"num_experts": 4},
    {"arch": "deepseek", "granularity": 2, "shared_experts": 1, "num_experts": 2, "top_k": 1, "format": "qwen2_moe"},
    {"arch": "deepseek", "granularity": 4, "num_experts": 8, "top_k": 4, "partition": "random"},
], ids=["mixtral copies", "qwen2_moe names, untied head", "virtual groups"])
def test_upcycled_shards_are_laid_out_first_as_save_file_lays_them_out(llama, tmp_path, plans, options):
    out = upcycle(llama, tmp_path / "moe", **FAST, **options).out
    assert len(plans) == 1 and plans[0] is not None
    assert len(list(out.glob("*.safetensors"))) > 1
    assert_files_of_save_file(out)


def test_import_and_export_shards_are_laid_out_first(llama, tmp_path, plans):
    ours = upcycle(llama, tmp_path / "moe", **FAST, num_experts=4).out
    exported = export_native(ours, tmp_path / "mixtral", "mixtral", max_shard_size="40KB", verify=False, verbose=False)
    imported = import_native(exported, tmp_path / "ours", max_shard_size="40KB", verify=False, verbose=False)
    assert len(plans) == 3 and all(plan is not None for plan in plans)
    for folder in (exported, imported):
        assert_files_of_save_file(folder)
    for file in ours.glob("*.safetensors"):  # the round trip gives back the same files
        assert (imported / file.name).read_bytes() == file.read_bytes()


def test_experts_that_are_copies_are_one_block_seen_e_times(llama):
    layer = "model.layers.0.mlp."
    weights = {name: tensor for path in llama.glob("*.safetensors") for name, tensor in load_file(path).items()}
    ffn = [weights[f"{layer}{projection}_proj.weight"] for projection in ("gate", "up", "down")]
    copies = build_sparse_mlp(plan_upcycle(llama, num_experts=4), 0, *ffn)
    assert copies["experts.gate_up_proj"].stride(0) == copies["experts.down_proj"].stride(0) == 0
    assert torch.equal(copies["experts.gate_up_proj"][3], torch.cat(ffn[:2]))
    noisy = build_sparse_mlp(plan_upcycle(llama, num_experts=4, noise_std=0.1), 0, *ffn)
    assert noisy["experts.gate_up_proj"].stride(0) > 0  # different experts: E blocks
    assert not torch.equal(noisy["experts.gate_up_proj"][0], noisy["experts.gate_up_proj"][1])


def test_each_written_tensor_keeps_the_dtype_it_has_in_the_source(llama, tmp_path):
    """The plan gives every tensor its dtype before it exists: a source whose norms are float32 next to bfloat16
    weights keeps them float32, and the MoE block of a layer takes the dtype of that layer's dense FFN."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in llama.iterdir():
        if path.suffix == ".safetensors":
            tensors = {name: tensor if "norm" in name else tensor.to(torch.bfloat16)
                       for name, tensor in load_file(path).items()}
            save_file(tensors, mixed / path.name, metadata={"format": "pt"})
        else:
            (mixed / path.name).write_bytes(path.read_bytes())
    out = upcycle(mixed, tmp_path / "moe", **FAST, arch="deepseek", granularity=2, shared_experts=1,
                  num_experts=2, top_k=1).out
    dtypes = {}
    for path in out.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            dtypes.update({name: handle.get_slice(name).get_dtype() for name in handle.keys()})  # noqa: SIM118
    assert dtypes["model.norm.weight"] == dtypes["model.layers.1.post_attention_layernorm.weight"] == "F32"
    assert {dtypes[f"model.layers.1.mlp.{name}"] for name in (
        "gate.weight", "experts.gate_up_proj", "experts.down_proj", "shared_experts.down_proj.weight")} == {"BF16"}
