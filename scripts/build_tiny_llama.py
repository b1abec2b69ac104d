"""Train the tiny dense Llama that ships in hf_moe/data/tiny-llama/, from scratch, on the Python standard library.

    python scripts/build_tiny_llama.py --overwrite        # the shipped checkpoint: every default below is its setting
    python scripts/build_tiny_llama.py --output /tmp/tiny-llama --steps 300

The recipe, in order:
1. corpus: the running Python's stdlib `*.py` files, held-out files chosen by path (hf_moe/data/corpus.py);
2. tokenizer: byte-level BPE trained on the train files, digits split one per token, <pad> <s> </s>;
3. model: LlamaForCausalLM from a LlamaConfig (tied embeddings, grouped-query attention), random init;
4. training: random windows of the train token stream, AdamW, linear warmup then cosine decay, gradient clipping;
5. eval: perplexity on the held-out files, next to a unigram model's;
6. save: safetensors weights, tokenizer, generation config and a model card with all of the above, written into a
   temporary folder that replaces the output only at the end.
"""

import argparse
import hashlib
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_moe.outputs import atomic_output_dir
from hf_moe.data.corpus import DEFAULT_HELDOUT_PERCENT, perplexity, read_source, split_stdlib_sources, token_stream

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "hf_moe" / "data" / "tiny-llama"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=SHIPPED, help="folder to create (default: the shipped one)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    data = parser.add_argument_group("data")
    data.add_argument("--heldout-percent", type=int, default=DEFAULT_HELDOUT_PERCENT,
                      help="share of stdlib files (by path) held out for eval")
    data.add_argument("--max-files", type=int, default=None,
                      help="use only the first N train and N held-out files (quick runs; default: all)")
    data.add_argument("--eval-slice-tokens", type=int, default=4096,
                      help="the card also reports perplexity on this many first held-out tokens (a quick check)")
    shape = parser.add_argument_group("model")
    shape.add_argument("--vocab-size", type=int, default=2048)
    shape.add_argument("--hidden-size", type=int, default=256)
    shape.add_argument("--intermediate-size", type=int, default=512)
    shape.add_argument("--num-layers", type=int, default=4)
    shape.add_argument("--num-heads", type=int, default=4)
    shape.add_argument("--num-kv-heads", type=int, default=2)
    train = parser.add_argument_group("training")
    train.add_argument("--seq-len", type=int, default=256, help="training window, also max_position_embeddings")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    train.add_argument("--min-lr", type=float, default=3e-4, help="learning rate at the end of the cosine decay")
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--weight-decay", type=float, default=0.1, help="on matrices and embeddings, not on norms")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every setting checked before anything is read or written."""
    minimum_vocab = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
    rules = [
        ("threads", args.threads >= 1, "an integer >= 1"),
        ("max-files", args.max_files is None or args.max_files >= 1, "an integer >= 1"),
        ("vocab-size", args.vocab_size >= minimum_vocab, f"an integer >= {minimum_vocab} (bytes + special tokens)"),
        ("seq-len", args.seq_len >= 2, "an integer >= 2"),
        ("eval-slice-tokens", args.eval_slice_tokens >= args.seq_len, f"an integer >= --seq-len ({args.seq_len})"),
        ("batch-size", args.batch_size >= 1, "an integer >= 1"),
        ("steps", args.steps >= 1, "an integer >= 1"),
        ("warmup-steps", 0 <= args.warmup_steps <= args.steps, f"an integer between 0 and --steps ({args.steps})"),
        ("lr", args.lr > 0, "a number > 0"),
        ("min-lr", 0 <= args.min_lr <= args.lr, f"a number between 0 and --lr ({args.lr})"),
        ("weight-decay", args.weight_decay >= 0, "a number >= 0"),
    ]
    for flag, valid, allowed in rules:
        if not valid:
            raise ValueError(f"--{flag}={getattr(args, flag.replace('-', '_'))!r} is invalid: must be {allowed}")


def model_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=True,
        pad_token_id=SPECIAL_TOKENS.index("<pad>"), bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
    )


def train_tokenizer(files: list[Path], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE whose pre-tokenizer isolates every digit, so numbers are spelled out digit by digit."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [read_source(path) for path in tqdm(files, desc="reading", unit="file")]
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    tokenizer.post_processor = processors.TemplateProcessing(  # Llama's convention: <s> before every sequence
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=model_max_length)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to --lr over --warmup-steps, then cosine decay to --min-lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    matrices = [param for param in model.parameters() if param.dim() >= 2]
    vectors = [param for param in model.parameters() if param.dim() < 2]  # RMSNorm weights: no decay
    return torch.optim.AdamW([{"params": matrices, "weight_decay": args.weight_decay},
                              {"params": vectors, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def train(model: LlamaForCausalLM, train_ids: torch.Tensor, args: argparse.Namespace) -> float:
    """The training loop; returns the mean loss of the last 50 steps."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = make_optimizer(model, args)
    model.train()
    losses = []
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        starts = torch.randint(0, len(train_ids) - args.seq_len, (args.batch_size,), generator=generator)
        batch = torch.stack([train_ids[start : start + args.seq_len] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return sum(losses[-50:]) / len(losses[-50:])


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int, block_size: int) -> float:
    """Perplexity of add-one-smoothed train token frequencies on the tokens `perplexity` predicts."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    targets = eval_ids[: len(eval_ids) // block_size * block_size].view(-1, block_size)[:, 1:]
    return float((-log_probs[targets.flatten()].mean()).exp())


def token_digest(token_ids: torch.Tensor) -> str:
    """sha256 of the token ids (int64, little-endian): identifies exactly which text a perplexity was measured on."""
    return hashlib.sha256(token_ids.numpy().astype("<i8").tobytes()).hexdigest()


def model_card(facts: dict, args: argparse.Namespace) -> ModelCard:
    python = facts["python"]
    heldout = f"Python {python} standard library, held-out files"
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license="apache-2.0", language=["en"],
        tags=["llama", "tiny", "python", "code", "hf-moe"], model_name="tiny-llama",
        eval_results=[
            EvalResult(task_type="text-generation", dataset_type="python-stdlib", dataset_name=heldout,
                       dataset_config=f"python-{python}", dataset_split="heldout", metric_type="perplexity",
                       metric_name="held-out perplexity", metric_value=round(facts["heldout_perplexity"], 4),
                       dataset_revision=facts["heldout_digest"]),
            EvalResult(task_type="text-generation", dataset_type="python-stdlib", dataset_name=heldout,
                       dataset_config=f"python-{python}", dataset_split=f"heldout[:{args.eval_slice_tokens}]",
                       metric_type="perplexity", metric_name=f"perplexity, first {args.eval_slice_tokens} held-out "
                       "tokens", metric_value=round(facts["slice_perplexity"], 4),
                       dataset_revision=facts["slice_digest"]),
        ],
    )
    body = f"""
# tiny-llama

A {facts['parameters'] / 1e6:.2f}M-parameter dense Llama trained from scratch on the source code of the Python
standard library. It ships inside `hf_moe` (`hf_moe.data.tiny_llama_path()`) so that upcycling and
fine-tuning examples run offline on something real. It writes Python-looking code; it knows nothing else.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_moe.data import tiny_llama_path

model = AutoModelForCausalLM.from_pretrained(tiny_llama_path())
tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path())
inputs = tokenizer("def read_config(path):\\n", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40, do_sample=False)[0]))
```

## Results

| | perplexity |
|---|---|
| held-out stdlib files ({facts['heldout_tokens']:,} tokens) | **{facts['heldout_perplexity']:.2f}** |
| unigram baseline (train token frequencies, add-one) on the same tokens | {facts['unigram_perplexity']:.2f} |
| first {args.eval_slice_tokens:,} held-out tokens (checked by the tests) | {facts['slice_perplexity']:.3f} |

Mean training loss over the last 50 steps: {facts['final_train_loss']:.3f}.

## Model

| | |
|---|---|
| architecture | `LlamaForCausalLM`, {args.num_layers} layers, hidden {args.hidden_size}, MLP {args.intermediate_size}, \
{args.num_heads} query / {args.num_kv_heads} key-value heads, tied embeddings, fp32 |
| context | {args.seq_len} tokens (RoPE, trained at this length only) |
| tokenizer | byte-level BPE, {args.vocab_size} tokens, every digit its own token; `<pad>`=0, `<s>`=1 (prepended), \
`</s>`=2 |

## Training

| | |
|---|---|
| data | `*.py` under the stdlib folder of Python {python}, without `site-packages`, test suites and the codec \
tables of `encodings/`; {facts['train_files']} train files ({facts['train_tokens']:,} tokens), \
{facts['heldout_files']} held-out files ({facts['heldout_tokens']:,} tokens): a file is held out when the CRC-32 of \
its relative path mod 100 < {args.heldout_percent} |
| tokenizer training | on the train files only |
| steps | {args.steps} x {args.batch_size} random windows of {args.seq_len} tokens \
= {facts['tokens_seen']:,} tokens ({facts['tokens_seen'] / facts['train_tokens']:.2f} epochs) |
| optimizer | AdamW (0.9, 0.95), weight decay {args.weight_decay} (not on norms), gradient clipping 1.0 |
| learning rate | linear warmup over {args.warmup_steps} steps to {args.lr:g}, cosine decay to {args.min_lr:g} |
| seed | {args.seed} |
| hardware | {facts['machine']}, {args.threads} torch threads (shared with other work while it trained) |
| wall time | {facts['train_seconds'] / 60:.1f} min training, {facts['total_seconds'] / 60:.1f} min in all |
| software | Python {python}, torch {torch.__version__}, transformers {transformers.__version__}, \
tokenizers {tokenizers.__version__} |

## How it was made

From the root of the hf-moe repository:

```bash
{facts['command']}
```

`scripts/build_tiny_llama.py` holds the whole recipe; its defaults are the settings above. A rerun on another
Python version trains on that version's stdlib, so its numbers differ slightly.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def main(argv=None) -> int:
    args = parse_args(argv)
    config = model_config(args)  # validates the shape before any work
    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with atomic_output_dir(args.output, "build_tiny_llama", overwrite=args.overwrite) as folder:
        train_files, heldout_files = split_stdlib_sources(args.heldout_percent)
        if args.max_files is not None:
            train_files, heldout_files = train_files[: args.max_files], heldout_files[: args.max_files]
        tokenizer = train_tokenizer(train_files, args.vocab_size, model_max_length=args.seq_len)
        train_ids = token_stream(tokenizer, train_files, progress=True)
        heldout_ids = token_stream(tokenizer, heldout_files, progress=True)
        slice_ids = heldout_ids[: args.eval_slice_tokens]
        for name, ids, needed in (("train", train_ids, args.seq_len + 1), ("held-out", slice_ids, args.seq_len)):
            if len(ids) < needed:
                raise ValueError(f"the {name} files give {len(ids)} tokens, fewer than --seq-len needs ({needed}): "
                                 "use more files (--max-files) or a shorter --seq-len")

        model = LlamaForCausalLM(config)
        training_started = time.time()
        final_train_loss = train(model, train_ids, args)
        train_seconds = time.time() - training_started

        model.eval()
        facts = {
            "python": platform.python_version(),
            "machine": f"{platform.machine()} CPU",
            "command": shlex.join(["python", "scripts/build_tiny_llama.py", *(sys.argv[1:] if argv is None else argv)]),
            "parameters": model.num_parameters(),
            "train_files": len(train_files), "heldout_files": len(heldout_files),
            "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids),
            "tokens_seen": args.steps * args.batch_size * args.seq_len,
            "final_train_loss": final_train_loss,
            "heldout_perplexity": perplexity(model, heldout_ids, args.seq_len, progress=True),
            "unigram_perplexity": unigram_perplexity(train_ids, heldout_ids, args.vocab_size, args.seq_len),
            "slice_perplexity": perplexity(model, slice_ids, args.seq_len),
            "heldout_digest": token_digest(heldout_ids), "slice_digest": token_digest(slice_ids),
            "train_seconds": train_seconds,
        }
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        facts["total_seconds"] = time.time() - started
        model_card(facts, args).save(folder / "README.md")

    print(f"held-out perplexity {facts['heldout_perplexity']:.2f} (unigram {facts['unigram_perplexity']:.2f}), "
          f"{facts['parameters'] / 1e6:.2f}M parameters, {facts['total_seconds'] / 60:.1f} min")
    print(f"wrote the model, tokenizer and card to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
