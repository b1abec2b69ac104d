"""Peak memory and wall time of `hf-moe upcycle` on a dense Llama of >= 1B parameters, converted to 8 experts.

1. A random dense Llama in bf16 with Llama-3.2-1B shapes (H 2048, FFN 8192, 32/8 heads, vocab 128256, tied
   embeddings: 1.24B parameters) is written shard by shard with hf-moe's ShardWriter, one layer in memory at a time.
2. `hf-moe upcycle SRC OUT --num-experts 8 --top-k 2` (Mixtral copies, random normal router; no verification, as
   mergekit, unless --verify: then layer by layer) runs in its own process under `/usr/bin/time -v`, for each
   requested depth, side by side with mergekit-moe (--mergekit) and another checkout of hf-moe (--compare-with),
   round-robin for --rounds rounds: peak RSS should stay at most one output MoE layer (8 x 3 x FFN x H x 2 bytes =
   805 MB here) above the import baseline, whatever the number of layers and the shard size.
3. The outputs (~14 GB for 16 layers) are deleted after each run unless --keep.

    python benchmarks/upcycle_memory.py                       # 16 layers (1.24B), prints a table
    python benchmarks/upcycle_memory.py --layers 8 16 --rounds 3 --mergekit PATH --write  # and BENCHMARKS.md
    python benchmarks/upcycle_memory.py --smoke               # tiny shapes, prints only (used by the tests)

Needs `/usr/bin/time` (Debian/Ubuntu: `apt-get install time`) and ~2.5 GB + ~14 GB of free disk per depth.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from hf_moe.conversion.safetensors_io import ShardWriter

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, tie_word_embeddings=True)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             tie_word_embeddings=True)


def write_word_level_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tokenizer with one made-up word per embedding row (mergekit-moe requires a tokenizer in its source)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{index}": index for index in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


def write_random_llama(folder: Path, shapes: dict, layers: int, max_shard_size: str, seed: int = 0) -> int:
    """A random bf16 Llama checkpoint written one tensor at a time; returns its parameter count."""
    config = LlamaConfig(**shapes, num_hidden_layers=layers, max_position_embeddings=4096, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    write_word_level_tokenizer(folder, config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    hidden, width = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv_width = config.num_key_value_heads * head_dim

    writer, count = ShardWriter(folder, max_shard_size), 0

    def random(*shape):
        nonlocal count
        count += shape[0] * shape[1]
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    writer.add("model.embed_tokens.weight", random(config.vocab_size, hidden))
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes_ = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv_width, hidden),
                   "self_attn.v_proj.weight": (kv_width, hidden), "self_attn.o_proj.weight": (hidden, hidden),
                   "mlp.gate_proj.weight": (width, hidden), "mlp.up_proj.weight": (width, hidden),
                   "mlp.down_proj.weight": (hidden, width)}
        for name, shape in shapes_.items():
            writer.add(p + name, random(*shape))
        writer.add(p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
        writer.add(p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16))
    writer.finish()
    return count + (2 * layers + 1) * hidden


def timed(command: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `command` under /usr/bin/time -v (in `cwd`, with `env`): wall seconds and peak RSS (MB)."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.+)", result.stderr).group(1).strip()
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return {"wall_s": seconds, "peak_rss_mb": peak_kb / 1024, "stdout": result.stdout}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def candidates(args, source: Path) -> dict:
    """tool label -> a function running one conversion of `source` into `out` (measured), in round-robin order."""
    verification = ["--verify-mode", "layerwise"] if args.verify else ["--no-verify"]

    def ours(out: Path, checkout: Path | None = None) -> dict:
        command = [sys.executable, "-m", "hf_moe.cli", "upcycle", str(source), str(out), "--num-experts",
                   str(args.experts), "--top-k", "2", "--router-init", "normal", *verification, "--overwrite",
                   "--max-shard-size", args.max_shard_size]
        if checkout is None:
            return timed(command)
        # run in the checkout with its package first on the path (`-m` puts the working folder first)
        return timed(command, {**os.environ, "PYTHONPATH": str(checkout)}, cwd=checkout)

    runs = {"hf-moe upcycle": ours}
    if args.compare_with:  # another checkout of hf-moe, e.g. an earlier commit
        checkout = Path(args.compare_with).resolve()
        runs[f"hf-moe upcycle ({_commit(checkout)})"] = lambda out: ours(out, checkout)
    if args.mergekit:
        runs["mergekit-moe"] = lambda out: run_mergekit(args, source, out)
    return runs


def run(args) -> list[dict]:
    shapes = SMOKE if args.smoke else LLAMA_1B
    work = Path(args.work or tempfile.mkdtemp(prefix="upcycle-memory-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    baseline = timed([sys.executable, "-c", "import hf_moe.cli"])["peak_rss_mb"]
    expert_layer_mb = args.experts * 3 * shapes["intermediate_size"] * shapes["hidden_size"] * 2 / 2**20
    rows = []
    for layers in args.layers:
        source = work / f"dense-{layers}"
        shutil.rmtree(source, ignore_errors=True)
        start = time.perf_counter()
        parameters = write_random_llama(source, shapes, layers, args.max_shard_size)
        build_s = time.perf_counter() - start
        measured: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for tool, convert in candidates(args, source).items():
                out = work / f"out-{layers}"
                result = convert(out)
                index = out / "model.safetensors.index.json"
                result["moe_parameters"] = (json.loads(index.read_text())["metadata"].get("total_parameters")
                                            if index.exists() and tool.startswith("hf-moe") else None)
                result["output_gb"] = folder_bytes(out) / 1e9
                measured.setdefault(tool, []).append(result)
                print(json.dumps({"tool": tool, "layers": layers, **{key: value for key, value in result.items()
                                                                     if key != "stdout"}}), flush=True)
                if not args.keep or len(measured[tool]) < args.rounds:
                    shutil.rmtree(out, ignore_errors=True)
        for tool, results in measured.items():
            walls, peaks = [r["wall_s"] for r in results], [r["peak_rss_mb"] for r in results]
            rows.append({"tool": tool, "layers": layers, "dense_parameters": parameters,
                         "moe_parameters": results[0]["moe_parameters"], "output_gb": results[0]["output_gb"],
                         "build_s": build_s, "wall_s": statistics.median(walls), "wall_range": (min(walls), max(walls)),
                         "peak_rss_mb": statistics.median(peaks), "peak_range": (min(peaks), max(peaks)),
                         "rounds": len(results), "baseline_rss_mb": baseline, "moe_layer_mb": expert_layer_mb,
                         "verified": args.verify and tool.startswith("hf-moe")})
        if not args.keep:
            shutil.rmtree(source, ignore_errors=True)
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run_mergekit(args, source: Path, out: Path) -> dict:
    """The same conversion with mergekit-moe (installed in its own environment): 8 copies of the FFN, random gate,
    bf16, shards of the same byte size; no tokenizer to copy."""
    config = out.with_suffix(".yaml")
    experts = "".join(f"  - source_model: {source}\n" for _ in range(args.experts))
    config.write_text(f"base_model: {source}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\n"
                      f"experts:\n{experts}")
    shard_parameters = f"{_parse_mb(args.max_shard_size) * 2**20 / 2 / 1e9:.0f}B"  # bf16: 2 bytes per parameter
    return timed([args.mergekit, str(config), str(out), "--no-copy-tokenizer", "--out-shard-size", shard_parameters,
                  "--random-seed", "0", "--i-understand-this-is-not-useful-without-training"])


def _commit(folder: Path) -> str:
    result = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() or Path(folder).name


def table(rows: list[dict], args) -> str:
    header = ["tool", "dense model", "layers", "MoE (8 experts)", "verification", "output", "wall time", "peak RSS",
              "import baseline", "one MoE layer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        moe = f"{row['moe_parameters'] / 1e9:.2f}B params" if row["moe_parameters"] else "-"
        wall, peak = row["wall_range"], row["peak_range"]
        lines.append(
            f"| {row['tool']} | random Llama {row['dense_parameters'] / 1e9:.2f}B bf16 | {row['layers']} | {moe} | "
            f"{'layer by layer' if row['verified'] else 'off'} | {row['output_gb']:.1f} GB | "
            f"{row['wall_s']:.0f} s ({wall[0]:.0f}-{wall[1]:.0f}) | "
            f"{row['peak_rss_mb'] / 1024:.2f} GB ({peak[0] / 1024:.2f}-{peak[1] / 1024:.2f}) | "
            f"{row['baseline_rss_mb'] / 1024:.2f} GB | {row['moe_layer_mb'] / 1024:.2f} GB |"
        )
    return "\n".join(lines)


def _parse_mb(size: str) -> float:
    from hf_moe.conversion.safetensors_io import parse_size

    return parse_size(size) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="depths to convert (default: 16)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--max-shard-size", default="2GB", help="shard size of the source and the output")
    parser.add_argument("--work", default=None, help="folder for the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--verify", action="store_true",
                        help="include the automatic verification, layer by layer (default: --no-verify, as mergekit)")
    parser.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, prints only")
    parser.add_argument("--mergekit", default=None, metavar="MERGEKIT_MOE",
                        help="path of a mergekit-moe executable (in its own virtual environment): also run the same "
                             "conversion with it, side by side")
    parser.add_argument("--compare-with", default=None, metavar="CHECKOUT",
                        help="another checkout of hf-moe (e.g. `git worktree add /tmp/before HEAD~1`): also run its "
                             "`hf-moe upcycle`, side by side")
    parser.add_argument("--rounds", type=int, default=1, help="conversions per tool and depth, round-robin; the "
                                                              "table gives medians and (min-max)")
    args = parser.parse_args()
    if shutil.which("/usr/bin/time") is None:
        sys.exit("/usr/bin/time is missing: install it (Debian/Ubuntu: apt-get install time)")
    if args.layers is None:
        args.layers = [2] if args.smoke else [16]
    if args.smoke:
        args.max_shard_size = "100KB"
    rows = run(args)
    body = table(rows, args)
    print(body)
    if args.write and not args.smoke:
        sys.path.insert(0, str(Path(__file__).parent))
        from common import write_section

        write_section("upcycle-memory", "### `hf-moe upcycle`: peak memory, dense Llama -> 8 experts\n\n" + body +
                      f"\n\nPeak RSS is that of the whole process (`/usr/bin/time -v`), wall time and peak RSS the "
                      f"median (min-max) of {args.rounds} round-robin rounds; the import baseline is "
                      f"`python -c 'import hf_moe.cli'`. Shards of at most {args.max_shard_size}.")


if __name__ == "__main__":
    main()
