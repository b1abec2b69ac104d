"""`hf_moe.preflight`: a broken checkpoint or adapter folder is refused with one line naming the file and what is
wrong, before anything is loaded or written, by the checks themselves and by the commands that use them
(`run_recipe` for the recipe's model, `materialize` for BASE and ADAPTER). The broken folders are copies of the
shipped tiny Llama (and of a MixLoRA adapter trained on it for zero steps), broken one way each."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_moe
from hf_moe.conversion.safetensors_io import ConversionError
from hf_moe.data import tasks_path, tiny_llama_path
from hf_moe.finetune.lora_moe.materialize import materialize
from hf_moe.finetune.recipes import run_recipe
from hf_moe.preflight import check_adapter_folder, check_checkpoint_folder, is_hub_repo_id

TINY_LLAMA = tiny_llama_path()
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(scope="module")
def sound(tmp_path_factory):
    """A sharded copy of the tiny Llama (3 shards) and a MixLoRA adapter on it, both sound, and a data file."""
    root = tmp_path_factory.mktemp("sound")
    base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    base.save_pretrained(root / "sharded", max_shard_size="4MB")
    adapter = get_peft_model(base, hf_moe.MixLoraConfig(task_type="CAUSAL_LM", r=2, num_experts=2, top_k=1))
    adapter.save_pretrained(root / "adapter")
    rows = [json.loads(line) for line in (tasks_path() / "train.jsonl").read_text().splitlines()[:8]]
    (root / "train.jsonl").write_text("".join(json.dumps({"instruction": row["prompt"], "output": row["answer"]})
                                              + "\n" for row in rows))
    return {"sharded": root / "sharded", "adapter": root / "adapter", "data": root / "train.jsonl"}


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything hands a file to torch.load (pickled weights must be refused, not read)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.load was called on {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)


def cut(file: Path, size) -> None:
    """Truncate `file` to `size(current size)` bytes, as an interrupted download or copy leaves it."""
    os.truncate(file, size(file.stat().st_size))


def pickle_weights(folder: Path, safetensors_name: str, pickle_name: str) -> None:
    """Replace the safetensors weights by the same tensors in a pickle (torch.save), as old checkpoints ship them."""
    torch.save(load_file(folder / safetensors_name), folder / pickle_name)
    (folder / safetensors_name).unlink()


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder)


def file_instead_of_folder(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


MODEL_WEIGHTS = "model.safetensors"
REMOTE_CODE = {"model_type": "my_custom_llama", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                             "AutoModelForCausalLM": "modeling_custom.CustomModel"}}
# id -> (break the copied tiny Llama folder, the file the message names (relative to the folder; "" = the folder),
#        words the message says). Every way a folder can be unusable: missing, no or unreadable config, pickled,
#        truncated or corrupt weights (single file and shards), code it needs but was not trusted with.
BROKEN_CHECKPOINTS = {
    "missing": (remove_folder, "", "does not exist"),
    "a file": (file_instead_of_folder, "", "is not a folder"),
    "no config.json": (lambda folder: (folder / "config.json").unlink(), "", "has no config.json"),
    "config.json not JSON": (lambda folder: (folder / "config.json").write_text('{"model_type": "llama",'),
                             "config.json", "is not valid JSON"),
    "config.json an array": (lambda folder: (folder / "config.json").write_text("[1, 2]"), "config.json",
                             "holds a JSON array"),
    "config.json a string": (lambda folder: (folder / "config.json").write_text('"llama"'), "config.json",
                             "holds a JSON string"),
    "config.json without model_type": (lambda folder: set_config(folder, model_type=None), "config.json",
                                       "model_type"),
    "pytorch_model.bin only": (lambda folder: pickle_weights(folder, MODEL_WEIGHTS, "pytorch_model.bin"), "",
                               ("(pytorch_model.bin)", "pickles")),
    "model.bin only": (lambda folder: pickle_weights(folder, MODEL_WEIGHTS, "model.bin"), "",
                       ("(model.bin)", "pickles")),
    "model.pt only": (lambda folder: pickle_weights(folder, MODEL_WEIGHTS, "model.pt"), "", ("(model.pt)", "pickles")),
    "no weights": (lambda folder: (folder / MODEL_WEIGHTS).unlink(), "", "has no model.safetensors"),
    "weights one byte short": (lambda folder: cut(folder / MODEL_WEIGHTS, lambda size: size - 1), MODEL_WEIGHTS,
                               "is truncated"),
    "weights cut in half": (lambda folder: cut(folder / MODEL_WEIGHTS, lambda size: size // 2), MODEL_WEIGHTS,
                            "is truncated"),
    "weights cut in the header": (lambda folder: cut(folder / MODEL_WEIGHTS, lambda size: 100), MODEL_WEIGHTS,
                                  "is truncated"),
    "weights cut to 3 bytes": (lambda folder: cut(folder / MODEL_WEIGHTS, lambda size: 3), MODEL_WEIGHTS,
                               "is truncated"),
    "weights empty": (lambda folder: cut(folder / MODEL_WEIGHTS, lambda size: 0), MODEL_WEIGHTS, "is truncated"),
    "weights with trailing bytes": (lambda folder: (folder / MODEL_WEIGHTS).open("ab").write(b"\0" * 16),
                                    MODEL_WEIGHTS, "is corrupt"),
    "weights header garbage": (lambda folder: (folder / MODEL_WEIGHTS).write_bytes(
        (12).to_bytes(8, "little") + b"not a header" + b"\0" * 64), MODEL_WEIGHTS, "corrupt safetensors header"),
    "unknown model_type, no auto_map": (lambda folder: set_config(folder, model_type="my_custom_llama"),
                                        "config.json", "neither transformers nor hf-moe knows"),
    "remote code not trusted": (lambda folder: set_config(folder, **REMOTE_CODE), "config.json",
                                "trust_remote_code"),
}
# the same, for a sharded checkpoint: every listed shard is checked, not only the first


def second_shard(folder: Path) -> Path:
    return sorted(folder.glob("model-*.safetensors"))[1]


def pickle_shards(folder: Path) -> None:
    for shard in sorted(folder.glob("model-*.safetensors")):
        pickle_weights(folder, shard.name, "pytorch_" + shard.name.replace(".safetensors", ".bin"))
    (folder / "model.safetensors.index.json").unlink()


INDEX = "model.safetensors.index.json"
BROKEN_SHARDED = {
    "a shard one byte short": (lambda folder: cut(second_shard(folder), lambda size: size - 1), second_shard,
                               "is truncated"),
    "a shard cut in half": (lambda folder: cut(second_shard(folder), lambda size: size // 2), second_shard,
                            "is truncated"),
    "a shard missing": (lambda folder: second_shard(folder).rename(folder / "moved-away"), INDEX,
                        "which is missing"),
    "index not JSON": (lambda folder: (folder / INDEX).write_text("{"), INDEX, "is not valid JSON"),
    "shards pickled": (pickle_shards, "", ("(pytorch_model-00001-of-", "pickles")),
}


def broken_copy(source: Path, tmp_path: Path, breakage) -> tuple[Path, str, str]:
    """A copy of `source` broken by `breakage`; -> (folder, the path the message must name, the words it must say).
    `breakage` = (damage(folder), the file the message names: a name in the folder, "" for the folder itself, or a
    function of the intact folder giving the file; the words the message says: one string or a tuple)."""
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    damage, named, words = breakage
    named = str(named(folder)) if callable(named) else str(folder / named) if named else str(folder)
    damage(folder)
    return folder, named, words


def assert_one_line_naming(error: Exception, role: str, named: str, words) -> None:
    """One line, starting with the role, naming the path (a pickle by its folder and file name), saying `words`."""
    message = str(error)
    assert "\n" not in message
    assert message.startswith(role), message
    assert named in message, message
    assert all(word in message for word in ((words,) if isinstance(words, str) else words)), message


BROKEN = [pytest.param("tiny", case, id=name) for name, case in BROKEN_CHECKPOINTS.items()] + \
         [pytest.param("sharded", case, id=name) for name, case in BROKEN_SHARDED.items()]


def source_folder(kind: str, sound) -> Path:
    return TINY_LLAMA if kind == "tiny" else sound["sharded"]


# ----------------------------------------------------------------------------------------------------------------
# checkpoint folders


@pytest.mark.parametrize("kind", ["tiny", "sharded"])
def test_a_sound_checkpoint_folder_passes_and_gives_its_config(kind, sound):
    config = check_checkpoint_folder(source_folder(kind, sound), "BASE")
    assert config["model_type"] == "llama" and config["hidden_size"] == 256


@pytest.mark.parametrize("kind, breakage", BROKEN)
def test_a_broken_checkpoint_folder_is_refused_naming_the_file(kind, breakage, sound, tmp_path, no_unpickling):
    folder, named, words = broken_copy(source_folder(kind, sound), tmp_path, breakage)
    with pytest.raises(ConversionError) as error:
        check_checkpoint_folder(folder, "BASE")
    assert_one_line_naming(error.value, "BASE: ", named, words)


@pytest.mark.parametrize("kind, breakage", BROKEN)
def test_finetune_refuses_a_broken_model_folder_before_loading_or_writing(kind, breakage, sound, tmp_path,
                                                                          no_unpickling):
    folder, named, words = broken_copy(source_folder(kind, sound), tmp_path, breakage)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:
        run_recipe(str(RECIPES / "mola.yaml"), model=str(folder), output_dir=str(out),
                   **{"data.train_file": str(sound["data"])})
    assert_one_line_naming(error.value, "recipe field `model`", named, words)
    assert not out.exists()


@pytest.mark.parametrize("kind, breakage", BROKEN)
def test_materialize_refuses_a_broken_base_before_loading_or_writing(kind, breakage, sound, tmp_path, no_unpickling):
    folder, named, words = broken_copy(source_folder(kind, sound), tmp_path, breakage)
    with pytest.raises(ConversionError) as error:
        materialize(folder, sound["adapter"], tmp_path / "moe")
    assert_one_line_naming(error.value, "BASE: ", named, words)
    assert not (tmp_path / "moe").exists()


def test_an_auto_map_with_a_model_type_transformers_knows_needs_no_remote_code(tmp_path):
    """hf-moe's own checkpoints carry an auto_map; a known model_type loads with the installed code, so transformers
    does not ask for trust_remote_code, and neither do we."""
    folder, _, _ = broken_copy(TINY_LLAMA, tmp_path, (lambda folder: set_config(
        folder, auto_map={"AutoConfig": "configuration_custom.CustomConfig"}), "", ""))
    assert check_checkpoint_folder(folder, "BASE")["model_type"] == "llama"
    assert AutoConfig.from_pretrained(folder, trust_remote_code=False).model_type == "llama"


def test_an_unknown_model_type_with_an_auto_map_needs_trusted_code_that_is_in_the_folder(tmp_path):
    folder, _, _ = broken_copy(TINY_LLAMA, tmp_path, (lambda folder: set_config(folder, **REMOTE_CODE), "", ""))
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers refuses it too
        AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with pytest.raises(ConversionError, match=r"configuration_custom\.py is missing"):
        check_checkpoint_folder(folder, "BASE", trust_remote_code=True)
    (folder / "configuration_custom.py").write_text("")
    (folder / "modeling_custom.py").write_text("")
    assert check_checkpoint_folder(folder, "BASE", trust_remote_code=True)["model_type"] == "my_custom_llama"


def test_finetune_asks_for_the_recipes_trust_remote_code_only_if_the_code_is_trusted(sound, tmp_path):
    folder, _, _ = broken_copy(TINY_LLAMA, tmp_path, (lambda folder: set_config(folder, **REMOTE_CODE), "", ""))
    with pytest.raises(ValueError, match=r"the recipe's `trust_remote_code: true`\) only if you trust that code"):
        run_recipe(str(RECIPES / "mola.yaml"), model=str(folder), output_dir=str(tmp_path / "out"),
                   **{"data.train_file": str(sound["data"])})


def test_hub_repo_ids_are_told_from_local_paths(tmp_path, monkeypatch):
    assert is_hub_repo_id("meta-llama/Llama-3.2-1B") and is_hub_repo_id("gpt2")
    for name in ("path/to/model", "./model", "/abs/model", "bad--name", str(tmp_path / "missing")):
        assert not is_hub_repo_id(name), name
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not is_hub_repo_id("org/model")  # a local folder, even though it reads as a repo id


# ----------------------------------------------------------------------------------------------------------------
# adapter folders

ADAPTER_WEIGHTS = "adapter_model.safetensors"
BROKEN_ADAPTERS = {
    "missing": (remove_folder, "", "does not exist"),
    "a file": (file_instead_of_folder, "", "is not a folder"),
    "no adapter_config.json": (lambda folder: (folder / "adapter_config.json").unlink(), "",
                               "has no adapter_config.json"),
    "adapter_config.json not JSON": (lambda folder: (folder / "adapter_config.json").write_text("peft_type: LORA"),
                                     "adapter_config.json", "is not valid JSON"),
    "adapter_config.json an array": (lambda folder: (folder / "adapter_config.json").write_text("[1, 2]"),
                                     "adapter_config.json", "holds a JSON array"),
    "adapter_config.json without peft_type": (lambda folder: (folder / "adapter_config.json").write_text("{}"),
                                              "adapter_config.json", "has no `peft_type`"),
    "adapter_model.bin only": (lambda folder: pickle_weights(folder, ADAPTER_WEIGHTS, "adapter_model.bin"), "",
                               ("(adapter_model.bin)", "pickles")),
    "no weights": (lambda folder: (folder / ADAPTER_WEIGHTS).unlink(), "", "has no adapter_model.safetensors"),
    "weights one byte short": (lambda folder: cut(folder / ADAPTER_WEIGHTS, lambda size: size - 1),
                               ADAPTER_WEIGHTS, "is truncated"),
    "weights cut in half": (lambda folder: cut(folder / ADAPTER_WEIGHTS, lambda size: size // 2), ADAPTER_WEIGHTS,
                            "is truncated"),
    "weights cut to 3 bytes": (lambda folder: cut(folder / ADAPTER_WEIGHTS, lambda size: 3), ADAPTER_WEIGHTS,
                               "is truncated"),
}


def test_a_sound_adapter_folder_passes_and_gives_its_config(sound):
    assert check_adapter_folder(sound["adapter"], "ADAPTER")["peft_type"] == "MIXLORA"


@pytest.mark.parametrize("breakage", BROKEN_ADAPTERS.values(), ids=BROKEN_ADAPTERS.keys())
def test_a_broken_adapter_folder_is_refused_naming_the_file(breakage, sound, tmp_path, no_unpickling):
    folder, named, words = broken_copy(sound["adapter"], tmp_path, breakage)
    with pytest.raises(ConversionError) as error:
        check_adapter_folder(folder, "ADAPTER")
    assert_one_line_naming(error.value, "ADAPTER: ", named, words)


@pytest.mark.parametrize("breakage", BROKEN_ADAPTERS.values(), ids=BROKEN_ADAPTERS.keys())
def test_materialize_refuses_a_broken_adapter_before_loading_or_writing(breakage, sound, tmp_path, no_unpickling):
    folder, named, words = broken_copy(sound["adapter"], tmp_path, breakage)
    with pytest.raises(ConversionError) as error:
        materialize(TINY_LLAMA, folder, tmp_path / "moe")
    assert_one_line_naming(error.value, "ADAPTER: ", named, words)
    assert not (tmp_path / "moe").exists()
