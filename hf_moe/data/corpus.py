"""Pretraining text every Python install carries: the standard library's own source, and its English documentation.

    train_files, heldout_files = split_stdlib_sources()
    ids = token_stream(tokenizer, heldout_files)           # <s> file </s> <s> file </s> ..., one 1D LongTensor
    print(perplexity(model, ids, block_size=256))

    train_texts, heldout_texts = split_pydoc_topics()      # English prose: the language reference's topics
    ids = text_token_stream(tokenizer, heldout_texts)

The corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]` in sorted order of its path relative to
that folder, minus installed packages (`site-packages`), the test suites and the codec tables of `encodings/`
(generated lookup tables, not code anyone writes). The held-out split is decided by the file's relative path alone
(its CRC-32), so it is the same on every machine and does not move when other files come or go.

The documentation corpus is `pydoc_data.topics.topics` (the text `help()` shows for the language reference's
topics, about 465k characters of English with code examples), split the same way by topic name.
"""

import sysconfig
import zlib
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings", "__pycache__"})
DEFAULT_HELDOUT_PERCENT = 3


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """The corpus files, sorted by their path relative to `root` (the running Python's stdlib by default)."""
    root = stdlib_root() if root is None else Path(root)
    files = (path for path in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(path.relative_to(root).parts))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def is_heldout(relative_path: str, heldout_percent: int = DEFAULT_HELDOUT_PERCENT) -> bool:
    """Whether a file (by its '/'-separated path relative to the stdlib folder) belongs to the held-out split."""
    return zlib.crc32(relative_path.encode("utf-8")) % 100 < heldout_percent


def split_stdlib_sources(heldout_percent: int = DEFAULT_HELDOUT_PERCENT,
                         root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train files, held-out files), each in corpus order."""
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent={heldout_percent!r} is invalid: must be an integer between 1 and 99")
    root = stdlib_root() if root is None else Path(root)
    train, heldout = [], []
    for path in stdlib_sources(root):
        (heldout if is_heldout(path.relative_to(root).as_posix(), heldout_percent) else train).append(path)
    return train, heldout


def split_pydoc_topics(heldout_percent: int = 15) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) of the documentation topics, each in sorted order of the topic name."""
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent={heldout_percent!r} is invalid: must be an integer between 1 and 99")
    from pydoc_data.topics import topics

    train, heldout = [], []
    for name in sorted(topics):
        (heldout if is_heldout(name, heldout_percent) else train).append(topics[name])
    return train, heldout


def read_source(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8")  # PEP 3120: UTF-8 is the source encoding of the stdlib


def token_stream(tokenizer, files: list[Path], progress: bool = False) -> torch.Tensor:
    """The files tokenized and concatenated as `bos ids eos` per file: a 1D LongTensor."""
    texts = (read_source(path) for path in tqdm(files, desc="tokenizing", unit="file", disable=not progress))
    return text_token_stream(tokenizer, texts)


def text_token_stream(tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """The texts tokenized and concatenated as `bos ids eos` per text (a tokenizer without a bos token: `ids eos`)."""
    ids = []
    for text in texts:
        if tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        # verbose=False: a whole text is longer than the model's context on purpose; it is cut into blocks later
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, block_size: int, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping blocks of `block_size` tokens (a last partial block is dropped;
    the first token of each block is context only)."""
    blocks = token_ids[: len(token_ids) // block_size * block_size].view(-1, block_size)
    if len(blocks) == 0:
        raise ValueError(f"token_ids has {len(token_ids)} tokens: need at least block_size={block_size}")
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = blocks[start : start + batch_size].to(model.device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total_nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return float(torch.tensor(total_nll / count).exp())
