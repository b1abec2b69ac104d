"""Dense -> MoE upcycling: `hf_moe.conversion.upcycle`, `hf-moe upcycle`, `hf-moe verify`.

Tiny random dense sources (H=32, FFN 96, 3 layers, vocab 128), saved sharded by their own transformers classes:
Llama (tied head, llama3 RoPE), Mistral (sliding window 8 < the 32-token prompts), Qwen2 (q/k/v biases) and Qwen3
(q/k norm, head_dim 16 != H / heads). Weights, norms and biases are all random, so a wrong mapping shows in the logits.
"""

import hashlib
import importlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeForCausalLM,
)

from hf_moe import DeepSeekMoEForCausalLM
from hf_moe.cli import _terminate_as_interrupt, main
from hf_moe.conversion import upcycle
from hf_moe.conversion.partition import clustered_partition, kmeans, random_partition
from hf_moe.conversion.safetensors_io import CheckpointReader, ConversionError
from hf_moe.conversion.upcycle import UpcycleOptions, parse_moe_layers, plan_upcycle
from hf_moe.conversion.verify import VerificationError, verify

VOCAB, HIDDEN, FFN, LAYERS = 128, 32, 96, 3
TOLERANCE = 1e-5
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
              eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
SOURCES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**COMMON, sliding_window=8)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**COMMON)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**COMMON, head_dim=16)),
}
ALL_SOURCES = pytest.mark.parametrize("source_name", sorted(SOURCES))
QUIET = dict(verbose=False, max_shard_size="40KB")

# Exact designs (see the module docstring of hf_moe/conversion/upcycle.py); the verification enforces 1e-5.
EXACT_MODES = {
    "mixtral_copies": dict(arch="mixtral", num_experts=4, top_k=2),
    "deepseek_copies": dict(arch="deepseek", num_experts=4, top_k=2),
    "virtual_groups": dict(arch="deepseek", granularity=4, num_experts=8, top_k=4, partition="random",
                           router_std=1.0),
    "shared_shuffled": dict(arch="deepseek", granularity=4, shared_experts=1, num_experts=6, top_k=6,
                            partition="shuffled", moe_layers="after-1"),
    "zero_router_softmax_scaled": dict(arch="deepseek", granularity=2, num_experts=6, top_k=2, router_init="zeros",
                                       norm_topk_prob=False),
    "grouped_copies": dict(arch="deepseek", granularity=3, shared_experts=1, num_experts=6, top_k=4, router_std=1.0,
                           group_copies=True),
    "kmeans_clustered": dict(arch="deepseek", granularity=3, shared_experts=1, num_experts=4, top_k=2,
                             partition="clustered", router_init="kmeans", calibration_tokens=list(range(3, 100)),
                             calibration_seq_len=40, moe_layers="every-2"),
}
# Deliberately inexact designs: their deviation is measured and recorded, not enforced.
INEXACT_MODES = {
    "noise": dict(arch="deepseek", num_experts=4, noise_std=0.05),
    "drop_upcycling": dict(arch="deepseek", num_experts=4, drop_ratio=0.5),
    "qwen_shuffle_reinit": dict(arch="deepseek", granularity=4, num_experts=8, top_k=4, partition="shuffled",
                                drop_ratio=0.5),
    "softmax_without_renormalisation": dict(arch="deepseek", granularity=2, num_experts=4, top_k=2,
                                            norm_topk_prob=False, router_std=1.0),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """N(0, 0.2) matrices and biases, 1 + N(0, 0.1) norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)


def save_dense(name: str, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    model_class, make_config = SOURCES[name]
    torch.manual_seed(0)
    model = model_class(make_config())
    randomize_(model, seed=sorted(SOURCES).index(name))
    model.to(dtype).save_pretrained(folder, max_shard_size="20KB")  # sharded source
    return folder


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory (ids < VOCAB), so a source can carry tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:()\n=<+-_'"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {name: save_dense(name, root / name) for name in SOURCES}


def tensor_names(folder: Path) -> set[str]:
    with CheckpointReader(folder) as reader:
        return set(reader.keys())


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    with CheckpointReader(folder) as reader:
        return reader.get(name)


def file_digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


def sample_ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model_class, folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model, info = model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()(input_ids=input_ids).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------------------------------------------------------
# Exact modes reproduce the dense model; inexact modes report their deviation
# ---------------------------------------------------------------------------------------------------------------


@ALL_SOURCES
@pytest.mark.parametrize("mode", sorted(EXACT_MODES))
def test_exact_mode_reproduces_the_dense_model(sources, tmp_path, source_name, mode):
    if mode == "mixtral_copies" and source_name in ("qwen2", "qwen3"):
        pytest.skip("hf_moe_mixtral has no q/k/v biases nor q/k norm: refused (test_refusals)")
    out = tmp_path / "moe"
    result = upcycle(sources[source_name], out, **QUIET, **EXACT_MODES[mode])
    assert result.plan.exact and result.out == out
    report = result.verification
    assert report["passed"] and report["max_rel_error"] <= TOLERANCE and report["top1_agreement"] == 1.0
    assert json.loads((out / "verification.json").read_text()) == report


def test_upcycle_shows_no_loading_bars_of_its_checks(sources, tmp_path, capfd):
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()
    upcycle(sources["llama"], tmp_path / "moe", **QUIET, **EXACT_MODES["mixtral_copies"])
    assert "Loading weights" not in capfd.readouterr().err  # verification and the heatmap load two models
    assert logging.is_progress_bar_enabled()  # the user's setting is back


def test_exact_modes_are_checked_independently_of_verify(sources, tmp_path):
    """The verification is not taken on trust: load both models here and compare their logits."""
    out = upcycle(sources["mistral"], tmp_path / "moe", **QUIET, **EXACT_MODES["shared_shuffled"]).out
    input_ids = sample_ids()
    dense = logits_of(MistralForCausalLM, sources["mistral"], input_ids)
    assert relative_error(logits_of(DeepSeekMoEForCausalLM, out, input_ids), dense) <= TOLERANCE


@pytest.mark.parametrize("mode", sorted(INEXACT_MODES))
def test_inexact_mode_records_its_deviation(sources, tmp_path, mode):
    out = tmp_path / "moe"
    result = upcycle(sources["qwen3"], out, **QUIET, **INEXACT_MODES[mode])
    assert not result.plan.exact and result.plan.deviations
    report = json.loads((out / "verification.json").read_text())
    assert report["max_abs_error"] > 0 and report["max_rel_error"] > 1e-4
    assert "passed" not in report and report["exact_mode"] is False
    card = (out / "README.md").read_text()
    assert "deliberately differs" in card and f"{report['max_rel_error']:.3g}" in card


def test_virtual_groups_share_router_rows_and_partition_the_ffn(sources, tmp_path):
    out = upcycle(sources["llama"], tmp_path / "moe", **QUIET, **EXACT_MODES["virtual_groups"]).out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hf_moe_deepseek" and config["routed_scaling_factor"] == 4.0
    assert config["n_group"] == 1 and config["moe_intermediate_size"] == FFN // 4  # the router stays free
    router = read_tensor(out, "model.layers.0.mlp.gate.weight")  # [8, H]: copy c = experts 4c .. 4c+3
    assert torch.equal(router[0], router[3]) and not torch.equal(router[0], router[4])
    gate_up = read_tensor(out, "model.layers.0.mlp.experts.gate_up_proj")  # [8, 2w, H]
    dense_gate = read_tensor(sources["llama"], "model.layers.0.mlp.gate_proj.weight")
    width = FFN // 4
    copy_rows = torch.cat([gate_up[e, :width] for e in range(4)])  # the gate rows of one whole copy
    assert torch.equal(copy_rows[copy_rows[:, 0].argsort()], dense_gate[dense_gate[:, 0].argsort()])


def test_zero_router_keeps_whole_copies_together(sources, tmp_path):
    result = upcycle(sources["qwen2"], tmp_path / "moe", **QUIET, **EXACT_MODES["zero_router_softmax_scaled"])
    config = json.loads((result.out / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["norm_topk_prob"]) == (3, 1, False)
    assert config["routed_scaling_factor"] == 6 * 2 / 2  # E * G_r / k
    assert torch.count_nonzero(read_tensor(result.out, "model.layers.1.mlp.gate.weight")) == 0


def chosen_experts(model: DeepSeekMoEForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """[T, k] experts each router chose, for every sparse layer (a router returns logits, weights, indices and its
    decision)."""
    chosen = []
    hooks = [router.register_forward_hook(lambda module, args, output: chosen.append(output[2]))
             for router in model.model.routers()]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()
    return chosen


@pytest.mark.parametrize("group_copies", [True, False])
def test_grouped_copies_stay_whole_once_the_router_rows_untie(sources, tmp_path, group_copies):
    """3 copies of 2 routed shards, top-4: with `group_copies` every token takes two whole copies however the router
    rows move; without it, rows untied by training mix shards of different copies."""
    options = dict(EXACT_MODES["grouped_copies"], group_copies=group_copies)
    result = upcycle(sources["llama"], tmp_path / "moe", **QUIET, **options)
    assert result.verification["passed"]
    config = json.loads((result.out / "config.json").read_text())
    assert (config["n_group"], config["topk_group"]) == ((3, 2) if group_copies else (1, 1))
    assert ("group-limited to the best 2 of 3 copies (group_copies" in result.plan.describe()) == group_copies
    model = DeepSeekMoEForCausalLM.from_pretrained(result.out).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what training does to the rows: each expert's own update
        for router in model.model.routers():
            router.weight.add_(torch.randn(router.weight.shape, generator=generator))
    whole = []
    for top_k_index in chosen_experts(model, sample_ids()):
        copies = torch.div(top_k_index, 2, rounding_mode="floor").sort(dim=-1).values  # [T, 4]: 2 shards per copy
        whole.append(bool((copies[:, 0::2] == copies[:, 1::2]).all()))
    assert all(whole) == group_copies


def test_drop_upcycling_reinitialises_the_same_neurons_in_gate_up_and_down(sources, tmp_path):
    out = upcycle(sources["llama"], tmp_path / "moe", **QUIET, **INEXACT_MODES["drop_upcycling"]).out
    layer = "model.layers.1.mlp."
    gate, up, down = (read_tensor(sources["llama"], f"{layer}{p}_proj.weight") for p in ("gate", "up", "down"))
    gate_up, down_proj = read_tensor(out, layer + "experts.gate_up_proj"), read_tensor(out, layer + "experts.down_proj")
    dropped_sets = []
    for expert in range(4):
        dropped = {j for j in range(FFN) if not torch.equal(gate_up[expert, j], gate[j])}
        assert dropped == {j for j in range(FFN) if not torch.equal(gate_up[expert, FFN + j], up[j])}
        assert dropped == {j for j in range(FFN) if not torch.equal(down_proj[expert, :, j], down[:, j])}
        assert len(dropped) == FFN // 2
        dropped_sets.append(dropped)
    assert len({frozenset(s) for s in dropped_sets}) == 4  # each expert drops its own neurons


def test_half_precision_source_stays_exact(tmp_path):
    source = save_dense("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    result = upcycle(source, tmp_path / "moe", **QUIET, **EXACT_MODES["virtual_groups"])
    assert result.verification["passed"]
    with CheckpointReader(result.out) as reader:
        assert reader.dtype("model.layers.0.mlp.experts.gate_up_proj") == torch.bfloat16
    assert json.loads((result.out / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------------------------
# Native formats: loaded by transformers' own classes, same logits as the dense model
# ---------------------------------------------------------------------------------------------------------------

NATIVE_CASES = {
    "mixtral": ("llama", MixtralForCausalLM, dict(arch="mixtral", num_experts=4, top_k=2)),
    "mixtral_fine_grained": ("mistral", MixtralForCausalLM,  # routed scale 2 folded into the weights
                             dict(arch="deepseek", granularity=2, num_experts=4, top_k=2)),
    "qwen2_moe": ("qwen2", Qwen2MoeForCausalLM,  # gated shared expert, scale 3 folded as sqrt(3) x sqrt(3)
                  dict(arch="deepseek", granularity=4, shared_experts=1, num_experts=6, top_k=3)),
    "qwen3_moe": ("qwen3", Qwen3MoeForCausalLM,
                  dict(arch="deepseek", granularity=2, num_experts=4, top_k=2, moe_layers="every-2")),
}


@pytest.mark.parametrize("case", sorted(NATIVE_CASES))
def test_native_format_loads_in_transformers_with_dense_logits(sources, tmp_path, case):
    source_name, native_class, options = NATIVE_CASES[case]
    fmt = case.removesuffix("_fine_grained")
    result = upcycle(sources[source_name], tmp_path / "moe", **QUIET, **options, format=fmt)
    assert result.verification["passed"] and result.verification["moe_class"] == native_class.__name__
    config = json.loads((result.out / "config.json").read_text())
    assert config["model_type"] == fmt and "auto_map" not in config
    assert not (result.out / "modeling_hf_moe.py").exists()
    input_ids = sample_ids()
    dense = logits_of(SOURCES[source_name][0], sources[source_name], input_ids)
    assert relative_error(logits_of(native_class, result.out, input_ids), dense) <= TOLERANCE


def test_qwen2_moe_shared_expert_gate_is_one_half_without_a_zero_weight(sources, tmp_path):
    """sigmoid(w . x) = 1/2 exactly (compensated by x2) from one tiny entry, not from w = 0 (0/0 in llama.cpp)."""
    out = upcycle(sources["qwen2"], tmp_path / "moe", **QUIET, **NATIVE_CASES["qwen2_moe"][2], format="qwen2_moe").out
    names = tensor_names(out)
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in names
    assert "model.layers.0.mlp.experts.5.up_proj.weight" in names
    gate = read_tensor(out, "model.layers.0.mlp.shared_expert_gate.weight")
    assert torch.count_nonzero(gate) == 1 and 0 < gate.abs().max() < 2.0**-26


# ---------------------------------------------------------------------------------------------------------------
# Refusals: nothing written
# ---------------------------------------------------------------------------------------------------------------

BAD_OPTIONS = {
    "granularity": dict(arch="deepseek", granularity=5),
    "top_k": dict(arch="deepseek", granularity=4, num_experts=8, top_k=2),
    "drop_ratio": dict(drop_ratio=1.0),
    "shared_experts": dict(arch="deepseek", granularity=2, shared_experts=2),
    "num_experts": dict(arch="deepseek", granularity=4, num_experts=6),
    "noise_std": dict(noise_std=-0.1),
    "moe_layers": dict(arch="deepseek", moe_layers="every-other"),
    "partition": dict(arch="deepseek", partition="clustered", calibration_tokens=[5, 6]),  # G=1: nothing to split
    "calibration_file": dict(arch="deepseek", router_init="kmeans"),
    "calibration_tokens": dict(router_init="kmeans", calibration_tokens=[1, 2, 999]),
    "router_init": dict(arch="deepseek", granularity=2, num_experts=4, router_init="zeros", format="qwen3_moe"),
    "group_copies": dict(arch="deepseek", granularity=2, num_experts=2, group_copies=True),  # one copy: no groups
    "arch": dict(arch="moe"),
    "format": dict(arch="deepseek", format="qwen3_moe"),  # llama has no q/k norm
}


@pytest.mark.parametrize("option", sorted(BAD_OPTIONS))
def test_invalid_option_is_refused_before_writing(sources, tmp_path, option):
    out = tmp_path / "moe"
    with pytest.raises(ConversionError, match=f"`{option}`"):
        upcycle(sources["llama"], out, **QUIET, **BAD_OPTIONS[option])
    assert_nothing_written(out)


@pytest.mark.parametrize(("source_name", "options", "match"), [
    ("qwen2", dict(arch="mixtral"), "q/k/v biases"),
    ("qwen3", dict(arch="mixtral"), "q/k RMSNorm"),
    ("mistral", dict(arch="deepseek", shared_experts=1, granularity=2, num_experts=2, top_k=1, format="qwen2_moe"),
     "sliding_window"),
    ("llama", dict(arch="deepseek", format="qwen2_moe"), "n_shared_experts"),
    ("llama", dict(mystery=1), "unknown upcycle option"),
    ("qwen3", dict(arch="deepseek", granularity=2, num_experts=4, top_k=2, group_copies=True, format="qwen3_moe"),
     "`group_copies`.*qwen3_moe has no group-limited routing"),
])
def test_unrepresentable_design_is_refused(sources, tmp_path, source_name, options, match):
    out = tmp_path / "moe"
    with pytest.raises(ConversionError, match=match):
        upcycle(sources[source_name], out, **QUIET, **options)
    assert_nothing_written(out)


def _fake_source(folder: Path, config: dict, weights: str = "safetensors") -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights == "safetensors":
        from safetensors.torch import save_file
        save_file({"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN)}, folder / "model.safetensors")
    else:
        (folder / "pytorch_model.bin").write_bytes(b"not a pickle that anyone should open")
    return folder


@pytest.mark.parametrize(("model_type", "weights", "match"), [
    ("gemma", "safetensors", "Llama, Mistral, Qwen2 and Qwen3"),
    ("gpt2", "safetensors", "Llama, Mistral, Qwen2 and Qwen3"),
    ("phi3", "safetensors", "Llama, Mistral, Qwen2 and Qwen3"),
    ("deepseek_v3", "safetensors", "Llama, Mistral, Qwen2 and Qwen3"),
    ("mixtral", "safetensors", "hf-moe import"),
    ("llama", "bin", "non-safetensors"),
])
def test_unsupported_source_is_refused_before_writing(tmp_path, model_type, weights, match):
    config = {**COMMON, "model_type": model_type}
    source = _fake_source(tmp_path / "src", config, weights)
    out = tmp_path / "moe"
    with pytest.raises(ConversionError, match=match):
        upcycle(source, out, **QUIET)
    assert_nothing_written(out)


@pytest.mark.parametrize(("config", "match"), [
    (dict(model_type="llama", mlp_bias=True), "mlp_bias"),
    (dict(model_type="llama", attention_bias=True), "attention_bias"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1), "layer_types"),
])
def test_source_features_hf_moe_cannot_compute_are_refused(tmp_path, config, match):
    source = _fake_source(tmp_path / "src", {**COMMON, **config})
    with pytest.raises(ConversionError, match=match):
        upcycle(source, tmp_path / "moe", **QUIET, arch="deepseek")
    assert_nothing_written(tmp_path / "moe")


def test_scale_folded_into_half_precision_weights_is_flagged_inexact(tmp_path):
    source = save_dense("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    options = dict(arch="deepseek", granularity=4, shared_experts=1, num_experts=6, top_k=3, dry_run=True)
    assert plan_upcycle(source, format="qwen2_moe", **options).deviations  # sqrt(3) rounds in bf16
    assert plan_upcycle(source, format="hf_moe", **options).exact  # routed_scaling_factor=3 in the config
    power_of_two = dict(arch="deepseek", granularity=4, shared_experts=2, num_experts=4, top_k=2, dry_run=True)
    assert plan_upcycle(source, format="qwen2_moe", **power_of_two).exact  # x2 on down_proj is exact


def test_existing_output_is_refused_unless_overwrite(sources, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        upcycle(sources["llama"], out, **QUIET, num_experts=2)
    with pytest.raises(FileExistsError, match=r"did not write \(keep.txt\)"):
        upcycle(sources["llama"], out, **QUIET, num_experts=2, overwrite=True, verify=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    upcycle(sources["llama"], out, **QUIET, num_experts=2, verify=False)  # an empty folder is taken
    upcycle(sources["llama"], out, **QUIET, num_experts=4, overwrite=True, verify=False)  # our own output: replaced
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4


# ---------------------------------------------------------------------------------------------------------------
# Atomicity, determinism, output folder
# ---------------------------------------------------------------------------------------------------------------


def test_interrupted_conversion_leaves_nothing(sources, tmp_path, monkeypatch):
    module = importlib.import_module("hf_moe.conversion.upcycle")
    original, calls = module.build_sparse_mlp, []

    def interrupt_on_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "build_sparse_mlp", interrupt_on_second_layer)
    out = tmp_path / "moe"
    with pytest.raises(KeyboardInterrupt):
        upcycle(sources["llama"], out, verbose=False, max_shard_size="10KB")  # some shards were already flushed
    assert_nothing_written(out)


def test_sigterm_becomes_an_interrupt():
    """`kill` during `hf-moe upcycle` unwinds like Ctrl-C, so the temporary folder is removed."""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler
    assert signal.getsignal(signal.SIGTERM) == previous


def test_exact_mode_failing_verification_publishes_nothing(sources, tmp_path, monkeypatch):
    module = importlib.import_module("hf_moe.conversion.upcycle")
    original = module.build_sparse_mlp

    def broken(*args, **kwargs):
        tensors = original(*args, **kwargs)
        tensors["experts.down_proj"] = tensors["experts.down_proj"] * 1.5  # a plausible scaling bug
        return tensors

    monkeypatch.setattr(module, "build_sparse_mlp", broken)
    out = tmp_path / "moe"
    with pytest.raises(VerificationError, match="failed verification: .*ABOVE the tolerance"):
        upcycle(sources["mistral"], out, **QUIET, num_experts=4)
    assert_nothing_written(out)
    assert main(["upcycle", str(sources["mistral"]), str(out), "--num-experts", "4"]) == 1
    assert_nothing_written(out)


def poisoned_copy(folder: Path, destination: Path, value: float) -> Path:
    """A copy of the checkpoint `folder` whose last layer's down projection holds one `value` (NaN or inf)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, destination)
    for weights in sorted(destination.glob("*.safetensors")):
        tensors = load_file(weights)
        name = next((name for name in sorted(tensors) if "layers.1." in name and "down_proj" in name), None)
        if name is not None:
            tensors[name].view(-1)[3] = value
            save_file(tensors, weights, metadata={"format": "pt"})
            return destination
    raise AssertionError(f"no down projection of layer 1 in {folder}")


def test_non_finite_logits_fail_verification_naming_the_side(sources, tmp_path, capsys):
    dense = sources["llama"]
    value = float("nan")
    bad_dense = poisoned_copy(dense, tmp_path / "bad-dense", value)
    out = tmp_path / "moe"
    with pytest.raises(VerificationError, match="non-finite .* logits in DENSE"):  # "exact" on NaN: refused
        upcycle(bad_dense, out, **QUIET, num_experts=2)
    assert_nothing_written(out)
    upcycle(dense, out, **QUIET, num_experts=2)
    report = verify(bad_dense, out, tolerance=1e-5)
    assert report["passed"] is False and report["non_finite_logits"]["DENSE"] > 0
    assert report["non_finite_logits"]["MOE"] == 0
    assert verify(bad_dense, out)["passed"] is False  # no tolerance given: still a failure
    infinite = verify(poisoned_copy(dense, tmp_path / "inf-dense", float("inf")), out, tolerance=1e-5)
    assert infinite["passed"] is False and infinite["non_finite_logits"]["DENSE"] > 0
    bad_moe = poisoned_copy(out, tmp_path / "bad-moe", value)
    assert main(["verify", str(dense), str(bad_moe), "--tolerance", "1e-5"]) == 1
    printed = capsys.readouterr().out
    assert "FAILED: non-finite (NaN or inf) logits in MOE" in printed and "DENSE (" not in printed
    assert main(["export", str(bad_moe), str(tmp_path / "native"), "--format", "mixtral"]) == 1
    assert "non-finite (NaN or inf) logits in DENSE" in capsys.readouterr().err  # the export's source is the reference
    assert_nothing_written(tmp_path / "native")


RANDOM_EVERYWHERE = dict(arch="deepseek", granularity=4, shared_experts=1, num_experts=6, top_k=3,
                         partition="clustered", router_init="kmeans", calibration_tokens=list(range(5, 69)),
                         noise_std=0.01, drop_ratio=0.25)


def test_same_seed_gives_identical_files(sources, tmp_path):
    first = upcycle(sources["qwen3"], tmp_path / "a", **QUIET, **RANDOM_EVERYWHERE, seed=3).out
    second = upcycle(sources["qwen3"], tmp_path / "b", **QUIET, **RANDOM_EVERYWHERE, seed=3).out
    assert len(list(first.glob("model-*.safetensors"))) > 1
    assert file_digests(first) == file_digests(second)
    other = file_digests(upcycle(sources["qwen3"], tmp_path / "c", **QUIET, **RANDOM_EVERYWHERE, seed=4).out)
    differing = {name for name, digest in file_digests(first).items() if other.get(name) != digest}
    assert "model.safetensors.index.json" not in differing  # same tensors, same shards
    assert any(name.endswith(".safetensors") for name in differing) and "upcycle.yaml" in differing


def test_output_folder_carries_config_tokenizer_code_and_card(tmp_path):
    source = save_dense("llama", tmp_path / "src")
    char_tokenizer().save_pretrained(source)
    (source / "README.md").write_text("# the dense model's card: not ours\n")
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "moe"
    result = upcycle(source, out, **QUIET, arch="deepseek", granularity=2, num_experts=4, partition="clustered",
                     calibration_file=str(calibration), seed=7)
    assert result.plan.num_calibration_tokens == len(calibration.read_text())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "modeling_hf_moe.py", "configuration_hf_moe.py", "routing.py", "README.md", "verification.json",
                 "upcycle.yaml", "model.safetensors.index.json"):
        assert (out / name).is_file(), name
    assert "sentences" in result.verification["prompts"]  # verified on the tokenizer's text, not random ids
    card = (out / "README.md").read_text()
    assert f"`{source.name}`" in card and str(source) not in card  # its name, never a local path
    assert "seed: 7" in card and "partition: clustered" in card
    assert "max relative error" in card and "exact" in card
    recorded = yaml.safe_load((out / "upcycle.yaml").read_text())
    assert recorded["src"] == str(source) and recorded["top_k"] == 2 and recorded["seed"] == 7
    assert set(recorded) == {"src", *(f.name for f in UpcycleOptions.__dataclass_fields__.values())} - {
        "dry_run", "overwrite"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is DeepSeekMoEForCausalLM


def test_layer_selection():
    assert parse_moe_layers("all", 3) == ["sparse"] * 3
    assert parse_moe_layers("every-2", 4) == ["dense", "sparse", "dense", "sparse"]
    assert parse_moe_layers("after-1", 3) == ["dense", "sparse", "sparse"]
    assert parse_moe_layers("0,2", 3) == ["sparse", "dense", "sparse"]
    assert parse_moe_layers([1], 3) == ["dense", "sparse", "dense"]
    for bad in ("every-0", "after-3", "3", "some"):
        with pytest.raises(ConversionError, match="moe_layers"):
            parse_moe_layers(bad, 3)


def test_partitions_are_balanced_and_cover_every_neuron():
    generator = torch.Generator().manual_seed(0)
    assert sorted(random_partition(12, 3, generator).flatten().tolist()) == list(range(12))
    profiles = torch.rand(24, 50, generator=generator)
    profiles[:8] += 2 * torch.arange(50) / 50  # a group of neurons that fire together, strongly
    partition = clustered_partition(profiles, 3, generator)
    assert partition.shape == (3, 8) and sorted(partition.flatten().tolist()) == list(range(24))
    assert set(partition[0].tolist()) == set(range(8))  # the most active cluster comes first
    points = torch.randn(40, 6, generator=generator)
    centroids, _ = kmeans(points, 4, torch.Generator().manual_seed(1))
    again, _ = kmeans(points, 4, torch.Generator().manual_seed(1))
    assert torch.equal(centroids, again) and torch.allclose(centroids.norm(dim=1), torch.ones(4))
    _, balanced = kmeans(points, 4, torch.Generator().manual_seed(1), balanced=True)
    assert torch.bincount(balanced).tolist() == [10] * 4


# ---------------------------------------------------------------------------------------------------------------
# Command line: dry run, YAML, verify, help
# ---------------------------------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_writes_nothing(sources, tmp_path, capsys):
    out = tmp_path / "moe"
    code = main(["upcycle", str(sources["qwen3"]), str(out), "--arch", "deepseek", "--granularity", "4",
                 "--shared-experts", "2", "--num-experts", "6", "--top-k", "4", "--moe-layers", "every-2",
                 "--dry-run"])
    assert code == 0
    assert_nothing_written(out)
    printed = capsys.readouterr().out
    for text in ("hf-moe upcycle plan", "parameters  total", "active per token", "file size", "[6, 32]",
                 "[6, 48, 32]", "[32, 48]", "dense FFN [96, 32]", "dry run, nothing was written"):
        assert text in printed, text
    plan = plan_upcycle(sources["qwen3"], arch="deepseek", granularity=4, shared_experts=2, num_experts=6, top_k=4,
                        moe_layers="every-2")
    total, active, _ = plan.parameter_counts()
    assert f"{total:,}" in printed and f"{active:,}" in printed and active < total


def test_yaml_config_drives_the_same_result_as_flags(sources, tmp_path):
    options = dict(arch="deepseek", granularity=4, num_experts=8, top_k=4, partition="random", seed=5)
    config = tmp_path / "upcycle.yaml"
    config.write_text(yaml.safe_dump({"src": str(sources["qwen2"]), "out": str(tmp_path / "from_yaml"),
                                      "max-shard-size": "40KB", "no_verify": True, **options, "seed": 9}))
    assert main(["upcycle", "--config", str(config), "--seed", "5"]) == 0  # the flag wins over the file
    flags = ["--arch", "deepseek", "--granularity", "4", "--num-experts", "8", "--top-k", "4", "--partition",
             "random", "--seed", "5", "--max-shard-size", "40KB", "--no-verify"]
    assert main(["upcycle", str(sources["qwen2"]), str(tmp_path / "from_flags"), *flags]) == 0
    from_yaml, from_flags = file_digests(tmp_path / "from_yaml"), file_digests(tmp_path / "from_flags")
    assert from_yaml == from_flags
    api = upcycle(sources["qwen2"], tmp_path / "from_api", **options, max_shard_size="40KB", verify=False,
                  verbose=False).out
    assert file_digests(api) == from_yaml
    # the saved upcycle.yaml reproduces the model
    assert main(["upcycle", "--config", str(api / "upcycle.yaml"), str(tmp_path / "again"), "--no-verify"]) == 0
    assert file_digests(tmp_path / "again") == from_yaml


def test_cli_reports_refusals_in_one_line(sources, tmp_path, capsys):
    assert main(["upcycle", str(sources["llama"]), str(tmp_path / "moe"), "--drop-ratio", "1.5"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--drop-ratio" in error and "[0.0, 1.0)" in error
    assert_nothing_written(tmp_path / "moe")


def test_verify_command(sources, tmp_path, capsys):
    exact = upcycle(sources["mistral"], tmp_path / "exact", **QUIET, num_experts=2, verify=False).out
    noisy = upcycle(sources["mistral"], tmp_path / "noisy", **QUIET, num_experts=2, noise_std=0.1, verify=False).out
    report_file = tmp_path / "report.json"
    assert main(["verify", str(sources["mistral"]), str(exact), "--tolerance", "1e-5", "--output",
                 str(report_file)]) == 0
    assert json.loads(report_file.read_text())["passed"] is True
    assert "max relative error" in capsys.readouterr().out
    assert main(["verify", str(sources["mistral"]), str(noisy), "--tolerance", "1e-5"]) == 1
    assert verify(sources["mistral"], noisy)["max_rel_error"] > 1e-4
    assert main(["verify", str(sources["mistral"]), str(sources["qwen2"])]) == 0  # any two models, same vocab


@pytest.mark.parametrize("case", ["hf_moe", "qwen2_moe"])
def test_layerwise_verification_agrees_with_full_verification(sources, tmp_path, case):
    """The bounded-memory verification (one layer at a time, native names mapped back) gives the same verdict."""
    options = NATIVE_CASES["qwen2_moe"][2] if case == "qwen2_moe" else EXACT_MODES["kmeans_clustered"]
    out = upcycle(sources["qwen2"], tmp_path / "moe", **QUIET, **options, format=case, verify_mode="layerwise").out
    layerwise = json.loads((out / "verification.json").read_text())
    full = verify(sources["qwen2"], out, mode="full")
    assert layerwise["mode"] == "layerwise" and full["mode"] == "full" and layerwise["passed"]
    assert layerwise["max_rel_error"] <= TOLERANCE and full["max_rel_error"] <= TOLERANCE
    noisy = upcycle(sources["qwen2"], tmp_path / "noisy", **QUIET, **options, format=case, noise_std=0.05,
                    verify=False).out
    by_layer, whole = verify(sources["qwen2"], noisy, mode="layerwise"), verify(sources["qwen2"], noisy, mode="full")
    assert by_layer["max_abs_error"] == pytest.approx(whole["max_abs_error"], rel=1e-3)


@pytest.mark.slow
def test_memory_benchmark_smoke(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "upcycle_memory.py"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--work", str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "peak RSS" in result.stdout and not list(tmp_path.iterdir())  # the checkpoints were deleted


@pytest.mark.parametrize("command", ["upcycle", "verify"])
def test_help_documents_every_option_with_its_default(command, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    if command == "upcycle":
        for flag in ("--arch", "--num-experts", "--top-k", "--granularity", "--shared-experts", "--noise-std",
                     "--drop-ratio", "--router-init", "--moe-layers", "--format", "--seed", "--dry-run",
                     "--no-verify", "--overwrite", "--config", "--calibration-file", "--calibration-tokens"):
            assert flag in text, flag
        for default in ("(default: mixtral)", "(default: 8)", "(default: auto)", "(default: normal)",
                        "(default: all)", "(default: hf_moe)", "(default: 0.02)", "(default: off)", "(default: on)"):
            assert default in text, default
    else:
        assert "DENSE" in text and "--tolerance" in text and "(default: 3)" in text
