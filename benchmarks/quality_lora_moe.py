"""Plain LoRA vs the LoRA-expert methods on the shipped tasks, at matched trainable parameters.

    python benchmarks/quality_lora_moe.py            # the shipped tiny Llama; writes a QUALITY.md section
    python benchmarks/quality_lora_moe.py --smoke    # a few steps on a few eval examples; prints only
    python benchmarks/quality_lora_moe.py --methods pesc --add   # run one method, keep the section's other rows
    python benchmarks/quality_lora_moe.py --base SmolLM2-135M-Instruct.Q4_1.gguf --section quality-lora-moe-smollm2 \\
        --max-steps 150 --batch-size 16 --learning-rate 1e-3 --eval-per-task 30 --seeds 0 1 --seeds-for lora mixlora

Every method fine-tunes the base (`--base`: a dense checkpoint folder or GGUF file; default the shipped tiny Llama,
`hf_moe.data.tiny_llama_path()`) with the same recipe as `hf-moe quickstart` (`hf_moe.quickstart.tasks_recipe`:
same data order, steps, batch, learning rate schedule and seed) on the shipped tasks' train split, and is scored on
the eval split: exact match of the greedy answer per task, and the perplexity of the answer tokens. Each method's
size (its `rank` column) is the one whose trainable-parameter count is closest to plain LoRA's at rank 16 on every
linear layer:

    LoRA      rank r on q, k, v, o, gate, up, down
    MixLoRA   8 LoRA experts (top-2) over each frozen FFN + LoRA on q, k, v, o          (Li et al. 2024)
    LoRAMoE   6 LoRA experts mixed by a dense softmax router on gate, up, down; the
              localized balancing constraint needs sample types, which the tasks
              do not define, so it is off (as in the reference without types)       (Dou et al. 2024)
    MoLA      LoRA experts (top-2) on every linear layer, 2-4-6-8 experts from the
              lowest to the highest quarter of the layers ("triangle")              (Gao et al. 2024)
    MOELoRA   total rank r split over 8 experts on every linear layer, mixed by a
              gate that reads the example's task (the tasks' `task` column), in
              training and in evaluation: task ids are an input of its model       (Liu et al. 2023)
    PESC      8 bottleneck-adapter experts (top-2) on each frozen FFN's output +
              LoRA on q, k, v, o; one size knob: adapter width d = attention rank
              r = the `rank` column                                                 (Wu et al. 2024)
    Mixture-  one LoRA expert of rank r per task on every linear layer; stage 1
    of-LoRAs  trains each task's expert on its examples (task ids from the `task`
              column), stage 2 trains the routers on the mixed data from stage 1's
              adapter; evaluated without task ids (the routers choose on the
              prompt); the step budget is split 3/4 + 1/4                           (Feng et al. 2024)
    MoCLE     4 LoRA experts + a universal LoRA expert on q and v; the training
              prompts' k-means cluster (8 clusters, fitted before training by the
              recipe runner) picks one expert per sequence                          (Gou et al. 2023)
    Expert    one LoRA expert of rank r per task on every linear layer and one
    Gate      autoencoder per task (code size 16); trains with task ids (the
              `task` column), evaluated without: the autoencoder that
              reconstructs the prompt best picks the expert                         (Aljundi et al. 2017)
    MixLoRA   MixLoRA with MMoE gates: one router per task over the same experts;
    + task    task ids from the `task` column in training and evaluation
    gates                                                                           (Ma et al. 2018)
    MOELoRA   MOELoRA with one task embedding and gate for the whole model
    global    (gate_sharing="global")

A method is one entry of METHODS (`Method`): its config class, its `peft` options at a size, and, for methods that
train in more than one run (stages) or need extra fitting steps, a `fit` hook that runs them through one recipe
runner and returns the model to evaluate; a `diagnose` hook prints what explains a score (how often a gate picks the
example's task). MoCLE needs no hook: the recipe runner fits its clusters on the training prompts before training.

With several `--seeds`, each run of a method differs only in the seed (LoRA init, router init, data order); the
table gives the mean and each seed's exact match. `--add` replaces only the rows of the methods run (and the base
model's) in the section's table and keeps the others, with the command that produced them; the runs must share the
section's settings.
"""

import argparse
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import markdown_table, read_section, write_section
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_moe.conversion.gguf import dense_source_folder
from hf_moe.data import tiny_llama_path
from hf_moe.data.tasks import load_tasks
from hf_moe.finetune.recipes import peft_config_class, run_recipe
from hf_moe.quickstart import QuickstartSettings, eval_examples, evaluate, tasks_recipe, tokenized_batches

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
REFERENCE_RANK = 16
TASK_NAMES = sorted({example["task"] for example in load_tasks("train")})  # the task methods' ids: sorted names
BASE_ROW = "base model (no fine-tune)"
STAGE1_SHARE = 0.75  # Mixture-of-LoRAs: the share of the step budget that stage 1 gets; stage 2 the rest
MIXTURE_OF_LORAS_STAGE2 = {"stage": 2, "router_input": "prompt_mean", "router_loss_coef": 1.0,
                           "stage2_routing": "label", "stage2_train_experts": True}  # recipes/..._stage2.yaml


def lora_common(rank: int) -> dict:
    return {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0}


# A stage runner: fit_stage(peft, stage_name, max_steps, **recipe_fields) runs one recipe of the method (the
# benchmark's base, batch, learning rate, seed; `data.task_field` for methods with a task column) and returns its
# RecipeResult. A `fit` hook gets it, the method's options and the whole step budget, and returns the trained model.
StageRunner = Callable[..., object]


def fit_one_stage(fit_stage: StageRunner, options: dict, max_steps: int):
    return fit_stage(options, "run", max_steps).trainer.model


def fit_mixture_of_loras(fit_stage: StageRunner, options: dict, max_steps: int):
    """Stage 1 (each task's expert on its examples; routers frozen) for STAGE1_SHARE of the steps, then stage 2
    (routers on the mixed data, experts still training) from stage 1's adapter for the rest."""
    stage1_steps = max(1, round(max_steps * STAGE1_SHARE))
    stage1_options = {**{key: value for key, value in options.items() if key not in MIXTURE_OF_LORAS_STAGE2},
                      "stage": 1}
    stage1 = fit_stage(stage1_options, "stage1", stage1_steps)
    folder = stage1.output_dir
    del stage1
    return fit_stage(options, "stage2", max(1, max_steps - stage1_steps), init_adapter=folder).trainer.model


def expert_gate_accuracy(model, batches, examples: list[dict]) -> str:
    """How often Expert Gate's autoencoders pick each eval example's own task, as evaluation decides (on the prompt,
    no task id)."""
    from hf_moe.finetune.lora_moe.expert_gate import route_prompts

    names = model.peft_config["default"].task_names
    chosen = torch.cat([route_prompts(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).expert
                        for batch in batches]).tolist()
    hits = {}
    for example, expert in zip(examples, chosen):
        hits.setdefault(example["task"], []).append(names[expert] == example["task"])
    overall = statistics.fmean(hit for task_hits in hits.values() for hit in task_hits)
    per_task = ", ".join(f"{task} {statistics.fmean(task_hits):.0%}" for task, task_hits in sorted(hits.items()))
    return f"the gate picks the example's task on {overall:.1%} of the eval prompts ({per_task})"


def mocle_clusters(model, batches, examples: list[dict]) -> str:
    """Each task's eval prompts by MoCLE cluster (nearest fitted centroid, as evaluation decides)."""
    from hf_moe.finetune.lora_moe.mocle import MocleLinear, nearest_centroid, prompt_feature_matrix

    owner = next(module for module in model.modules()
                 if isinstance(module, MocleLinear) and "default" in module.mocle_centroids)
    features = prompt_feature_matrix(model, batches, model.peft_config["default"].feature_layer)
    clusters = nearest_centroid(features, owner.mocle_centroids["default"]).tolist()
    by_task = {}
    for example, cluster in zip(examples, clusters):
        by_task.setdefault(example["task"], []).append(cluster)
    parts = []
    for task, found in sorted(by_task.items()):
        counts = sorted(((found.count(c), c) for c in set(found)), reverse=True)
        parts.append(f"{task}: " + " ".join(f"c{c} {n / len(found):.0%}" for n, c in counts))
    return "eval prompts by cluster: " + "; ".join(parts)


@dataclass(frozen=True)
class Method:
    """One method of the comparison (one row of the table)."""

    options: Callable[[int], dict]  # the recipe's `peft` section at size k: the knob the matcher searches
    size_step: int = 1  # the sizes searched: size_step, 2 * size_step, ...
    task_column: bool = False  # training reads each example's task from the tasks' `task` column
    eval_task_ids: bool = False  # evaluation gives the model task ids (the method defines them as a model input)
    fit: Callable = fit_one_stage  # (fit_stage, options, max_steps) -> trained model: stages, extra fitting steps
    note: str = ""  # what the table's notes say of it
    diagnose: Callable | None = None  # (model, batches, examples) -> one line, printed after the evaluation
    recipe_method: str | None = None  # the recipe's `method` when it is not the entry's name (a method's variant)


METHODS = {
    "lora": Method(lambda k: {**lora_common(k), "target_modules": ATTENTION + FFN}),
    "mixlora": Method(lambda k: {**lora_common(k), "num_experts": 8, "top_k": 2,
                                 "target_modules": ["mlp", *ATTENTION]}),
    "loramoe": Method(lambda k: {**lora_common(k), "num_experts": 6, "target_modules": FFN}),
    "mola": Method(lambda k: {**lora_common(k), "num_experts": "triangle", "top_k": 2,
                              "target_modules": ATTENTION + FFN}),
    "moelora": Method(
        lambda k: {**lora_common(k), "num_experts": 8, "task_names": TASK_NAMES,
                   "target_modules": ATTENTION + FFN},
        size_step=8, task_column=True, eval_task_ids=True,  # its rank is split over 8 experts
        note="MOELoRA's gate reads each example's task id (the tasks' `task` column) in training and in evaluation: "
             "task ids are an input of the model it defines, as in its paper; its rank is the total over its 8 "
             "experts."),
    "pesc": Method(
        lambda k: {**lora_common(k), "num_experts": 8, "top_k": 2, "adapter_dim": k,
                   "adapter_act": "gelu", "adapter_dropout": 0.0, "adapter_scaling": 1.0,
                   "router_aux_loss_coef": 0.01, "target_modules": ["mlp", *ATTENTION]},
        note="PESC (8 GELU bottleneck adapters, top-2, on each frozen FFN's output, scale 1, Switch balancing loss "
             "0.01, plain LoRA on attention, as recipes/pesc.yaml) has one size knob: its rank column is both the "
             "adapters' width d and the attention LoRA's rank; dropout 0 and lora_alpha 2r like the other methods "
             "(the authors: 0.1, and alpha 16 at r 64)."),
    "mixture_of_loras": Method(
        lambda k: {**lora_common(k), "task_names": TASK_NAMES,
                   "target_modules": ATTENTION + FFN, **MIXTURE_OF_LORAS_STAGE2},
        task_column=True, fit=fit_mixture_of_loras,
        note=f"Mixture-of-LoRAs (one rank-r LoRA expert per task on every linear layer) spends the same step budget "
             f"in two runs: {STAGE1_SHARE:.0%} of the steps in stage 1 (each task's expert trains on its own "
             f"examples, selected by the `task` column), the rest in stage 2 (from stage 1's adapter, the routers "
             f"learn the task from the prompt on the mixed data while the experts keep training; options of "
             f"recipes/mixture_of_loras_stage2.yaml, but the benchmark's learning rate for everything), each stage "
             f"with its own warmup and cosine schedule. Evaluation gives no task id: the stage-2 routers choose each "
             f"sequence's expert on its prompt. Its trainable count is stage 2's (experts and routers)."),
    "mocle": Method(
        lambda k: {**lora_common(k), "num_experts": 4, "num_clusters": 8, "router_temperature": 0.05,
                   "router_noise_std": 0.1, "universal_expert": True, "universal_mixing": "complement",
                   "target_modules": ["q_proj", "v_proj"]},
        diagnose=mocle_clusters,
        note="MoCLE (4 LoRA experts of rank r and a universal expert of rank r on q and v, 8 k-means clusters of the "
             "training prompts' frozen features after the middle layer, fitted by the recipe runner before training, "
             "gate temperature 0.05, training noise 0.1, universal weight 1 - g: as recipes/mocle.yaml) chooses one "
             "expert per sequence from its prompt's cluster, without task ids; dropout 0 and lora_alpha 2r like the "
             "other methods (the recipe: 0.1, alpha 4r)."),
    "expert_gate": Method(
        lambda k: {**lora_common(k), "task_names": TASK_NAMES, "autoencoder_dim": 16,
                   "temperature": 2.0, "autoencoder_loss_coef": 1.0, "statistics_samples": 1024,
                   "target_modules": ATTENTION + FFN},
        task_column=True, diagnose=expert_gate_accuracy,
        note="Expert Gate (one rank-r LoRA expert per task on every linear layer, one autoencoder per task on the "
             "frozen prompt features after the middle layer) trains each example's own task expert and autoencoder "
             "(task ids from the `task` column) and is evaluated without task ids: the autoencoder that reconstructs "
             "the prompt best picks the expert. Its autoencoders have a code size of 16, not recipes/expert_gate.yaml's "
             "100 (the paper's): at 100 the six autoencoders alone hold 309k trainable parameters, more than the whole "
             "budget; at 16 they hold 50k, as many as Mixture-of-LoRAs' routers (49k), and the experts get its rank "
             "2. Otherwise the recipe's "
             "options (temperature 2, autoencoder loss weight 1, statistics from the first 1024 prompts) but the "
             "benchmark's learning rate for everything (the recipe: 5e-4, autoencoders 3e-3), dropout 0 and "
             "lora_alpha 2r."),
    "mixlora_task_gates": Method(
        lambda k: {**lora_common(k), "num_experts": 8, "top_k": 2, "task_gates": True,
                   "task_names": TASK_NAMES, "target_modules": ["mlp", *ATTENTION]},
        task_column=True, eval_task_ids=True, recipe_method="mixlora",
        note="MixLoRA with task gates (MMoE: one router per task over the same 8 experts, top-2, as "
             "recipes/mixlora_task_gates.yaml, with the mixlora row's other options) reads each example's task id "
             "(the `task` column) in training and in evaluation, like MOELoRA: task ids are an input of the model."),
    "mixlora_contrastive": Method(
        lambda k: {**lora_common(k), "num_experts": 8, "top_k": 2, "contrastive_loss_coef": 0.05,
                   "target_modules": ["mlp", *ATTENTION]},
        recipe_method="mixlora",
        note="MixLoRA with MoELoRA's contrastive loss among experts (coefficient 0.05, temperature 0.07, at most 64 "
             "tokens a sequence) is the mixlora row plus that loss."),
    "lora_qv": Method(
        lambda k: {**lora_common(k), "target_modules": ["q_proj", "v_proj"]}, recipe_method="lora",
        note="LoRA on q and v is plain LoRA on MoCLE's targets only, at the same budget (a higher rank): the baseline "
             "that tells what MoCLE's cluster routing does from what its targets do."),
    "moelora_global": Method(
        lambda k: {**lora_common(k), "num_experts": 8, "task_names": TASK_NAMES,
                   "gate_sharing": "global", "target_modules": ATTENTION + FFN},
        size_step=8, task_column=True, eval_task_ids=True, recipe_method="moelora",
        note="MOELoRA global is the moelora row with one task embedding and one gate for the whole model "
             "(gate_sharing=\"global\", the authors' MMOELoraLinearS) instead of one per adapted Linear; task ids in "
             "training and evaluation as there."),
}


def method_options(method: str, rank: int) -> dict:
    """The recipe's `peft` section of `method` at size `rank`."""
    return METHODS[method].options(rank)


def trainable_parameters(base, method: str, rank: int) -> int:
    """Trainable parameters of `method` at `rank` on `base`, counted on a model without weights (meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
        config_class = peft_config_class(METHODS[method].recipe_method or method)
        model = get_peft_model(model, config_class(task_type="CAUSAL_LM", **method_options(method, rank)))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_rank(base, method: str, target: int) -> tuple[int, int]:
    """(size, trainable parameters) of `method` closest to `target` parameters."""
    best = None
    step = METHODS[method].size_step
    for rank in range(step, 8 * REFERENCE_RANK + 1, step):
        count = trainable_parameters(base, method, rank)
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (rank, count)
        if count > target:
            break
    return best


@torch.no_grad()
def spread(values: list[float]) -> str:
    """'mean' for one value; 'mean (v1 / v2 ...)' for several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1%}"
    return f"{mean:.1%} ({' / '.join(f'{value:.1%}' for value in values)})"


# ----------------------------------------------------------------------------------------------------------------
# --add: merging this run's rows into a section's tables


def split_row(line: str) -> list[str]:
    """The cells of one markdown table line (escaped pipes, `\\|`, stay inside their cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def tables_of(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in `text`: (header, rows)."""
    tables, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].startswith("|") and index + 1 < len(lines) and lines[index + 1].startswith("|---"):
            header, rows, index = split_row(lines[index]), [], index + 2
            while index < len(lines) and lines[index].startswith("|"):
                rows.append(split_row(lines[index]))
                index += 1
            tables.append((header, rows))
        else:
            index += 1
    return tables


@dataclass
class EarlierRows:
    """What an existing section holds, for `--add`."""

    settings: str  # its first line
    table: tuple[list[str], list[list[str]]]
    samples: tuple[list[str], list[list[str]]] | None
    sources: dict[str, list[str]] = field(default_factory=dict)  # command -> the methods whose rows it produced


def earlier_rows(section: str) -> EarlierRows:
    tables = tables_of(section)
    if not tables:
        raise SystemExit("--add: the section has no table to add rows to")
    table = tables[0]
    samples = next((found for found in tables[1:] if found[0][:2] == ["prompt", "expected"]), None)
    sources = {}
    for methods, command in re.findall(r"^Rows of (.+?) from `(.+?)`\.$", section, re.MULTILINE):
        sources.setdefault(command, []).extend(name.strip() for name in methods.split(","))
    command = re.search(r"^Command: `(.+?)`", section, re.MULTILINE)
    attributed = {name for names in sources.values() for name in names}
    if command is not None:
        sources.setdefault(command.group(1), []).extend(
            row[0] for row in table[1] if row[0] != BASE_ROW and row[0] not in attributed)
    return EarlierRows(section.strip().splitlines()[0], table, samples, sources)


COLUMN_NAMES = {"exact match": "exact match (mean, per seed)"}  # earlier names of today's columns


def current_column(name: str) -> str:
    return COLUMN_NAMES.get(name, name)


def merge_rows(header: list[str], rows: list[list[str]], earlier_header: list[str], earlier: list[list[str]],
               order: list[str]) -> list[list[str]]:
    """`rows` and the rows of `earlier` whose first cell (the method) `rows` has not, each laid out as `header`
    (a column the earlier table lacks is '-'), sorted by the first cell's place in `order` (others last)."""
    names = {row[0] for row in rows}
    kept = [[dict(zip(map(current_column, earlier_header), row)).get(column, "-") for column in header]
            for row in earlier if row[0] not in names]
    rank = {name: index for index, name in enumerate(order)}
    return sorted(rows + kept, key=lambda row: rank.get(row[0], len(order)))


def merge_samples(header: list[str], rows: list[list[str]], earlier: tuple[list[str], list[list[str]]] | None,
                  kept: list[str]) -> tuple[list[str], list[list[str]]]:
    """The sample table with the columns of the `kept` methods from the earlier one (matched by prompt), in the
    order of the result table."""
    if earlier is None:
        return header, rows
    earlier_header, earlier_rows_ = earlier
    by_prompt = {row[0]: dict(zip(earlier_header, row)) for row in earlier_rows_}
    columns = [name for name in kept if name in earlier_header]
    merged_header = header + columns
    merged = [row + [by_prompt.get(row[0], {}).get(name, "-") for name in columns] for row in rows]
    return merged_header, merged


def reorder_columns(header: list[str], rows: list[list[str]], first: int, order: list[str]):
    """Columns after the first `first` sorted by their place in `order`."""
    rank = {name: index for index, name in enumerate(order)}
    tail = sorted(range(first, len(header)), key=lambda index: rank.get(header[index], len(order)))
    picks = list(range(first)) + tail
    return [header[index] for index in picks], [[row[index] for index in picks] for row in rows]


def add_to_earlier(earlier: EarlierRows, header: list[str], rows: list[list[str]], samples_header: list[str],
                   samples_rows: list[list[str]]):
    """(rows, samples header, samples rows, provenance lines) of this run's tables merged into `earlier`'s: this
    run's rows replace the earlier rows of their methods, the earlier rows of the other methods are kept, and the
    provenance names the command that produced each kept row."""
    ran = {row[0] for row in rows}
    rows = merge_rows(header, rows, *earlier.table, [BASE_ROW, *METHODS])
    kept = [row[0] for row in rows if row[0] not in ran]
    samples_header, samples_rows = reorder_columns(
        *merge_samples(samples_header, samples_rows, earlier.samples, kept), 2,
        ["base model", *(row[0] for row in rows)])
    lines = []
    for command, names in earlier.sources.items():
        names = [name for name in names if name in kept]
        if names:
            lines.append(f"Rows of {', '.join(names)} from `{command}`.")
    missing = [column for column in header if column not in map(current_column, earlier.table[0])]
    lines.append("The other rows from the Command below"
                 + (f"; the earlier runs did not report {', '.join(missing)} ('-')." if kept and missing else "."))
    return rows, samples_header, samples_rows, "\n".join(lines) + "\n\n"


# ----------------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    quickstart = QuickstartSettings()  # the same fine-tune as `hf-moe quickstart`
    parser.add_argument("--base", default=None, help="dense checkpoint folder or GGUF file (default: shipped tiny)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-steps", type=int, default=quickstart.max_steps)
    parser.add_argument("--batch-size", type=int, default=quickstart.batch_size)
    parser.add_argument("--learning-rate", type=float, default=quickstart.learning_rate)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds-for", nargs="+", default=None,
                        help="methods run with every seed (default: all); the others with the first seed only")
    parser.add_argument("--eval-per-task", type=int, default=None, help="eval examples per task (default: all)")
    parser.add_argument("--section", default="quality-lora-moe", help="QUALITY.md section to write")
    parser.add_argument("--add", action="store_true",
                        help="keep the section's rows of the methods not run (same settings required)")
    parser.add_argument("--dry-run", action="store_true", help="print the tables; write nothing")
    args = parser.parse_args()
    if args.smoke:
        args.max_steps, args.batch_size, args.eval_per_task = 2, 4, 2
    torch.set_num_threads(2)
    examples = eval_examples(args.eval_per_task)
    seeds_text = f"seed{'s' if len(args.seeds) > 1 else ''} {', '.join(map(str, args.seeds))}"
    base_name = "the shipped tiny Llama" if args.base is None else f"`{Path(args.base).name}` (dequantized to fp32)"
    settings = (f"{args.max_steps} steps of {args.batch_size} examples, learning rate {args.learning_rate} (cosine, "
                f"5% warmup), {seeds_text}; {len(examples)} eval examples")
    earlier = None
    if args.add:
        section = read_section(args.section, "QUALITY.md")
        if section is None:
            raise SystemExit(f"--add: QUALITY.md has no section {args.section!r} to add rows to")
        earlier = earlier_rows(section)
        same_base = not earlier.settings.startswith("Base:") or earlier.settings.startswith(f"Base: {base_name}.")
        if settings not in earlier.settings or not same_base:
            raise SystemExit(f"--add merges runs of the same base and settings: the section has "
                             f"{earlier.settings!r}, this run {base_name}, {settings!r}")

    with dense_source_folder(args.base or tiny_llama_path()) as base, tempfile.TemporaryDirectory() as scratch:
        tokenizer = AutoTokenizer.from_pretrained(base)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batches = tokenized_batches(tokenizer, examples, batch_size=64)
        task_batches = tokenized_batches(tokenizer, examples, batch_size=64, task_names=TASK_NAMES)
        target = trainable_parameters(base, "lora", REFERENCE_RANK)
        dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        start = time.perf_counter()
        results = {BASE_ROW: (None, 0, [evaluate(dense, tokenizer, examples, batches, "base")],
                              time.perf_counter() - start)}
        del dense
        for name in args.methods:
            method = METHODS[name]
            rank, count = (REFERENCE_RANK, target) if name == "lora" else matched_rank(base, name, target)
            seeds = args.seeds if args.seeds_for is None or name in args.seeds_for else args.seeds[:1]
            scores, start = [], time.perf_counter()
            for seed in seeds:
                def fit_stage(peft: dict, stage: str, max_steps: int, _seed=seed, _name=name, **fields):
                    recipe = tasks_recipe(METHODS[_name].recipe_method or _name, peft, base,
                                          f"{scratch}/{_name}-{_seed}-{stage}", max_steps, args.batch_size,
                                          args.learning_rate, _seed)
                    recipe["training"]["eval_strategy"] = "no"  # scored below, once
                    if METHODS[_name].task_column:
                        recipe["data"]["task_field"] = "task"
                    return run_recipe({**recipe, **fields})

                model = method.fit(fit_stage, method_options(name, rank), args.max_steps)
                task_names = TASK_NAMES if method.eval_task_ids else None
                score = evaluate(model, tokenizer, examples, task_batches if task_names else batches,
                                 f"{name} seed {seed}", task_names)
                if method.diagnose is not None:
                    print(f"{name} seed {seed}: {method.diagnose(model, batches, examples)}", flush=True)
                scores.append(score)
                del model
            results[name] = (rank, count, scores, (time.perf_counter() - start) / len(seeds))
            print(f"{name}: {(time.perf_counter() - start) / 60:.1f} minutes", flush=True)

    tasks = sorted(next(iter(results.values()))[2][0].exact_match_per_task)
    rows = []
    for name, (rank, count, scores, seconds) in results.items():
        per_task = {task: statistics.fmean(score.exact_match_per_task[task] for score in scores) for task in tasks}
        rows.append([name, "-" if rank is None else str(rank), f"{count / 1e3:.0f}k", str(len(scores)),
                     spread([score.exact_match for score in scores]), *(f"{per_task[task]:.0%}" for task in tasks),
                     f"{statistics.fmean(score.answer_perplexity for score in scores):.3f}", f"{seconds / 60:.1f}"])
    header = ["method", "rank", "trainable", "seeds", "exact match (mean, per seed)", *tasks, "answer perplexity",
              "minutes per run"]
    samples_header, samples_rows = sample_table(examples, results)
    provenance = ""
    if earlier is not None:
        rows, samples_header, samples_rows, provenance = add_to_earlier(earlier, header, rows, samples_header,
                                                                        samples_rows)
    table = markdown_table(header, rows)
    samples = markdown_table(samples_header, samples_rows)
    print(table)
    print(samples)
    if args.smoke or args.dry_run:
        return
    names = [row[0] for row in rows]
    notes = [METHODS[name].note for name in METHODS if name in names and METHODS[name].note]
    notes_text = "".join(f"- {note}\n" for note in notes)
    body = (f"Base: {base_name}. {settings} ({len(tasks)} tasks).\n\n{table}\n\n"
            f"{notes_text + chr(10) if notes else ''}{provenance}Greedy answers on the first eval example of each "
            f"task (first seed):\n\n{samples}")
    write_section(args.section, body, document="QUALITY.md")


def shown(text: str, limit: int = 40) -> str:
    """`text` as one markdown table cell: a code span, newlines as \\n, cut after `limit` characters."""
    if not text:
        return "(empty)"
    text = text.replace("\n", "\\n")
    text = text if len(text) <= limit else text[:limit] + "..."
    return "`" + text.replace("|", "\\|") + "`"


def sample_table(examples: list[dict], results: dict) -> tuple[list[str], list[list[str]]]:
    """One eval example per task: the prompt, the expected answer and each run's greedy answer (first seed)."""
    first = {}
    for index, example in enumerate(examples):
        first.setdefault(example["task"], index)
    rows = []
    for task, index in sorted(first.items()):
        prompt = examples[index]["prompt"].strip()
        answers = [shown(scores[0].predictions[index]) for _, _, scores, _ in results.values()]
        rows.append([shown(prompt), shown(examples[index]["answer"]), *answers])
    names = [name.replace(" (no fine-tune)", "") for name in results]
    return ["prompt", "expected", *names], rows


if __name__ == "__main__":
    main()
