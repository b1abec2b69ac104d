"""A small multi-task instruction dataset with exact-match answers, and its exact-match evaluation.

Every example is a prompt `"{task}: {input}\\n"` followed by its answer (the full `text` is the two joined):

| task      | input                                        | answer               |
|-----------|----------------------------------------------|----------------------|
| `add`     | two numbers of 2 digits, `47 + 38`           | the sum, `85`        |
| `sort`    | 3-5 digits, `5 2 9 1`                        | ascending, `1 2 5 9` |
| `reverse` | 3-5 letters, `q x b m`                       | reversed, `m b x q`  |
| `upper`   | 3-5 letters, `q x b m`                       | `Q X B M`            |
| `count`   | a digit, then 4-6 digits, `3 in 3 1 3 7`     | its count, `2`       |
| `python`  | a Python expression `a op b`, a and b in 0-20, op one of + - * , `14 * 3` | its value, `42` |

Items are space-separated so that a byte-level tokenizer sees one token per digit or letter. Each task draws from
its own `random.Random(f"{seed}:{task}")` (stable across Python versions), and no prompt appears twice, so the
eval split shares no prompt with the train split.

    from hf_moe.data.tasks import exact_match, load_tasks

    result = exact_match(model, tokenizer, load_tasks("eval"), max_new_tokens=8)
    print(result.accuracy, result.per_task)
"""

import json
import operator
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import tasks_path

SPLITS = ("train", "eval")
DEFAULT_SEED = 0
DEFAULT_TRAIN_PER_TASK = 800
DEFAULT_EVAL_PER_TASK = 100
PROMPT_FORMAT = "{task}: {task_input}\n"
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def spaced_letters(rng: random.Random) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5))]


def make_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a} + {b}", str(a + b)


def make_sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    ascending = [digit for digit in range(10) for _ in range(digits.count(digit))]  # counting sort
    return " ".join(map(str, digits)), " ".join(map(str, ascending))


def make_reverse(rng: random.Random) -> tuple[str, str]:
    letters = spaced_letters(rng)
    return " ".join(letters), " ".join(reversed(letters))


def make_upper(rng: random.Random) -> tuple[str, str]:
    letters = spaced_letters(rng)
    return " ".join(letters), " ".join(letters).upper()


def make_count(rng: random.Random) -> tuple[str, str]:
    target, length = rng.randint(0, 9), rng.randint(4, 6)
    occurrences = rng.randint(0, 3)
    others = [digit for digit in range(10) if digit != target]
    digits = [rng.choice(others) for _ in range(length - occurrences)]
    for _ in range(occurrences):
        digits.insert(rng.randint(0, len(digits)), target)
    return f"{target} in {' '.join(map(str, digits))}", str(occurrences)


def make_python(rng: random.Random) -> tuple[str, str]:
    a, b, symbol = rng.randint(0, 20), rng.randint(0, 20), rng.choice("+-*")
    return f"{a} {symbol} {b}", str(OPERATORS[symbol](a, b))


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": make_add,
    "sort": make_sort,
    "reverse": make_reverse,
    "upper": make_upper,
    "count": make_count,
    "python": make_python,
}


def format_prompt(task: str, task_input: str) -> str:
    return PROMPT_FORMAT.format(task=task, task_input=task_input)


def make_example(task: str, task_input: str, answer: str) -> dict:
    prompt = format_prompt(task, task_input)
    return {"task": task, "prompt": prompt, "answer": answer, "text": prompt + answer}


def generate_tasks(seed: int = DEFAULT_SEED, train_per_task: int = DEFAULT_TRAIN_PER_TASK,
                   eval_per_task: int = DEFAULT_EVAL_PER_TASK) -> dict[str, list[dict]]:
    """{"train": [...], "eval": [...]}: per task, the first `eval_per_task` distinct prompts go to eval and the next
    `train_per_task` to train. The train split is shuffled (tasks interleaved); eval is grouped by task."""
    for name, value in (("train_per_task", train_per_task), ("eval_per_task", eval_per_task)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
    splits = {"train": [], "eval": []}
    wanted = eval_per_task + train_per_task
    for task, make_input in TASKS.items():
        rng = random.Random(f"{seed}:{task}")
        seen: dict[str, str] = {}
        for _ in range(50 * wanted):
            task_input, answer = make_input(rng)
            seen.setdefault(task_input, answer)
            if len(seen) == wanted:
                break
        else:
            raise ValueError(f"train_per_task + eval_per_task = {wanted} is invalid: task {task!r} found only "
                             f"{len(seen)} distinct prompts; ask for fewer examples")
        examples = [make_example(task, task_input, answer) for task_input, answer in seen.items()]
        splits["eval"] += examples[:eval_per_task]
        splits["train"] += examples[eval_per_task:]
    random.Random(seed).shuffle(splits["train"])
    return splits


def load_tasks(split: str, folder=None) -> list[dict]:
    """The examples of `split` ("train" or "eval") from the shipped dataset, or from `folder` if given."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: allowed values are {list(SPLITS)}")
    path = Path(tasks_path() if folder is None else folder) / f"{split}.jsonl"
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


@dataclass
class ExactMatch:
    accuracy: float  # over all examples
    per_task: dict[str, float]  # task -> accuracy over its examples
    predictions: list[str]  # the stripped completions, in example order


@torch.no_grad()
def task_ids_of(examples: list[dict], task_names: list[str]) -> torch.Tensor:
    """[batch] the index in `task_names` of each example's task."""
    return torch.tensor([task_names.index(example["task"]) for example in examples])


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int = 16, batch_size: int = 32,
                progress: bool = False, task_names: list[str] | None = None) -> ExactMatch:
    """Greedy completion of each example's prompt (left-padded batches, stopping at eos); an example counts as
    correct when the completion, stripped of surrounding whitespace, equals its answer. With `task_names` (a
    task-aware adapter's, e.g. MOELoRA's), each example's task id (its task's index there) goes to `generate`."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos token)")
    was_training = model.training
    model.eval()
    predictions = []
    for start in tqdm(range(0, len(examples), batch_size), desc="exact match", unit="batch", disable=not progress):
        prompts = [example["prompt"] for example in examples[start : start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        if task_names is not None:
            inputs["task_ids"] = task_ids_of(examples[start : start + batch_size], task_names).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        completions = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        predictions += [completion.strip() for completion in completions]
    model.train(was_training)
    correct: dict[str, list[bool]] = {}
    for example, prediction in zip(examples, predictions):
        correct.setdefault(example["task"], []).append(prediction == example["answer"])
    every = [hit for hits in correct.values() for hit in hits]
    return ExactMatch(accuracy=sum(every) / max(len(every), 1),
                      per_task={task: sum(hits) / len(hits) for task, hits in correct.items()},
                      predictions=predictions)
