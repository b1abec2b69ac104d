"""`hf-moe quickstart`: the whole story on the model and the data that ship with hf-moe, offline, on a CPU.

    1. upcycle   the shipped dense Llama -> a Mixtral-style MoE (8 copies of each FFN, top-2), verified exact
    2. evaluate  the dense model on the shipped tasks' eval split: exact-match accuracy and answer perplexity
    3. MixLoRA   fine-tune: every FFN becomes 8 LoRA experts (top-2) over the frozen FFN, LoRA on attention
    4. evaluate  the MixLoRA model the same way
    5. materialize the adapter into a standalone Mixtral-style hf-moe checkpoint (expert e = FFN + LoRA e),
                 checked to compute the adapter model's logits
    6. summary   summary.json and a printed table; every folder has its card (expert-load heatmap, loss plot)

`base` (`hf-moe quickstart --base PATH`) runs the same steps on another dense checkpoint folder (Llama, Mistral,
Qwen2, Qwen3) or GGUF file; a GGUF file is first dequantized to an fp32 checkpoint in DIR/dense-dequantized, which
the steps (and the adapter, as its base) then use.

Steps 1 and 3-5 are the two ways to an MoE from a dense model: full-rank experts that continued pretraining will
specialise (1), and low-rank experts trained on a task mix (3-5), served in the same format.

Everything is seeded: the same seed gives the same numbers on the same kind of CPU with the same torch version.
Another CPU (e.g. Intel Xeon vs AMD EPYC) or torch version runs other matrix kernels (MKL, oneDNN, vectorisation),
whose rounding differs; 300 training steps amplify it, so exact match and perplexity differ by a few points there.

Two perplexities, not to be compared with each other:
- `answer perplexity` (printed here, summary.json): exp of the mean cross-entropy over every answer token (and the
  closing eos) of the eval split, the prompt given; computed by `answer_perplexity`.
- `eval perplexity (exp of eval_loss)` (the adapter's card): exp of Trainer's eval_loss, i.e. the mean over eval
  batches of each batch's mean label-token cross-entropy, plus MixLoRA's router auxiliary loss.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .outputs import check_output_dir, prepare_output_dir

logger = logging.get_logger(__name__)

# The tasks' prompts already end with the separator the answer follows ("task: input\n").
DATA_FORMAT = {"prompt_field": "prompt", "response_field": "answer", "prompt_template": "{prompt}", "max_length": 64}
MATERIALIZE_TOLERANCE = 1e-5  # max |logits materialized - logits adapter| / max |logits adapter|, fp32
OUTPUTS = {"upcycled": "moe-upcycled", "adapter": "mixlora-adapter", "materialized": "moe-mixlora"}
DEQUANTIZED = "dense-dequantized"  # the fp32 checkpoint of a GGUF base
SUMMARY = "summary.json"


@dataclass
class QuickstartSettings:
    """The knobs of the run; the defaults take about 2-10 minutes on 2 CPU cores, depending on the CPU."""

    output_dir: str = "hf-moe-quickstart"
    base: str | None = None  # a dense checkpoint folder or GGUF file; None: the shipped tiny Llama
    seed: int = 0
    num_experts: int = 8
    top_k: int = 2
    rank: int = 8
    max_steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    eval_examples_per_task: int | None = None  # None: the whole eval split
    overwrite: bool = False

    def check(self) -> None:
        for name in ("num_experts", "top_k", "rank", "max_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}`={value!r} is invalid: must be an integer >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"`top_k`={self.top_k} is invalid: must be at most num_experts={self.num_experts}")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate`={self.learning_rate!r} is invalid: must be > 0")
        if self.eval_examples_per_task is not None and self.eval_examples_per_task < 1:
            raise ValueError(f"`eval_examples_per_task`={self.eval_examples_per_task!r} is invalid: must be None "
                             f"(the whole eval split) or an integer >= 1")
        if self.base is not None:
            from .conversion.dense import read_dense_source
            from .conversion.gguf import check_gguf_file, find_gguf_file

            if not Path(self.base).exists():
                raise ValueError(f"`base`={self.base!r} is invalid: must be a dense checkpoint folder or GGUF file")
            gguf_file = find_gguf_file(self.base)
            if gguf_file is not None:
                check_gguf_file(gguf_file)
            else:
                read_dense_source(self.base)  # refuses what cannot be upcycled
        check_output_dir(self.output_dir, self.overwrite, sources=[self.base])


@dataclass
class Evaluation:
    exact_match: float
    exact_match_per_task: dict[str, float]
    answer_perplexity: float
    predictions: list[str] = field(default_factory=list, repr=False)  # greedy answers, in the examples' order


@dataclass
class QuickstartResult:
    output_dir: str
    upcycled: str  # folders
    adapter: str
    materialized: str
    upcycle_max_rel_error: float
    materialize_max_rel_error: float
    dense: Evaluation
    mixlora: Evaluation
    train_loss: float
    settings: dict = field(default_factory=dict)


def eval_examples(per_task: int | None) -> list[dict]:
    from .data.tasks import load_tasks

    examples = load_tasks("eval")
    if per_task is None:
        return examples
    kept, seen = [], {}
    for example in examples:
        seen[example["task"]] = seen.get(example["task"], 0) + 1
        if seen[example["task"]] <= per_task:
            kept.append(example)
    return kept


def tokenized_batches(tokenizer, examples: list[dict], batch_size: int, task_names: list[str] | None = None):
    """Right-padded batches of the examples as the fine-tune sees them: prompt tokens labelled -100; with
    `task_names`, each batch also has the examples' `task_ids`."""
    from transformers import DataCollatorForSeq2Seq

    from .data.tasks import task_ids_of
    from .finetune.recipes import tokenize_example

    rows = [tokenize_example(example, tokenizer, DATA_FORMAT) for example in examples]
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    batches = []
    for start in range(0, len(rows), batch_size):
        batches.append(collate(rows[start:start + batch_size]))
        if task_names is not None:
            batches[-1]["task_ids"] = task_ids_of(examples[start:start + batch_size], task_names)
    return batches


@torch.no_grad()
def answer_perplexity(model, batches) -> float:
    """exp(mean NLL of the answer tokens and the closing eos), the prompt given. The forward gets the labels, so that a
    model that routes each sequence on its prompt (the tokens before the first label) routes as in generation."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels", "task_ids") if key in batch}
        logits = model(**inputs).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(total / count)


def evaluate(model, tokenizer, examples: list[dict], batches, name: str, task_names: list[str] | None = None
             ) -> Evaluation:
    """Exact match and answer perplexity; `task_names` for a task-aware adapter (the batches must then carry the
    matching `task_ids`, see `tokenized_batches`)."""
    from .data.tasks import exact_match

    print(f"hf-moe quickstart: evaluating the {name} model on {len(examples)} held-out examples")
    scores = exact_match(model, tokenizer, examples, progress=True, task_names=task_names)
    return Evaluation(exact_match=scores.accuracy, exact_match_per_task=scores.per_task,
                      answer_perplexity=answer_perplexity(model, batches), predictions=scores.predictions)


@torch.no_grad()
def max_rel_logit_error(reference, candidate, batches) -> float:
    """max |candidate - reference| / max |reference| over the batches' logits (both in eval mode)."""
    error, scale = 0.0, 0.0
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        expected, actual = reference(**inputs).logits.float(), candidate(**inputs).logits.float()
        mask = batch["attention_mask"].bool()
        error = max(error, (actual - expected)[mask].abs().max().item())
        scale = max(scale, expected[mask].abs().max().item())
    return error / scale


def tasks_recipe(method: str, peft: dict, base, output_dir, max_steps: int, batch_size: int, learning_rate: float,
                 seed: int) -> dict:
    """The `hf-moe finetune` recipe of a fine-tune on the shipped tasks (train split; eval split for eval loss)."""
    from .data import tasks_path

    return {
        "model": str(base),
        "method": method,
        "peft": peft,
        "data": {"train_file": str(tasks_path() / "train.jsonl"), "eval_file": str(tasks_path() / "eval.jsonl"),
                 **DATA_FORMAT},
        "training": {"learning_rate": learning_rate, "max_steps": max_steps,
                     "per_device_train_batch_size": batch_size, "per_device_eval_batch_size": 64,
                     "lr_scheduler_type": "cosine", "warmup_steps": max(1, max_steps // 20),
                     "logging_steps": max(1, max_steps // 30), "eval_strategy": "steps",
                     "eval_steps": max(50, max_steps // 5), "save_strategy": "no", "seed": seed, "data_seed": seed,
                     "use_cpu": True, "dataloader_num_workers": 0},
        "output_dir": str(output_dir),
    }


def mixlora_options(settings: QuickstartSettings) -> dict:
    """MixLoRA on every FFN (E LoRA experts, top-k, over the frozen FFN) and plain LoRA on attention."""
    return {"r": settings.rank, "lora_alpha": 2 * settings.rank, "lora_dropout": 0.0,
            "num_experts": settings.num_experts, "top_k": settings.top_k, "router_aux_loss_coef": 0.01,
            "target_modules": ["mlp", "q_proj", "k_proj", "v_proj", "o_proj"]}


def run_quickstart(settings: QuickstartSettings | None = None, **overrides) -> QuickstartResult:
    """Run the six steps into `settings.output_dir` (see the module docstring); returns what was measured."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from .conversion import upcycle
    from .conversion.gguf import find_gguf_file, write_dense_checkpoint
    from .data import tiny_llama_path
    from .finetune.lora_moe.materialize import materialize
    from .finetune.recipes import quiet_peft_deprecations, run_recipe

    settings = settings or QuickstartSettings(**overrides)
    settings.check()
    base = Path(settings.base) if settings.base is not None else tiny_llama_path()
    gguf_file = find_gguf_file(base)
    output = prepare_output_dir(settings.output_dir, "quickstart", settings.overwrite, sources=[base],
                                files=[*OUTPUTS.values(), SUMMARY, *([DEQUANTIZED] if gguf_file else [])])
    if gguf_file is not None:
        print(f"hf-moe quickstart: dequantizing {gguf_file.name} into {DEQUANTIZED}")
        base = output / DEQUANTIZED
        write_dense_checkpoint(gguf_file, base)
    folders = {name: output / folder for name, folder in OUTPUTS.items()}

    print(f"hf-moe quickstart [1/6]: upcycling {base.name} to {settings.num_experts} experts, top-{settings.top_k}")
    upcycled = upcycle(base, folders["upcycled"], arch="mixtral", num_experts=settings.num_experts,
                       top_k=settings.top_k, seed=settings.seed, verbose=False)

    set_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = eval_examples(settings.eval_examples_per_task)
    batches = tokenized_batches(tokenizer, examples, batch_size=64)
    dense_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    print("hf-moe quickstart [2/6]: the dense model before fine-tuning")
    dense = evaluate(dense_model, tokenizer, examples, batches, "dense")

    print(f"hf-moe quickstart [3/6]: MixLoRA fine-tune, {settings.max_steps} steps of {settings.batch_size} examples")
    run = run_recipe(tasks_recipe("mixlora", mixlora_options(settings), base, folders["adapter"],
                                  settings.max_steps, settings.batch_size, settings.learning_rate, settings.seed))

    print("hf-moe quickstart [4/6]: the MixLoRA model after fine-tuning")
    with quiet_peft_deprecations():
        adapter_model = PeftModel.from_pretrained(dense_model, folders["adapter"]).eval()
    mixlora = evaluate(adapter_model, tokenizer, examples, batches, "MixLoRA")

    print("hf-moe quickstart [5/6]: materializing the MixLoRA model as a Mixtral-style checkpoint")
    with quiet_peft_deprecations():
        materialize(base, folders["adapter"], folders["materialized"])
    materialized_model = AutoModelForCausalLM.from_pretrained(folders["materialized"], dtype=torch.float32).eval()
    materialize_error = max_rel_logit_error(adapter_model, materialized_model, batches[:2])
    if materialize_error > MATERIALIZE_TOLERANCE:
        raise RuntimeError(f"the materialized checkpoint's logits differ from the adapter model's by "
                           f"{materialize_error:.2e} (relative), more than {MATERIALIZE_TOLERANCE:.0e}")

    result = QuickstartResult(
        output_dir=str(output), upcycled=str(folders["upcycled"]), adapter=str(folders["adapter"]),
        materialized=str(folders["materialized"]),
        upcycle_max_rel_error=float(upcycled.verification["max_rel_error"]),
        materialize_max_rel_error=materialize_error, dense=dense, mixlora=mixlora, train_loss=run.train_loss,
        settings=asdict(settings),
    )
    (output / SUMMARY).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    print("hf-moe quickstart [6/6]: summary")
    print(format_summary(result))
    return result


def format_summary(result: QuickstartResult) -> str:
    tasks = sorted(result.dense.exact_match_per_task)
    lines = [
        f"{'':<22}{'dense':>10}{'MixLoRA':>10}",
        f"{'exact match':<22}{result.dense.exact_match:>10.1%}{result.mixlora.exact_match:>10.1%}",
        *(f"{'  ' + task:<22}{result.dense.exact_match_per_task[task]:>10.1%}"
          f"{result.mixlora.exact_match_per_task[task]:>10.1%}" for task in tasks),
        f"{'answer perplexity':<22}{result.dense.answer_perplexity:>10.2f}{result.mixlora.answer_perplexity:>10.2f}",
        "(answer perplexity: exp of the mean cross-entropy of the answer tokens; the adapter card's eval perplexity is",
        " exp of Trainer's eval_loss, which averages per batch and includes the router aux loss)",
        "",
        f"upcycled MoE (exact: max relative logit error {result.upcycle_max_rel_error:.1e}): {result.upcycled}",
        f"MixLoRA adapter (train loss {result.train_loss:.3f}): {result.adapter}",
        f"MixLoRA materialized as an MoE checkpoint (max relative logit error "
        f"{result.materialize_max_rel_error:.1e}): {result.materialized}",
        f"numbers: {os.path.join(result.output_dir, SUMMARY)}; each folder has a README.md card",
    ]
    return "\n".join(lines)
