"""Exact interop with native MoE checkpoints: `hf_moe.conversion.native`, `hf-moe import`, `hf-moe export`.

Tiny random models (H=32, 3 layers, 4 experts). Every native model has random routers (not zeros) and norms that
are not all ones, so a wrong router, norm or expert mapping changes the logits.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig, MixtralMoEForCausalLM
from hf_moe.cli import main
from hf_moe.conversion.native import (
    ConversionError,
    deepseek_layer_rule,
    export_native,
    fuse_gate_up,
    import_native,
    native_config_to_ours,
    our_tensor_shapes,
    qwen_mlp_layer_types,
    qwen_sparse_rule,
    split_gate_up,
    tensor_plan,
)
from hf_moe.conversion.safetensors_io import CheckpointReader, ShardWriter, parse_size

VOCAB, HIDDEN, LAYERS, EXPERTS = 96, 32, 3, 4
TOLERANCE = 1e-5
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)

# format -> (native class, native config, max_shard_size of the native save)
NATIVE_CASES = {
    "mixtral": (
        MixtralForCausalLM,
        lambda: MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=EXPERTS, num_experts_per_tok=2),
        "20KB",  # sharded source
    ),
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        lambda: Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                               shared_expert_intermediate_size=40, num_experts=EXPERTS, num_experts_per_tok=2,
                               decoder_sparse_step=2, qkv_bias=True, norm_topk_prob=False),  # layers 0, 2 dense
        "5GB",
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        lambda: Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=48, moe_intermediate_size=16,
                               num_experts=EXPERTS, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                               tie_word_embeddings=True),  # head_dim != H / heads, one dense layer, tied head
        "5GB",
    ),
}
OUR_CLASSES = {"mixtral": MixtralMoEForCausalLM, "qwen2_moe": DeepSeekMoEForCausalLM,
               "qwen3_moe": DeepSeekMoEForCausalLM}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: N(0, 0.2) for matrices, routers and biases; 1 + N(0, 0.1) for norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)


def sample_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding on the second row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs).logits


def load(cls, folder):
    model, info = cls.from_pretrained(folder, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def tensor_names(folder: Path) -> set[str]:
    with CheckpointReader(folder) as reader:
        return set(reader.keys())


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


def build_native_checkpoint(fmt: str, root: Path) -> tuple[torch.nn.Module, Path, Path]:
    """(native model with eager attention, its save_pretrained folder, our imported folder)."""
    native_class, make_config, shard_size = NATIVE_CASES[fmt]
    torch.manual_seed(0)
    model = native_class(make_config())
    randomize_(model, seed=sorted(NATIVE_CASES).index(fmt))
    model.set_attn_implementation("eager")
    model.save_pretrained(root / "native", max_shard_size=shard_size)
    (root / "native" / "tokenizer.json").write_text('{"version": "1.0"}')  # a side file to carry over
    import_native(root / "native", root / "ours")
    return model.eval(), root / "native", root / "ours"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`checkpoints(fmt)` -> `build_native_checkpoint(fmt)`, built once per module and format."""
    built = {}

    def get(fmt: str):
        if fmt not in built:
            built[fmt] = build_native_checkpoint(fmt, tmp_path_factory.mktemp(fmt))
        return built[fmt]

    return get


ALL_FORMATS = pytest.mark.parametrize("fmt", sorted(NATIVE_CASES))


# ---------------------------------------------------------------------------------------------------------------
# Native round trips
# ---------------------------------------------------------------------------------------------------------------


@ALL_FORMATS
def test_native_sources_are_realistic(checkpoints, fmt):
    model, native_dir, _ = checkpoints(fmt)
    routers = [module.weight for name, module in model.named_modules() if name.endswith("mlp.gate")]
    assert routers and all(router.abs().min() > 0 for router in routers)
    norms = [param for name, param in model.named_parameters() if "norm" in name]
    assert all(not torch.equal(norm, torch.ones_like(norm)) for norm in norms)
    if fmt == "mixtral":
        assert (native_dir / "model.safetensors.index.json").exists()
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in tensor_names(native_dir)


@ALL_FORMATS
def test_import_matches_native_logits(checkpoints, fmt):
    model, _, ours_dir = checkpoints(fmt)
    ours = load(AutoModelForCausalLM, ours_dir)
    assert type(ours) is OUR_CLASSES[fmt]
    inputs = sample_inputs()
    difference = (logits_of(ours, inputs) - logits_of(model, inputs)).abs().max().item()
    assert difference <= TOLERANCE


@ALL_FORMATS
def test_import_writes_our_layout_and_side_files(checkpoints, fmt):
    model, _, ours_dir = checkpoints(fmt)
    config = json.loads((ours_dir / "config.json").read_text())
    assert config["model_type"] == OUR_CLASSES[fmt].config_class.model_type
    assert config["architectures"] == [OUR_CLASSES[fmt].__name__]
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_hf_moe.{OUR_CLASSES[fmt].__name__}"
    for name in ("modeling_hf_moe.py", "configuration_hf_moe.py", "routing.py", "generation_config.json",
                 "tokenizer.json"):
        assert (ours_dir / name).is_file(), name
    names = tensor_names(ours_dir)
    sparse_layer = next(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
    assert f"model.layers.{sparse_layer}.mlp.experts.gate_up_proj" in names
    assert not any(".experts.0." in name for name in names)
    if fmt == "qwen2_moe":
        assert config["mlp_layer_types"] == ["dense", "sparse", "dense"]
        assert config["qkv_bias"] and config["shared_expert_gate"] and config["n_shared_experts"] == 1
    if fmt == "qwen3_moe":
        assert config["qk_norm"] and config["head_dim"] == 16 and config["mlp_layer_types"][0] == "dense"


@ALL_FORMATS
def test_export_round_trip_matches_native(checkpoints, fmt, tmp_path):
    model, native_dir, ours_dir = checkpoints(fmt)
    native_class = NATIVE_CASES[fmt][0]
    out = export_native(ours_dir, tmp_path / "exported", fmt, max_shard_size="30KB")
    assert tensor_names(out) == tensor_names(native_dir)  # the original per-expert names, nothing else
    assert not (out / "modeling_hf_moe.py").exists() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == fmt and config["architectures"] == [native_class.__name__]
    assert config["rope_parameters"]["rope_theta"] == model.config.rope_parameters["rope_theta"]
    experts_key = "num_local_experts" if fmt == "mixtral" else "num_experts"
    assert config[experts_key] == EXPERTS
    exported = load(native_class, out)
    inputs = sample_inputs(seed=1)
    difference = (logits_of(exported, inputs) - logits_of(model, inputs)).abs().max().item()
    assert difference <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# DeepSeek-MoE 16B remote-code layout (no transformers class: written by hand)
# ---------------------------------------------------------------------------------------------------------------

DEEPSEEK_CONFIG = {
    "architectures": ["DeepseekForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
    "model_type": "deepseek", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": EXPERTS, "n_shared_experts": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001,
    "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "pretraining_tp": 1,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}


def deepseek_tensors(seed: int = 7) -> dict[str, torch.Tensor]:
    """Random weights under the DeepSeek-MoE 16B key names (layer 0 dense, layers 1-2 sparse)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, norm=False):
        noise = torch.randn(shape, generator=generator)
        return 1 + 0.1 * noise if norm else 0.2 * noise

    def mlp(prefix, width):
        return {f"{prefix}gate_proj.weight": rand(width, HIDDEN), f"{prefix}up_proj.weight": rand(width, HIDDEN),
                f"{prefix}down_proj.weight": rand(HIDDEN, width)}

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": rand(HIDDEN, norm=True),
               "lm_head.weight": rand(VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        tensors.update({f"{p}self_attn.{name}_proj.weight": rand(HIDDEN, HIDDEN) for name in "qkvo"})
        tensors[p + "input_layernorm.weight"] = rand(HIDDEN, norm=True)
        tensors[p + "post_attention_layernorm.weight"] = rand(HIDDEN, norm=True)
        if layer == 0:
            tensors.update(mlp(p + "mlp.", 48))
            continue
        tensors[p + "mlp.gate.weight"] = rand(EXPERTS, HIDDEN)
        for expert in range(EXPERTS):
            tensors.update(mlp(f"{p}mlp.experts.{expert}.", 16))
        tensors.update(mlp(p + "mlp.shared_experts.", 2 * 16))
    return tensors


def write_deepseek_checkpoint(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_deepseek.py").write_text("# remote code of the source: must not be copied\n")
    (folder / "configuration_deepseek.py").write_text("# remote code of the source: must not be copied\n")
    (folder / "tokenizer_config.json").write_text("{}")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def deepseek_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    tensors = deepseek_tensors()
    source = write_deepseek_checkpoint(root / "native", DEEPSEEK_CONFIG, tensors)
    import_native(source, root / "ours", max_shard_size="40KB")  # our output sharded too
    return tensors, source, root / "ours"


def swiglu(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def reference_deepseek_moe(x: torch.Tensor, tensors: dict, layer: int) -> torch.Tensor:
    """DeepSeek-MoE's MoE block from the raw tensors, token by token: softmax router, top-k, no renormalisation,
    shared experts added unscaled. x: [T, H] -> [T, H]."""
    p = f"model.layers.{layer}.mlp."
    scores = F.linear(x, tensors[p + "gate.weight"]).softmax(dim=-1)
    weights, chosen = scores.topk(DEEPSEEK_CONFIG["num_experts_per_tok"], dim=-1)
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for weight, expert in zip(weights[token], chosen[token].tolist(), strict=True):
            e = f"{p}experts.{expert}."
            out[token] += weight * swiglu(x[token], tensors[e + "gate_proj.weight"], tensors[e + "up_proj.weight"],
                                          tensors[e + "down_proj.weight"])
    shared = f"{p}shared_experts."
    return out + swiglu(x, tensors[shared + "gate_proj.weight"], tensors[shared + "up_proj.weight"],
                        tensors[shared + "down_proj.weight"])


def test_deepseek_import_moe_block_matches_reference(deepseek_checkpoint):
    tensors, _, ours_dir = deepseek_checkpoint
    ours = load(AutoModelForCausalLM, ours_dir)
    assert type(ours) is DeepSeekMoEForCausalLM
    assert ours.config.mlp_layer_types == ["dense", "sparse", "sparse"]
    x = torch.randn(13, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for layer in (1, 2):
            block_output = ours.model.layers[layer].mlp(x[None])[0]
            assert (block_output - reference_deepseek_moe(x, tensors, layer)).abs().max().item() <= TOLERANCE


def test_deepseek_import_matches_directly_built_model(deepseek_checkpoint):
    tensors, _, ours_dir = deepseek_checkpoint
    config = DeepSeekMoEConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=EXPERTS, n_shared_experts=2,
        num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=False, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    state_dict = {name: t for name, t in tensors.items() if ".mlp.experts." not in name}
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp."
        expert = [{proj: tensors[f"{p}experts.{e}.{proj}_proj.weight"] for proj in ("gate", "up", "down")}
                  for e in range(EXPERTS)]
        state_dict[p + "experts.gate_up_proj"] = torch.stack([torch.cat([w["gate"], w["up"]]) for w in expert])
        state_dict[p + "experts.down_proj"] = torch.stack([w["down"] for w in expert])
    direct = DeepSeekMoEForCausalLM(config)
    direct.load_state_dict(state_dict, strict=True)
    direct.set_attn_implementation("eager")
    imported = load(AutoModelForCausalLM, ours_dir)
    inputs = sample_inputs(seed=2)
    assert (logits_of(imported, inputs) - logits_of(direct, inputs)).abs().max().item() <= TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# Load-time conversion: per-expert checkpoints load into our fused experts (`import hf_moe` registers it)
# ---------------------------------------------------------------------------------------------------------------


def test_our_folders_stay_fused_and_load_from_the_per_expert_layout(deepseek_checkpoint, tmp_path):
    loaded = load(AutoModelForCausalLM, deepseek_checkpoint[2])
    ours = DeepSeekMoEForCausalLM(loaded.config)  # built, not loaded: transformers reverts only what it converted
    ours.load_state_dict(loaded.state_dict())
    ours.save_pretrained(tmp_path / "fused")
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensor_names(tmp_path / "fused")
    ours.save_pretrained(tmp_path / "per_expert", save_original_format=True)
    names = tensor_names(tmp_path / "per_expert")
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names and not any("gate_up_proj" in n for n in names)
    inputs = sample_inputs(seed=4)
    reloaded = load(AutoModelForCausalLM, tmp_path / "per_expert")
    assert torch.equal(logits_of(reloaded, inputs), logits_of(ours, inputs))


def test_deepseek_remote_code_layout_loads_directly_with_our_config(deepseek_checkpoint):
    """What `hf-moe import` writes, `from_pretrained` now also reads in place, given the converted config."""
    _, source, ours_dir = deepseek_checkpoint
    config = native_config_to_ours(json.loads((source / "config.json").read_text()))
    direct, info = DeepSeekMoEForCausalLM.from_pretrained(source, config=config, attn_implementation="eager",
                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = sample_inputs(seed=5)
    assert torch.equal(logits_of(direct, inputs), logits_of(load(AutoModelForCausalLM, ours_dir), inputs))


def test_mixtral_checkpoint_loads_directly_with_our_config(checkpoints):
    native, source, _ = checkpoints("mixtral")
    config = native_config_to_ours(json.loads((source / "config.json").read_text()))
    direct, info = MixtralMoEForCausalLM.from_pretrained(source, config=config, attn_implementation="eager",
                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = sample_inputs(seed=6)
    assert (logits_of(direct, inputs) - logits_of(native, inputs)).abs().max().item() <= TOLERANCE


def test_deepseek_v3_checkpoint_loads_directly_with_our_config(tmp_path):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    native = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=EXPERTS, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5))
    randomize_(native, seed=7)
    native.save_pretrained(tmp_path)
    config = native_config_to_ours(json.loads((tmp_path / "config.json").read_text()))
    direct, info = DeepSeekMoEForCausalLM.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = sample_inputs(seed=7)
    assert (logits_of(direct, inputs) - logits_of(native, inputs)).abs().max().item() <= TOLERANCE


def test_deepseek_import_files(deepseek_checkpoint):
    _, _, ours_dir = deepseek_checkpoint
    assert (ours_dir / "model.safetensors.index.json").is_file()
    assert not (ours_dir / "modeling_deepseek.py").exists() and not (ours_dir / "configuration_deepseek.py").exists()
    assert (ours_dir / "tokenizer_config.json").is_file() and (ours_dir / "generation_config.json").is_file()
    config = json.loads((ours_dir / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 32 and config["router_aux_loss_coef"] == 0.001
    assert config["first_k_dense_replace"] == 1 and config["moe_layer_freq"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Refusals: nothing is written
# ---------------------------------------------------------------------------------------------------------------


def _edited_copy(source: Path, destination: Path, **config_changes) -> Path:
    destination.mkdir()
    for path in source.iterdir():
        destination.joinpath(path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config.update(config_changes)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


@pytest.mark.parametrize(
    ("fmt", "target", "expected"),
    [
        ("qwen3_moe", "mixtral", ["`qk_norm`=True", "`mlp_layer_types`=['dense', 'sparse', 'sparse']"]),
        ("qwen2_moe", "mixtral", ["`n_shared_experts`=1", "`qkv_bias`=True", "`norm_topk_prob`=False"]),
        ("qwen2_moe", "qwen3_moe", ["`n_shared_experts`=1", "`qkv_bias`=True", "`qk_norm`=False"]),
        ("mixtral", "qwen2_moe", ["`n_shared_experts`=0", "`shared_expert_gate`=False"]),
        ("mixtral", "llama", ["`format`='llama'", "allowed: mixtral, qwen2_moe, qwen3_moe"]),
    ],
)
def test_export_refuses_unrepresentable_configs(checkpoints, tmp_path, fmt, target, expected):
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as error:
        export_native(checkpoints(fmt)[2], out, target)
    for text in expected:
        assert text in str(error.value)
    assert_nothing_written(out)


def test_export_refuses_routed_scaling(deepseek_checkpoint, tmp_path):
    source = _edited_copy(deepseek_checkpoint[2], tmp_path / "scaled", routed_scaling_factor=2.5)
    with pytest.raises(ConversionError, match=r"`routed_scaling_factor`=2\.5: .*allowed: 1\.0"):
        export_native(source, tmp_path / "out", "qwen3_moe")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"scoring_func": "sigmoid"}, r"`scoring_func`='sigmoid' is not supported: allowed: 'softmax'"),
        ({"topk_method": "group_limited_greedy"}, r"`topk_method`='group_limited_greedy'"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, r"`rope_scaling`="),
        ({"model_type": "llama"}, r"`model_type`='llama' cannot be imported \(allowed: mixtral, qwen2_moe"),
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok"),
        ({"quantization_config": {"quant_method": "fp8"}}, r"`quantization_config` is set"),
    ],
)
def test_import_refuses_unsupported_sources(tmp_path, changes, expected):
    source = write_deepseek_checkpoint(tmp_path / "src", {**DEEPSEEK_CONFIG, **changes}, deepseek_tensors())
    with pytest.raises(ConversionError, match=expected):
        import_native(source, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_import_refuses_qwen3_attention_bias(checkpoints, tmp_path):
    source = _edited_copy(checkpoints("qwen3_moe")[1], tmp_path / "biased", attention_bias=True)
    with pytest.raises(ConversionError, match=r"`attention_bias`=True is not supported: .*allowed: False"):
        import_native(source, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_import_refuses_missing_and_unexpected_tensors(tmp_path):
    tensors = deepseek_tensors()
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    source = write_deepseek_checkpoint(tmp_path / "missing", DEEPSEEK_CONFIG, tensors)
    with pytest.raises(ConversionError, match=r"lacks tensors .*experts\.3\.up_proj\.weight"):
        import_native(source, tmp_path / "out")
    tensors = {**deepseek_tensors(), "model.layers.1.mlp.experts.4.up_proj.weight": torch.zeros(16, HIDDEN)}
    source = write_deepseek_checkpoint(tmp_path / "extra", DEEPSEEK_CONFIG, tensors)
    with pytest.raises(ConversionError, match=r"does not explain: .*experts\.4\.up_proj\.weight"):
        import_native(source, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_import_refuses_wrong_shapes(tmp_path):
    source = write_deepseek_checkpoint(tmp_path / "src", {**DEEPSEEK_CONFIG, "moe_intermediate_size": 8},
                                       deepseek_tensors())
    with pytest.raises(ConversionError, match=r"gives model\.layers\.1\.mlp\.experts\.gate_up_proj the shape"):
        import_native(source, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_pickle_only_source_is_refused(tmp_path):
    source = tmp_path / "bin_only"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(DEEPSEEK_CONFIG))
    (source / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*pickles"):
        import_native(source, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_overwrite(deepseek_checkpoint, tmp_path):
    _, source, _ = deepseek_checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous content")
    with pytest.raises(FileExistsError, match="already exists"):
        import_native(source, out)
    with pytest.raises(FileExistsError, match=r"did not write \(keep.txt\)"):  # not an earlier output of hf-moe
        import_native(source, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "previous content"
    (out / "keep.txt").unlink()
    import_native(source, out)  # an empty folder is taken
    with pytest.raises(FileExistsError, match="already exists"):
        import_native(source, out)
    (out / "config.json").write_text("{}")  # an earlier output of hf-moe, replaced whole
    import_native(source, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["model_type"] == "hf_moe_deepseek"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or moved-aside folder left


def test_interrupted_conversion_leaves_nothing(deepseek_checkpoint, tmp_path, monkeypatch):
    _, source, _ = deepseek_checkpoint
    original_add, calls = ShardWriter.add, []

    def interrupting_add(self, name, tensor):
        calls.append(name)
        if len(calls) == 10:
            raise KeyboardInterrupt
        original_add(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", interrupting_add)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        import_native(source, out, max_shard_size="10KB")  # some shards are on disk when interrupted
    assert_nothing_written(out)
    calls.clear()
    assert main(["import", str(source), str(out)]) == 130
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["import", "export"])
def test_cli_help_documents_every_option(command, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("SRC", "OUT", "--overwrite", "(default: off)", "--max-shard-size", "(default: 5GB)"):
        assert option in text
    if command == "export":
        assert "--format {mixtral,qwen2_moe,qwen3_moe,deepseek_v2,deepseek_v3,glm4_moe,olmoe,gpt_oss}" in text


def test_cli_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["export", "a", "b", "--format", "gguf"]) == 2
    assert "invalid choice: 'gguf'" in capsys.readouterr().err


def test_cli_import_export_end_to_end(checkpoints, tmp_path, capsys):
    model, native_dir, _ = checkpoints("mixtral")
    ours, exported = tmp_path / "ours", tmp_path / "exported"
    assert main(["import", str(native_dir), str(ours)]) == 0
    assert str(ours) in capsys.readouterr().out
    assert main(["export", str(ours), str(exported), "--format", "mixtral", "--max-shard-size", "20KB"]) == 0
    assert str(exported) in capsys.readouterr().out
    assert (exported / "model.safetensors.index.json").exists()
    inputs = sample_inputs(seed=3)
    difference = (logits_of(load(MixtralForCausalLM, exported), inputs) - logits_of(model, inputs)).abs().max()
    assert difference.item() <= TOLERANCE
    capsys.readouterr()  # drop the loading progress bars

    assert main(["export", str(ours), str(tmp_path / "refused"), "--format", "qwen3_moe"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("hf-moe export: error: cannot export to qwen3_moe: `qk_norm`=False")
    assert error.count("\n") == 1 and "Traceback" not in error
    assert_nothing_written(tmp_path / "refused")
    assert main(["import", str(native_dir), str(ours)]) == 2
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------------


def test_qwen_sparse_rule_reproduces_every_pattern():
    for num_layers in range(1, 6):
        for bits in range(2**num_layers):
            types = ["sparse" if bits >> i & 1 else "dense" for i in range(num_layers)]
            step, mlp_only = qwen_sparse_rule(types)
            assert qwen_mlp_layer_types(num_layers, step, mlp_only) == types
    assert qwen_sparse_rule(["dense", "sparse", "dense", "sparse"]) == (2, [])
    assert qwen_sparse_rule(["dense", "sparse", "sparse", "sparse"]) == (1, [0])


def test_deepseek_layer_rule():
    assert deepseek_layer_rule(["dense", "sparse", "sparse"]) == {"first_k_dense_replace": 1, "moe_layer_freq": 1}
    assert deepseek_layer_rule(["dense", "dense", "sparse", "dense", "sparse"]) == {
        "first_k_dense_replace": 2, "moe_layer_freq": 2}
    assert deepseek_layer_rule(["dense", "sparse", "dense"]) == {}


def test_deepseek_single_expert_is_not_renormalised():
    """DeepSeek's MoEGate renormalises only when top_k > 1, ours whenever norm_topk_prob is set."""
    config = native_config_to_ours({**DEEPSEEK_CONFIG, "num_experts_per_tok": 1, "norm_topk_prob": True})
    assert config.norm_topk_prob is False
    assert native_config_to_ours({**DEEPSEEK_CONFIG, "norm_topk_prob": True}).norm_topk_prob is True


def test_gate_up_fusion_round_trip():
    gates, ups = list(torch.randn(EXPERTS, 5, 3)), list(torch.randn(EXPERTS, 5, 3))
    fused = fuse_gate_up(gates, ups)
    assert fused.shape == (EXPERTS, 10, 3) and torch.equal(fused[2, :5], gates[2]) and torch.equal(fused[2, 5:], ups[2])
    split_gates, split_ups = split_gate_up(fused)
    assert all(torch.equal(a, b) for a, b in zip(split_gates + split_ups, gates + ups, strict=True))


@pytest.mark.parametrize(
    "config",
    [
        MixtralMoEConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS, head_dim=16),
        DeepSeekMoEConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=16,
                          num_hidden_layers=3, num_attention_heads=4, n_routed_experts=EXPERTS, num_experts_per_tok=2,
                          n_shared_experts=2, shared_expert_gate=True, qkv_bias=True, qk_norm=True),
        DeepSeekMoEConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=16,
                          num_hidden_layers=3, num_attention_heads=4, n_routed_experts=EXPERTS, num_experts_per_tok=2,
                          n_shared_experts=1, attention_type="mla", q_lora_rank=16, kv_lora_rank=8,
                          qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, scoring_func="sigmoid",
                          router_selection_bias=True),
        DeepSeekMoEConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=16, moe_intermediate_size=16,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=EXPERTS,
                          num_experts_per_tok=2, n_shared_experts=0, first_k_dense_replace=0, qkv_bias=True,
                          o_proj_bias=True, qk_norm=True, qk_norm_type="whole_projection", clip_qkv=2.0),
        DeepSeekMoEConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=16, moe_intermediate_size=16,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          n_routed_experts=EXPERTS, num_experts_per_tok=2, n_shared_experts=0, first_k_dense_replace=0,
                          qkv_bias=True, o_proj_bias=True, attention_sinks=True, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"], router_bias=True, expert_bias=True,
                          experts_activation="clamped_swiglu"),
    ],
    ids=["mixtral", "deepseek", "deepseek_v3-like", "olmoe-like", "gpt_oss-like"],
)
def test_our_tensor_shapes_match_the_model(config):
    model_class = MixtralMoEForCausalLM if isinstance(config, MixtralMoEConfig) else DeepSeekMoEForCausalLM
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert our_tensor_shapes(config) == expected


def test_mixtral_tensor_names():
    config = MixtralMoEConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=24, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    plan = {mapping.ours: mapping for mapping in tensor_plan(config, "mixtral")}
    assert plan["model.layers.0.mlp.gate.weight"].native == ("model.layers.0.block_sparse_moe.gate.weight",)
    assert plan["model.layers.0.mlp.experts.gate_up_proj"].native == tuple(
        f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w3") for e in range(2))
    assert plan["model.layers.0.mlp.experts.down_proj"].native == (
        "model.layers.0.block_sparse_moe.experts.0.w2.weight", "model.layers.0.block_sparse_moe.experts.1.w2.weight")
    assert plan["model.layers.0.self_attn.q_proj.weight"].native == ("model.layers.0.self_attn.q_proj.weight",)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size(1234) == 1234
    for bad in ("5 parsecs", "", "-1MB", 0):
        with pytest.raises(ConversionError, match="max_shard_size"):
            parse_size(bad)


def test_shard_writer_and_reader_round_trip(tmp_path):
    tensors = {f"t.{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    tensors["view"] = torch.randn(4, 10)[1:3]  # a view: must be written as its own storage
    writer = ShardWriter(tmp_path, max_shard_size=900)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    files = writer.finish()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 520, "total_size": 2080}
    with safe_open(tmp_path / files[0], framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    with CheckpointReader(tmp_path) as reader:
        assert set(reader.keys()) == set(tensors) and reader.shape("view") == (2, 10)
        assert all(torch.equal(reader.get(name), tensor) for name, tensor in tensors.items())
