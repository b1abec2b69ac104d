"""YAML recipes -> `run_recipe` / `hf-moe finetune`: every shipped recipe runs two steps on a tiny model and tiny
local data (no download), saves what it should, and an invalid recipe is refused before anything is loaded."""

import glob
import json
import math
import os
import re

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, set_seed

from hf_moe import MixtralMoEConfig, MixtralMoEForCausalLM, MoERouterCallback, cli
from hf_moe.conversion.safetensors_io import ConversionError
from hf_moe.data import tasks_path, tiny_llama_path
from hf_moe.finetune.lora_moe import LoraMoeLossCallback
from hf_moe.finetune.recipes import DEFAULT_PROMPT_TEMPLATE, load_recipe, run_recipe, tokenize_example, validate_recipe
from hf_moe.outputs import read_owner_record

RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = ["###", "Instruction", "Response", ":", "user", "assistant", "system", "add", "two", "and", "three", "what",
         "is", "the", "sum", "of", "numbers", "answer", "five", "hello", "world", "a", "b", "c", "d", "e", "f", "g",
         "h", "one", "four", "six", "seven", "eight", "nine", "ten"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")
# the tiny runs: two optimizer steps, batch 2, no checkpoint, on CPU
TINY_TRAINING = {"training.max_steps": 2, "training.per_device_train_batch_size": 2,
                 "training.gradient_accumulation_steps": 1, "training.save_steps": 1000, "training.logging_steps": 1,
                 "training.warmup_steps": 0, "training.use_cpu": True, "training.disable_tqdm": True,
                 "training.dataloader_num_workers": 0}


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of a tiny dense Llama and a tiny hf-moe Mixtral (each with the tokenizer), and the data files."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": 0,
             "bos_token_id": 2, "eos_token_id": 3}
    tokenizer = make_tokenizer()
    paths = {"llama": str(root / "llama"), "moe": str(root / "moe")}
    LlamaForCausalLM(LlamaConfig(**sizes)).save_pretrained(paths["llama"])
    MixtralMoEForCausalLM(MixtralMoEConfig(num_local_experts=4, num_experts_per_tok=2, **sizes)).save_pretrained(
        paths["moe"])
    for folder in (paths["llama"], paths["moe"]):
        tokenizer.save_pretrained(folder)

    words = WORDS[10:]
    rows = [{"instruction": f"what is the sum of {words[i % 8]} and {words[(i + 1) % 8]}",
             "output": f"the answer is {words[(i + 2) % 8]}", "task_type": i % 2,
             "text": " ".join(words[i % 5:i % 5 + 6]),
             "messages": [{"role": "user", "content": f"hello {words[i % 8]}"},
                          {"role": "assistant", "content": f"hello world {words[(i + 3) % 8]}"}]}
            for i in range(8)]
    paths["data"] = str(root / "train.jsonl")
    with open(paths["data"], "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return paths


def run_shipped(name: str, tiny: dict, tmp_path, base: str = "llama", **overrides):
    return run_recipe(os.path.join(RECIPES, name), model=tiny[base], output_dir=str(tmp_path / "out"),
                      **{"data.train_file": tiny["data"], **TINY_TRAINING, **overrides})


def assert_adapter_reloads(result, base_folder: str) -> None:
    """The saved adapter on a fresh base gives the trained model's logits."""
    assert os.path.isfile(os.path.join(result.output_dir, "adapter_model.safetensors"))
    trained = result.trainer.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), result.output_dir).eval()
    input_ids = torch.tensor([[4, 9, 12, 20, 21, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, trained(input_ids=input_ids).logits,
                                   rtol=0, atol=0)


def assert_common_outputs(result) -> None:
    assert math.isfinite(result.train_loss)
    assert result.trainer.state.global_step == 2
    assert os.path.isfile(os.path.join(result.output_dir, "recipe.yaml"))
    assert os.path.isfile(os.path.join(result.output_dir, "tokenizer.json"))


def has_callback(trainer, callback_class) -> bool:
    return any(isinstance(callback, callback_class) for callback in trainer.callback_handler.callbacks)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(RECIPES, "*.yaml"))), ids=os.path.basename)
def test_every_shipped_recipe_parses_and_validates(path, tiny, tmp_path):
    recipe = validate_recipe(load_recipe(path, model=tiny["llama"], output_dir=str(tmp_path / "out"),
                                         **{"data.train_file": tiny["data"]}))
    assert recipe["trust_remote_code"] is False
    assert not (tmp_path / "out").exists()


def test_mixlora_recipe_trains_and_saves_a_reloadable_adapter(tiny, tmp_path):
    result = run_shipped("mixlora.yaml", tiny, tmp_path)
    assert_common_outputs(result)
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)  # eval_split 0.05 -> one row
    assert has_callback(result.trainer, LoraMoeLossCallback)
    assert not has_callback(result.trainer, MoERouterCallback)  # dense base: no router of its own
    assert_adapter_reloads(result, tiny["llama"])
    with open(os.path.join(result.output_dir, "recipe.yaml"), encoding="utf-8") as file:
        saved = yaml.safe_load(file)
    assert saved["model"] == tiny["llama"] and saved["training"]["max_steps"] == 2


def test_loramoe_recipe_trains_with_type_labels(tiny, tmp_path):
    result = run_shipped("loramoe.yaml", tiny, tmp_path)
    assert_common_outputs(result)
    assert any("lora_moe/lbc_loss" in entry for entry in result.trainer.state.log_history)  # the LBC saw the types
    assert_adapter_reloads(result, tiny["llama"])


def test_mola_recipe_trains_and_saves_a_reloadable_adapter(tiny, tmp_path):
    result = run_shipped("mola.yaml", tiny, tmp_path)
    assert_common_outputs(result)
    assert_adapter_reloads(result, tiny["llama"])


def test_lora_on_moe_recipe_adapts_the_fused_experts_and_logs_the_router(tiny, tmp_path):
    result = run_shipped("lora_on_moe.yaml", tiny, tmp_path, base="moe")
    assert_common_outputs(result)
    model = result.trainer.model
    assert model.config.output_router_logits is True
    assert has_callback(result.trainer, MoERouterCallback)
    assert any("experts" in name and "lora" in name for name, _ in model.named_parameters())
    assert any("router/entropy" in entry for entry in result.trainer.state.log_history)
    assert_adapter_reloads(result, tiny["moe"])


def test_continued_pretraining_recipe_saves_the_full_model(tiny, tmp_path):
    result = run_shipped("continued_pretraining.yaml", tiny, tmp_path, base="moe")
    assert_common_outputs(result)
    assert os.path.isfile(os.path.join(result.output_dir, "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    input_ids = torch.tensor([[4, 9, 12, 20, 21, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits,
                                   result.trainer.model.eval()(input_ids=input_ids).logits)


def test_prompt_tokens_are_masked_in_the_prompt_response_format():
    tokenizer = make_tokenizer()
    data = {"prompt_field": "instruction", "response_field": "output", "max_length": 64}
    row = tokenize_example({"instruction": "add two and three", "output": "five"}, tokenizer, data)
    prompt_length = len(tokenizer(DEFAULT_PROMPT_TEMPLATE.format(prompt="add two and three"))["input_ids"])
    assert row["labels"][:prompt_length] == [-100] * prompt_length
    assert row["labels"][prompt_length:] == row["input_ids"][prompt_length:] == [tokenizer.convert_tokens_to_ids(
        "five"), tokenizer.eos_token_id]


def test_chat_messages_are_masked_up_to_the_last_assistant_reply():
    tokenizer = make_tokenizer()
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]
    row = tokenize_example({"messages": messages}, tokenizer, {"messages_field": "messages", "max_length": 64})
    trained = [token for token, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "hello world </s>"


INVALID = [
    ({"method": "qlora"}, "`method`='qlora'", "allowed values"),
    ({"peft": {"rank": 8}}, "`peft.rank`", "MixLoraConfig"),
    ({"peft": {"top_k": 9}}, "`peft`", "top_k"),
    ({"epochs": 3}, "`epochs`", "allowed fields"),
    ({"training": {"learning_rat": 1e-4}}, "`training.learning_rat`", "TrainingArguments"),
    ({"data.text_field": "text"}, "`data`", "exactly one"),
    ({"data.eval_split": 2.0}, "`data.eval_split`=2.0", "between 0 and 1"),
    ({"data.train_file": "missing.jsonl"}, "`data.train_file`='missing.jsonl'", "no such file"),
    ({"data.train_file": "train.txt"}, "`data.train_file`='train.txt'", ".jsonl"),
    ({"data.type_field": "task_type"}, "`data.type_field`", "loramoe"),
    ({"trust_remote_code": "yes"}, "`trust_remote_code`", "true or false"),
]


@pytest.mark.parametrize("override, field, allowed", INVALID, ids=[case[1] for case in INVALID])
def test_invalid_recipe_is_refused_before_anything_is_loaded_or_written(override, field, allowed, tiny, tmp_path):
    recipe = load_recipe(os.path.join(RECIPES, "mixlora.yaml"), **{"data.train_file": tiny["data"], **override})
    out = tmp_path / "out"
    with pytest.raises(ValueError) as error:  # the model folder does not exist either: reported in the same line
        run_recipe(recipe, model=str(tmp_path / "no-model"), output_dir=str(out))
    assert field in str(error.value) and allowed in str(error.value)
    assert "`model`=" in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()


def write_cli_recipe(tiny, tmp_path, **changes) -> str:
    recipe = load_recipe(os.path.join(RECIPES, "mola.yaml"), model=tiny["llama"], output_dir=str(tmp_path / "unused"),
                         **{"data.train_file": tiny["data"], **TINY_TRAINING, **changes})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_cli_finetune_runs_a_recipe_with_output_and_max_steps(tiny, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert cli.main(["finetune", write_cli_recipe(tiny, tmp_path), "--output", str(out), "--max-steps", "1"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["max_steps"] == 1
    assert f"wrote the results to {out}" in capsys.readouterr().out
    record = read_owner_record(out)
    assert record["command"] == "finetune" and "adapter_model.safetensors" in record["files"]

    # a second run into the same folder: refused, unless --overwrite replaces this earlier output of hf-moe
    adapter = (out / "adapter_model.safetensors").read_bytes()
    argv = ["finetune", write_cli_recipe(tiny, tmp_path), "--output", str(out), "--max-steps", "1"]
    assert cli.main(argv) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    (out / "my-notes.txt").write_text("mine")
    assert cli.main([*argv, "--overwrite"]) == 2
    assert "did not write (my-notes.txt)" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    (out / "my-notes.txt").unlink()
    (out / "checkpoint-7").mkdir()  # what an interrupted run leaves: Trainer's, so ours to replace
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not (out / "checkpoint-7").exists() and (out / "adapter_model.safetensors").is_file()


def test_cli_finetune_reports_an_invalid_recipe_in_one_line(tiny, tmp_path, capsys):
    assert cli.main(["finetune", write_cli_recipe(tiny, tmp_path, method="qlora")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hf-moe finetune: error:") and "`method`='qlora'" in error and "\n" not in error


def test_cli_finetune_help_prints(capsys):
    assert cli.main(["finetune", "--help"]) == 0
    assert "RECIPE" in capsys.readouterr().out


def test_a_run_resumes_from_its_last_checkpoint(tiny, tmp_path):
    first = run_shipped("mola.yaml", tiny, tmp_path, **{"training.max_steps": 1, "training.save_steps": 1})
    assert (tmp_path / "out" / "checkpoint-1").is_dir()
    resumed = run_shipped("mola.yaml", tiny, tmp_path, **{"training.resume_from_checkpoint": True})
    assert first.trainer.state.global_step == 1 and resumed.trainer.state.global_step == 2
    assert math.isfinite(resumed.train_loss)


def test_an_eval_file_is_evaluated(tiny, tmp_path):
    result = run_shipped("continued_pretraining.yaml", tiny, tmp_path, **{"data.eval_split": None,
                                                                           "data.eval_file": tiny["data"]})
    assert result.eval_loss is not None and math.isfinite(result.eval_loss)


def test_a_resumed_run_refuses_a_checkpoint_whose_weights_are_a_pickle(tiny, tmp_path, monkeypatch):
    run_shipped("mola.yaml", tiny, tmp_path, **{"training.max_steps": 1, "training.save_steps": 1})
    checkpoint = tmp_path / "out" / "checkpoint-1"
    torch.save(load_file(checkpoint / "adapter_model.safetensors"), checkpoint / "adapter_model.bin")
    (checkpoint / "adapter_model.safetensors").unlink()
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("torch.load was called"))
    with pytest.raises(ConversionError, match=r"training\.resume_from_checkpoint.*\(adapter_model\.bin\); these "
                                              r"are pickles"):
        run_shipped("mola.yaml", tiny, tmp_path, **{"training.resume_from_checkpoint": True})


# ----------------------------------------------------------------------------------------------------------------
# Reproducibility: one recipe and one seed give one result, for every method, however the process got there

# Each method's shipped recipe fitted to the shipped tiny Llama (dense, so plain LoRA goes on attention only; no chat
# template, so prompt/response) and to a short prompt template, so that a tiny max_length keeps the response.
METHOD_RECIPES = {
    "full": ("continued_pretraining.yaml", {}),
    "lora": ("lora_on_moe.yaml", {"peft.target_parameters": None, "data.messages_field": None,
                                  "data.prompt_field": "instruction", "data.response_field": "output",
                                  "data.prompt_template": "{prompt}"}),
    "mixlora": ("mixlora.yaml", {"data.prompt_template": "{prompt}"}),
    "loramoe": ("loramoe.yaml", {"data.prompt_template": "{prompt}"}),
    "mola": ("mola.yaml", {"data.prompt_template": "{prompt}"}),
    "mocle": ("mocle.yaml", {"data.prompt_field": "instruction", "data.response_field": "output",
                             "peft.num_clusters": 2}),  # its k-means is fitted on the 8 rows: seeded too
    "expert_gate": ("expert_gate.yaml", {"data.prompt_field": "instruction", "data.response_field": "output",
                                         "data.task_field": "task_type"}),  # two tasks: the rows' types
}
SHORT_RUN = {"data.max_length": 24, "training.max_steps": 2, "training.per_device_train_batch_size": 2,
             "training.gradient_accumulation_steps": 1, "training.save_strategy": "no", "training.logging_steps": 1,
             "training.warmup_steps": 0, "training.bf16": False, "training.use_cpu": True,
             "training.disable_tqdm": True, "training.dataloader_num_workers": 0}


@pytest.fixture(scope="module")
def shipped_tasks(tmp_path_factory) -> str:
    """Eight examples of the shipped tasks dataset, with the columns the shipped recipes name."""
    rows = [json.loads(line) for line in (tasks_path() / "train.jsonl").read_text().splitlines()[:8]]
    path = tmp_path_factory.mktemp("tasks") / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": row["prompt"], "output": row["answer"], "text": row["text"],
                                        "task_type": index % 2}) + "\n" for index, row in enumerate(rows)))
    return str(path)


def run_on_tiny_llama(method: str, data_file: str, output_dir, process_seed: int, **overrides):
    """A short run of `method` on the shipped tiny Llama, after setting the process's random state to
    `process_seed` (whatever ran before in a process, or a fresh process, leaves some state: the run must not
    depend on it)."""
    set_seed(process_seed)
    recipe, fitted = METHOD_RECIPES[method]
    return run_recipe(os.path.join(RECIPES, recipe), model=str(tiny_llama_path()), output_dir=str(output_dir),
                      **{"data.train_file": data_file, **SHORT_RUN, **fitted, **overrides})


def saved_weights(result) -> dict[str, torch.Tensor]:
    adapter = os.path.join(result.output_dir, "adapter_model.safetensors")
    return load_file(adapter if os.path.isfile(adapter) else os.path.join(result.output_dir, "model.safetensors"))


def differing_tensors(first: dict, second: dict) -> list[str]:
    """Names of the tensors whose bytes differ (bit for bit: -0.0 is not 0.0, NaN is compared as bytes)."""
    assert first.keys() == second.keys()
    return [name for name in first
            if not torch.equal(first[name].reshape(-1).view(torch.uint8), second[name].reshape(-1).view(torch.uint8))]


def logged_losses(result) -> list[float]:
    return [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("method", METHOD_RECIPES)
def test_two_runs_of_a_recipe_with_the_same_seed_save_bit_identical_weights(method, shipped_tasks, tmp_path):
    first = run_on_tiny_llama(method, shipped_tasks, tmp_path / "first", process_seed=1)
    second = run_on_tiny_llama(method, shipped_tasks, tmp_path / "second", process_seed=2)
    assert len(logged_losses(first)) == 2 and all(math.isfinite(loss) for loss in logged_losses(first))
    assert logged_losses(first) == logged_losses(second)
    weights = saved_weights(first)
    assert not differing_tensors(weights, saved_weights(second)), f"of {len(weights)} tensors"


def test_the_seed_is_the_recipes_training_seed_and_trainings_default_without_one(shipped_tasks, tmp_path):
    default = run_on_tiny_llama("loramoe", shipped_tasks, tmp_path / "default", 1, **{"training.seed": None})
    explicit = run_on_tiny_llama("loramoe", shipped_tasks, tmp_path / "42", 2, **{"training.seed": 42})
    other = run_on_tiny_llama("loramoe", shipped_tasks, tmp_path / "7", 1, **{"training.seed": 7})
    assert not differing_tensors(saved_weights(default), saved_weights(explicit))
    assert len(differing_tensors(saved_weights(default), saved_weights(other))) == len(saved_weights(other))


# ----------------------------------------------------------------------------------------------------------------
# What a wrong recipe file or a wrong recipe answers: one line naming the file or every invalid field

MALFORMED_YAML = {  # text -> where PyYAML finds the problem
    "unclosed bracket": ("model: m\nmethod: [lora, mola\ndata: {}\n", "at line 3, column 5"),
    "indented key": ("model: m\nmethod: lora\n  data: x\n", "at line 3, column 7"),
    "tab indentation": ("model: m\ndata:\n\ttrain_file: x\n", "at line 3, column 1"),
    "unterminated quote": ("model: m\nmethod: 'lora\n", "at line 3, column 1"),
    "two colons": ("model: m\nmethod: lora: mola\n", "at line 2, column 13"),
    "two documents": ("model: m\n---\n- a\n", "at line 2, column 1"),
}


@pytest.mark.parametrize("text, place", MALFORMED_YAML.values(), ids=MALFORMED_YAML.keys())
def test_malformed_yaml_is_reported_with_the_file_and_line(text, place, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        load_recipe(str(path))
    assert str(error.value).startswith(f"{path} is not valid YAML {place}: ") and "\n" not in str(error.value)
    assert cli.main(["finetune", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"hf-moe finetune: error: {error.value}"


NOT_RECIPES = {  # notes.txt's text -> what the file holds
    "prose": ("Notes on the run.\nTry more experts next time\n", "a YAML str"),
    "a list": ("- model\n- method\n", "a YAML list"),
    "a number": ("42\n", "a YAML int"),
    "empty": ("", "nothing"),
    "other fields": ("ideas: more experts\ntodo: [eval]\n", "a mapping without any of those fields"),
}


@pytest.mark.parametrize("text, holds", NOT_RECIPES.values(), ids=NOT_RECIPES.keys())
def test_a_file_that_is_not_a_recipe_is_named_as_such(text, holds, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text(text)
    expected = (f"{path} is not a recipe: expected a YAML mapping with the fields model, method, data, training, "
                f"output_dir (the file holds {holds})")
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        run_recipe(str(path))
    assert cli.main(["finetune", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"hf-moe finetune: error: {expected}"


@pytest.mark.parametrize("name, answer", [("missing.yaml", ": no such recipe file"),
                                          ("folder", " is a folder: expected a YAML recipe file")])
def test_a_recipe_path_that_is_no_file_is_reported_in_one_line(name, answer, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    path = tmp_path / name
    assert cli.main(["finetune", str(path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"hf-moe finetune: error: {path}{answer}")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(RECIPES, "*.yaml"))), ids=os.path.basename)
def test_a_shipped_recipe_run_as_written_names_every_placeholder(path, tmp_path, monkeypatch, capsys):
    """The README's `hf-moe finetune recipes/<x>.yaml --output ... --max-steps ...` before the CHANGE lines are
    changed: the placeholder model and the missing data file are reported together, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    with open(path, encoding="utf-8") as file:
        recipe = yaml.safe_load(file)
    assert cli.main(["finetune", path, "--output", "runs/out", "--max-steps", "1000"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hf-moe finetune: error:") and "\n" not in error
    assert f"`model`={recipe['model']!r} is invalid: neither a local model folder" in error
    assert f"`data.train_file`={recipe['data']['train_file']!r} is invalid: no such file" in error
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("model", ["path/to/model", "./my-model", "/no/such/model", "org/name--x", "a/b/"])
def test_a_model_that_is_neither_a_folder_nor_a_hub_id_is_named(model, tiny, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"`model`={model!r} is invalid: neither a local model folder")):
        validate_recipe(load_recipe(os.path.join(RECIPES, "mola.yaml"), model=model,
                                    **{"data.train_file": tiny["data"]}))


@pytest.mark.parametrize("model", ["gpt2", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-0.5B"])
def test_a_hub_id_passes_validation_without_a_download(model, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = validate_recipe(load_recipe(os.path.join(RECIPES, "mola.yaml"), model=model,
                                         **{"data.train_file": tiny["data"]}))
    assert recipe["model"] == model


def test_every_invalid_field_is_reported_at_once(tiny, tmp_path):
    recipe = load_recipe(os.path.join(RECIPES, "mixlora.yaml"), model="path/to/model", method="qlora",
                         **{"data.train_file": "missing.jsonl", "data.eval_split": 2.0,
                            "training.learning_rat": 1e-4, "training.seed": "x"})
    with pytest.raises(ValueError) as error:
        validate_recipe(recipe)
    message = str(error.value)
    for field in ("`model`='path/to/model'", "`method`='qlora'", "`data.train_file`='missing.jsonl'",
                  "`data.eval_split`=2.0", "`training.learning_rat`", "`training.seed`='x'"):
        assert field in message, field
    assert message.count("; recipe field") == 5 and "\n" not in message


def test_an_override_into_a_section_that_is_not_a_mapping_is_reported(tmp_path):
    with pytest.raises(ValueError, match=r"`training`='fast' is invalid: a mapping of fields \(the override "
                                         r"training\.max_steps goes inside it\)"):
        load_recipe({"model": "m", "training": "fast"}, **{"training.max_steps": 5})
    assert load_recipe({"model": "m", "training": None}, **{"training.max_steps": 5})["training"] == {"max_steps": 5}
