"""YAML recipes -> `run_recipe` / `hf-moe finetune`: every shipped recipe runs two steps on a tiny model and tiny
local data (no download), saves what it should, and an invalid recipe is refused before anything is loaded."""

import glob
import json
import math
import os

import pytest
import torch
import yaml
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_moe import MixtralMoEConfig, MixtralMoEForCausalLM, MoERouterCallback, cli
from hf_moe.finetune.lora_moe import LoraMoeLossCallback
from hf_moe.finetune.recipes import DEFAULT_PROMPT_TEMPLATE, load_recipe, run_recipe, tokenize_example, validate_recipe

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
    with pytest.raises(ValueError) as error:  # the model folder does not exist: loading would raise OSError
        run_recipe(recipe, model=str(tmp_path / "no-model"), output_dir=str(out))
    assert field in str(error.value) and allowed in str(error.value)
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
