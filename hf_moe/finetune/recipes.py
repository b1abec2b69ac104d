"""A fine-tune from one YAML recipe: recipe -> datasets -> model + PEFT method -> Trainer -> adapter or full model.

    model: path/to/model                 # local folder or Hub id
    method: mixlora                      # full | lora | mixlora | loramoe | mola | moelora | pesc | mixture_of_loras
                                         # | mocle | expert_gate
    peft: {r: 8, num_experts: 8}         # the method's config fields (peft's LoraConfig for `lora`)
    data: {train_file: train.jsonl, prompt_field: instruction, response_field: output, max_length: 512}
    training: {learning_rate: 2.0e-4, max_steps: 1000, per_device_train_batch_size: 4}   # TrainingArguments
    parameter_groups: {freeze: [router], learning_rates: {experts: 1.0e-4}}              # optional, see below
    init_adapter: runs/stage1            # Mixture-of-LoRAs stage 2 only: the stage-1 adapter it starts from
    output_dir: runs/mixlora

    from hf_moe.finetune.recipes import run_recipe
    result = run_recipe("recipes/mixlora.yaml", model="my/model", **{"training.max_steps": 10})

The whole recipe is checked before anything is loaded or written: one ValueError names every wrong field, its value
and what is allowed ('; ' between them), including a `model` that is neither a Hub repo id nor a sound local
checkpoint folder (`hf_moe.preflight`: weights must be safetensors; pickles are refused, never loaded). A run is
seeded with `training.seed` (TrainingArguments' 42 when absent) before the model and adapter are created, so one
recipe and one seed give bit-identical results on one machine. The output folder gets the adapter
(adapter_model.safetensors) or the full model (model.safetensors), the tokenizer, `recipe.yaml` (the recipe as it ran,
overrides applied), Trainer's results (all_results.json, trainer_state.json) and the model card (README.md, with
loss.png and, for models with routers, expert_load.png measured on the eval split).

`parameter_groups` (optional) splits the trainable parameters into three groups (`trainer.parameter_groups`):
`router` (the routers: an MoE model's routers, the LoRA-expert methods' routers and MOELoRA's task gate), `experts`
(an MoE model's routed and shared experts and any LoRA on them, the LoRA experts) and `other` (everything else
that trains: attention, embeddings, MixLoRA's attention LoRA, ...). `freeze` lists groups left untrained (ST-MoE:
freezing the MoE layers, [router, experts], fine-tunes almost as well as training everything; freezing everything but
them, [other], does much worse); `learning_rates` maps groups to their own learning rate (the others keep
`training.learning_rate`, and the schedule scales each).
"""

import copy
import dataclasses
import itertools
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import yaml

logger = logging.getLogger(__name__)

METHODS = ("full", "lora", "mixlora", "loramoe", "mola", "moelora", "pesc", "mixture_of_loras", "mocle",
           "expert_gate")
LORA_MOE_METHODS = ("mixlora", "loramoe", "mola", "moelora", "pesc", "mixture_of_loras", "mocle", "expert_gate")
# the methods that read each row's task (data.task_field -> peft.task_names -> task_ids): always, or with MMoE task
# gates (`peft.task_gates: true`); `reads_tasks` decides for one recipe
TASK_METHODS = ("moelora", "mixture_of_loras", "expert_gate")
TASK_GATE_METHODS = ("mixlora", "loramoe", "mola")
# token routers, measured for the card's expert-load picture (MOELoRA's gate needs task ids, not only tokens)
ROUTED_METHODS = ("mixlora", "loramoe", "mola", "pesc")
MOE_MODEL_TYPES = ("hf_moe_mixtral", "hf_moe_deepseek")
RECIPE_FIELDS = ("model", "trust_remote_code", "method", "peft", "data", "training", "parameter_groups", "output_dir",
                 "init_adapter")
PARAMETER_GROUP_FIELDS = ("freeze", "learning_rates")
DATA_FIELDS = ("train_file", "dataset", "dataset_config", "split", "eval_file", "eval_split", "text_field",
               "prompt_field", "response_field", "prompt_template", "messages_field", "type_field", "task_field",
               "max_length")
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Alpaca's template; `{prompt}` is replaced by the prompt field. The loss sees only the response tokens.
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
# Trainer options the recipe does not have to repeat: no reporting service (runs may be offline), and the columns
# our preprocessing keeps are exactly the ones the model (and LoRAMoE's type collator) needs.
TRAINING_DEFAULTS = {"report_to": "none", "remove_unused_columns": False}
HEATMAP_BATCHES = 50  # eval batches the card's expert-load picture is measured on


@contextmanager
def quiet_peft_deprecations():
    """peft 0.21 reads `model.is_gradient_checkpointing` whenever it wraps a model (get_peft_model,
    PeftModel.from_pretrained), which transformers 5 deprecated with a FutureWarning that says nothing to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


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
    recipe = copy.deepcopy(path_or_dict) if isinstance(path_or_dict, dict) else read_recipe_file(path_or_dict)
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = recipe
        for depth, section in enumerate(sections):
            if node.get(section) is None:  # `training:` left empty in the YAML
                node[section] = {}
            _require(isinstance(node[section], dict), ".".join(sections[:depth + 1]), node[section],
                     f"a mapping of fields (the override {key} goes inside it)")
            node = node[section]
        if value is None:  # an override of None removes the field
            node.pop(name, None)
        elif isinstance(value, dict) and isinstance(node.get(name), dict):
            node[name] = {**node[name], **value}
        else:
            node[name] = value
    return recipe


def read_recipe_file(path) -> dict:
    """The YAML mapping in the file `path`; a ValueError naming the file (and the line of a YAML error) otherwise."""
    try:
        with open(path, encoding="utf-8") as file:
            recipe = yaml.safe_load(file)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder: expected a YAML recipe file (examples: recipes/*.yaml)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a recipe: not a UTF-8 text file") from None
    except OSError as error:
        raise ValueError(f"cannot read the recipe {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML {_yaml_error_place(error)}") from None
    if isinstance(recipe, dict) and set(recipe) & set(RECIPE_FIELDS):
        return recipe
    got = ("nothing" if recipe is None else "a mapping without any of those fields" if isinstance(recipe, dict)
           else f"a YAML {type(recipe).__name__}")
    raise ValueError(f"{path} is not a recipe: expected a YAML mapping with the fields model, method, data, training, "
                     f"output_dir (the file holds {got})")


def _yaml_error_place(error: yaml.YAMLError) -> str:
    """'at line L, column C: what is wrong (while parsing X from line K)', one line; PyYAML's marks count from 0."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return "(" + " ".join(str(error).split()) + ")"
    text = f"at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        text += f" ({context} from line {context_mark.line + 1})"
    return " ".join(text.split())


def _invalid(name: str, value, allowed: str) -> str:
    return f"recipe field `{name}`={value!r} is invalid: {allowed}."


def _require(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(_invalid(name, value, allowed))


class _Problems(list):
    """The invalid fields of a recipe, collected so that one error names them all."""

    def check(self, condition, name: str, value, allowed: str) -> bool:
        if not condition:
            self.append(_invalid(name, value, allowed))
        return bool(condition)

    def raise_if_any(self) -> None:
        if self:
            raise ValueError("; ".join(message.removesuffix(".") for message in self) + ".")


def peft_config_class(method: str):
    from peft import LoraConfig

    from .lora_moe import (
        ExpertGateConfig,
        LoraMoeConfig,
        MixLoraConfig,
        MixtureOfLorasConfig,
        MocleConfig,
        MoeLoraConfig,
        MolaConfig,
        PescConfig,
    )

    return {"lora": LoraConfig, "mixlora": MixLoraConfig, "loramoe": LoraMoeConfig, "mola": MolaConfig,
            "moelora": MoeLoraConfig, "pesc": PescConfig, "mixture_of_loras": MixtureOfLorasConfig,
            "mocle": MocleConfig, "expert_gate": ExpertGateConfig}[method]


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


def reads_tasks(method, peft) -> bool:
    """Does `method` with the recipe's `peft` fields read each row's task (data.task_field -> peft.task_names ->
    task_ids)? The `TASK_METHODS` always; the `TASK_GATE_METHODS` when their adapter config says so
    (`lora_moe.model.uses_task_ids`: `task_gates: true`), not when the fields build no config (an error reported on
    its own)."""
    from .lora_moe.model import uses_task_ids

    if method in TASK_METHODS:
        return True
    if method not in TASK_GATE_METHODS or not isinstance(peft, dict):
        return False
    try:
        return uses_task_ids(build_peft_config(method, peft))
    except ValueError:
        return False


def validate_recipe(recipe: dict) -> dict:
    """Check every field; returns the recipe with its defaults filled in. Raises one ValueError naming every invalid
    field ('; ' between them), so that a fresh copy of a shipped recipe lists all its CHANGE placeholders at once."""
    from transformers import TrainingArguments

    problems = _Problems()
    for key, value in recipe.items():
        problems.check(key in RECIPE_FIELDS, key, value, f"allowed fields: {list(RECIPE_FIELDS)}")
    recipe = {"trust_remote_code": False, "peft": {}, "training": {}, **recipe}
    trust_remote_code = recipe["trust_remote_code"]
    problems.check(isinstance(trust_remote_code, bool), "trust_remote_code", trust_remote_code, "true or false")
    model = recipe.get("model")
    if problems.check(isinstance(model, str) and model, "model", model, "a local model folder or a Hub id"):
        problems.extend(_model_problems(model, trust_remote_code is True))
    method = recipe.get("method")
    problems.check(method in METHODS, "method", method, f"allowed values: {list(METHODS)}")
    problems.check(isinstance(recipe.get("output_dir"), str) and recipe["output_dir"], "output_dir",
                   recipe.get("output_dir"), "a folder for the results (or --output on the command line)")

    peft = recipe["peft"] or {}
    if problems.check(isinstance(peft, dict), "peft", peft, "a mapping of the method's config fields"):
        problems.check(method != "full" or not peft, "peft", peft, "must be empty with method 'full' (no adapter)")
        if method in METHODS and method != "full":
            try:
                build_peft_config(method, peft)
            except ValueError as error:
                problems.append(str(error))

    data = recipe.get("data")
    if problems.check(isinstance(data, dict), "data", data, "a mapping with train_file or dataset, and a text format"):
        data = recipe["data"] = {"split": "train", "max_length": 512, **data}
        _check_data(data, method, reads_tasks(method, peft), problems)

    training = recipe["training"] or {}
    if problems.check(isinstance(training, dict), "training", training, "a mapping of TrainingArguments fields"):
        names = {field.name for field in dataclasses.fields(TrainingArguments)}
        for key in training:
            problems.check(key in names and key != "output_dir", f"training.{key}", training[key],
                           "not a TrainingArguments field (the output folder is the top-level `output_dir`)")
        for key in ("seed", "data_seed"):
            value = training.get(key)
            problems.check(value is None or (isinstance(value, int) and not isinstance(value, bool)),
                           f"training.{key}", value, "an integer")
        checkpoint = training.get("resume_from_checkpoint")
        problems.check(checkpoint is None or isinstance(checkpoint, bool)
                       or (isinstance(checkpoint, str) and os.path.isdir(checkpoint)),
                       "training.resume_from_checkpoint", checkpoint,
                       "true (the last checkpoint in output_dir) or a folder")
        recipe["training"] = training

    if "parameter_groups" in recipe:
        section = recipe["parameter_groups"] or {}
        if problems.check(isinstance(section, dict), "parameter_groups", section,
                          f"a mapping with the fields {list(PARAMETER_GROUP_FIELDS)}"):
            recipe["parameter_groups"] = section
            _check_parameter_groups(section, problems)
    from .lora_moe.mixture_of_loras import recipe_problems  # init_adapter: Mixture-of-LoRAs stage 2's start

    problems.extend(recipe_problems(recipe))
    problems.raise_if_any()
    return recipe


def _check_parameter_groups(section: dict, problems: _Problems) -> None:
    """`parameter_groups.freeze` (normalised to a list) and `parameter_groups.learning_rates`."""
    from .trainer import PARAMETER_GROUPS

    groups = list(PARAMETER_GROUPS)
    for key, value in section.items():
        problems.check(key in PARAMETER_GROUP_FIELDS, f"parameter_groups.{key}", value,
                       f"allowed fields: {list(PARAMETER_GROUP_FIELDS)}")
    freeze = section.get("freeze") or []
    frozen = [freeze] if isinstance(freeze, str) else freeze
    if problems.check(isinstance(frozen, list) and all(group in groups for group in frozen)
                      and len(set(frozen)) == len(frozen), "parameter_groups.freeze", freeze,
                      f"a list of distinct groups from {groups}"):
        problems.check(len(frozen) < len(groups), "parameter_groups.freeze", freeze,
                       "freezing every group leaves nothing to train")
        section["freeze"] = list(frozen)
    else:
        frozen = []
    rates = section.get("learning_rates") or {}
    if not problems.check(isinstance(rates, dict), "parameter_groups.learning_rates", rates,
                          f"a mapping of groups from {groups} to learning rates"):
        return
    for group, rate in rates.items():
        name = f"parameter_groups.learning_rates.{group}"
        if not problems.check(group in groups, name, rate, f"allowed groups: {groups}"):
            continue
        if problems.check(isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0, name, rate,
                          "a learning rate > 0 (YAML reads 1e-4 as text: write 1.0e-4)"):
            problems.check(group not in frozen, name, rate, "the group is frozen (parameter_groups.freeze)")


def _model_problems(model: str, trust_remote_code: bool) -> list[str]:
    """What is wrong with the recipe's `model`: nothing for a Hub repo id (checked when it downloads) or a sound
    local checkpoint folder (`preflight.check_checkpoint_folder`)."""
    from ..conversion.safetensors_io import ConversionError
    from ..preflight import check_checkpoint_folder, is_hub_repo_id

    if is_hub_repo_id(model):
        return []
    if not os.path.exists(model):
        return [_invalid("model", model, "neither a local model folder (it does not exist) nor a Hub repo id "
                                         "(`name` or `namespace/name`)")]
    try:
        check_checkpoint_folder(model, "recipe field `model`", trust_remote_code)
    except ConversionError as error:
        return [str(error)]
    return []


def _check_data(data: dict, method, tasks: bool, problems: _Problems) -> None:
    """`tasks`: the method, with its peft fields, reads each row's task (`reads_tasks`)."""
    for key, value in data.items():
        problems.check(key in DATA_FIELDS, f"data.{key}", value, f"allowed fields: {list(DATA_FIELDS)}")
    problems.check(("train_file" in data) != ("dataset" in data), "data.train_file", data.get("train_file"),
                   "give exactly one of data.train_file (local json/jsonl/csv/parquet) and data.dataset (a Hub name)")
    for key in ("train_file", "eval_file"):
        for path in _as_list(data.get(key, [])):
            if problems.check(isinstance(path, str) and os.path.splitext(path)[1] in DATA_FORMATS, f"data.{key}",
                              path, f"a file with one of the extensions {sorted(DATA_FORMATS)}"):
                problems.check(os.path.isfile(path), f"data.{key}", path, "no such file")
    formats = [name for name in ("text_field", "prompt_field", "messages_field") if name in data]
    problems.check(len(formats) == 1, "data", sorted(data), "give exactly one of text_field, prompt_field (with "
                   "response_field), messages_field")
    problems.check(("prompt_field" in data) == ("response_field" in data), "data.response_field",
                   data.get("response_field"), "prompt_field and response_field go together")
    template = data.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    problems.check("prompt_template" not in data or "prompt_field" in data, "data.prompt_template", template,
                   "only used with prompt_field/response_field")
    problems.check(isinstance(template, str) and "{prompt}" in template, "data.prompt_template", template,
                   "a string containing {prompt}")
    problems.check("type_field" not in data or method == "loramoe", "data.type_field", data.get("type_field"),
                   "LoRAMoE's sample types: only with method 'loramoe'")
    problems.check(method != "mocle" or "text_field" not in data, "data.text_field", data.get("text_field"),
                   "MoCLE clusters each sequence by its prompt: give prompt_field and response_field, or "
                   "messages_field")
    problems.check(method != "expert_gate" or "text_field" not in data, "data.text_field", data.get("text_field"),
                   "Expert Gate routes each sequence by its prompt's reconstruction errors: give prompt_field and "
                   "response_field, or messages_field")
    problems.check("task_field" not in data or tasks, "data.task_field", data.get("task_field"),
                   f"the task column: only with methods {list(TASK_METHODS)}, or {list(TASK_GATE_METHODS)} with "
                   f"peft.task_gates: true (MMoE gates)")
    problems.check(not tasks or isinstance(data.get("task_field"), str), "data.task_field", data.get("task_field"),
                   f"method {method!r}{'' if method in TASK_METHODS else ' with peft.task_gates'} needs the name of "
                   f"the data's task column")
    max_length = data["max_length"]
    problems.check(isinstance(max_length, int) and not isinstance(max_length, bool) and max_length > 1,
                   "data.max_length", max_length, "an integer > 1")
    problems.check("eval_split" not in data or "eval_file" not in data, "data.eval_split", data.get("eval_split"),
                   "give eval_split or eval_file, not both")
    if "eval_split" in data:
        problems.check(isinstance(data["eval_split"], float) and 0 < data["eval_split"] < 1, "data.eval_split",
                       data["eval_split"], "a fraction strictly between 0 and 1")


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ----------------------------------------------------------------------------------------------------------------
# Data: load, then tokenize into input_ids / attention_mask / labels (-100 where no loss)

TASK_IDS_COLUMN = "task_ids"  # the methods that read tasks: the id of the row's task in peft.task_names


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


def task_names_of(datasets, column: str) -> list[str]:
    """The task names: the distinct values of the task column in `datasets` (train and eval: a task an eval split
    happens to hold alone still gets an id), sorted (a task's id is its index)."""
    return sorted({str(value) for dataset in datasets if dataset is not None for value in dataset[column]})


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
    if "task_field" in data:
        row[TASK_IDS_COLUMN] = data["task_names"].index(str(example[data["task_field"]]))
    return row


def tokenize_dataset(dataset, tokenizer, data: dict):
    if "messages_field" in data and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"recipe field `data.messages_field`={data['messages_field']!r} is invalid: the tokenizer "
                         "has no chat template; use prompt_field/response_field or text_field.")
    for name in ("text_field", "prompt_field", "response_field", "messages_field", "type_field", "task_field"):
        if name in data and data[name] not in dataset.column_names:
            raise ValueError(f"recipe field `data.{name}`={data[name]!r} is invalid: the data's columns are "
                             f"{dataset.column_names}.")
    if "task_field" in data:
        unknown = sorted({str(value) for value in dataset[data["task_field"]]} - set(data["task_names"]))
        if unknown:
            raise ValueError(f"recipe field `peft.task_names`={data['task_names']!r} is invalid: the data's "
                             f"`{data['task_field']}` column also has {unknown}.")
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


def seed_run(training: dict) -> None:
    """Seed python, numpy and torch with the recipe's `training.seed` (TrainingArguments' default when absent), as
    Trainer does, with `full_determinism` too."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import enable_full_determinism, set_seed

    seed = training.get("seed", TrainingArguments.seed)
    if training.get("full_determinism"):
        enable_full_determinism(seed)
    else:
        set_seed(seed)


def check_resume_checkpoint(checkpoint, output_dir: str, method: str, trust_remote_code: bool) -> None:
    """The checkpoint a resumed run loads (True: the last one in output_dir) holds safetensors weights Trainer can
    read: a pickle-only checkpoint is refused rather than unpickled."""
    from transformers.trainer_utils import get_last_checkpoint

    from ..preflight import check_adapter_folder, check_checkpoint_folder

    if checkpoint is True:
        checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if not checkpoint:
        return  # nothing to resume from: Trainer says so
    role = "recipe field `training.resume_from_checkpoint`"
    if method == "full":
        check_checkpoint_folder(checkpoint, role, trust_remote_code)
    else:
        check_adapter_folder(checkpoint, role)


def apply_parameter_groups(model, section: dict, method: str) -> dict[str, float]:
    """Freeze the recipe's `parameter_groups.freeze` groups of `model` (before the Trainer is built) and return
    `parameter_groups.learning_rates` for `MoETrainer`. A group named in either that has no trainable parameter in
    this model with this method is an error naming the field (a dense model has no router or experts of its own)."""
    from .trainer import freeze_parameter_groups, parameter_groups

    freeze = section.get("freeze") or []
    frozen = freeze_parameter_groups(model, freeze)
    empty = [group for group in freeze if not frozen[group]]
    _require(not empty, "parameter_groups.freeze", freeze,
             f"this model has no trainable parameter in {empty} with method {method!r}")
    _require(any(param.requires_grad for param in model.parameters()), "parameter_groups.freeze", freeze,
             f"it leaves no parameter to train with method {method!r}")
    rates = dict(section.get("learning_rates") or {})
    groups = parameter_groups(model)
    for group, rate in rates.items():
        _require(any(param.requires_grad for _, param in groups[group]), f"parameter_groups.learning_rates.{group}",
                 rate, f"this model has no trainable parameter in the group {group!r} with method {method!r}")
    return rates


def run_recipe(path_or_dict, overwrite: bool = False, **overrides) -> RecipeResult:
    """Validate, load the model and data, train, save. Overrides as in `load_recipe`.

    A non-empty output folder is refused (before anything is loaded) unless the recipe resumes from its checkpoints
    (`training.resume_from_checkpoint`), or `overwrite` is set and the folder holds an earlier output of hf-moe,
    which is then removed once the model and data have loaded."""
    from ..outputs import check_output_dir, prepare_output_dir, write_owner_record

    recipe = validate_recipe(load_recipe(path_or_dict, **overrides))
    resuming = bool(recipe["training"].get("resume_from_checkpoint"))
    data_files = [*_as_list(recipe["data"].get("train_file", [])), *_as_list(recipe["data"].get("eval_file", []))]
    output_sources = [recipe["model"], *data_files]
    check_output_dir(recipe["output_dir"], overwrite, output_sources, resuming)

    import torch
    from peft import get_peft_model
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        TrainingArguments,
    )

    from ..cards import RECIPE_FILE
    from .lora_moe import TaskIdsCollator, TypeIdsCollator, add_lora_moe_callback
    from .trainer import MoETrainer, add_router_callback

    method, data, output_dir = recipe["method"], recipe["data"], recipe["output_dir"]
    training = {**TRAINING_DEFAULTS, **recipe["training"]}
    resume = training.pop("resume_from_checkpoint", None)
    check_resume_checkpoint(resume, output_dir, method, recipe["trust_remote_code"])
    if recipe.get("init_adapter"):  # Mixture-of-LoRAs stage 2's start, checked now: stage 1 may write it after
        from .lora_moe.mixture_of_loras import check_init_adapter

        check_init_adapter(recipe)
    if "dataloader_pin_memory" not in training and (training.get("use_cpu") or not torch.cuda.is_available()):
        training["dataloader_pin_memory"] = False  # pinned memory needs an accelerator; torch warns otherwise
    if training.get("bf16") and not has_native_bf16():
        logger.warning("hf-moe finetune: this hardware has no native bf16; training in fp32 instead")
        training["bf16"] = False

    # data
    tokenizer = AutoTokenizer.from_pretrained(recipe["model"], trust_remote_code=recipe["trust_remote_code"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_raw, eval_raw = load_data(data)
    if method == "mixture_of_loras" and recipe.get("init_adapter"):  # stage 2: the stage-1 experts' fields and tasks
        from .lora_moe.mixture_of_loras import stage2_options

        recipe["peft"] = stage2_options(recipe["peft"], recipe["init_adapter"])
    if reads_tasks(method, recipe["peft"]):  # task names -> ids, saved in the adapter config: ids keep their meaning
        recipe["peft"] = {**recipe["peft"], "task_names": recipe["peft"].get("task_names")
                          or task_names_of([train_raw, eval_raw], data["task_field"])}
        data = {**data, "task_names": recipe["peft"]["task_names"]}
    train_dataset = tokenize_dataset(train_raw, tokenizer, data)
    eval_dataset = tokenize_dataset(eval_raw, tokenizer, data) if eval_raw is not None else None
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    if "type_field" in data:
        collator = TypeIdsCollator(collator, column=data["type_field"])
    if "task_field" in data:
        collator = TaskIdsCollator(collator, column=TASK_IDS_COLUMN)

    # model: hf-moe bases return router logits so that their load-balancing loss reaches the training loss.
    # Seeded first: the adapter's (and any newly initialised weight's) values come from this seed; Trainer seeds
    # again with it before training (data order, dropout). Weights load from safetensors only, never from pickles.
    seed_run(training)
    config = AutoConfig.from_pretrained(recipe["model"], trust_remote_code=recipe["trust_remote_code"])
    is_moe = config.model_type in MOE_MODEL_TYPES
    if is_moe:
        config.output_router_logits = True
    model = AutoModelForCausalLM.from_pretrained(recipe["model"], config=config, dtype=torch.float32,
                                                 trust_remote_code=recipe["trust_remote_code"], use_safetensors=True)
    if method != "full":
        with quiet_peft_deprecations():
            model = get_peft_model(model, build_peft_config(method, recipe["peft"]))
    if recipe.get("init_adapter"):  # Mixture-of-LoRAs stage 2: the experts trained in stage 1
        from .lora_moe.mixture_of_loras import load_experts

        load_experts(model, recipe["init_adapter"])
    if method == "mocle":  # the k-means centroids of the training prompts, fitted before training
        from .lora_moe.mocle import fit_clusters_on_dataset

        fit_clusters_on_dataset(model, train_dataset, collator, training.get("per_device_train_batch_size", 8))
    group_learning_rates = apply_parameter_groups(model, recipe.get("parameter_groups") or {}, method)
    if method != "full":
        model.print_trainable_parameters()

    # trainer
    if int(os.environ.get("RANK", "0")) == 0:
        prepare_output_dir(output_dir, "finetune", overwrite, output_sources, resuming)
    args = TrainingArguments(output_dir=output_dir, **training)
    trainer = MoETrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=collator, group_learning_rates=group_learning_rates)
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
    card = describe_run(trainer, output_dir, method, routed=is_moe or method in ROUTED_METHODS)
    if trainer.is_world_process_zero():
        write_owner_record(output_dir, "finetune")
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
