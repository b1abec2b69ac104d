"""How much of a training step is page-faulting fresh memory, and what glibc with mmap off changes.

A fused MoE layer's weight gradients are whole [E, ...] tensors: 369 MB for the DeepSeek-like layer's gate/up in fp32.
Trainer's `zero_grad` sets gradients to None, so each step allocates them anew. When no free block of glibc's heap
holds a request, glibc asks the OS: a request above the mmap threshold (32 MB at most, whatever MALLOC_MMAP_THRESHOLD_
asks) gets a mapping of its own, unmapped when it is freed, so the next step faults its pages in again; smaller ones
grow the heap, which the warmed settings of BENCHMARKS.md keep. MALLOC_MMAP_MAX_=0 makes glibc grow the heap for
every request: with the warmed settings, freed memory is kept for the next step, as a caching allocator would keep
it, and the price is memory not returned to the OS.

glibc reads its settings when a process starts, so each setting runs in a fresh process, in rounds that alternate
them. Each process times (round-robin medians) one MoE layer's forward+backward (moe_block.py's blocks, T=512 and
4096) and a whole training step with fused AdamW (train_step.py's models), counts the minor page faults of each
timed call, and reports its peak resident memory (getrusage).

    python benchmarks/page_faults.py           # writes BENCHMARKS.md
    python benchmarks/page_faults.py --smoke   # tiny shapes, prints only
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
from common import WARMED_MALLOC, machine_description, markdown_table, round_robin_medians, write_section
from models import FAMILIES, build_models
from moe_block import SHAPES, SMOKE_SHAPES, build_blocks, repeats, step
from train_step import fused_adamw, training_step

SETTINGS = {"warmed malloc": WARMED_MALLOC, "mmap off": {**WARMED_MALLOC, "MALLOC_MMAP_MAX_": "0"}}
LAYER_CANDIDATES = ("floor", "transformers grouped_mm", "ours sorted_mm", "ours grouped_mm")
MODEL_CANDIDATES = ("dense floor", "transformers grouped_mm", "ours sorted_mm", "ours grouped_mm")


def timed_with_faults(candidates: dict, count: int) -> dict[str, tuple[float, float, float]]:
    """name -> (median ms, median MiB of minor page faults per call, the first candidate's (the floor's) median ms),
    round-robin."""
    page_mib, faults = resource.getpagesize() / 2**20, {name: [] for name in candidates}

    def counting(name, run):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    times = round_robin_medians({name: (lambda n=name, r=run: counting(n, r)) for name, run in candidates.items()},
                                repeats=count)
    floor_ms = next(iter(times.values()))
    return {name: (ms, statistics.median(faults[name][-count:]) * page_mib, floor_ms) for name, ms in times.items()}


def layer_results(smoke: bool) -> list[list]:
    rows = []
    for shape_name, shape in (SMOKE_SHAPES if smoke else SHAPES).items():
        ours, ours_config, native, floor = build_blocks(shape, torch.float32, "cpu")
        for tokens in (8,) if smoke else (512, 4096):
            torch.manual_seed(0)
            inputs = torch.randn(1, tokens, shape[0]).requires_grad_()
            grad = torch.randn(1, tokens, shape[0])

            def ours_step(implementation):
                ours_config._experts_implementation = implementation
                step(ours, inputs, grad, True)

            candidates = dict(zip(LAYER_CANDIDATES, (
                lambda: step(floor, inputs, grad, True), lambda: step(native, inputs, grad, True),
                lambda: ours_step("sorted_mm"), lambda: ours_step("grouped_mm"))))
            results = timed_with_faults(candidates, 1 if smoke else repeats(tokens, "cpu"))
            rows += [[shape_name, f"one layer fwd+bwd, T={tokens}", name, *results[name]] for name in candidates]
    return rows


def model_results(smoke: bool) -> list[list]:
    rows = []
    for family in FAMILIES:
        models = {name: model for name, model in build_models(family, smoke).items() if name in MODEL_CANDIDATES}
        torch.manual_seed(1)
        input_ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (2, 8) if smoke else (4, 256))
        optimizers = {name: fused_adamw(model) for name, model in models.items()}
        candidates = {name: (lambda n=name: training_step(models[n], optimizers[n], input_ids)) for name in models}
        results = timed_with_faults(candidates, 1 if smoke else 5)
        work = f"training step, batch {input_ids.shape[0]} x {input_ids.shape[1]}"
        rows += [[family, work, name, *results[name]] for name in models]
    return rows


def run_setting(setting: str, smoke: bool) -> dict:
    """One process's results under `setting`, measured in a fresh process."""
    arguments = [sys.executable, __file__, "--run", setting] + ["--smoke"] * smoke
    result = subprocess.run(arguments, env={**os.environ, **SETTINGS[setting]}, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{setting}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])  # {"rows": [...], "peak_rss_mib": ...}


def table(rounds: int, smoke: bool) -> tuple[str, dict[str, float]]:
    """The table, and each setting's largest peak resident memory (MiB) of a process."""
    measured = {setting: [] for setting in SETTINGS}  # setting -> one list of rows per round
    peak_rss = dict.fromkeys(SETTINGS, 0.0)
    for round_index in range(rounds):
        for setting in SETTINGS:
            result = run_setting(setting, smoke)
            measured[setting].append(result["rows"])
            peak_rss[setting] = max(peak_rss[setting], result["peak_rss_mib"])
            print(f"round {round_index + 1}, {setting}: done, peak resident memory {result['peak_rss_mib']:.0f} MiB",
                  flush=True)
    rows = []
    for index, (shape, work, name, *_) in enumerate(measured["warmed malloc"][0]):
        row = [shape, work, name]
        for setting in SETTINGS:
            runs = measured[setting]  # a row of a run: shape, work, name, ms, MiB faulted, the floor's ms
            speeds = [run[index][5] / run[index][3] for run in runs]
            row += [f"{statistics.median(run[index][3] for run in runs):.0f}",
                    f"{min(speeds):.2f}" + (f"-{max(speeds):.2f}" if rounds > 1 else ""),
                    f"{statistics.median(run[index][4] for run in runs):.0f}"]
        rows.append(row)
        print(" | ".join(row), flush=True)
    return markdown_table(["shape", "work", "candidate", "warmed malloc: ms", "speed vs floor",
                           "MiB page-faulted / call", "mmap off: ms", "speed vs floor",
                           "MiB page-faulted / call"], rows), peak_rss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round, prints only")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting, alternating the settings")
    parser.add_argument("--run", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # one process under one setting, for table()
        rows = layer_results(args.smoke) + model_results(args.smoke)
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        print(json.dumps({"rows": rows, "peak_rss_mib": peak_rss_mib}))
        return
    body, peak_rss = table(1 if args.smoke else args.rounds, args.smoke)
    if not args.smoke:
        memory = ", ".join(f"{rss / 1024:.1f} GiB with {setting}" for setting, rss in peak_rss.items())
        write_section("page-faults", "## Page faults of fresh memory: glibc's warmed settings against mmap off, "
                      "fp32\n\nEach setting in its own processes (rounds alternate them). Times are medians over the "
                      "rounds, speeds the range over the rounds, faults the minor page faults of one timed call "
                      f"(median) times the page size. Peak resident memory of a process: {memory}.\n\n" + body,
                      machine=machine_description(malloc="malloc settings per column"))


if __name__ == "__main__":
    main()
