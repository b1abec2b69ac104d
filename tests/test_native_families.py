"""Exact import and export of the native families deepseek_v2, deepseek_v3, glm4_moe, olmoe and gpt_oss
(`hf_moe.conversion.native`, `hf-moe import`, `hf-moe export`).

Each source is transformers' own `*ForCausalLM` for a tiny fp32 config (hidden 32, 3 layers with a dense first layer
where the family has `first_k_dense_replace`, 8 experts), every parameter randomised (biases, norms, gpt-oss sinks
and router bias, the DeepSeek-V3/GLM selection bias `e_score_correction_bias`), saved with `save_pretrained` (per-expert
keys for the four families transformers converts on load, fused `[E, H, 2I]` experts for gpt_oss). The deepseek_v3
and glm4_moe sources also carry a multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`, as real
checkpoints do), which the importer must drop.

Import: our class, logits within 1e-5 relative on a left-padded batch, the same greedy generation, verification.json
passed. Export back: transformers' class loads it with no missing/unexpected key, the same logits, and the tensors
the source saved (bit-equal, same names, without the MTP layer). Refusals write nothing.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import PAD_TOKEN_ID, VOCAB_SIZE, randomize_weights_
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_families_modeling import FAMILIES as GQA_FAMILIES
from test_mla import WHOLE_MODEL, YARN
from test_native import NATIVE_CASES, assert_nothing_written, load, randomize_, tensor_names
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Glm4MoeForCausalLM,
    GptOssForCausalLM,
    OlmoeForCausalLM,
)

import hf_moe  # noqa: F401  (registers our model types with the Auto classes)
from hf_moe import DeepSeekMoEForCausalLM
from hf_moe.cli import main
from hf_moe.conversion.native import ConversionError, export_native, import_native
from hf_moe.conversion.verify import verify

RELATIVE_TOLERANCE = 1e-5
LAYERS = 3
MTP_FORMATS = ("deepseek_v3", "glm4_moe")  # real checkpoints carry a multi-token-prediction layer

# MLA shapes of test_mla (hidden 32, 4 heads, kv rank 16, nope 8 + rope 4, v 6, layer 0 dense, 8 experts in 4 groups,
# top-3 from the 2 best groups), with pad token 0
MLA_SHAPES = dict(WHOLE_MODEL, n_routed_experts=8, pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False)
MLA_SHAPES.pop("attn_implementation")


def deepseek_v2_config() -> DeepseekV2Config:
    """V2-Lite style: a plain q_proj (no q LoRA), group-limited greedy routing (group score = max), x2 scaling, no
    renormalisation, complex-pair RoPE with V2's YaRN (mscale = mscale_all_dim = 0.707: the softmax scale changes)."""
    return DeepseekV2Config(**dict(MLA_SHAPES, q_lora_rank=None), topk_method="group_limited_greedy",
                            routed_scaling_factor=2.0, norm_topk_prob=False,
                            rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})


def deepseek_v3_config() -> DeepseekV3Config:
    """V3: q LoRA, sigmoid router with the selection bias, groups by their top-2 sum, renormalised then x2.5, YaRN with
    mscale != mscale_all_dim (both the cos/sin factor and the softmax scale differ from 1), interleaved RoPE."""
    return DeepseekV3Config(**MLA_SHAPES, routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=YARN,
                            rope_interleave=True)


@dataclass(frozen=True)
class Case:
    native_class: type
    make_config: object  # () -> the transformers config


# olmoe (clip_qkv 1.5, q/k/o biases, whole-projection q/k norm), glm4_moe (partial RoPE 0.5, per-head q/k norm, q/k/v
# biases, one dense layer, 4 groups, x2.5) and gpt_oss (sliding window 4 on layers 0 and 2, swiglu_limit 1.0, YaRN)
# are test_families_modeling's configs, which its tests already hold equal to ours.
CASES = {
    "deepseek_v2": Case(DeepseekV2ForCausalLM, deepseek_v2_config),
    "deepseek_v3": Case(DeepseekV3ForCausalLM, deepseek_v3_config),
    "glm4_moe": Case(Glm4MoeForCausalLM, GQA_FAMILIES["glm4_moe"][0]),
    "olmoe": Case(OlmoeForCausalLM, GQA_FAMILIES["olmoe"][0]),
    "gpt_oss": Case(GptOssForCausalLM, GQA_FAMILIES["gpt_oss"][0]),
}
FORMATS = pytest.mark.parametrize("fmt", list(CASES))


def native_model(fmt: str, seed: int | None = None, **config_changes) -> torch.nn.Module:
    """transformers' model for `fmt`, eager attention, every parameter and the selection bias random, eval mode."""
    case = CASES[fmt]
    config = case.make_config()
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(list(CASES).index(fmt) if seed is None else seed)
    model = randomize_weights_(case.native_class(config))
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("e_score_correction_bias"):  # large enough to change which experts are chosen
                tensor.copy_(0.3 * torch.randn_like(tensor))
            elif name.endswith("self_attn.sinks"):  # logits of order 1, like the attention scores
                tensor.copy_(torch.randn_like(tensor))
            elif name.endswith("mlp.router.bias"):
                tensor.copy_(0.5 * torch.randn_like(tensor))
    model.set_attn_implementation("eager")
    return model.eval()


def left_padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of 11 tokens (longer than gpt_oss's window of 4), the second with 3 pad tokens on the left."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB_SIZE, (2, 11), generator=generator)
    input_ids[1, :3] = PAD_TOKEN_ID
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD_TOKEN_ID).long()}


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return model.eval()(**inputs).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |actual - expected| / max |expected|, over the positions where `mask` is set (all by default)."""
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def greedy(model, inputs) -> torch.Tensor:
    return model.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=PAD_TOKEN_ID)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of `folder` (sharded or not)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def add_mtp_layer(folder: Path, num_layers: int) -> set[str]:
    """Add the multi-token-prediction layer that DeepSeek-V3 / GLM-4.5 checkpoints carry after the decoder layers:
    `model.layers.{num_layers}.*` = a decoder layer (a copy of the last one) + enorm, hnorm, eh_proj, embed_tokens and
    shared_head, and `num_nextn_predict_layers: 1` in config.json. A sharded checkpoint gets it as a shard of its own
    in the index (as DeepSeek-V3's last shard), a single file gets it appended. Returns the added tensor names."""
    tensors = read_tensors(folder)
    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    added = {mtp + name.removeprefix(last): tensor.clone() for name, tensor in tensors.items() if name.startswith(last)}
    hidden = tensors["model.norm.weight"].shape[0]
    generator = torch.Generator().manual_seed(99)
    added.update({
        mtp + "enorm.weight": 1 + 0.1 * torch.randn(hidden, generator=generator),
        mtp + "hnorm.weight": 1 + 0.1 * torch.randn(hidden, generator=generator),
        mtp + "eh_proj.weight": 0.2 * torch.randn(hidden, 2 * hidden, generator=generator),
        mtp + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        mtp + "shared_head.norm.weight": 1 + 0.1 * torch.randn(hidden, generator=generator),
        mtp + "shared_head.head.weight": tensors["lm_head.weight"].clone(),
    })
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        save_file(added, folder / "model-mtp.safetensors", metadata={"format": "pt"})
        index = json.loads(index_path.read_text())
        index["weight_map"].update(dict.fromkeys(added, "model-mtp.safetensors"))
        index_path.write_text(json.dumps(index, indent=2))
    else:
        path = folder / "model.safetensors"
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
        save_file({**{name: tensor.clone() for name, tensor in tensors.items()}, **added}, path, metadata=metadata)
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return set(added)


@dataclass
class Built:
    model: torch.nn.Module  # transformers' model, eager, eval
    native_dir: Path  # its save_pretrained folder (+ the MTP layer for MTP_FORMATS)
    saved: dict[str, torch.Tensor]  # what save_pretrained wrote (without the MTP layer)
    mtp_names: set[str]
    root: Path

    @property
    def ours_dir(self) -> Path:
        return self.root / "ours"

    @property
    def exported_dir(self) -> Path:
        return self.root / "exported"


SHARDED = {"deepseek_v3": "100KB"}  # a sharded source (its MTP layer in a shard of its own); the others: one file


def build_source(fmt: str, root: Path) -> Built:
    model = native_model(fmt)
    native_dir = root / "native"
    model.save_pretrained(native_dir, max_shard_size=SHARDED.get(fmt, "5GB"))
    assert (native_dir / "model.safetensors.index.json").exists() == (fmt in SHARDED)
    saved = read_tensors(native_dir)
    mtp_names = add_mtp_layer(native_dir, model.config.num_hidden_layers) if fmt in MTP_FORMATS else set()
    return Built(model, native_dir, saved, mtp_names, root)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """`sources(fmt)` -> the `Built` native checkpoint of `fmt`, saved once per module."""
    built = {}

    def get(fmt: str) -> Built:
        if fmt not in built:
            built[fmt] = build_source(fmt, tmp_path_factory.mktemp(fmt))
        return built[fmt]

    return get


@pytest.fixture(scope="module")
def imported(sources):
    """`imported(fmt)` -> `Built` whose `ours_dir` holds `import_native(native_dir)` (with verification)."""
    done = set()

    def get(fmt: str) -> Built:
        built = sources(fmt)
        if fmt not in done:
            import_native(built.native_dir, built.ours_dir)
            done.add(fmt)
        return built

    return get


@pytest.fixture(scope="module")
def exported(imported):
    """`exported(fmt)` -> `Built` whose `exported_dir` holds `export_native(ours_dir, format=fmt)`."""
    done = set()

    def get(fmt: str) -> Built:
        built = imported(fmt)
        if fmt not in done:
            export_native(built.ours_dir, built.exported_dir, format=fmt)
            done.add(fmt)
        return built

    return get


# ---------------------------------------------------------------------------------------------------------------
# The sources exercise what they are meant to test
# ---------------------------------------------------------------------------------------------------------------


def _logits_with(fmt: str, state_changes=None, **config_changes) -> torch.Tensor:
    """Logits of the same weights as `native_model(fmt)` with a config or state change (for the sanity checks)."""
    reference = native_model(fmt)
    changed = native_model(fmt, **config_changes)
    state = reference.state_dict()
    for name, fn in (state_changes or {}).items():
        state = {key: fn(value) if key.endswith(name) else value for key, value in state.items()}
    changed.load_state_dict(state, strict=True)
    return logits_of(changed, left_padded_batch())


FEATURES = [
    ("deepseek_v2", {"topk_method": "greedy"}, None),
    ("deepseek_v3", {}, {"e_score_correction_bias": torch.zeros_like}),
    ("glm4_moe", {}, {"e_score_correction_bias": torch.zeros_like}),
    ("olmoe", {"clip_qkv": None}, None),
    ("gpt_oss", {"sliding_window": 64}, None),
    ("gpt_oss", {"swiglu_limit": 100.0}, None),
    ("gpt_oss", {}, {"self_attn.sinks": lambda t: torch.full_like(t, -torch.inf)}),
    ("gpt_oss", {}, {"mlp.router.bias": torch.zeros_like}),
]


@pytest.mark.parametrize(("fmt", "config_changes", "state_changes"), FEATURES,
                         ids=[f"{f}-{next(iter(c or s))}" for f, c, s in FEATURES])
def test_family_feature_changes_the_source_logits(fmt, config_changes, state_changes):
    """Each family feature the round trips must carry (group routing, selection bias, clip_qkv, sliding window,
    SwiGLU clamps, sinks, router bias) changes these sources' logits: a converter that dropped it would fail."""
    inputs = left_padded_batch()
    expected = logits_of(native_model(fmt), inputs)
    changed = _logits_with(fmt, state_changes, **config_changes)
    assert relative_error(changed, expected, inputs["attention_mask"]) > 1e-3


@FORMATS
def test_sources_have_the_native_on_disk_layout(sources, fmt):
    built = sources(fmt)
    names = tensor_names(built.native_dir)
    config = json.loads((built.native_dir / "config.json").read_text())
    assert config["model_type"] == fmt
    if fmt == "gpt_oss":
        assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.router.bias" in names
        assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    else:
        sparse = 0 if fmt == "olmoe" else 1
        assert f"model.layers.{sparse}.mlp.experts.7.down_proj.weight" in names
    if fmt in MTP_FORMATS:
        assert config["num_nextn_predict_layers"] == 1 and f"model.layers.{LAYERS}.eh_proj.weight" in names
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    else:
        assert not any(name.startswith(f"model.layers.{LAYERS}.") for name in names)


# ---------------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------------


@FORMATS
def test_import_matches_transformers_logits_and_generation(imported, fmt):
    built = imported(fmt)
    ours = load(AutoModelForCausalLM, built.ours_dir)
    assert type(ours) is DeepSeekMoEForCausalLM
    inputs = left_padded_batch()
    assert relative_error(logits_of(ours, inputs), logits_of(built.model, inputs),
                          inputs["attention_mask"]) <= RELATIVE_TOLERANCE
    assert torch.equal(greedy(ours, inputs), greedy(built.model, inputs))


@FORMATS
def test_import_records_a_passed_verification(imported, fmt):
    report = json.loads((imported(fmt).ours_dir / "verification.json").read_text())
    assert report["passed"] is True and report["max_rel_error"] <= RELATIVE_TOLERANCE


@FORMATS
def test_import_writes_our_fused_layout_without_the_mtp_layer(imported, fmt):
    built = imported(fmt)
    config = json.loads((built.ours_dir / "config.json").read_text())
    assert config["model_type"] == "hf_moe_deepseek" and config["num_hidden_layers"] == LAYERS
    assert (built.ours_dir / "modeling_hf_moe.py").is_file()  # loads with trust_remote_code, without hf_moe
    names = tensor_names(built.ours_dir)
    assert not any(name.startswith(f"model.layers.{LAYERS}.") for name in names)
    assert not any(".experts.0." in name for name in names)
    sparse = 0 if fmt in ("olmoe", "gpt_oss") else 1
    assert f"model.layers.{sparse}.mlp.experts.gate_up_proj" in names
    assert ("model.layers.0.mlp.experts.gate_up_proj" in names) == (sparse == 0)  # the dense layer stays dense


EXPECTED_CONFIG = {
    "deepseek_v2": {"attention_type": "mla", "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                    "qk_rope_head_dim": 4, "v_head_dim": 6, "rope_interleave": True, "scoring_func": "softmax",
                    "router_selection_bias": False, "n_group": 4, "topk_group": 2, "norm_topk_prob": False,
                    "routed_scaling_factor": 2.0, "n_shared_experts": 1,
                    "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "deepseek_v3": {"attention_type": "mla", "q_lora_rank": 24, "rope_interleave": True, "scoring_func": "sigmoid",
                    "router_selection_bias": True, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
                    "routed_scaling_factor": 2.5, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "glm4_moe": {"head_dim": 8, "qk_norm": True, "qkv_bias": True, "o_proj_bias": False, "scoring_func": "sigmoid",
                 "router_selection_bias": True, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "olmoe": {"qk_norm_type": "whole_projection", "clip_qkv": 1.5, "qkv_bias": True, "o_proj_bias": True,
              "n_shared_experts": 0, "mlp_layer_types": ["sparse"] * 3},
    "gpt_oss": {"attention_sinks": True, "sliding_window": 4, "router_bias": True, "expert_bias": True,
                "experts_activation": "clamped_swiglu", "swiglu_limit": 1.0,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
}


@FORMATS
def test_import_config_holds_the_family_fields(imported, fmt):
    config = AutoConfig.from_pretrained(imported(fmt).ours_dir)
    assert {key: getattr(config, key) for key in EXPECTED_CONFIG[fmt]} == EXPECTED_CONFIG[fmt]


@pytest.mark.parametrize("fmt", ["glm4_moe", "olmoe", "gpt_oss"])
def test_import_config_is_the_family_config_map(imported, fmt):
    """The imported config is test_families_modeling's map of the native config (which its tests hold exact)."""
    config_to_ours = GQA_FAMILIES[fmt][2]
    expected = config_to_ours(CASES[fmt].make_config()).to_dict()
    actual = AutoConfig.from_pretrained(imported(fmt).ours_dir).to_dict()
    ignored = {"architectures", "dtype", "_name_or_path", "transformers_version", "auto_map"}
    differences = {key: (actual.get(key), expected.get(key)) for key in set(actual) | set(expected)
                   if key not in ignored and actual.get(key) != expected.get(key)}
    assert not differences, differences


# ---------------------------------------------------------------------------------------------------------------
# Export back
# ---------------------------------------------------------------------------------------------------------------


@FORMATS
def test_export_writes_back_the_saved_tensors(exported, fmt):
    built = exported(fmt)
    tensors = read_tensors(built.exported_dir)
    assert set(tensors) == set(built.saved)  # the same names, without the MTP layer
    for name, tensor in built.saved.items():
        assert tensors[name].dtype == tensor.dtype, name
        torch.testing.assert_close(tensors[name], tensor, atol=1e-6, rtol=0, msg=name)


@FORMATS
def test_export_loads_in_transformers_with_the_same_logits(exported, fmt):
    built = exported(fmt)
    config = json.loads((built.exported_dir / "config.json").read_text())
    assert config["model_type"] == fmt and config["architectures"] == [CASES[fmt].native_class.__name__]
    assert not (built.exported_dir / "modeling_hf_moe.py").exists() and "auto_map" not in config
    model = load(CASES[fmt].native_class, built.exported_dir)
    inputs = left_padded_batch(seed=1)
    assert relative_error(logits_of(model, inputs), logits_of(built.model, inputs)) <= RELATIVE_TOLERANCE


@FORMATS
def test_export_config_matches_the_source_config(exported, fmt):
    """Every field transformers reads comes back as the source had it (the MTP count aside: the layer is dropped)."""
    built = exported(fmt)
    source = built.model.config.to_dict()
    actual = AutoConfig.from_pretrained(built.exported_dir).to_dict()
    ignored = {"architectures", "dtype", "_name_or_path", "transformers_version", "num_nextn_predict_layers",
               "attn_implementation", "_attn_implementation_autoset", "output_attentions", "use_cache"}
    differences = {key: (actual.get(key), source.get(key)) for key in set(actual) | set(source)
                   if key not in ignored and actual.get(key) != source.get(key)}
    assert not differences, differences


@pytest.mark.parametrize("fmt", MTP_FORMATS)
def test_export_does_not_announce_the_dropped_mtp_layer(exported, fmt):
    """The MTP layer is not written back, so the exported config must not tell engines (vLLM's MTP drafter) that
    it is there."""
    assert AutoConfig.from_pretrained(exported(fmt).exported_dir).num_nextn_predict_layers == 0


@FORMATS
def test_export_records_a_passed_verification(exported, fmt):
    report = json.loads((exported(fmt).exported_dir / "verification.json").read_text())
    assert report["passed"] is True and report["max_rel_error"] <= RELATIVE_TOLERANCE


@FORMATS
def test_layerwise_verification_reads_both_layouts(exported, fmt):
    """The bounded-memory verification (what large checkpoints get) maps the native names of each family: the
    import's source (with its MTP layer) against ours, and ours against the export."""
    built = exported(fmt)
    for source, converted in ((built.native_dir, built.ours_dir), (built.ours_dir, built.exported_dir)):
        report = verify(source, converted, tolerance=RELATIVE_TOLERANCE, mode="layerwise")
        assert report["mode"] == "layerwise" and report["passed"], report


def test_bf16_checkpoint_with_fp32_routers_round_trips_bit_exactly(sources, tmp_path):
    """A bf16 DeepSeek-V3 checkpoint keeps its router weight and selection bias in fp32 on disk (transformers'
    `_keep_in_fp32_modules_strict`): import and export keep every tensor's dtype and bits."""
    built = sources("deepseek_v3")
    bf16 = DeepseekV3ForCausalLM.from_pretrained(built.native_dir, dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "native")
    saved = read_tensors(tmp_path / "native")
    assert saved["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert saved["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert saved["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == torch.bfloat16
    import_native(tmp_path / "native", tmp_path / "ours", verbose=False)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    export_native(tmp_path / "ours", tmp_path / "exported", format="deepseek_v3", verbose=False)
    exported_tensors = read_tensors(tmp_path / "exported")
    assert set(exported_tensors) == set(saved)
    for name, tensor in saved.items():
        assert exported_tensors[name].dtype == tensor.dtype and torch.equal(exported_tensors[name], tensor), name


# ---------------------------------------------------------------------------------------------------------------
# Refusals: nothing is written
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["deepseek_v3", "glm4_moe"])
def test_bf16_import_routes_in_fp32_as_transformers_does(imported, fmt):
    """DeepSeek-V3 and GLM-4.5 keep the router weight and logits in fp32 in a bf16 model (`router_in_fp32`): in bf16
    our model gives transformers' logits exactly (under transformers' experts kernel: "auto" may choose another one),
    and the router weight loads as fp32."""
    built = imported(fmt)
    native = AutoModelForCausalLM.from_pretrained(built.native_dir, dtype=torch.bfloat16).eval()
    ours = AutoModelForCausalLM.from_pretrained(built.ours_dir, dtype=torch.bfloat16,
                                                experts_implementation="grouped_mm").eval()
    assert ours.config.router_in_fp32
    assert ours.model.layers[-1].mlp.gate.weight.dtype == torch.float32
    input_ids = torch.randint(1, VOCAB_SIZE, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(ours(input_ids).logits, native(input_ids).logits)


def test_import_refuses_deepseek_v3_attention_bias(tmp_path):
    """MLA with biases on q_a_proj / kv_a_proj_with_mqa / o_proj is not something our MLA computes."""
    model = native_model("deepseek_v3", attention_bias=True)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    model.save_pretrained(tmp_path / "biased")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="attention_bias"):
        import_native(tmp_path / "biased", out)
    assert_nothing_written(out)


@pytest.mark.parametrize("fmt", ["olmoe", "deepseek_v3"])
def test_import_refuses_layers_beyond_the_config(sources, tmp_path, fmt):
    """Only the `num_nextn_predict_layers` MTP layers are dropped: any other layer past `num_hidden_layers` (a config
    that does not match its weights) is refused, for a family without MTP and past the MTP layer alike."""
    built = sources(fmt)
    source = tmp_path / "extra"
    source.mkdir()
    for path in built.native_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    extra_layer = LAYERS + len({name.split(".")[2] for name in built.mtp_names})
    save_file({f"model.layers.{extra_layer}.input_layernorm.weight": torch.ones(32)},
              source / "model-extra.safetensors", metadata={"format": "pt"})
    index_path = source / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        (source / "model.safetensors").rename(source / "model-main.safetensors")
        index = {"metadata": {}, "weight_map": dict.fromkeys(tensor_names(built.native_dir), "model-main.safetensors")}
    index["weight_map"][f"model.layers.{extra_layer}.input_layernorm.weight"] = "model-extra.safetensors"
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=rf"does not explain: model\.layers\.{extra_layer}\.input_layernorm"):
        import_native(source, out)
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("fmt", "target", "field"),
    [
        ("deepseek_v3", "olmoe", "attention_type"),
        ("deepseek_v3", "qwen3_moe", "attention_type"),
        ("deepseek_v3", "glm4_moe", "attention_type"),
        ("deepseek_v3", "deepseek_v2", "scoring_func"),
        ("deepseek_v2", "deepseek_v3", "scoring_func"),
        ("gpt_oss", "mixtral", "attention_sinks"),
        ("olmoe", "deepseek_v3", "attention_type"),
        ("olmoe", "gpt_oss", "qk_norm"),
        ("glm4_moe", "olmoe", "scoring_func"),
    ],
)
def test_export_refuses_what_the_format_cannot_hold(imported, tmp_path, fmt, target, field):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=field):
        export_native(imported(fmt).ours_dir, out, format=target)
    assert_nothing_written(out)


@pytest.fixture(scope="module")
def mixtral_import(tmp_path_factory) -> Path:
    """An hf_moe_mixtral checkpoint: test_native's Mixtral source, imported."""
    root = tmp_path_factory.mktemp("mixtral")
    native_class, make_config, _ = NATIVE_CASES["mixtral"]
    model = native_class(make_config())
    randomize_(model, seed=0)
    model.save_pretrained(root / "native")
    return import_native(root / "native", root / "ours", verify=False, verbose=False)


@pytest.mark.parametrize(("target", "field"), [("olmoe", "qk_norm"), ("glm4_moe", "scoring_func"),
                                             ("gpt_oss", "attention_sinks")])
def test_export_of_a_mixtral_model_names_only_what_differs(mixtral_import, tmp_path, target, field):
    """An hf_moe_mixtral model (GQA, softmax router, no q/k norm, no biases) is refused for what the format cannot
    hold, without fields that it does not differ in (its attention is GQA, it has no sinks, no biases)."""
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=field) as error:
        export_native(mixtral_import, out, format=target)
    assert "`attention_type`" not in str(error.value) and "=None" not in str(error.value)
    assert_nothing_written(out)


def test_export_to_an_unknown_format_lists_the_new_ones(imported, tmp_path):
    with pytest.raises(ConversionError) as error:
        export_native(imported("olmoe").ours_dir, tmp_path / "out", format="llama4")
    assert all(fmt in str(error.value) for fmt in CASES)
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_export_help_lists_the_new_formats(capsys):
    assert main(["export", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(fmt in text for fmt in CASES)


def test_cli_import_export_end_to_end(sources, tmp_path, capsys):
    built = sources("glm4_moe")
    ours, exported_dir = tmp_path / "ours", tmp_path / "exported"
    assert main(["import", str(built.native_dir), str(ours)]) == 0
    assert any(line.startswith("verification:") for line in capsys.readouterr().out.splitlines())
    assert main(["export", str(ours), str(exported_dir), "--format", "glm4_moe"]) == 0
    assert any(line.startswith("verification:") for line in capsys.readouterr().out.splitlines())
    inputs = left_padded_batch(seed=2)
    model = load(Glm4MoeForCausalLM, exported_dir)
    assert relative_error(logits_of(model, inputs), logits_of(built.model, inputs)) <= RELATIVE_TOLERANCE
