"""Plain LoRA vs MixLoRA vs LoRAMoE vs MoLA on the shipped tasks, at matched trainable parameters.

    python benchmarks/quality_lora_moe.py            # writes a QUALITY.md section
    python benchmarks/quality_lora_moe.py --smoke    # a few steps on a few eval examples; prints only

Every method fine-tunes the shipped tiny Llama (`hf_moe.data.tiny_llama_path()`) with the same recipe as
`hf-moe quickstart` (`hf_moe.quickstart.tasks_recipe`: same data order, steps, batch, learning rate schedule and
seed) on the shipped tasks' train split, and is scored on the eval split: exact match of the greedy answer per task,
and the perplexity of the answer tokens. Each method's rank is the one whose trainable-parameter count is closest
to plain LoRA's at rank 16 on every linear layer:

    LoRA      rank r on q, k, v, o, gate, up, down
    MixLoRA   8 LoRA experts (top-2) over each frozen FFN + LoRA on q, k, v, o          (Li et al. 2024)
    LoRAMoE   6 LoRA experts mixed by a dense softmax router on gate, up, down; the
              localized balancing constraint needs sample types, which the tasks
              do not define, so it is off (as in the reference without types)       (Dou et al. 2024)
    MoLA      LoRA experts (top-2) on every linear layer, 2-4-6-8 experts from the
              lowest to the highest quarter of the layers ("triangle")              (Gao et al. 2024)
"""

import argparse
import tempfile

import torch
from common import markdown_table, write_section
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe import LoraMoeConfig, MixLoraConfig, MolaConfig
from hf_moe.data import tiny_llama_path
from hf_moe.finetune.recipes import run_recipe
from hf_moe.quickstart import QuickstartSettings, eval_examples, evaluate, tasks_recipe, tokenized_batches

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
REFERENCE_RANK = 16


def method_options(method: str, rank: int) -> dict:
    """The recipe's `peft` section of `method` at `rank`."""
    common = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0}
    return {
        "lora": {**common, "target_modules": ATTENTION + FFN},
        "mixlora": {**common, "num_experts": 8, "top_k": 2, "target_modules": ["mlp", *ATTENTION]},
        "loramoe": {**common, "num_experts": 6, "target_modules": FFN},
        "mola": {**common, "num_experts": "triangle", "top_k": 2, "target_modules": ATTENTION + FFN},
    }[method]


CONFIG_CLASSES = {"lora": LoraConfig, "mixlora": MixLoraConfig, "loramoe": LoraMoeConfig, "mola": MolaConfig}


def trainable_parameters(method: str, rank: int) -> int:
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path(), dtype=torch.float32)
    model = get_peft_model(base, CONFIG_CLASSES[method](task_type="CAUSAL_LM", **method_options(method, rank)))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_rank(method: str, target: int) -> tuple[int, int]:
    """(rank, trainable parameters) of `method` closest to `target` parameters."""
    best = None
    for rank in range(1, 4 * REFERENCE_RANK + 1):
        count = trainable_parameters(method, rank)
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (rank, count)
        if count > target:
            break
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    quickstart = QuickstartSettings()  # the same fine-tune as `hf-moe quickstart`
    parser.add_argument("--max-steps", type=int, default=quickstart.max_steps)
    parser.add_argument("--batch-size", type=int, default=quickstart.batch_size)
    parser.add_argument("--learning-rate", type=float, default=quickstart.learning_rate)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.max_steps, args.batch_size = 2, 4
    torch.set_num_threads(2)

    base = tiny_llama_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = eval_examples(2 if args.smoke else None)
    batches = tokenized_batches(tokenizer, examples, batch_size=64)
    target = trainable_parameters("lora", REFERENCE_RANK)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        results["base model (no fine-tune)"] = (None, 0, evaluate(dense, tokenizer, examples, batches, "base"))
        for method in CONFIG_CLASSES:
            rank, count = (REFERENCE_RANK, target) if method == "lora" else matched_rank(method, target)
            recipe = tasks_recipe(method, method_options(method, rank), base, f"{scratch}/{method}", args.max_steps,
                                  args.batch_size, args.learning_rate, args.seed)
            run = run_recipe(recipe)
            results[method] = (rank, count, evaluate(run.trainer.model, tokenizer, examples, batches, method))

    tasks = sorted(next(iter(results.values()))[2].exact_match_per_task)
    rows = []
    for name, (rank, count, scores) in results.items():
        rows.append([name, "-" if rank is None else rank, f"{count / 1e3:.0f}k", f"{scores.exact_match:.1%}",
                     *(f"{scores.exact_match_per_task[task]:.0%}" for task in tasks),
                     f"{scores.answer_perplexity:.3f}"])
    table = markdown_table(["method", "rank", "trainable", "exact match", *tasks, "answer perplexity"], rows)
    print(table)
    if args.smoke:
        return
    body = (f"{args.max_steps} steps of {args.batch_size} examples, learning rate {args.learning_rate} (cosine, 5% "
            f"warmup), seed {args.seed}; {len(examples)} eval examples ({len(tasks)} tasks).\n\n{table}")
    write_section("quality-lora-moe", body, document="QUALITY.md")


if __name__ == "__main__":
    main()
