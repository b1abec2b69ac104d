"""Plain LoRA vs the LoRA-expert methods on the shipped tasks, at matched trainable parameters.

    python benchmarks/quality_lora_moe.py            # the shipped tiny Llama; writes a QUALITY.md section
    python benchmarks/quality_lora_moe.py --smoke    # a few steps on a few eval examples; prints only
    python benchmarks/quality_lora_moe.py --base SmolLM2-135M-Instruct.Q4_1.gguf --section quality-lora-moe-smollm2 \\
        --max-steps 150 --batch-size 16 --learning-rate 1e-3 --eval-per-task 30 --seeds 0 1 --seeds-for lora mixlora

Every method fine-tunes the base (`--base`: a dense checkpoint folder or GGUF file; default the shipped tiny Llama,
`hf_moe.data.tiny_llama_path()`) with the same recipe as `hf-moe quickstart` (`hf_moe.quickstart.tasks_recipe`:
same data order, steps, batch, learning rate schedule and seed) on the shipped tasks' train split, and is scored on
the eval split: exact match of the greedy answer per task, and the perplexity of the answer tokens. Each method's
rank is the one whose trainable-parameter count is closest to plain LoRA's at rank 16 on every linear layer:

    LoRA      rank r on q, k, v, o, gate, up, down
    MixLoRA   8 LoRA experts (top-2) over each frozen FFN + LoRA on q, k, v, o          (Li et al. 2024)
    LoRAMoE   6 LoRA experts mixed by a dense softmax router on gate, up, down; the
              localized balancing constraint needs sample types, which the tasks
              do not define, so it is off (as in the reference without types)       (Dou et al. 2024)
    MoLA      LoRA experts (top-2) on every linear layer, 2-4-6-8 experts from the
              lowest to the highest quarter of the layers ("triangle")              (Gao et al. 2024)
    MOELoRA   total rank r split over 8 experts on every linear layer, mixed by a
              gate that reads the example's task (the tasks' `task` column)         (Liu et al. 2023)

With several `--seeds`, each run of a method differs only in the seed (LoRA init, router init, data order); the
table gives the mean and each seed's exact match.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table, write_section
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_moe import LoraMoeConfig, MixLoraConfig, MoeLoraConfig, MolaConfig
from hf_moe.conversion.gguf import dense_source_folder
from hf_moe.data import tiny_llama_path
from hf_moe.data.tasks import load_tasks
from hf_moe.finetune.recipes import run_recipe
from hf_moe.quickstart import QuickstartSettings, eval_examples, evaluate, tasks_recipe, tokenized_batches

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
REFERENCE_RANK = 16
TASK_NAMES = sorted({example["task"] for example in load_tasks("train")})  # MOELoRA's task ids: sorted names


def method_options(method: str, rank: int) -> dict:
    """The recipe's `peft` section of `method` at `rank`."""
    common = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0}
    return {
        "lora": {**common, "target_modules": ATTENTION + FFN},
        "mixlora": {**common, "num_experts": 8, "top_k": 2, "target_modules": ["mlp", *ATTENTION]},
        "loramoe": {**common, "num_experts": 6, "target_modules": FFN},
        "mola": {**common, "num_experts": "triangle", "top_k": 2, "target_modules": ATTENTION + FFN},
        "moelora": {**common, "num_experts": 8, "task_names": TASK_NAMES, "target_modules": ATTENTION + FFN},
    }[method]


CONFIG_CLASSES = {"lora": LoraConfig, "mixlora": MixLoraConfig, "loramoe": LoraMoeConfig, "mola": MolaConfig,
                  "moelora": MoeLoraConfig}
RANK_STEP = {"moelora": 8}  # MOELoRA splits its rank over 8 experts


def trainable_parameters(base, method: str, rank: int) -> int:
    """Trainable parameters of `method` at `rank` on `base`, counted on a model without weights (meta device)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
        model = get_peft_model(model, CONFIG_CLASSES[method](task_type="CAUSAL_LM", **method_options(method, rank)))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_rank(base, method: str, target: int) -> tuple[int, int]:
    """(rank, trainable parameters) of `method` closest to `target` parameters."""
    best = None
    step = RANK_STEP.get(method, 1)
    for rank in range(step, 8 * REFERENCE_RANK + 1, step):
        count = trainable_parameters(base, method, rank)
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (rank, count)
        if count > target:
            break
    return best


def spread(values: list[float]) -> str:
    """'mean' for one value; 'mean (v1 / v2 ...)' for several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1%}"
    return f"{mean:.1%} ({' / '.join(f'{value:.1%}' for value in values)})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    quickstart = QuickstartSettings()  # the same fine-tune as `hf-moe quickstart`
    parser.add_argument("--base", default=None, help="dense checkpoint folder or GGUF file (default: shipped tiny)")
    parser.add_argument("--methods", nargs="+", default=list(CONFIG_CLASSES), choices=list(CONFIG_CLASSES))
    parser.add_argument("--max-steps", type=int, default=quickstart.max_steps)
    parser.add_argument("--batch-size", type=int, default=quickstart.batch_size)
    parser.add_argument("--learning-rate", type=float, default=quickstart.learning_rate)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds-for", nargs="+", default=None,
                        help="methods run with every seed (default: all); the others with the first seed only")
    parser.add_argument("--eval-per-task", type=int, default=None, help="eval examples per task (default: all)")
    parser.add_argument("--section", default="quality-lora-moe", help="QUALITY.md section to write")
    args = parser.parse_args()
    if args.smoke:
        args.max_steps, args.batch_size, args.eval_per_task = 2, 4, 2
    torch.set_num_threads(2)

    with dense_source_folder(args.base or tiny_llama_path()) as base, tempfile.TemporaryDirectory() as scratch:
        tokenizer = AutoTokenizer.from_pretrained(base)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        examples = eval_examples(args.eval_per_task)
        batches = tokenized_batches(tokenizer, examples, batch_size=64)
        task_batches = tokenized_batches(tokenizer, examples, batch_size=64, task_names=TASK_NAMES)
        target = trainable_parameters(base, "lora", REFERENCE_RANK)
        dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        start = time.perf_counter()
        results = {"base model (no fine-tune)": (None, 0, [evaluate(dense, tokenizer, examples, batches, "base")],
                                                 time.perf_counter() - start)}
        del dense
        for method in args.methods:
            rank, count = (REFERENCE_RANK, target) if method == "lora" else matched_rank(base, method, target)
            seeds = args.seeds if args.seeds_for is None or method in args.seeds_for else args.seeds[:1]
            scores, start = [], time.perf_counter()
            for seed in seeds:
                recipe = tasks_recipe(method, method_options(method, rank), base, f"{scratch}/{method}-{seed}",
                                      args.max_steps, args.batch_size, args.learning_rate, seed)
                recipe["training"]["eval_strategy"] = "no"  # scored below, once
                if method == "moelora":
                    recipe["data"]["task_field"] = "task"
                run = run_recipe(recipe)
                task_names = TASK_NAMES if method == "moelora" else None
                scores.append(evaluate(run.trainer.model, tokenizer, examples,
                                       task_batches if task_names else batches, f"{method} seed {seed}", task_names))
                del run
            results[method] = (rank, count, scores, (time.perf_counter() - start) / len(seeds))

    tasks = sorted(next(iter(results.values()))[2][0].exact_match_per_task)
    rows = []
    for name, (rank, count, scores, seconds) in results.items():
        per_task = {task: statistics.fmean(score.exact_match_per_task[task] for score in scores) for task in tasks}
        rows.append([name, "-" if rank is None else rank, f"{count / 1e3:.0f}k", len(scores),
                     spread([score.exact_match for score in scores]), *(f"{per_task[task]:.0%}" for task in tasks),
                     f"{statistics.fmean(score.answer_perplexity for score in scores):.3f}", f"{seconds / 60:.1f}"])
    table = markdown_table(["method", "rank", "trainable", "seeds", "exact match (mean, per seed)", *tasks,
                            "answer perplexity", "minutes per run"], rows)
    print(table)
    samples = sample_table(examples, results)
    print(samples)
    if args.smoke:
        return
    base_name = "the shipped tiny Llama" if args.base is None else f"`{Path(args.base).name}` (dequantized to fp32)"
    body = (f"Base: {base_name}. {args.max_steps} steps of {args.batch_size} examples, learning rate "
            f"{args.learning_rate} (cosine, 5% warmup), seeds {', '.join(map(str, args.seeds))}; {len(examples)} eval "
            f"examples ({len(tasks)} tasks).\n\n{table}\n\nGreedy answers on the first eval example of each task "
            f"(first seed):\n\n{samples}")
    write_section(args.section, body, document="QUALITY.md")


def shown(text: str, limit: int = 40) -> str:
    """`text` as one markdown table cell: a code span, newlines as \\n, cut after `limit` characters."""
    if not text:
        return "(empty)"
    text = text.replace("\n", "\\n")
    text = text if len(text) <= limit else text[:limit] + "..."
    return "`" + text.replace("|", "\\|") + "`"


def sample_table(examples: list[dict], results: dict) -> str:
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
    return markdown_table(["prompt", "expected", *names], rows)


if __name__ == "__main__":
    main()
