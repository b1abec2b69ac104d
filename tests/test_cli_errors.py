"""Every command that reads a checkpoint or adapter folder answers a broken one with one line that names the file
and what is wrong (exit code 2), never a traceback and never by unpickling; `--debug` shows the traceback."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_moe import MixLoraConfig
from hf_moe.cli import main

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A dense Llama, its upcycled MoE and that MoE exported as mixtral, a MixLoRA adapter on the Llama, and a data
    file."""
    root = tmp_path_factory.mktemp("cli-errors")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES))
    model.save_pretrained(root / "llama")
    get_peft_model(model, MixLoraConfig(r=2, num_experts=2, top_k=1, task_type="CAUSAL_LM")).save_pretrained(
        root / "adapter")
    assert main(["upcycle", str(root / "llama"), str(root / "moe"), "--num-experts", "2", "--no-verify"]) == 0
    assert main(["export", str(root / "moe"), str(root / "native"), "--format", "mixtral", "--no-verify"]) == 0
    (root / "data.jsonl").write_text('{"text": "hello world"}\n')
    return root


def break_checkpoint(folder: Path, breakage: str, weights: str = "model.safetensors") -> str:
    """Break the copied `folder`; returns the file (or folder) the error must name."""
    if breakage == "missing folder":
        shutil.rmtree(folder)
        return str(folder)
    if breakage in ("config is a JSON array", "config is not JSON"):
        config = folder / ("adapter_config.json" if weights.startswith("adapter") else "config.json")
        config.write_text("[1, 2]" if breakage == "config is a JSON array" else "{not json")
        return str(config)
    if breakage == "truncated weights":
        data = (folder / weights).read_bytes()
        (folder / weights).write_bytes(data[: len(data) // 2])
        return str(folder / weights)
    if breakage == "pickle-only weights":
        pickled = weights.replace(".safetensors", ".bin")
        (folder / weights).unlink()
        (folder / pickled).write_bytes(b"\x80\x04 a pickle that must never be opened")
        return pickled
    raise AssertionError(breakage)


BREAKAGES = ["missing folder", "config is a JSON array", "config is not JSON", "truncated weights",
             "pickle-only weights"]
# (command, which folder is broken, weights file name): argv is built from the folders
READERS = [
    ("upcycle", "llama", "model.safetensors"),
    ("import", "native", "model.safetensors"),
    ("export", "moe", "model.safetensors"),
    ("verify", "llama", "model.safetensors"),
    ("verify", "moe", "model.safetensors"),
    ("materialize", "llama", "model.safetensors"),
    ("materialize", "adapter", "adapter_model.safetensors"),
    ("finetune", "llama", "model.safetensors"),
    ("push", "moe", "model.safetensors"),
    ("card", "moe", "model.safetensors"),
]


def argv_for(command: str, paths: dict[str, Path], out: Path) -> list[str]:
    if command == "finetune":
        recipe = out.parent / "recipe.yaml"
        recipe.write_text(f"model: {paths['llama']}\nmethod: lora\noutput_dir: {out}\n"
                          f"data: {{train_file: {paths['data']}, text_field: text}}\n")
        return ["finetune", str(recipe)]
    return {
        "upcycle": ["upcycle", str(paths["llama"]), str(out), "--num-experts", "2"],
        "import": ["import", str(paths["native"]), str(out)],
        "export": ["export", str(paths["moe"]), str(out), "--format", "mixtral"],
        "verify": ["verify", str(paths["llama"]), str(paths["moe"])],
        "materialize": ["materialize", str(paths["llama"]), str(paths["adapter"]), str(out)],
        "push": ["push", str(paths["moe"]), "someone/some-model"],
        "card": ["card", str(paths["moe"])],
    }[command]


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize(("command", "broken", "weights"), READERS)
def test_a_broken_input_folder_gets_one_line_naming_the_file(folders, tmp_path, capsys, command, broken, weights,
                                                             breakage):
    if command == "card" and breakage in ("truncated weights", "pickle-only weights"):
        pytest.skip("a card reads the folder's records, not its weights")
    paths = {name: folders / name for name in ("llama", "moe", "native", "adapter")}
    paths["data"] = folders / "data.jsonl"
    paths[broken] = Path(shutil.copytree(folders / broken, tmp_path / broken))
    named = break_checkpoint(paths[broken], breakage, weights)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(argv_for(command, paths, out))
    error = capsys.readouterr().err.strip().splitlines()[-1:]  # loading bars may come before the error line
    assert code == 2, (code, error)
    assert error and error[0].startswith(f"hf-moe {command}: error: "), error
    assert named in error[0], error
    assert not out.exists()


def test_debug_shows_the_traceback(folders, tmp_path):
    config = tmp_path / "llama" / "config.json"
    shutil.copytree(folders / "llama", tmp_path / "llama")
    config.write_text(json.dumps([1, 2]))
    argv = ["upcycle", str(tmp_path / "llama"), str(tmp_path / "out")]
    assert main(argv) == 2
    with pytest.raises(ValueError, match="holds a JSON array"):
        main([*argv, "--debug"])
    with pytest.raises(ValueError, match="holds a JSON array"):
        main(["--debug", *argv])


def test_an_unexpected_error_is_one_line_with_its_type(folders, tmp_path, capsys, monkeypatch):
    import hf_moe.conversion.native as native

    def bug(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(native, "_stream", bug)
    assert main(["export", str(folders / "moe"), str(tmp_path / "out"), "--format", "mixtral"]) == 1
    assert capsys.readouterr().err == ("hf-moe export: error: RuntimeError: something unexpected (run with --debug "
                                       "for the traceback)\n")


def test_verify_of_a_moe_missing_a_tensor_names_it_in_one_line(folders, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    moe = Path(shutil.copytree(folders / "moe", tmp_path / "moe"))
    tensors = load_file(moe / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj"]
    save_file(tensors, moe / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(folders / "llama"), str(moe)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"hf-moe verify: error: {moe} does not load cleanly") and "Traceback" not in error
    assert "missing ['model.layers.1.mlp.experts.down_proj']" in error
