"""What oneDNN's per-shape kernels cost `sorted_mm`: one product at a new row count against a cached one, and the
new shapes that training steps and prefills meet with exact and with bucketed row windows.

oneDNN builds (JIT-compiles) a kernel for every new product shape and keeps the last 1024 in a cache. `sorted_mm`'s
per-expert row counts change with every batch, so with exact windows training steps and prompts of new lengths keep
meeting new shapes; bucketed windows (`hf_moe/modeling/experts_kernels.py`, `_bucketed`) round each count up to one of
16 steps per power of two. Part 1 times single products: the first call at each of 20 row counts near 48 and 256, the
same call again, and `torch.mm`. Part 2 runs each model of table (b) under `sorted_mm` for a number of training steps,
and of prefills of prompts of random lengths, once with exact and once with bucketed windows, each in a fresh process
(the cache is per process), and counts the oneDNN calls whose shape the process had not seen before and the time they
took.

    python benchmarks/onednn_shapes.py           # writes BENCHMARKS.md
    python benchmarks/onednn_shapes.py --smoke   # tiny shapes, prints only
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from common import markdown_table, onednn_linear, write_section
from models import FAMILIES, build_models

from hf_moe.modeling import experts_kernels

# (in, out) of the expert products of table (b)'s models, forward layout
PRODUCTS = {"mixtral-like gate/up": (512, 2816), "mixtral-like down": (1408, 512),
            "qwen2moe-like gate/up": (512, 704), "qwen2moe-like down": (352, 512)}


def milliseconds(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000


def product_rows(smoke: bool) -> list[list]:
    linear, rows = experts_kernels._onednn_linear, []
    counts = 3 if smoke else 20
    for name, (fan_in, fan_out) in PRODUCTS.items():
        weight = torch.randn(fan_out, fan_in)  # [out, in], as the forward passes it
        inputs = torch.randn(1024, fan_in)
        for near in (48, 256):
            first, again, mm = [], [], []
            for count in range(near, near + counts):
                x = inputs[:count]
                first.append(milliseconds(lambda: linear(x, weight, None, "none", [], "")))
                again.append(milliseconds(lambda: linear(x, weight, None, "none", [], "")))
                mm.append(milliseconds(lambda: torch.mm(x, weight.t())))
            medians = [statistics.median(times) for times in (first, again, mm)]
            rows.append([name, f"{near}-{near + counts - 1}", *(f"{ms:.2f}" for ms in medians),
                         f"{medians[0] - medians[1]:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def run_steps(family: str, work: str, windows: str, steps: int, smoke: bool) -> dict:
    """Run `steps` steps of the family's `sorted_mm` model: training steps on one batch, or prefills (forward passes
    without gradients, what "auto" runs `sorted_mm` for) of prompts of random lengths. Per step, the oneDNN calls at
    shapes new to this process and the time in them."""
    if windows == "exact":
        experts_kernels._bucketed = lambda rows: rows
    linear, seen, step_calls = experts_kernels._onednn_linear, set(), []

    def counting_linear(x, weight, *args):
        shape = (x.shape, weight.shape, weight.stride())
        start = time.perf_counter()
        result = linear(x, weight, *args)
        step_calls.append((shape not in seen, time.perf_counter() - start))
        seen.add(shape)
        return result

    experts_kernels._onednn_linear = counting_linear
    model = build_models(family, smoke)["ours sorted_mm"]
    vocab, generator = model.config.vocab_size, torch.Generator().manual_seed(1)
    if work == "training":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        input_ids = torch.randint(0, vocab, (2, 8) if smoke else (4, 256), generator=generator)
        model.train()

        def step():
            model(input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        lengths = (4, 12) if smoke else (64, 512)

        def step():
            length = int(torch.randint(*lengths, (1,), generator=generator))
            with torch.no_grad():
                model(torch.randint(0, vocab, (1, length), generator=generator))
    per_step = []
    for _ in range(steps):
        step_calls.clear()
        start = time.perf_counter()
        step()
        step_ms = (time.perf_counter() - start) * 1000
        new = [seconds for is_new, seconds in step_calls if is_new]
        old = [seconds for is_new, seconds in step_calls if not is_new]
        per_step.append({"step ms": step_ms, "calls": len(step_calls), "new": len(new), "new ms": sum(new) * 1000,
                         "old ms": sum(old) * 1000})
    return {"per step": per_step, "shapes": len(seen)}


def step_rows(steps: int, smoke: bool) -> list[list]:
    rows = []
    for work in ("training", "prefill"):
        for family in list(FAMILIES)[:1] if smoke else FAMILIES:
            for windows in ("exact", "bucketed"):
                arguments = [sys.executable, __file__, "--run", family, work, windows, str(steps)]
                result = json.loads(subprocess.run(arguments + ["--smoke"] * smoke, capture_output=True, text=True,
                                                   check=True).stdout)
                later = result["per step"][1:] or result["per step"]  # step 1 meets every shape for the first time

                def median(key):
                    return statistics.median(step[key] for step in later)
                rows.append([family, work, windows, str(steps), str(result["per step"][0]["new"]),
                             f"{median('calls'):.0f}", f"{median('new'):.0f}", f"{median('new ms'):.0f}",
                             f"{median('old ms'):.0f}", str(result["shapes"]), f"{median('step ms'):.0f}"])
                print(" | ".join(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, prints only")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--run", nargs=4, metavar=("FAMILY", "WORK", "WINDOWS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    onednn_linear()  # exits where this machine has none
    if args.run:  # one run of steps in this fresh process, for step_rows
        family, work, windows, steps = args.run
        print(json.dumps(run_steps(family, work, windows, int(steps), args.smoke)))
        return
    steps = 2 if args.smoke else args.steps
    products, trained = product_rows(args.smoke), step_rows(steps, args.smoke)
    if args.smoke:
        return
    write_section("onednn-shapes", "## oneDNN kernel shapes: new row counts against cached ones, fp32\n\n"
                  "One product, median ms over 20 row counts: the first call at each count, the same call again, and "
                  "`torch.mm` (MKL).\n\n"
                  + markdown_table(["product", "rows", "oneDNN first call", "oneDNN again", "torch.mm",
                                    "first-call cost"], products)
                  + "\n\nSteps of table (b)'s models under `sorted_mm`, each run in a fresh process: training steps "
                  "(batch 4 x 256), or prefills (forward passes without gradients, as \"auto\" runs them) of single "
                  "prompts of 64-511 random tokens. Medians over the steps after the first.\n\n"
                  + markdown_table(["family", "steps of", "row windows", "steps", "new shapes in step 1",
                                    "oneDNN calls / step", "of which at new shapes", "ms in those",
                                    "ms in the other calls", "shapes after the last step", "ms / step"], trained))


if __name__ == "__main__":
    main()
