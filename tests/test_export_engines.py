"""Engine-safe exports: what llama.cpp reads differently from transformers, fixed where an exact layout exists and
warned about (and recorded in conversion.yaml) where none does. See the module docstring of
`hf_moe.conversion.native`.

Tiny random models (H=32, 3-4 layers). Every export is loaded with transformers' own class and compared with the
model it came from, so an "engine-safe" rewrite can never cost exactness in transformers.
"""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig, MixtralMoEForCausalLM
from hf_moe.conversion import upcycle
from hf_moe.conversion.native import (
    SHARED_GATE_LOGIT_BOUND,
    ConversionError,
    constant_shared_gate,
    export_native,
    import_native,
)
from hf_moe.conversion.safetensors_io import CheckpointReader

VOCAB, HIDDEN, TOLERANCE = 96, 32, 1e-5
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
NATIVE_CLASSES = {"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """N(0, 0.2) matrices, routers and biases; 1 + N(0, 0.1) norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


def deepseek(**overrides) -> DeepSeekMoEConfig:
    fields = dict(**COMMON, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
                  num_experts_per_tok=2, n_shared_experts=0, first_k_dense_replace=0, qk_norm=True)
    return DeepSeekMoEConfig(**{**fields, **overrides})


def save_ours(config, folder, zero_shared_gate: bool = False):
    model_class = MixtralMoEForCausalLM if isinstance(config, MixtralMoEConfig) else DeepSeekMoEForCausalLM
    torch.manual_seed(0)
    model = randomize_(model_class(config))
    if zero_shared_gate:  # what `hf-moe upcycle --format qwen2_moe` wrote before: sigmoid(0) = 1/2
        with torch.no_grad():
            for layer in model.model.layers:
                if hasattr(layer.mlp, "shared_expert_gate"):
                    layer.mlp.shared_expert_gate.weight.zero_()
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def logits(model_class, folder, input_ids, **config_overrides) -> torch.Tensor:
    model, info = model_class.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                              output_loading_info=True, **config_overrides)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()(input_ids=input_ids).logits


def sample_ids(length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= TOLERANCE


def tensor(folder, name) -> torch.Tensor:
    with CheckpointReader(folder) as reader:
        return reader.get(name)


def tensor_names(folder) -> set[str]:
    with CheckpointReader(folder) as reader:
        return set(reader.keys())


def conversion_record(folder) -> dict:
    return yaml.safe_load((folder / "conversion.yaml").read_text())


def shared_gate_logits(folder, input_ids) -> list[torch.Tensor]:
    """z = shared_expert_gate(x) of every sparse layer, as Qwen2MoeForCausalLM computes it on `input_ids`."""
    model = Qwen2MoeForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    captured = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "shared_expert_gate"):
            layer.mlp.shared_expert_gate.register_forward_hook(lambda m, args, out: captured.append(out.detach()))
    with torch.no_grad():
        model(input_ids=input_ids)
    return captured


def llama_cpp_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """llama.cpp's qwen2moe shared-expert gate: ggml_div(ggml_silu(z), z), i.e. silu(z) / z, in fp32."""
    return F.silu(z) / z


# ---------------------------------------------------------------------------------------------------------------
# Item 1 and 2: a qwen2_moe upcycled from a tied Llama loads in llama.cpp and has no 0/0 gate
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A dense Llama with a tied head (like the shipped tiny-llama), 4 layers."""
    folder = tmp_path_factory.mktemp("llama") / "dense"
    torch.manual_seed(0)
    config = LlamaConfig(**COMMON, intermediate_size=96, num_hidden_layers=4, tie_word_embeddings=True)
    randomize_(LlamaForCausalLM(config), seed=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def upcycled_qwen2_moe(tied_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("upcycled") / "qwen2_moe"
    return upcycle(tied_llama, out, verbose=False, arch="deepseek", granularity=4, shared_experts=1, num_experts=6,
                   top_k=3, format="qwen2_moe")


def test_upcycled_qwen2_moe_writes_an_untied_head(tied_llama, upcycled_qwen2_moe):
    out = upcycled_qwen2_moe.out
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # llama.cpp's qwen2moe requires `output.weight`
    assert torch.equal(tensor(out, "lm_head.weight"), tensor(out, "model.embed_tokens.weight"))
    input_ids = sample_ids()
    assert_same_logits(logits(Qwen2MoeForCausalLM, out, input_ids), logits(LlamaForCausalLM, tied_llama, input_ids))


def test_upcycled_shared_expert_gate_is_exactly_one_half_without_a_zero_logit(upcycled_qwen2_moe):
    out = upcycled_qwen2_moe.out
    for layer in range(4):
        weight = tensor(out, f"model.layers.{layer}.mlp.shared_expert_gate.weight")
        assert weight.any(), "an all-zero gate row is 0/0 = NaN in llama.cpp"
    logits_z = torch.cat([z.flatten() for z in shared_gate_logits(out, sample_ids(24, seed=1))])
    assert (logits_z != 0).all() and (logits_z.abs() <= SHARED_GATE_LOGIT_BOUND).all()
    assert (torch.sigmoid(logits_z) == 0.5).all()  # transformers: exactly the gate the x2 compensates
    assert (llama_cpp_sigmoid(logits_z) == 0.5).all()  # llama.cpp: finite, and the same value


def test_constant_shared_gate_bound_holds_for_extreme_norm_inputs():
    norm = torch.tensor([0.5, -3.0, 2.0, 0.0] * 8)
    weight = constant_shared_gate(norm, torch.float32)
    assert torch.count_nonzero(weight) == 1 and weight[0, 1] > 0  # at the largest |norm weight|
    # the largest |x_j| an RMSNorm can emit: all the energy in one component, |x_j| = |g_j| * sqrt(H)
    hidden = torch.zeros(1, 32)
    hidden[0, 1] = -7.0
    x = norm * hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    z = F.linear(x, weight)
    assert z.abs().item() <= SHARED_GATE_LOGIT_BOUND and z.item() != 0
    assert torch.sigmoid(z).item() == 0.5 and llama_cpp_sigmoid(z).item() == 0.5
    assert constant_shared_gate(norm, torch.bfloat16).any() and constant_shared_gate(norm, torch.float16).any()


def test_export_replaces_a_zero_shared_gate_and_unties_the_head(tmp_path, caplog):
    config = deepseek(n_shared_experts=1, shared_expert_intermediate_size=16, shared_expert_gate=True, qk_norm=False,
                      tie_word_embeddings=True, n_routed_experts=4, num_experts_per_tok=4)
    ours = save_ours(config, tmp_path / "ours", zero_shared_gate=True)
    assert "lm_head.weight" not in tensor_names(ours)
    with caplog.at_level(logging.WARNING):
        out = export_native(ours, tmp_path / "qwen2_moe", "qwen2_moe", verify=False, verbose=False)
    exported = json.loads((out / "config.json").read_text())
    assert exported["tie_word_embeddings"] is False and "lm_head.weight" in tensor_names(out)
    assert exported["norm_topk_prob"] is False  # top_k == E: renormalising is a no-op, written as llama.cpp reads it
    assert not caplog.records and "engine_warnings" not in conversion_record(out)  # nothing llama.cpp reads otherwise
    assert tensor(out, "model.layers.0.mlp.shared_expert_gate.weight").any()
    input_ids = sample_ids()
    assert_same_logits(logits(Qwen2MoeForCausalLM, out, input_ids), logits(AutoModelForCausalLM, ours, input_ids))
    assert all((llama_cpp_sigmoid(z) == 0.5).all() for z in shared_gate_logits(out, input_ids))


@pytest.mark.parametrize("fmt", ["mixtral", "qwen3_moe"])
def test_formats_llama_cpp_reads_tied_stay_tied(tmp_path, fmt):
    config = (MixtralMoEConfig(**COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=4,
                               tie_word_embeddings=True) if fmt == "mixtral" else deepseek(tie_word_embeddings=True))
    out = export_native(save_ours(config, tmp_path / "ours"), tmp_path / fmt, fmt, verify=False, verbose=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in tensor_names(out)  # llama / qwen3moe fall back to the embeddings


# ---------------------------------------------------------------------------------------------------------------
# Item 3: norm_topk_prob, which llama.cpp fixes per architecture
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "norm_topk_prob"), [("qwen2_moe", True), ("qwen3_moe", False)])
def test_norm_topk_prob_llama_cpp_ignores_is_warned_and_recorded(tmp_path, caplog, fmt, norm_topk_prob):
    shared = dict(n_shared_experts=1, shared_expert_intermediate_size=16, shared_expert_gate=True, qk_norm=False)
    config = deepseek(norm_topk_prob=norm_topk_prob, **(shared if fmt == "qwen2_moe" else {}))
    ours = save_ours(config, tmp_path / "ours")
    with caplog.at_level(logging.WARNING):
        out = export_native(ours, tmp_path / fmt, fmt, verify=False, verbose=False)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "llama.cpp" in warnings[0] and "`norm_topk_prob`" in warnings[0]
    assert conversion_record(out)["engine_warnings"] == warnings
    card = (out / "README.md").read_text()
    assert "## Serving limits" in card and warnings[0] in " ".join(card.split())  # in the card, not as a flag
    assert "--engine-warnings" not in card
    assert json.loads((out / "config.json").read_text())["norm_topk_prob"] is norm_topk_prob  # transformers: exact
    input_ids = sample_ids()
    assert_same_logits(logits(NATIVE_CLASSES[fmt], out, input_ids), logits(AutoModelForCausalLM, ours, input_ids))


def test_norm_topk_prob_is_written_as_llama_cpp_reads_it_when_all_experts_are_chosen(tmp_path, caplog):
    ours = save_ours(deepseek(norm_topk_prob=False, n_routed_experts=2, num_experts_per_tok=2), tmp_path / "ours")
    with caplog.at_level(logging.WARNING):
        out = export_native(ours, tmp_path / "qwen3_moe", "qwen3_moe", verify=False, verbose=False)
    assert not caplog.records
    assert json.loads((out / "config.json").read_text())["norm_topk_prob"] is True
    input_ids = sample_ids()
    assert_same_logits(logits(Qwen3MoeForCausalLM, out, input_ids), logits(AutoModelForCausalLM, ours, input_ids))


def test_upcycle_plan_lists_the_engine_limits(tied_llama, capsys):
    upcycle(tied_llama, None, dry_run=True, arch="deepseek", granularity=4, shared_experts=1, num_experts=6, top_k=3,
            format="qwen2_moe")
    assert "engines     llama.cpp (qwen2moe) never renormalises" in capsys.readouterr().out
    plan = upcycle(tied_llama, None, dry_run=True, verbose=False, arch="deepseek", granularity=4, shared_experts=1,
                   num_experts=3, top_k=3, format="qwen2_moe").plan
    assert plan.engine_warnings == [] and plan.native_config.norm_topk_prob is False  # k == E: equivalent


# ---------------------------------------------------------------------------------------------------------------
# Item 4: sliding_window survives mixtral / qwen3_moe exports (logits past the window)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mixtral", "qwen3_moe"])
def test_sliding_window_is_carried_over(tmp_path, caplog, fmt):
    window = 4
    config = (MixtralMoEConfig(**COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=4,
                               sliding_window=window) if fmt == "mixtral" else deepseek(sliding_window=window))
    ours = save_ours(config, tmp_path / "ours")
    with caplog.at_level(logging.WARNING):
        out = export_native(ours, tmp_path / fmt, fmt, verify=False, verbose=False)
    native = json.loads((out / "config.json").read_text())
    assert native["sliding_window"] == window and native.get("use_sliding_window", True) is True
    input_ids = sample_ids(length=3 * window)  # most positions attend past the window
    expected = logits(AutoModelForCausalLM, ours, input_ids)
    assert_same_logits(logits(NATIVE_CLASSES[fmt], out, input_ids), expected)
    full_attention = logits(NATIVE_CLASSES[fmt], out, input_ids, sliding_window=None)  # what dropping it computes
    assert (full_attention - expected).abs().max() > 1e-3
    assert any("`sliding_window`=4" in warning for warning in conversion_record(out)["engine_warnings"])


# ---------------------------------------------------------------------------------------------------------------
# Item 5: dense layers (mlp_only_layers / decoder_sparse_step), both directions
# ---------------------------------------------------------------------------------------------------------------

LAYER_PATTERNS = {
    "every_other": ["dense", "sparse", "dense", "sparse"],  # decoder_sparse_step=2
    "irregular": ["sparse", "dense", "dense", "sparse"],  # mlp_only_layers=[1, 2]
}


@pytest.mark.parametrize("fmt", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("pattern", sorted(LAYER_PATTERNS))
def test_dense_layers_export_and_import_exactly(tmp_path, fmt, pattern):
    types = LAYER_PATTERNS[pattern]
    shared = dict(n_shared_experts=1, shared_expert_intermediate_size=16, shared_expert_gate=True, qk_norm=False,
                  qkv_bias=True)
    config = deepseek(num_hidden_layers=4, mlp_layer_types=types, first_k_dense_replace=None, moe_layer_freq=None,
                      **(shared if fmt == "qwen2_moe" else {}))
    ours = save_ours(config, tmp_path / "ours")
    out = export_native(ours, tmp_path / fmt, fmt, verify=False, verbose=False)
    native = NATIVE_CLASSES[fmt].from_pretrained(out)
    assert [hasattr(layer.mlp, "experts") for layer in native.model.layers] == [t == "sparse" for t in types]
    assert any("requires every layer to be sparse" in w for w in conversion_record(out)["engine_warnings"])
    input_ids = sample_ids()
    expected = logits(AutoModelForCausalLM, ours, input_ids)
    assert_same_logits(logits(NATIVE_CLASSES[fmt], out, input_ids), expected)
    back = import_native(out, tmp_path / "back", verify=False, verbose=False)
    assert json.loads((back / "config.json").read_text())["mlp_layer_types"] == types
    assert_same_logits(logits(AutoModelForCausalLM, back, input_ids), expected)


@pytest.mark.parametrize("fmt", ["qwen2_moe", "qwen3_moe"])
def test_native_mlp_only_layers_with_sparse_step_import_exactly(tmp_path, fmt):
    fields = dict(**COMMON, num_hidden_layers=6, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                  num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3])  # sparse: 1, 5
    native_config = (Qwen2MoeConfig(**fields, shared_expert_intermediate_size=16) if fmt == "qwen2_moe"
                     else Qwen3MoeConfig(**fields))
    torch.manual_seed(0)
    randomize_(NATIVE_CLASSES[fmt](native_config)).save_pretrained(tmp_path / "native")
    ours = import_native(tmp_path / "native", tmp_path / "ours", verify=False, verbose=False)
    assert json.loads((ours / "config.json").read_text())["mlp_layer_types"] == [
        "dense", "sparse", "dense", "dense", "dense", "sparse"]
    input_ids = sample_ids()
    expected = logits(NATIVE_CLASSES[fmt], tmp_path / "native", input_ids)
    assert_same_logits(logits(AutoModelForCausalLM, ours, input_ids), expected)
    again = export_native(ours, tmp_path / "again", fmt, verify=False, verbose=False)
    assert_same_logits(logits(NATIVE_CLASSES[fmt], again, input_ids), expected)


# ---------------------------------------------------------------------------------------------------------------
# Items 6-8: messages and records
# ---------------------------------------------------------------------------------------------------------------


def test_export_refusal_of_a_deepseek_upcycle_points_to_upcycle_format(tmp_path):
    config = deepseek(n_shared_experts=1, shared_expert_intermediate_size=16, qk_norm=False, routed_scaling_factor=2.0)
    ours = save_ours(config, tmp_path / "ours")
    with pytest.raises(ConversionError) as error:
        export_native(ours, tmp_path / "out", "qwen2_moe")
    message = str(error.value)
    assert "`routed_scaling_factor`=2.0" in message and "`shared_expert_gate`=False" in message
    assert "hf-moe upcycle DENSE OUT --arch deepseek ... --format qwen2_moe" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export", "import"])
def test_conversion_prints_its_verification_and_names_the_roles(tmp_path, capsys, command):
    ours = save_ours(deepseek(), tmp_path / "ours")
    out = export_native(ours, tmp_path / "exported", "qwen3_moe")
    if command == "import":
        capsys.readouterr()
        out = import_native(out, tmp_path / "imported")
    assert capsys.readouterr().out.startswith("verification: max abs logit error")
    report = json.loads((out / "verification.json").read_text())
    source, converted = ("DeepSeekMoEForCausalLM", "Qwen3MoeForCausalLM")[:: 1 if command == "export" else -1]
    assert report["source_class"] == source and report["converted_class"] == converted
    assert report["dense_class"] == source  # the key the model card reads is kept


def test_export_without_verbose_prints_nothing(tmp_path, capsys):
    ours = save_ours(deepseek(), tmp_path / "ours")
    capsys.readouterr()
    export_native(ours, tmp_path / "exported", "qwen3_moe", verify=False, verbose=False)
    assert "verification:" not in capsys.readouterr().out


@pytest.mark.parametrize(("options", "expected"), [
    (dict(num_experts=10), ("`num_experts` (--num-experts) = 10 is invalid: with granularity 4 and shared_experts 1: "
                           "allowed 3, 6, 9, 12, ...")),
    (dict(num_experts=9, top_k=4), ("`top_k` (--top-k) = 4 is invalid: with granularity 4 and shared_experts 1 and "
                                   "num_experts 9: allowed 3, 6, 9")),
])
def test_deepseek_expert_counts_list_the_valid_values(tied_llama, options, expected):
    with pytest.raises(ConversionError) as error:
        upcycle(tied_llama, None, dry_run=True, verbose=False, arch="deepseek", granularity=4, shared_experts=1,
                **options)
    assert str(error.value).startswith(expected)
