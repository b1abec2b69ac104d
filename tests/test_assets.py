"""The assets that ship inside the package: the tiny Llama trained on the stdlib, and the tasks dataset.

The model must load offline and score on held-out stdlib text what its card says; the dataset must regenerate byte
for byte from its seed and every answer must be right by an independent computation; the scripts that made both run.
"""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_moe.data import tasks_path, tiny_llama_path
from hf_moe.data.corpus import split_pydoc_topics, split_stdlib_sources, text_token_stream, token_stream
from hf_moe.data.tasks import TASKS, exact_match, format_prompt, load_tasks

ROOT = Path(__file__).resolve().parents[1]
# a smoke run of the model script: one tiny layer, two steps, three files per split
TINY_BUILD = ["--max-files", "3", "--vocab-size", "300", "--hidden-size", "32", "--intermediate-size", "64",
              "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1", "--seq-len", "32", "--batch-size", "2",
              "--steps", "2", "--warmup-steps", "1", "--eval-slice-tokens", "64"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_llama():
    folder = tiny_llama_path()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def slice_result(card: ModelCard):
    """The card's perplexity on the first N held-out tokens, and N."""
    result = next(result for result in card.data.eval_results if result.dataset_split.startswith("heldout[:"))
    return result, int(re.fullmatch(r"heldout\[:(\d+)\]", result.dataset_split).group(1))


def reference_perplexity(model, token_ids: torch.Tensor, block_size: int) -> float:
    """Through transformers' own causal-LM loss: blocks of equal length, so the mean of their losses is the mean
    next-token NLL."""
    blocks = token_ids[: len(token_ids) // block_size * block_size].view(-1, block_size)
    with torch.no_grad():
        losses = [model(input_ids=block[None], labels=block[None]).loss for block in blocks]
    return math.exp(torch.stack(losses).mean().item())


# ----------------------------------------------------------------------------------------------------------------
# The tiny Llama


def test_tiny_llama_is_a_small_fp32_llama_with_safetensors_only(tiny_llama):
    model, tokenizer = tiny_llama
    folder = tiny_llama_path()
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.dtype == torch.float32
    assert 2e6 <= model.num_parameters() <= 3e6
    assert sorted(path.name for path in folder.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert (folder / "model.safetensors").stat().st_size < 12e6
    assert len(tokenizer) == model.config.vocab_size
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)


def test_tiny_llama_perplexity_on_heldout_stdlib_is_what_its_card_says(tiny_llama):
    model, tokenizer = tiny_llama
    card = ModelCard.load(tiny_llama_path() / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    result, n_tokens = slice_result(card)
    _, heldout_files = split_stdlib_sources()
    token_ids = token_stream(tokenizer, heldout_files)[:n_tokens]
    measured = reference_perplexity(model, token_ids, model.config.max_position_embeddings)

    build = load_script("build_tiny_llama")
    if build.token_digest(token_ids) == result.dataset_revision:  # the very text the card measured
        assert measured == pytest.approx(result.metric_value, rel=2e-3)
    else:  # another Python version: its held-out files differ a little (measured: within 1% on 3.10 to 3.13)
        assert measured == pytest.approx(result.metric_value, rel=0.05)
    # clearly better than unigram statistics, even ones fitted on these very tokens
    frequencies = torch.bincount(token_ids, minlength=model.config.vocab_size).double() / len(token_ids)
    in_sample_unigram = math.exp(-(frequencies[frequencies > 0] * frequencies[frequencies > 0].log()).sum().item())
    assert measured < 0.5 * in_sample_unigram


def test_documentation_corpus_splits_topics_by_name_and_streams_them_between_bos_and_eos(tiny_llama):
    from pydoc_data.topics import topics

    train, heldout = split_pydoc_topics()
    assert sorted(train + heldout) == sorted(topics.values()) and not set(train) & set(heldout)
    assert 0.05 < len(heldout) / len(topics) < 0.3 and split_pydoc_topics() == (train, heldout)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path())
    ids = text_token_stream(tokenizer, heldout[:2]).tolist()
    first = tokenizer(heldout[0], add_special_tokens=False, verbose=False)["input_ids"]
    assert ids[: len(first) + 2] == [tokenizer.bos_token_id, *first, tokenizer.eos_token_id]
    assert ids.count(tokenizer.bos_token_id) == 2 and ids[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="heldout_percent"):
        split_pydoc_topics(0)


def test_tiny_llama_tokenizer_round_trips_and_spells_out_digits(tiny_llama):
    _, tokenizer = tiny_llama
    texts = ["def f(x):\n    return {'a': [1, 2.5e-3]}  # naïve → ∑\n\n\tpass\n", "add: 947 + 85\n1032", "  \n"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.tokenize("x = 2026") == ["x", "Ġ=", "Ġ", "2", "0", "2", "6"]


def test_tiny_llama_pre_tokenizer_is_the_one_the_readme_names_for_llama_cpp():
    """README: "splits digits one by one, then applies GPT-2's byte-level regex: the pre-tokenizer of StarCoder"."""
    import json

    pre_tokenizer = json.loads((tiny_llama_path() / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre_tokenizer == {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}
    assert "llama.cpp's `starcoder` type" in " ".join((ROOT / "README.md").read_text().split())


def test_exact_match_agrees_with_one_prompt_at_a_time_greedy_decoding(tiny_llama):
    model, tokenizer = tiny_llama
    examples = [example for example in load_tasks("eval")][::75]  # every task, prompts of different lengths
    examples[0] = {**examples[0], "answer": "not what the model says"}
    result = exact_match(model, tokenizer, examples, max_new_tokens=6, batch_size=4)

    expected = []
    for example in examples:  # no padding, no generate(): argmax until eos
        ids = tokenizer(example["prompt"], return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                token = model(input_ids=ids).logits[0, -1].argmax().item()
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        expected.append(tokenizer.decode(new).strip())
    assert result.predictions == expected
    hits = [prediction == example["answer"] for prediction, example in zip(expected, examples)]
    assert result.accuracy == pytest.approx(sum(hits) / len(hits))
    assert set(result.per_task) == {example["task"] for example in examples}
    assert not hits[0]


# ----------------------------------------------------------------------------------------------------------------
# The tasks dataset


def independent_answer(task: str, task_input: str) -> str:
    if task == "add":
        first, second = task_input.split(" + ")
        return str(int(first) + int(second))
    if task == "sort":
        return " ".join(sorted(task_input.split()))
    if task == "reverse":
        return " ".join(task_input.split()[::-1])
    if task == "upper":
        return "".join(chr(ord(char) - 32) if "a" <= char <= "z" else char for char in task_input)
    if task == "count":
        target, digits = task_input.split(" in ")
        return str(digits.split().count(target))
    if task == "python":
        assert re.fullmatch(r"\d{1,2} [-+*] \d{1,2}", task_input)
        return str(eval(task_input))
    raise AssertionError(f"no reference for task {task!r}")


@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_task_answer_is_right_by_an_independent_computation(split):
    examples = load_tasks(split)
    counts = {task: sum(example["task"] == task for example in examples) for task in TASKS}
    assert counts == {task: 800 if split == "train" else 100 for task in TASKS}
    for example in examples:
        task, prompt = example["task"], example["prompt"]
        task_input = prompt.removeprefix(f"{task}: ").removesuffix("\n")
        assert prompt == format_prompt(task, task_input) and example["text"] == prompt + example["answer"]
        assert example["answer"] == independent_answer(task, task_input), example


def test_no_eval_prompt_is_in_train():
    train_prompts = {example["prompt"] for example in load_tasks("train")}
    eval_prompts = [example["prompt"] for example in load_tasks("eval")]
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not train_prompts.intersection(eval_prompts)


def test_tasks_dataset_regenerates_byte_for_byte(tmp_path):
    build = load_script("build_tasks_dataset")
    assert build.main(["--output", str(tmp_path / "tasks")]) == 0
    for name in ("train.jsonl", "eval.jsonl", "README.md"):
        assert (tmp_path / "tasks" / name).read_bytes() == (tasks_path() / name).read_bytes(), name
    card_rows = (tasks_path() / "README.md").read_text()
    assert all(f"| `{task}` |" in card_rows for task in TASKS)


def test_bad_task_settings_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="split='test' is invalid"):
        load_tasks("test")
    build = load_script("build_tasks_dataset")
    with pytest.raises(ValueError, match="train_per_task=0 is invalid"):
        build.main(["--output", str(tmp_path / "tasks"), "--train-per-task", "0"])
    with pytest.raises(ValueError, match="task 'python' found only 1323 distinct prompts"):  # 21 * 21 * 3
        build.main(["--output", str(tmp_path / "tasks"), "--train-per-task", "2000"])
    assert not (tmp_path / "tasks").exists()


# ----------------------------------------------------------------------------------------------------------------
# The model script


def test_build_tiny_llama_smoke_run_writes_a_loadable_model_and_a_true_card(tmp_path):
    build = load_script("build_tiny_llama")
    out = tmp_path / "tiny"
    assert build.main([*TINY_BUILD, "--output", str(out)]) == 0

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (model.config.num_hidden_layers, model.config.vocab_size, len(tokenizer)) == (1, 300, 300)
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()
    card = ModelCard.load(out / "README.md")
    result, n_tokens = slice_result(card)
    _, heldout_files = split_stdlib_sources()
    token_ids = token_stream(tokenizer, heldout_files[:3])[:n_tokens]
    assert build.token_digest(token_ids) == result.dataset_revision
    assert reference_perplexity(model, token_ids, 32) == pytest.approx(result.metric_value, rel=1e-3)
    assert "python scripts/build_tiny_llama.py --max-files 3" in card.text

    with pytest.raises(FileExistsError):  # refused up front, not after training
        build.main([*TINY_BUILD, "--output", str(out)])


def test_build_tiny_llama_refuses_bad_settings():
    build = load_script("build_tiny_llama")
    with pytest.raises(ValueError, match=r"--warmup-steps=10 is invalid: must be an integer between 0 and --steps"):
        build.parse_args(["--steps", "5", "--warmup-steps", "10"])
    with pytest.raises(ValueError, match=r"--vocab-size=100 is invalid"):
        build.parse_args(["--vocab-size", "100"])
