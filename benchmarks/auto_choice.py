"""Does "auto"'s timing pick the fastest kernel? Its verdicts on the batch-1 decoding call (one token), timed in the
caller's thread, as "auto" times, and in a thread of its own, as it timed before (hf_moe/modeling/kernel_choice.py),
against greedy decoding at batch 1 with "auto" pinned to each candidate (`HF_MOE_AUTO_KERNEL`), on the models of
table (c). With `--training`: its verdicts on the training call of table (a)'s layers (weight gradients too) at a
few token counts, against the layer's forward and backward with "auto" pinned to each candidate.

    python benchmarks/auto_choice.py              # writes BENCHMARKS.md
    python benchmarks/auto_choice.py --training   # writes BENCHMARKS.md (a section of its own)
    python benchmarks/auto_choice.py --smoke      # tiny models, prints only (both studies)
"""

import argparse
import collections
import os
import statistics
import threading

import torch
from common import cpu_model, markdown_table, round_robin_medians, write_section
from models import FAMILIES, SMOKE_FAMILIES, build_models
from moe_block import SHAPES, SMOKE_SHAPES, build_blocks, step

from hf_moe.modeling import kernel_choice
from hf_moe.modeling.experts_kernels import auto_candidates, auto_kernels


def verdicts(experts: torch.nn.Module, top_k: int, count: int, own_thread: bool) -> dict[str, tuple[int, float]]:
    """candidate -> (how many of `count` timings it won, the median over them of its timed ms) for the one-token
    inference call, each timing as "auto" runs one (`kernel_choice._time`)."""
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


def pinned_times(run, kernels: list[str], repeats: int) -> dict[str, float]:
    """kernel -> median ms of `run()` with "auto" pinned to it (`HF_MOE_AUTO_KERNEL`; round-robin)."""

    def pinned_run(kernel: str):
        os.environ[kernel_choice.PIN_ENV] = kernel
        run()

    pinned = os.environ.get(kernel_choice.PIN_ENV)
    try:
        return round_robin_medians({kernel: (lambda k=kernel: pinned_run(k)) for kernel in kernels}, repeats=repeats)
    finally:
        os.environ.pop(kernel_choice.PIN_ENV, None)
        if pinned is not None:
            os.environ[kernel_choice.PIN_ENV] = pinned


def decode_speeds(model, kernels: list[str], repeats: int, new_tokens: int) -> dict[str, float]:
    """kernel -> new tokens per second of greedy decoding at batch 1 with "auto" pinned to it (round-robin)."""
    prompt = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))

    def decode():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    times = pinned_times(decode, kernels, repeats)
    return {kernel: new_tokens / times[kernel] * 1000 for kernel in kernels}


# How a timing's calls make each candidate's time, by the number of timed calls it uses: "auto"'s rule now for slow
# calls (`kernel_choice._MIN_ROUNDS` calls, of which the fastest), its rule before (the median of 2), and all nine calls
NOW = "fastest of 5 calls (now)"
RULES = {NOW: lambda calls: min(calls[:5]),
         "median of 2 calls (before)": lambda calls: statistics.median(calls[:2]),
         "median of 9 calls": statistics.median, "fastest of 9 calls": min}


def training_timings(experts: torch.nn.Module, top_k: int, count: int, tokens: int) -> list[dict[str, dict]]:
    """`count` timings of the training call (weight gradients too) as "auto" times it, each with all its calls: rule
    -> candidate -> ms (a candidate dropped after its warm-up keeps that call's time under every rule)."""
    hidden = torch.zeros(tokens, experts.gate_up_proj.shape[-1])
    names = auto_candidates(experts, hidden, torch.zeros(tokens, top_k, dtype=torch.long), "weights")
    candidates = {name: auto_kernels()[name] for name in names}
    timings = []
    for _ in range(count):
        warmup, calls = kernel_choice._timed_calls(experts, candidates, hidden.dtype, hidden.shape[-1], top_k,
                                                   "weights", kernel_choice.token_bucket(tokens),
                                                   min_rounds=kernel_choice._MAX_ROUNDS)
        timings.append({rule: {**warmup, **{name: time_of(ms) for name, ms in calls.items()}}
                        for rule, time_of in RULES.items()})
    return timings


def measure_training(smoke: bool, count: int, repeats: int, token_counts: list[int]) -> tuple[str, str]:
    """Table (a)'s layers in training: `count` timings per token count, and the layer's forward and backward
    (`moe_block.step`) with "auto" pinned to each candidate. Returns a table per kernel (its time under "auto"'s rule,
    the timings it won, its step) and one per rule (the timings that picked the fastest step)."""
    kernel_rows, rule_rows = [], []
    for shape_name, shape in (SMOKE_SHAPES if smoke else SHAPES).items():
        block, config, _, _ = build_blocks(shape, torch.float32, "cpu")
        config._experts_implementation = "auto"
        for tokens in token_counts:
            timings = training_timings(block.experts, shape[2], count, tokens)
            names = list(timings[0][NOW])
            inputs = torch.randn(1, tokens, shape[0]).requires_grad_()
            grad = torch.randn(1, tokens, shape[0])
            steps = pinned_times(lambda b=block, x=inputs, g=grad: step(b, x, g, True), names, repeats)
            fastest = min(steps, key=steps.get)
            now = [timing[NOW] for timing in timings]
            wins = collections.Counter(min(ms, key=ms.get) for ms in now)
            for name in names:
                kernel_rows.append([shape_name, tokens, f"`{name}`",
                                    f"{statistics.median(ms[name] for ms in now):.1f} ({wins[name]} of {count})",
                                    f"{steps[name]:.1f}" + (" (fastest)" if name == fastest else "")])
                print(" | ".join(map(str, kernel_rows[-1])), flush=True)
            for rule in RULES:
                picked = sum(min(timing[rule], key=timing[rule].get) == fastest for timing in timings)
                rule_rows.append([shape_name, tokens, rule, f"{picked} of {count}"])
                print(" | ".join(map(str, rule_rows[-1])), flush=True)
    return (markdown_table(["layer", "tokens", "kernel", "timed ms, fastest of 5 calls (timings won)",
                            "layer fwd+bwd, ms"], kernel_rows),
            markdown_table(["layer", "tokens", "a candidate's time", "timings that picked the fastest step"],
                           rule_rows))


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
    parser.add_argument("--training", action="store_true", help="the training study (table (a)'s layers)")
    parser.add_argument("--token-counts", type=int, nargs="+", default=[16, 256], metavar="T",
                        help="--training: the calls' token counts")
    args = parser.parse_args()
    if args.smoke:
        measure(True, 1, 1, 3)
        measure_training(True, 1, 1, [4])
        return
    tag, cpu = cpu_model()
    if args.training:
        kernels, rules = measure_training(False, args.verdicts, args.repeats, args.token_counts)
        write_section(f"auto-choice-training-{tag}", (
            f"## Does \"auto\"'s timing pick the fastest kernel for training? ({cpu})\n\n"
            f"The training call (weight gradients too) of table (a)'s layers timed {args.verdicts} times per token "
            f"count as \"auto\" times it, each timing with nine calls of each candidate after its warm-up (the time "
            f"budget of \"auto\" stops these slow calls at five); then the layer's forward and backward with \"auto\" "
            f"pinned to each candidate (round-robin, medians of {args.repeats}). Per kernel: the median over the "
            f"timings of its time under \"auto\"'s rule (the fastest of the first five calls) and how many timings it "
            f"won.\n\n{kernels}\n\nPer rule, the same timings' calls made into each candidate's time in other ways: "
            f"how many timings picked the kernel whose step was fastest.\n\n{rules}"))
        return
    table = measure(False, args.verdicts, args.repeats, args.new_tokens)
    write_section(f"auto-choice-{tag}", (
        f"## Does \"auto\"'s timing predict decoding? ({cpu})\n\n"
        f"Each family's one-token inference call (the batch-1 decoding step of table (c)'s models) timed "
        f"{args.verdicts} times as \"auto\" times it: in the caller's thread (as \"auto\" does) and in a thread of its "
        f"own (as it did before); each timing's value per candidate (\"auto\"'s rule at the time of the run), the "
        f"median of those, and how many timings the candidate won. Then greedy decoding at batch 1 (prompt 16, "
        f"{args.new_tokens} new tokens, medians of {args.repeats}) with \"auto\" pinned to each candidate.\n\n{table}"))


if __name__ == "__main__":
    main()
