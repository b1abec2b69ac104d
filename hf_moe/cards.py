# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Model cards for every artefact hf-moe writes, rendered from the templates in `model_cards/`, with plots.

| kind | written by | read from the folder |
|---|---|---|
| `upcycled` | `hf-moe upcycle` | config.json, upcycle.yaml, verification.json |
| `native` | `hf-moe import`, `hf-moe export` | config.json, conversion.yaml, verification.json |
| `finetuned` | `hf-moe finetune` (full), `hf-moe materialize` | config.json, recipe.yaml, all_results.json, conversion.yaml |
| `adapter` | `hf-moe finetune` (PEFT methods) | adapter_config.json, adapter weights, recipe.yaml, all_results.json |
| `model` | `save_pretrained` (any other model folder; `hf-moe push` renders it when a folder has no card) | config.json, weights |

A card is YAML metadata (huggingface_hub's `ModelCardData`: the kind's defaults from `model_cards/metadata.yaml`,
what the folder records, and the keys of the folder's existing card that we do not set, such as PEFT's) and a
Markdown body rendered by Jinja from `model_cards/<kind>.md`. Since everything is read from the folder,
`render_card` (`hf-moe card PATH`) re-renders what the conversion or fine-tune wrote; keyword facts given to
`write_card` take precedence. Pictures are embedded when present: `expert_load.png` (share of routed tokens per
layer and expert, numbers in `expert_load.json`) and `loss.png` (training and evaluation loss).

This module is a leaf: the converters call it, it never imports them. What a card says that only they know (a
native format's config in our terms, parameter counts, what an upcycle's options mean) reaches it through
`use_converters`, which `hf_moe.conversion` calls when it is imported.

A card never shows a local path: sources, commands, options and records name a local folder or file by its base
name (a folder of the Hub cache by its repository id), since the card is published with the weights.

Metric names: `eval_loss` is Trainer's evaluation loss (the mean over eval batches of the mean cross-entropy of the
label tokens, plus the auxiliary router losses of a LoRA-expert adapter); the card adds `eval perplexity (exp of
eval_loss)`. `hf-moe quickstart` reports another number, `answer perplexity`: exp of the mean cross-entropy of every
answer token of the eval split, without auxiliary losses.
"""

import importlib
import json
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import jinja2
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load, try_to_load_from_cache
from transformers.utils import logging

from .modeling.configuration_hf_moe import MoEDecoderConfig

logger = logging.get_logger(__name__)

CARD_FILE = "README.md"
KINDS = ("upcycled", "native", "finetuned", "adapter", "model")
EVAL_PERPLEXITY = "eval perplexity (exp of eval_loss)"
EXPERT_LOAD_IMAGE, EXPERT_LOAD_DATA = "expert_load.png", "expert_load.json"
LOSS_IMAGE = "loss.png"
CONVERSION_FILE = "conversion.yaml"  # how `import`, `export` and `materialize` made a folder
UPCYCLE_FILE = "upcycle.yaml"  # the options `hf-moe upcycle` ran with
VERIFICATION_FILE = "verification.json"  # the report of `verify` on a conversion
RECIPE_FILE = "recipe.yaml"
TRAINING_RECORD = (RECIPE_FILE, "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json",
                   EXPERT_LOAD_IMAGE, EXPERT_LOAD_DATA, LOSS_IMAGE)
# The card and everything it is rendered from: a copy of a checkpoint is another artefact with its own card, so
# `copy_side_files` never carries these along.
PROVENANCE_FILES = (CARD_FILE, VERIFICATION_FILE, UPCYCLE_FILE, CONVERSION_FILE, *TRAINING_RECORD)
# `write_card` keyword facts (each overrides what the folder records)
FACTS = ("title", "description", "base_model", "base_model_revision", "license", "datasets", "command", "options",
         "seed", "training", "metrics", "verification", "repo_id")
_CACHED_SNAPSHOT = re.compile(r"models--(?P<repo>.+)/snapshots/(?P<revision>[0-9a-f]{40})")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def templates_folder() -> Path:
    """`model_cards/`: inside the installed package (wheels map it to `hf_moe/model_cards`), else at the root of a
    source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "model_cards", here.parent / "model_cards"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the model card templates are missing (looked in {here / 'model_cards'} and "
                            f"{here.parent / 'model_cards'}): reinstall hf-moe")


# ---------------------------------------------------------------------------------------------------------------
# What the converters know
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """The weights of a folder as a card describes them (read by `Converters.checkpoint`)."""

    config_dict: dict  # its config.json
    config: MoEDecoderConfig | None  # in our terms: ours, or a native MoE format that `hf-moe import` reads; else None
    total: int  # parameters (a tied head counted once)
    active: int  # parameters a token runs through (all of them when `config` is None)


@dataclass(frozen=True)
class Converters:
    """What a card says that only hf-moe's converters know. The converters import this module to write their cards,
    so it does not import them: `hf_moe.conversion` hands this over (`use_converters`) when it is imported, which
    every `hf-moe` command and every converter does."""

    checkpoint: Callable[[Path], Checkpoint]  # a checkpoint folder (with config.json) in our terms
    importable: tuple[str, ...]  # the transformers MoE model types that `hf-moe import` reads
    upcycle_defaults: dict  # every option of `hf-moe upcycle` with its default
    upcycle_deviations: Callable[[dict, torch.dtype], list[str]]  # why recorded upcycle options are not exact


_converters: Converters | None = None


def use_converters(knowledge: Converters) -> None:
    """Called by `hf_moe.conversion` on import (see `Converters`)."""
    global _converters
    _converters = knowledge


def converters() -> Converters:
    """What `use_converters` handed over. A card written before any converter was imported imports them now, by
    name: their import hands it over (no import of this module names them, so the arrows still point one way)."""
    if _converters is None:
        importlib.import_module(f"{__package__}.conversion")
    return _converters


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A matplotlib figure drawn by the Agg canvas: no pyplot state, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _routers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(row label, module) for every router: MoE routers (ours, transformers' `*TopKRouter`, the same classes loaded
    as remote code) and the routed layers of the LoRA-expert PEFT methods."""
    from .finetune.lora_moe.layer import LoraExpertLayer

    routers = []
    for name, module in model.named_modules():
        is_moe_router = type(module).__name__.endswith("TopKRouter")
        is_lora_router = isinstance(module, LoraExpertLayer) and "router" in module.adapter_layer_names[0]
        if not (is_moe_router or is_lora_router):
            continue
        match = re.search(r"layers\.(\d+)\.(.+)", name)
        label = name if match is None else f"layer {match.group(1)}"
        if match is not None and (block := re.match(r"blocks\.(\d+)\.", match.group(2))):  # a block_layout sub-block
            label += f" block {block.group(1)}"
        if match is not None and is_lora_router:
            label += f" {match.group(2).split('.')[-1]}"
        routers.append((label, module))
    return routers


def _routing_of(module: torch.nn.Module, output) -> tuple | None:
    """(logits [T, E], top-k index [T, k] or None for dense gates, dispatched slots [T, k] or None for all) of the
    router call that just returned `output`."""
    from .finetune.lora_moe.layer import LoraExpertLayer

    if isinstance(module, LoraExpertLayer):
        record = module.last_record  # what this call recorded (see aux_loss.py)
        return None if record is None else (record.logits, record.top_k_index, None)
    logits, weights, index = output[:3]  # every *TopKRouter returns (logits, weights, index, ...)
    return logits, index, weights != 0  # slots dropped by capacity have weight 0


def _expert_counts(logits: torch.Tensor, index: torch.Tensor | None, dispatched: torch.Tensor | None,
                   tokens: torch.Tensor | None) -> torch.Tensor:
    """Routed slots per expert [E] (softmax weights for dense gates), counting only `tokens` [T] (None: all)."""
    logits = logits.detach().float().cpu()
    weights = torch.ones(len(logits)) if tokens is None or len(tokens) != len(logits) else tokens.float().cpu()
    if index is None:
        return (torch.softmax(logits, dim=-1) * weights[:, None]).sum(0)
    slots = torch.ones(index.shape) if dispatched is None else dispatched.float().cpu()
    return torch.zeros(logits.shape[-1]).index_add_(0, index.reshape(-1).cpu(), (slots * weights[:, None]).reshape(-1))


@torch.no_grad()
def expert_load(model: torch.nn.Module, batches: Iterable) -> dict:
    """Routing of `model` over `batches`: per router (rows) the share of its routed tokens that each expert got.

    `batches`: input_ids tensors ([B, S] or [S]) or dicts with `input_ids` and optionally `attention_mask` (padding
    is not counted) and `task_ids` (for routers chosen by task, MMoE task gates); other keys are ignored. Top-k
    routers count each token's k dispatched slots (slots dropped by capacity are not); dense LoRAMoE gates count each
    token's softmax weights. Returns `{"rows": labels, "share":
    [[...], ...], "tokens": tokens counted}`; each row sums to 1.
    """
    routers = _routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no router (no MoE layer and no LoRA-expert adapter): there is "
                         f"no expert load to measure")
    counts: dict[str, torch.Tensor] = {}
    current = {"tokens": None}

    def hook_for(label: str):
        def hook(module, args, output):
            routing = _routing_of(module, output)
            if routing is not None:
                counts[label] = counts.get(label, 0) + _expert_counts(*routing, current["tokens"])
        return hook

    handles = [module.register_forward_hook(hook_for(label)) for label, module in routers]
    device = next(model.parameters()).device
    was_training, total_tokens = model.training, 0
    model.eval()
    try:
        for batch in batches:
            inputs = {"input_ids": batch} if isinstance(batch, torch.Tensor) else {
                key: batch[key] for key in ("input_ids", "attention_mask", "task_ids") if key in batch}
            inputs = {key: (value if value.dim() > 1 or key == "task_ids" else value[None]).to(device)  # [S] -> [1, S]
                      for key, value in inputs.items()}
            mask = inputs.get("attention_mask")
            current["tokens"] = mask.reshape(-1).bool() if mask is not None else None
            total_tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    labels = [label for label, _ in routers if label in counts]
    if not labels:
        raise ValueError("the batches routed no token: pass at least one batch of input_ids")
    share = [(counts[label] / counts[label].sum().clamp(min=1e-20)).tolist() for label in labels]
    return {"rows": labels, "share": share, "tokens": total_tokens}


def expert_load_heatmap(model: torch.nn.Module, batches: Iterable, path: str | os.PathLike,
                        description: str = "the given tokens") -> Path:
    """Write a PNG heatmap of `expert_load(model, batches)` (rows: MoE layers or routed LoRA modules, columns:
    experts, value: share of routed tokens) to `path`, and its numbers to the same path with `.json` (the card
    reads them from expert_load.json next to expert_load.png).

    `description` says what the tokens were (e.g. "the eval split"); it goes into the title and the JSON.
    """
    return plot_expert_load(expert_load(model, batches), path, description)


def plot_expert_load(load: dict, path: str | os.PathLike, description: str = "the given tokens") -> Path:
    """The PNG and JSON of `expert_load_heatmap` from an `expert_load` result (e.g. computed on every rank of a
    distributed run, written by one)."""
    load = {**load, "description": description}
    path = Path(path)
    rows, width = len(load["rows"]), max(len(row) for row in load["share"])
    grid = torch.full((rows, width), float("nan"))
    for i, row in enumerate(load["share"]):
        grid[i, : len(row)] = torch.tensor(row)
    figure = _figure(min(16, max(5.0, 2.5 + 0.45 * width)), min(20, 2.0 + 0.35 * rows))
    axes = figure.add_subplot()
    image = axes.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="share of routed tokens")
    axes.set_xticks(range(width))
    axes.set_yticks(range(rows), labels=load["rows"])
    axes.set_xlabel("expert")
    title = f"Expert load over {load['tokens']:,} tokens of {description}"
    axes.set_title(textwrap.fill(title, 60), fontsize=9)
    if rows * width <= 160:  # small grids: print the shares in the cells
        bright = 0.6 * float(grid.nan_to_num(0).max())
        for i in range(rows):
            for j in range(width):
                if not math.isnan(grid[i, j]):
                    axes.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                              color="black" if grid[i, j] > bright else "white")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    path.with_suffix(".json").write_text(json.dumps(load, indent=1) + "\n", encoding="utf-8")
    return path


def loss_curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of the training loss (`loss`) and evaluation loss (`eval_loss`) in Trainer's
    `state.log_history`; a curve with no point is left out."""
    curves = {"train": [], "eval": []}
    for entry in log_history:
        for curve, key in (("train", "loss"), ("eval", "eval_loss")):
            if key in entry and "step" in entry:
                curves[curve].append((entry["step"], entry[key]))
    return {name: points for name, points in curves.items() if points}


def loss_plot(log_history: list[dict], path: str | os.PathLike) -> Path:
    """Write a PNG of the training and evaluation loss against the optimizer step, from Trainer's
    `state.log_history`. Raises ValueError when the history holds no loss (e.g. `logging_steps` > the steps run)."""
    from matplotlib.ticker import MaxNLocator

    curves = loss_curves(log_history)
    if not curves:
        raise ValueError("log_history holds no `loss` or `eval_loss` entry: nothing to plot (log more often, e.g. "
                         "training.logging_steps)")
    figure = _figure(6, 3.6)
    axes = figure.add_subplot()
    for name, points in curves.items():
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=f"{name} loss")
    axes.set_xlabel("optimizer step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


@contextmanager
def quiet_loading():
    """transformers' "Loading weights" bars off for the loads a conversion makes to check its output (verification,
    the heatmap): the conversion shows its own progress, and one upcycle would otherwise print three such bars."""
    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def conversion_heatmap(folder: Path, batches: Iterable, description: str, model_folder: Path | None = None) -> Path:
    """The expert-load heatmap of the checkpoint in `model_folder` (default: `folder`; loaded whole, fp32) on a
    conversion's calibration or verification tokens, written into `folder`. An export measures its source (ours,
    whose router hf-moe reads; the verified export routes identically)."""
    from transformers import AutoModelForCausalLM

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(model_folder or folder, dtype=torch.float32)
    return expert_load_heatmap(model, batches, folder / EXPERT_LOAD_IMAGE, description)


# ---------------------------------------------------------------------------------------------------------------
# What a folder records
# ---------------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict | None:
    return _read_record(path, yaml.safe_load, (yaml.YAMLError, UnicodeDecodeError), "YAML")


def _read_json(path: Path) -> dict | None:
    return _read_record(path, json.loads, (ValueError,), "JSON")


def _read_record(path: Path, parse, errors: tuple, language: str) -> dict | None:
    """The mapping a record file of the folder holds (None when there is no such file); a ValueError naming the
    file when it does not parse or holds something else."""
    if not path.is_file():
        return None
    try:
        record = parse(path.read_text(encoding="utf-8"))
    except errors as error:
        raise ValueError(f"{path} is not valid {language}: {' '.join(str(error).split())}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {language} {type(record).__name__}, not a mapping of fields")
    return record


def record_conversion(folder: Path, command: str, **options) -> None:
    """Write `conversion.yaml`: which hf-moe command made `folder`, from what, with which options."""
    content = yaml.safe_dump({"command": command, **options}, sort_keys=False)
    (Path(folder) / CONVERSION_FILE).write_text(content, encoding="utf-8")


def hub_reference(name: str | None, revision: str | None = None) -> tuple[str, str | None] | None:
    """(Hub repository id, revision) of a source given as a Hub id or as a folder of the Hub cache
    (`.../models--org--name/snapshots/<sha>`); None for other local folders."""
    if not name:
        return None
    if Path(name).exists():
        match = _CACHED_SNAPSHOT.search(Path(name).resolve().as_posix())
        return (match["repo"].replace("--", "/"), match["revision"]) if match else None
    return (name, revision) if _is_hub_id(name) else None


def source_license(name: str | None, revision: str | None = None) -> dict:
    """`license` (with `license_name` / `license_link` for `other`) from the card of a source folder, or of a Hub
    source in the local cache (nothing is downloaded); {} when unknown."""
    card = None
    if name and Path(name, CARD_FILE).is_file():
        card = Path(name, CARD_FILE)
    elif (reference := hub_reference(name, revision)) is not None:
        cached = try_to_load_from_cache(reference[0], CARD_FILE, revision=reference[1])
        card = Path(cached) if isinstance(cached, str) else None
    metadata = (metadata_load(card) or {}) if card is not None else {}
    return {key: metadata[key] for key in ("license", "license_name", "license_link") if metadata.get(key)}


def _router_text(config) -> str:
    if config.router_type == "expert_choice":
        text = f"expert choice: each expert takes its top tokens ({config.scoring_func} scores)"
    else:
        text = f"{config.scoring_func}, top-{config.num_experts_per_tok}, " + (
            "renormalised" if config.norm_topk_prob else "not renormalised")
    if config.routed_scaling_factor != 1:
        text += f", routed output x{config.routed_scaling_factor:g}"
    if config.n_group > 1:
        text += f", group-limited to the best {config.topk_group} of {config.n_group} expert groups"
    if config.router_selection_bias:
        text += ", selection bias (auxiliary-loss-free balancing)"
    return text


def architecture(folder: Path) -> dict | None:
    """The architecture table of the model in `folder` (our types and the native MoE formats; dense models get
    their size only); None without config.json."""
    if not (folder / "config.json").is_file():
        return None
    checkpoint = converters().checkpoint(folder)
    config_dict, config, total = checkpoint.config_dict, checkpoint.config, checkpoint.total
    model_type = config_dict.get("model_type")
    if config is None:
        return {"model_type": model_type, "experts": 0, "layers": config_dict.get("num_hidden_layers"),
                "hidden_size": config_dict.get("hidden_size"), "total": total}
    shared = "none"
    if config.n_shared_experts:
        gated = ", gated by sigmoid(w . x)" if config.shared_expert_gate else ""
        shared = f"{config.n_shared_experts}, fused into one FFN of width {config.shared_expert_intermediate_size}" \
                 f"{gated}"
    return {
        "model_type": model_type, "custom_code": bool(config_dict.get("auto_map")),
        "layers": config.num_hidden_layers, "moe_layers": config.num_sparse_layers,
        "hidden_size": config.hidden_size, "experts": config.num_experts, "expert_width": config.moe_intermediate_size,
        "top_k": config.num_experts_per_tok, "shared": shared, "router": _router_text(config),
        "total": total, "active": checkpoint.active,
    }


def adapter_table(folder: Path, adapter_config: dict) -> dict:
    """The adapter table: method, experts, rank, adapted modules, and adapter parameters in total and per token
    (a stacked expert tensor [E, ...] of a top-k method counts k/E of its parameters per token, a router per task
    [num_tasks, E, in] 1/num_tasks)."""
    from safetensors import safe_open

    peft_type, top_k = adapter_config.get("peft_type", "LORA"), adapter_config.get("top_k")
    if peft_type in ("MOCLE", "MIXTURE_OF_LORAS", "EXPERT_GATE"):  # one expert per sequence (MoCLE: + the universal)
        top_k = 1
    experts = adapter_config.get("num_experts") or adapter_config.get("num_tasks")  # one expert per task: num_tasks
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as weights:
        shapes = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    total = active = 0
    for name, shape in shapes.items():
        size, k = math.prod(shape), top_k
        if isinstance(top_k, list):  # one per layer (MoLA)
            layer = re.search(r"layers\.(\d+)\.", name)
            k = top_k[int(layer.group(1))] if layer else max(top_k)
        stacked = len(shape) == 3 and name.rsplit(".", 1)[-1].endswith(("_A", "_B"))
        per_task = len(shape) == 3 and name.endswith("_router")  # MMoE task gates: a token uses its task's router
        total += size
        active += size * min(k, shape[0]) // shape[0] if stacked and k else size // shape[0] if per_task else size
    method = {"MIXLORA": "MixLoRA", "LORAMOE": "LoRAMoE", "MOLA": "MoLA", "MOELORA": "MOELoRA",
              "PESC": "PESC", "MOCLE": "MoCLE", "MIXTURE_OF_LORAS": "Mixture-of-LoRAs", "EXPERT_GATE": "Expert Gate"
              }.get(peft_type)
    routing = {"MIXLORA": f"top-{top_k} of {experts} LoRA experts per FFN block",
               "LORAMOE": f"{experts} LoRA experts per adapted Linear, mixed by dense softmax gates",
               "MOLA": f"top-{top_k} of {experts} LoRA experts per adapted Linear",
               "MOELORA": f"{experts} LoRA experts per adapted Linear, mixed by per-task gates",
               "PESC": f"top-{top_k} of {experts} adapter experts on each FFN block's output",
               "MOCLE": f"top-1 of {experts} LoRA experts per adapted Linear, chosen per sequence by its prompt's "
                        f"cluster ({adapter_config.get('num_clusters')} k-means clusters), plus a universal LoRA "
                        f"expert",
               "MIXTURE_OF_LORAS": f"one of {experts} LoRA experts (one per task) per adapted Linear, chosen per "
                                   f"sequence by its task (stage 1) or its router on the prompt (stage 2)",
               "EXPERT_GATE": f"one of {experts} LoRA experts (one per task) per adapted Linear, chosen per sequence "
                              f"by the task autoencoder that best reconstructs its prompt's features"}.get(peft_type)
    if routing and adapter_config.get("task_gates"):
        routing += f", one router per task ({adapter_config.get('num_tasks')} tasks, MMoE gates)"
    if routing and adapter_config.get("gate_sharing") == "global":
        routing += " (one task gate for the whole model)"
    targets = adapter_config.get("target_modules")
    targets = ", ".join(f"`{t}`" for t in sorted(targets)) if isinstance(targets, list) else f"`{targets}`"
    return {"peft_type": peft_type, "method": method or peft_type, "moe": method is not None, "experts": experts,
            "top_k": top_k if top_k is not None else "all (dense gates)", "experts_text": routing,
            "r": adapter_config.get("r"), "lora_alpha": adapter_config.get("lora_alpha"), "target_modules": targets,
            "total": total, "active": active}


def _command_line(command: str, positionals: list[str], options: dict, defaults: dict) -> str:
    """`hf-moe COMMAND POSITIONALS --flag value ...` for the options that differ from their defaults."""
    parts = ["hf-moe", command, *positionals]
    for name, value in options.items():
        if name in defaults and value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            parts += [flag, ",".join(map(str, value))]
        elif value is not None:
            parts += [flag, str(value)]
    return " ".join(parts)


def _upcycled_facts(folder: Path) -> dict:
    """What upcycle.yaml and verification.json record."""
    options = _read_yaml(folder / UPCYCLE_FILE) or {}
    src = options.pop("src", None)
    shown = dict(options)
    long_list = isinstance(options.get("calibration_tokens"), list) and len(options["calibration_tokens"]) > 16
    if long_list:
        shown["calibration_tokens"] = f"{len(options['calibration_tokens'])} token ids (listed in {UPCYCLE_FILE})"
    command = _command_line("upcycle", [str(src), "OUT"], {k: v for k, v in options.items() if not (
        long_list and k == "calibration_tokens")}, {**converters().upcycle_defaults, "top_k": None})
    if long_list:
        command += f"  # with the calibration tokens of {UPCYCLE_FILE}: hf-moe upcycle --config {UPCYCLE_FILE} OUT"
    dtype = getattr(torch, (_read_json(folder / "config.json") or {}).get("dtype") or "float32")
    deviations = converters().upcycle_deviations(options, dtype) if options else None
    return {"base_model": src, "base_model_revision": options.get("revision"), "seed": options.get("seed"),
            "command": command, "options": shown, "options_file": UPCYCLE_FILE,
            "verification": _read_json(folder / VERIFICATION_FILE), "verification_hint": "`--no-verify`",
            "deviations": deviations, "exact_copies": deviations == [] and options.get("norm_topk_prob", True)}


def _conversion_facts(folder: Path) -> dict:
    """What conversion.yaml (import, export, materialize) and verification.json record."""
    record = _read_yaml(folder / CONVERSION_FILE)
    if record is None:
        return {}
    inputs = [name for name in ("src", "base", "adapter") if name in record]
    not_options = ("command", "source_format", "engine_warnings", *inputs)
    options = {name: value for name, value in record.items() if name not in not_options}
    return {"conversion": record, "base_model": record.get("src", record.get("base")),
            "command": _command_line(record["command"], [str(record[name]) for name in inputs] + ["OUT"], options,
                                     {}),
            "options": {name: value for name, value in record.items() if name != "command"},
            "options_file": CONVERSION_FILE, "verification": _read_json(folder / VERIFICATION_FILE),
            "verification_hint": "check it with `hf-moe verify SRC OUT --output OUT/verification.json`, then run "
                                 "`hf-moe card OUT`"}


def _training_facts(folder: Path) -> dict:
    """What a fine-tune leaves: recipe.yaml (the run as it ran) and all_results.json (final metrics)."""
    facts = {"metrics": _read_json(folder / "all_results.json")}
    recipe = _read_yaml(folder / RECIPE_FILE)
    if recipe is not None:
        from transformers import TrainingArguments

        default_seed = next(f.default for f in fields(TrainingArguments) if f.name == "seed")
        data = recipe.get("data") or {}
        facts.update(training=recipe, training_file=RECIPE_FILE, training_method=recipe.get("method"),
                     base_model=recipe.get("model"), seed=(recipe.get("training") or {}).get("seed", default_seed),
                     datasets=[data["dataset"]] if "dataset" in data else None,
                     command=f"hf-moe finetune {RECIPE_FILE}")
    return facts


def _adapter_facts(folder: Path) -> dict:
    config = _read_json(folder / "adapter_config.json")
    return {**_training_facts(folder), "base_model": config.get("base_model_name_or_path"),
            "base_model_revision": config.get("revision")}


def _finetuned_facts(folder: Path) -> dict:
    """A fine-tune's record; for a materialized checkpoint, the materialize step is how it was made, and the
    adapter's training record (copied next to it) is how it was trained."""
    training, conversion = _training_facts(folder), _conversion_facts(folder)
    return {**training, **{key: value for key, value in conversion.items() if value is not None}}


def _model_facts(folder: Path) -> dict:
    """A folder written by `save_pretrained` records nothing but its config and weights."""
    return {}


RECORDS = {"upcycled": _upcycled_facts, "native": _conversion_facts, "finetuned": _finetuned_facts,
           "adapter": _adapter_facts, "model": _model_facts}


def card_kind(folder: str | os.PathLike) -> str:
    """The kind of artefact in `folder`, from the files a conversion or fine-tune leaves there."""
    folder = Path(folder)
    conversion = (_read_yaml(folder / CONVERSION_FILE) or {}).get("command")
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / UPCYCLE_FILE).is_file():
        return "upcycled"
    if (folder / RECIPE_FILE).is_file() or conversion == "materialize":
        return "finetuned"
    if conversion in ("import", "export"):
        return "native"
    if (folder / "config.json").is_file():
        return "model"
    raise ValueError(f"cannot tell what {folder} holds: a card needs one of adapter_config.json (adapter), "
                     f"upcycle.yaml (upcycled), recipe.yaml or a materialize {CONVERSION_FILE} (finetuned), an "
                     f"import/export {CONVERSION_FILE} (native), config.json (model); for another folder call "
                     f"hf_moe.cards.write_card(folder, kind, ...) with kind one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


# An absolute path inside a text (POSIX: `/` after a space, quote or line start, not inside a URL or a fraction).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~%-])/[^\s`'\",;()\[\]{}<>|*]+")


def public_name(path: str) -> str:
    """How a card names a local path: a folder of the Hub cache by its repository id, anything else by its base
    name. Hub ids and other non-paths are returned as they are."""
    if not Path(path).is_absolute() and not Path(path).exists():
        return path
    reference = hub_reference(path)
    if reference is not None:
        return reference[0]
    return Path(path).name or path


def _public(value):
    """`value` (a string, or lists and dicts of them) with every absolute local path replaced by `public_name`."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda match: public_name(match.group()), value)
    if isinstance(value, dict):
        return {key: _public(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_public(item) for item in value)
    return value


def _format_metric(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_report(report: dict) -> str:
    """One line: errors and agreement (and the verdict when a tolerance was set)."""
    line = (f"max abs logit error {report['max_abs_error']:.3g}, max relative error {report['max_rel_error']:.3g}, "
            f"top-1 agreement {100 * report['top1_agreement']:.1f}% over {report['num_positions']} positions")
    if "non_finite_logits" in report:
        sides = [f"{side} ({count} of {report['num_positions']} x vocabulary)"
                 for side, count in report["non_finite_logits"].items() if count]
        return line + f"; FAILED: non-finite (NaN or inf) logits in {' and '.join(sides)}"
    if "tolerance" in report:
        line += f" ({'within' if report['passed'] else 'ABOVE'} the tolerance {report['tolerance']:g})"
    return line


def _verification_context(report: dict | None) -> dict | None:
    if report is None:
        return None
    verdict = {True: "exact mode", False: "the measured deviation of a non-exact mode"}.get(report.get("exact_mode"))
    return {**report, "summary": format_report(report), "verdict": verdict}


def _expert_load_context(folder: Path, kind: str) -> dict | None:
    data = folder / EXPERT_LOAD_DATA
    if not (folder / EXPERT_LOAD_IMAGE).is_file() or not data.is_file():
        return None
    load = json.loads(data.read_text(encoding="utf-8"))
    experts = max(len(row) for row in load["share"])
    caption = (f"Share of routed tokens per expert (columns) in each {'router' if kind == 'adapter' else 'MoE layer'} "
               f"(rows), over {load['tokens']:,} tokens of {load['description']}. Even routing gives "
               f"{1 / experts:.3f} everywhere; the most loaded expert gets {max(map(max, load['share'])):.3f}.")
    return {"image": EXPERT_LOAD_IMAGE, "data": data.name, "caption": caption}


def _context(folder: Path, kind: str, facts: dict) -> dict:
    """Everything the templates use: the folder's record, overridden by the keyword `facts` of `write_card`."""
    from . import __version__

    recorded = RECORDS[kind](folder)
    given = {**recorded, **facts}
    name, revision = given.get("base_model"), given.get("base_model_revision")
    metrics = given.get("metrics")
    if metrics and "eval_loss" in metrics and EVAL_PERPLEXITY not in metrics:
        metrics = {**metrics, EVAL_PERPLEXITY: math.exp(metrics["eval_loss"])}
    arch = architecture(folder) if kind != "adapter" else None
    adapter = adapter_table(folder, _read_json(folder / "adapter_config.json")) if kind == "adapter" else None
    model_type = arch["model_type"] if arch else None
    conversion = given.get("conversion") or {}
    hub = hub_reference(name, revision)
    local_source = (name, revision)  # where the source's license is read from
    if hub is not None:  # a Hub id, or a folder of the Hub cache: named by its repository and revision
        name, revision = hub
    elif name:
        name = public_name(str(name))
    short_name = Path(str(name)).name if name else "model"
    title = given.get("title") or {
        "upcycled": f"{short_name} upcycled to a mixture of experts",
        "native": f"{short_name} as {model_type}",
        "finetuned": f"{short_name} with merged MixLoRA experts" if conversion.get("command") == "materialize"
        else f"{short_name} fine-tuned",
        "adapter": f"{adapter['method']} adapter for {short_name}" if adapter else "",
        "model": str(given.get("repo_id") or folder.resolve().name).split("/")[-1],
    }[kind]
    training = given.get("training")
    context = {
        "title": title, "description": given.get("description"),
        "source": {"name": name, "revision": revision} if name else None,
        "architecture": arch, "adapter": adapter, "conversion": conversion,
        "materialized": conversion if conversion.get("command") == "materialize" else None,
        "made": {"command": given.get("command") or "(not recorded)", "seed": given.get("seed"),
                 "version": __version__,
                 "options": yaml.safe_dump(given["options"], sort_keys=False).rstrip() if given.get("options")
                 else None, "options_file": None if "options" in facts else recorded.get("options_file")},
        "verification": _verification_context(given.get("verification")),
        "verification_hint": recorded.get("verification_hint"),
        "deviations": recorded.get("deviations"), "exact_copies": recorded.get("exact_copies", False),
        "training": yaml.safe_dump(training, sort_keys=False).rstrip() if isinstance(training, dict) else training,
        "training_file": None if "training" in facts else recorded.get("training_file"),
        "training_method": recorded.get("training_method"),
        "metrics": [(key, _format_metric(value)) for key, value in metrics.items()] if metrics else None,
        "loss_image": LOSS_IMAGE if (folder / LOSS_IMAGE).is_file() else None,
        "expert_load": _expert_load_context(folder, kind),
        "loading": {
            "repo": given.get("repo_id") or "REPO_ID", "model_type": model_type,
            "custom_code": bool(arch and arch.get("custom_code")),
            "importable": model_type is not None and model_type in converters().importable, "base_model": name,
            "adapter": adapter["method"] if adapter else None, "plain_peft": bool(adapter and not adapter["moe"]),
            "materializable": bool(adapter and adapter["peft_type"] == "MIXLORA"),
        },
        "kind": kind,
        # metadata only
        "_hub": hub, "_license": given.get("license"), "_datasets": given.get("datasets"),
        "_moe": bool((arch and arch.get("experts")) or (adapter and adapter["moe"])), "_source": local_source,
    }
    return {key: value if key.startswith("_") else _public(value) for key, value in context.items()}


def is_hub_id(src: str) -> bool:
    """True for `owner/name` that is not a local path: a Hub repository id."""
    return not os.path.exists(src) and _HUB_ID.fullmatch(src) is not None


def _is_hub_id(value) -> bool:
    return isinstance(value, str) and is_hub_id(value)


def _metadata(folder: Path, kind: str, context: dict) -> ModelCardData:
    """The card's YAML: the kind's defaults, what the folder records, and the other keys of the folder's existing
    card (PEFT's, or an earlier render with a hand-set license). Local paths never become `base_model`: the Hub
    takes repository ids only."""
    existing = (metadata_load(folder / CARD_FILE) or {}) if (folder / CARD_FILE).is_file() else {}
    defaults = yaml.safe_load((templates_folder() / "metadata.yaml").read_text(encoding="utf-8"))[kind]
    data = {**existing, **{key: value for key, value in defaults.items() if key != "tags"}}
    base_model = context["_hub"][0] if context["_hub"] else existing.get("base_model")
    data["base_model"] = base_model if _is_hub_id(base_model) else None
    if data["base_model"] is None:
        data.pop("base_model_relation", None)  # a relation needs a base model
    derived = ["moe", "mixture-of-experts"] if context["_moe"] else []
    derived += [context["architecture"]["model_type"]] if context["architecture"] else []
    derived += [context["adapter"]["peft_type"].lower()] if context["adapter"] else []
    derived += ["custom_code"] if context["loading"]["custom_code"] else []
    kept = [tag for tag in existing.get("tags") or [] if not tag.startswith("base_model:") or _is_hub_id(
        tag.split(":")[-1])]  # PEFT tags the base as base_model:adapter:<name or path>
    data["tags"] = list(dict.fromkeys([*defaults.get("tags", []), *derived, *kept]))
    if context["_license"]:
        data["license"] = context["_license"]
    elif not existing.get("license") and context["_source"][0]:
        data.update(source_license(*context["_source"]))
    # Hub datasets only (owner/name, or a canonical name such as `wikitext`), not local files
    datasets = [name for name in context["_datasets"] or [] if _is_hub_id(name) or re.fullmatch(r"[\w-]+", name)]
    if datasets:
        data["datasets"] = datasets
    return ModelCardData(**{key: value for key, value in data.items() if value is not None})


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(templates_folder()), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def write_card(folder: str | os.PathLike, kind: str, **facts) -> Path:
    """Render the `kind` card of `folder` (see the module docstring) and save it as README.md; returns its path.

    `facts` override or complete what the folder records: title, description (a paragraph after the summary),
    base_model (Hub id or path) and base_model_revision, license, datasets (Hub ids go into the metadata), command
    and options (how it was made), training (settings dict) and metrics (final values), verification (a report of
    `hf_moe.conversion.verify.verify`), repo_id (the Hub repository the card is for, shown in the loading code).
    Raises ValueError for an unknown kind or fact.
    """
    folder = Path(folder)
    path = folder / CARD_FILE
    text = card_text(folder, kind, **facts)
    temporary = folder / f".{CARD_FILE}.tmp"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)  # atomic: a reader sees the old card or the new one
    logger.info(f"wrote the {kind} model card {path}")
    return path


def card_text(folder: str | os.PathLike, kind: str, **facts) -> str:
    """The text `write_card` saves (see there), without writing anything: `hf_moe.hub.push` uploads it as the
    README.md of a folder that has none."""
    folder = Path(folder)
    if kind not in KINDS:
        raise ValueError(f"`kind`={kind!r} is invalid: allowed values are {', '.join(KINDS)}")
    if unknown := sorted(set(facts) - set(FACTS)):
        raise ValueError(f"unknown card fact(s) {unknown}: allowed are {', '.join(FACTS)}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    context = _context(folder, kind, facts)
    card_data = _metadata(folder, kind, context)
    body = _environment().get_template(f"{kind}.md").render(card_data=card_data.to_yaml(), **{
        key: value for key, value in context.items() if not key.startswith("_")})
    return str(ModelCard(re.sub(r"\n{3,}", "\n\n", body)))


def render_card(folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """(Re)render the card of an existing hf-moe folder, its kind inferred from the files present (`card_kind`).

    A README.md that hf-moe did not write (no `hf-moe` tag in its metadata) is replaced only with `overwrite`: its
    metadata keys are kept, its text is not."""
    kind = card_kind(folder)
    path = Path(folder) / CARD_FILE
    if path.is_file() and not overwrite:
        try:
            tags = (metadata_load(path) or {}).get("tags") or []
        except yaml.YAMLError:
            tags = []
        if "hf-moe" not in tags:
            raise FileExistsError(f"{path} was not written by hf-moe (its metadata has no `hf-moe` tag): pass "
                                  f"overwrite=True (--overwrite) to replace its text (its metadata keys are kept)")
    return write_card(folder, kind)
