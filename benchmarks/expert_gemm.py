"""The matrix products of one expert block against the floor's: why per-expert products cost more per FLOP.

At T=512 tokens the Mixtral-like layer (E 8, top-2) gives each expert about 128 rows and the DeepSeek-like layer
(64 experts, top-6) about 48; the dense floor multiplies all 512 rows at once. This times the gate/up product of
one block in the orientation the experts kernels use (rows x W^T, as nn.Linear) and transposed (W x rows^T, the
output [2I, rows]), and the same product on the floor's 512 rows, in one process: round-robin medians, GFLOP/s.

    python benchmarks/expert_gemm.py            # writes BENCHMARKS.md
    python benchmarks/expert_gemm.py --smoke    # tiny shapes, prints only
"""

import argparse

import torch
from common import markdown_table, round_robin_medians, write_section

# name: (hidden, gate+up width 2I, rows per expert block at T=512, floor rows)
SHAPES = {"mixtral-like": (1024, 2 * 2816, 128, 512), "deepseek-like": (1024, 2 * 704, 48, 512)}
SMOKE_SHAPES = {"mixtral-like": (32, 96, 8, 32)}


def measure(shapes: dict, repeats: int) -> str:
    rows = []
    for name, (hidden, width, block_rows, floor_rows) in shapes.items():
        torch.manual_seed(0)
        weight = torch.randn(width, hidden)
        block, floor = torch.randn(block_rows, hidden), torch.randn(floor_rows, hidden)
        block_out, block_out_t = torch.empty(block_rows, width), torch.empty(width, block_rows)
        floor_out = torch.empty(floor_rows, width)
        candidates = {
            ("floor rows x W^T", floor_rows): lambda: torch.mm(floor, weight.t(), out=floor_out),
            ("block rows x W^T", block_rows): lambda: torch.mm(block, weight.t(), out=block_out),
            ("block W x rows^T", block_rows): lambda: torch.mm(weight, block.t(), out=block_out_t),
        }
        times = round_robin_medians(candidates, repeats=repeats)
        for (label, count), ms in times.items():
            gflops = 2 * count * hidden * width / ms / 1e6
            rows.append([name, label, f"[{count}, {hidden}] x [{hidden}, {width}]", f"{ms:.2f}", f"{gflops:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    return markdown_table(["shape", "product", "sizes", "ms", "GFLOP/s"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.smoke:
        measure(SMOKE_SHAPES, 1)
        return
    table = measure(SHAPES, args.repeats)
    write_section("expert-gemm", "## Expert-block matrix products vs the floor's, fp32 (gate/up product at T=512)\n\n"
                  + table)


if __name__ == "__main__":
    main()
