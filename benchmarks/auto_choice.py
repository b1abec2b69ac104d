"""Does "auto"'s timing predict decoding speed? Its verdicts on the batch-1 decoding call (one token), timed in the
caller's thread, as "auto" times, and in a thread of its own, as it timed before (hf_moe/modeling/kernel_choice.py),
against greedy decoding at batch 1 with "auto" pinned to each candidate (`HF_MOE_AUTO_KERNEL`), on the models of
table (c).

    python benchmarks/auto_choice.py            # writes BENCHMARKS.md
    python benchmarks/auto_choice.py --smoke    # tiny models, prints only
"""

import argparse
import collections
import os
import statistics
import threading

import torch
from common import cpu_model, markdown_table, round_robin_medians, write_section
from models import FAMILIES, SMOKE_FAMILIES, build_models

from hf_moe.modeling import kernel_choice
from hf_moe.modeling.experts_kernels import auto_candidates, auto_kernels


def verdicts(experts: torch.nn.Module, top_k: int, count: int, own_thread: bool) -> dict[str, tuple[int, float]]:
    """candidate -> (how many of `count` timings it won, its median time in ms over them) for the one-token inference
    call, each timing as "auto" runs one (`kernel_choice._time`)."""
    hidden = torch.zeros(1, experts.gate_up_proj.shape[-1])
    names = auto_candidates(experts, hidden, torch.zeros(1, top_k, dtype=torch.long), "none")
    candidates = {name: auto_kernels()[name] for name in names}
    timings = []

    def time_once():
        with torch.no_grad():
            timings.append(kernel_choice._time(experts, candidates, hidden.dtype, hidden.shape[-1], top_k, "none", 1))

    for _ in range(count):
        if own_thread:
            thread = threading.Thread(target=time_once)
            thread.start()
            thread.join()
        else:
            time_once()
    wins = collections.Counter(min(timing, key=timing.get) for timing in timings)
    return {name: (wins[name], statistics.median(timing[name] for timing in timings)) for name in names}


def decode_speeds(model, kernels: list[str], repeats: int, new_tokens: int) -> dict[str, float]:
    """kernel -> new tokens per second of greedy decoding at batch 1 with "auto" pinned to it (round-robin)."""
    prompt = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))

    def decode(kernel: str):
        os.environ[kernel_choice.PIN_ENV] = kernel
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    pinned = os.environ.get(kernel_choice.PIN_ENV)
    try:
        times = round_robin_medians({kernel: (lambda k=kernel: decode(k)) for kernel in kernels}, repeats=repeats)
    finally:
        os.environ.pop(kernel_choice.PIN_ENV, None)
        if pinned is not None:
            os.environ[kernel_choice.PIN_ENV] = pinned
    return {kernel: new_tokens / times[kernel] * 1000 for kernel in kernels}


def measure(smoke: bool, count: int, repeats: int, new_tokens: int) -> str:
    rows = []
    for family in SMOKE_FAMILIES if smoke else FAMILIES:
        model = build_models(family, smoke)["ours auto"]
        experts, top_k = model.model.layers[0].mlp.experts, model.config.num_experts_per_tok
        caller = verdicts(experts, top_k, count, own_thread=False)
        own = verdicts(experts, top_k, count, own_thread=True)
        speeds = decode_speeds(model, list(caller), repeats, new_tokens)
        for name in caller:
            rows.append([family, f"`{name}`", f"{caller[name][1]:.2f} ({caller[name][0]} of {count})",
                         f"{own[name][1]:.2f} ({own[name][0]} of {count})", f"{speeds[name]:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    return markdown_table(["family", "kernel", "timed ms, caller's thread (verdicts won)",
                           "timed ms, own thread (verdicts won)", "decode batch 1, new tokens / s"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models, prints only")
    parser.add_argument("--verdicts", type=int, default=8, help="timings per thread kind")
    parser.add_argument("--repeats", type=int, default=5, help="decodes per kernel (medians)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.smoke:
        measure(True, 1, 1, 3)
        return
    table = measure(False, args.verdicts, args.repeats, args.new_tokens)
    tag, cpu = cpu_model()
    write_section(f"auto-choice-{tag}", (
        f"## Does \"auto\"'s timing predict decoding? ({cpu})\n\n"
        f"Each family's one-token inference call (the batch-1 decoding step of table (c)'s models) timed "
        f"{args.verdicts} times as \"auto\" times it: in the caller's thread (as \"auto\" does) and in a thread of its "
        f"own (as it did before); each timing's median per candidate, the median of those, and how many timings the "
        f"candidate won. Then greedy decoding at batch 1 (prompt 16, {args.new_tokens} new tokens, medians of "
        f"{args.repeats}) with \"auto\" pinned to each candidate.\n\n{table}"))


if __name__ == "__main__":
    main()
