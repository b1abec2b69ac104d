"""A fine-tune from one YAML recipe: recipe -> datasets -> model + PEFT method -> Trainer -> adapter or full model.

    model: path/to/model                 # local folder or Hub id
    method: mixlora                      # full | lora | mixlora | loramoe | mola
    peft: {r: 8, num_experts: 8}         # the method's config fields (peft's LoraConfig for `lora`)
    data: {train_file: train.jsonl, prompt_field: instruction, response_field: output, max_length: 512}
    training: {learning_rate: 2.0e-4, max_steps: 1000, per_device_train_batch_size: 4}   # TrainingArguments
    output_dir: runs/mixlora

    from hf_moe.finetune.recipes import run_recipe
    result = run_recipe("recipes/mixlora.yaml", model="my/model", **{"training.max_steps": 10})

The whole recipe is checked before anything is loaded or written: a wrong field raises a ValueError that names the
field, the value and what is allowed. The output folder gets the adapter (adapter_model.safetensors) or the full
model (model.safetensors), the tokenizer, `recipe.yaml` (the recipe as it ran, overrides applied), Trainer's
results (all_results.json, trainer_state.json) and the model card (README.md, with loss.png and, for models with
routers, expert_load.png measured on the eval split).
"""

import copy
import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass

import yaml

logger = logging.getLogger(__name__)

METHODS = ("full", "lora", "mixlora", "loramoe", "mola")
LORA_MOE_METHODS = ("mixlora", "loramoe", "mola")
MOE_MODEL_TYPES = ("hf_moe_mixtral", "hf_moe_deepseek")
RECIPE_FIELDS = ("model", "trust_remote_code", "method", "peft", "data", "training", "output_dir")
DATA_FIELDS = ("train_file", "dataset", "dataset_config", "split", "eval_file", "eval_split", "text_field",
               "prompt_field", "response_field", "prompt_template", "messages_field", "type_field", "max_length")
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Alpaca's template; `{prompt}` is replaced by the prompt field. The loss sees only the response tokens.
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
# Trainer options the recipe does not have to repeat: no reporting service (runs may be offline), and the columns
# our preprocessing keeps are exactly the ones the model (and LoRAMoE's type collator) needs.
TRAINING_DEFAULTS = {"report_to": "none", "remove_unused_columns": False}
HEATMAP_BATCHES = 50  # eval batches the card's expert-load picture is measured on


@dataclass
class RecipeResult:
    output_dir: str
    train_loss: float
    eval_loss: float | None
    trainer: object  # the transformers.Trainer that ran; `trainer.model` is the trained (PEFT) model


# ----------------------------------------------------------------------------------------------------------------
# Recipe: read, override, validate (nothing is loaded or written here)


def load_recipe(path_or_dict, **overrides) -> dict:
    """The recipe as a dict, overrides applied. An override is a top-level field (a dict is merged into that
    section) or a dotted path such as `training.max_steps`; None removes the field."""
    if isinstance(path_or_dict, dict):
        recipe = copy.deepcopy(path_or_dict)
    else:
        with open(path_or_dict, encoding="utf-8") as file:
            recipe = yaml.safe_load(file) or {}
        _require(isinstance(recipe, dict), "recipe", type(recipe).__name__, "a YAML mapping of fields")
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = recipe
        for section in sections:
            node = node.setdefault(section, {})
        if value is None:  # an override of None removes the field
            node.pop(name, None)
        elif isinstance(value, dict) and isinstance(node.get(name), dict):
            node[name] = {**node[name], **value}
        else:
            node[name] = value
    return recipe


def _require(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"recipe field `{name}`={value!r} is invalid: {allowed}.")


def peft_config_class(method: str):
    from peft import LoraConfig

    from .lora_moe import LoraMoeConfig, MixLoraConfig, MolaConfig

    return {"lora": LoraConfig, "mixlora": MixLoraConfig, "loramoe": LoraMoeConfig, "mola": MolaConfig}[method]


def build_peft_config(method: str, options: dict):
    """The method's PEFT config from the recipe's `peft` section; any error becomes a ValueError naming `peft`."""
    config_class = peft_config_class(method)
    names = {field.name for field in dataclasses.fields(config_class)}
    for key, value in options.items():
        _require(key in names and key not in ("peft_type", "task_type"), f"peft.{key}", value,
                 f"not a field of {config_class.__name__} for method {method!r}")
    try:
        return config_class(task_type="CAUSAL_LM", **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"recipe section `peft` is invalid for method {method!r}: {error}") from error


def validate_recipe(recipe: dict) -> dict:
    """Check every field; returns the recipe with its defaults filled in. Raises ValueError naming the field."""
    from transformers import TrainingArguments

    for key, value in recipe.items():
        _require(key in RECIPE_FIELDS, key, value, f"allowed fields: {list(RECIPE_FIELDS)}")
    recipe = {"trust_remote_code": False, "peft": {}, "training": {}, **recipe}
    _require(isinstance(recipe.get("model"), str) and recipe["model"], "model", recipe.get("model"),
             "a local model folder or a Hub id")
    _require(isinstance(recipe["trust_remote_code"], bool), "trust_remote_code", recipe["trust_remote_code"],
             "true or false")
    _require(recipe.get("method") in METHODS, "method", recipe.get("method"), f"allowed values: {list(METHODS)}")
    _require(isinstance(recipe.get("output_dir"), str) and recipe["output_dir"], "output_dir",
             recipe.get("output_dir"), "a folder for the results (or --output on the command line)")

    method, peft = recipe["method"], recipe["peft"] or {}
    _require(isinstance(peft, dict), "peft", peft, "a mapping of the method's config fields")
    _require(method != "full" or not peft, "peft", peft, "must be empty with method 'full' (no adapter)")
    if method != "full":
        build_peft_config(method, peft)

    data = recipe.get("data")
    _require(isinstance(data, dict), "data", data, "a mapping with train_file or dataset, and a text format")
    data = recipe["data"] = {"split": "train", "max_length": 512, **data}
    for key in data:
        _require(key in DATA_FIELDS, f"data.{key}", data[key], f"allowed fields: {list(DATA_FIELDS)}")
    _require(("train_file" in data) != ("dataset" in data), "data.train_file", data.get("train_file"),
             "give exactly one of data.train_file (local json/jsonl/csv/parquet) and data.dataset (a Hub name)")
    for key in ("train_file", "eval_file"):
        for path in _as_list(data.get(key, [])):
            _require(isinstance(path, str) and os.path.splitext(path)[1] in DATA_FORMATS, f"data.{key}", path,
                     f"a file with one of the extensions {sorted(DATA_FORMATS)}")
            _require(os.path.isfile(path), f"data.{key}", path, "no such file")
    formats = [name for name in ("text_field", "prompt_field", "messages_field") if name in data]
    _require(len(formats) == 1, "data", sorted(data), "give exactly one of text_field, prompt_field (with "
             "response_field), messages_field")
    _require(("prompt_field" in data) == ("response_field" in data), "data.response_field",
             data.get("response_field"), "prompt_field and response_field go together")
    template = data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    _require("prompt_template" not in data or "prompt_field" in data, "data.prompt_template", template,
             "only used with prompt_field/response_field")
    _require(isinstance(template, str) and "{prompt}" in template, "data.prompt_template", template,
             "a string containing {prompt}")
    _require("type_field" not in data or method == "loramoe", "data.type_field", data.get("type_field"),
             "LoRAMoE's sample types: only with method 'loramoe'")
    _require(isinstance(data["max_length"], int) and data["max_length"] > 1, "data.max_length", data["max_length"],
             "an integer > 1")
    _require("eval_split" not in data or "eval_file" not in data, "data.eval_split", data.get("eval_split"),
             "give eval_split or eval_file, not both")
    if "eval_split" in data:
        _require(isinstance(data["eval_split"], float) and 0 < data["eval_split"] < 1, "data.eval_split",
                 data["eval_split"], "a fraction strictly between 0 and 1")

    training = recipe["training"] or {}
    _require(isinstance(training, dict), "training", training, "a mapping of TrainingArguments fields")
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    for key in training:
        _require(key in names and key != "output_dir", f"training.{key}", training[key],
                 "not a TrainingArguments field (the output folder is the top-level `output_dir`)")
    checkpoint = training.get("resume_from_checkpoint")
    _require(checkpoint is None or isinstance(checkpoint, bool) or os.path.isdir(checkpoint),
             "training.resume_from_checkpoint", checkpoint, "true (the last checkpoint in output_dir) or a folder")
    recipe["training"] = training
    return recipe


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------------------------------------------
# Data: load, then tokenize into input_ids / attention_mask / labels (-100 where no loss)


def load_data(data: dict):
    """-> (train dataset, eval dataset or None), untokenized."""
    from datasets import load_dataset

    def load_files(paths):
        paths = _as_list(paths)
        return load_dataset(DATA_FORMATS[os.path.splitext(paths[0])[1]], data_files=paths, split="train")

    if "train_file" in data:
        train = load_files(data["train_file"])
    else:
        train = load_dataset(data["dataset"], data.get("dataset_config"), split=data["split"])
    evaluation = load_files(data["eval_file"]) if "eval_file" in data else None
    if "eval_split" in data:
        parts = train.train_test_split(test_size=data["eval_split"], seed=0)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


def tokenize_example(example: dict, tokenizer, data: dict) -> dict:
    """One example -> input_ids, attention_mask, labels; prompt tokens (and chat turns before the last assistant
    reply) are labelled -100 so that the loss sees only the response."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text_field" in data:
        prompt_ids, response_ids = [], tokenizer(example[data["text_field"]])["input_ids"] + eos
    elif "prompt_field" in data:
        prompt = data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE).format(prompt=example[data["prompt_field"]])
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(example[data["response_field"]], add_special_tokens=False)["input_ids"] + eos
    else:
        messages = example[data["messages_field"]]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if messages[-1]["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        else:
            prompt = ""
        if not full.startswith(prompt):  # a template that rewrites earlier turns: train on everything
            prompt = ""
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + response_ids)[: data["max_length"]]
    labels = ([-100] * len(prompt_ids) + response_ids)[: data["max_length"]]
    row = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}
    if "type_field" in data:
        row[data["type_field"]] = int(example[data["type_field"]])
    return row


def tokenize_dataset(dataset, tokenizer, data: dict):
    if "messages_field" in data and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"recipe field `data.messages_field`={data['messages_field']!r} is invalid: the tokenizer "
                         "has no chat template; use prompt_field/response_field or text_field.")
    for name in ("text_field", "prompt_field", "response_field", "messages_field", "type_field"):
        if name in data and data[name] not in dataset.column_names:
            raise ValueError(f"recipe field `data.{name}`={data[name]!r} is invalid: the data's columns are "
                             f"{dataset.column_names}.")
    return dataset.map(tokenize_example, fn_kwargs={"tokenizer": tokenizer, "data": data},
                       remove_columns=dataset.column_names, desc="tokenizing")


# ----------------------------------------------------------------------------------------------------------------
# The run


def has_native_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def describe_run(trainer, output_dir: str, method: str, routed: bool):
    """The pictures and the card of a finished run: the loss curve when losses were logged, and, for a model with
    routers and an eval split, the expert load on (the first HEATMAP_BATCHES batches of) that split. Call it on
    every rank (the forwards of the expert load may be collective, as under FSDP); the main process writes. Returns
    the card's path (None on other ranks)."""
    from ..cards import EXPERT_LOAD_IMAGE, LOSS_IMAGE, expert_load, loss_curves, loss_plot, plot_expert_load, write_card

    load = None
    if routed and trainer.eval_dataset is not None:
        loader = trainer.get_eval_dataloader()
        description = "the eval split" if len(loader) <= HEATMAP_BATCHES else \
            f"the first {HEATMAP_BATCHES} batches of the eval split"
        load = expert_load(trainer.model, itertools.islice(loader, HEATMAP_BATCHES))
    if not trainer.is_world_process_zero():
        return None
    if loss_curves(trainer.state.log_history):
        loss_plot(trainer.state.log_history, os.path.join(output_dir, LOSS_IMAGE))
    if load is not None:
        plot_expert_load(load, os.path.join(output_dir, EXPERT_LOAD_IMAGE), description)
    return write_card(output_dir, "finetuned" if method == "full" else "adapter")


def run_recipe(path_or_dict, **overrides) -> RecipeResult:
    """Validate, load the model and data, train, save. Overrides as in `load_recipe`."""
    recipe = validate_recipe(load_recipe(path_or_dict, **overrides))

    import torch
    from peft import get_peft_model
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from ..cards import RECIPE_FILE
    from .lora_moe import TypeIdsCollator, add_lora_moe_callback
    from .trainer import add_router_callback

    method, data, output_dir = recipe["method"], recipe["data"], recipe["output_dir"]
    training = {**TRAINING_DEFAULTS, **recipe["training"]}
    resume = training.pop("resume_from_checkpoint", None)
    if training.get("bf16") and not has_native_bf16():
        logger.warning("hf-moe finetune: this hardware has no native bf16; training in fp32 instead")
        training["bf16"] = False

    # data
    tokenizer = AutoTokenizer.from_pretrained(recipe["model"], trust_remote_code=recipe["trust_remote_code"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_raw, eval_raw = load_data(data)
    train_dataset = tokenize_dataset(train_raw, tokenizer, data)
    eval_dataset = tokenize_dataset(eval_raw, tokenizer, data) if eval_raw is not None else None
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    if "type_field" in data:
        collator = TypeIdsCollator(collator, column=data["type_field"])

    # model: hf-moe bases return router logits so that their load-balancing loss reaches the training loss
    config = AutoConfig.from_pretrained(recipe["model"], trust_remote_code=recipe["trust_remote_code"])
    is_moe = config.model_type in MOE_MODEL_TYPES
    if is_moe:
        config.output_router_logits = True
    model = AutoModelForCausalLM.from_pretrained(recipe["model"], config=config, dtype=torch.float32,
                                                 trust_remote_code=recipe["trust_remote_code"])
    if method != "full":
        model = get_peft_model(model, build_peft_config(method, recipe["peft"]))
        model.print_trainable_parameters()

    # trainer
    args = TrainingArguments(output_dir=output_dir, **training)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=collator)
    if is_moe:
        add_router_callback(trainer)
    if method in LORA_MOE_METHODS:
        add_lora_moe_callback(trainer)
    train_output = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate() if eval_dataset is not None else None
    eval_loss = eval_metrics["eval_loss"] if eval_metrics is not None else None

    # save: adapter or full model (safetensors), tokenizer, the recipe as it ran, Trainer's results, the card.
    # Under torchrun every rank gets here; Trainer's save_* write on the main process only, and so does the rest.
    trainer.save_model(output_dir)
    trainer.save_metrics("train", train_output.metrics)  # train_results.json and all_results.json
    if eval_metrics is not None:
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()  # trainer_state.json, with the log history
    recipe_path = os.path.join(output_dir, RECIPE_FILE)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        with open(recipe_path, "w", encoding="utf-8") as file:
            yaml.safe_dump(recipe, file, sort_keys=False)
    card = describe_run(trainer, output_dir, method, routed=is_moe or method in LORA_MOE_METHODS)
    result = RecipeResult(output_dir=output_dir, train_loss=train_output.training_loss, eval_loss=eval_loss,
                          trainer=trainer)
    if not trainer.is_world_process_zero():
        return result
    weights = "adapter_model.safetensors" if method != "full" else "model.safetensors"
    print(f"hf-moe finetune: {method} run finished, train loss {train_output.training_loss:.4f}"
          + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""))
    print(f"hf-moe finetune: {'adapter' if method != 'full' else 'model'} ({weights}) and tokenizer in {output_dir}")
    print(f"hf-moe finetune: recipe as run in {recipe_path}"
          + ("" if args.save_strategy == "no" else f"; checkpoints under {output_dir}/checkpoint-*"))
    print(f"hf-moe finetune: model card in {card}")
    return result
