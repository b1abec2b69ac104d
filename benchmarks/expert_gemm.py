"""The matrix products of one expert block against the floor's, under torch's fp32 `mm` and under oneDNN.

At T=512 tokens the Mixtral-like layer (E 8, top-2) gives each expert about 128 rows and the DeepSeek-like layer
(64 experts, top-6) about 48; the dense floor multiplies all 512 rows at once. This times the gate/up and down
products of one block as the experts kernels run them (rows x W^T, W stored [out, in] as nn.Linear stores it) and
the same products on the floor's 512 rows, each through `torch.mm` (which calls MKL for fp32 on x86 CPUs) and
through oneDNN's linear (what `sorted_mm` calls for fp32 on x86-64), in one process: round-robin medians, GFLOP/s.
It also times each product's weight gradient (the output gradient's rows^T x the input rows, a sum over the rows),
written into its slot of an [E, out, in] gradient as `sorted_mm` does: by `torch.mm` directly, or by oneDNN's linear
and a copy (oneDNN's time includes the copy; it has no `out=`).

    python benchmarks/expert_gemm.py            # writes BENCHMARKS.md
    python benchmarks/expert_gemm.py --smoke    # tiny shapes, prints only
"""

import argparse

import torch
from common import markdown_table, onednn_linear, round_robin_medians, write_section

# name: (hidden, expert width I, rows per expert block at T=512, floor rows)
SHAPES = {"mixtral-like": (1024, 2816, 128, 512), "deepseek-like": (1024, 704, 48, 512)}
SMOKE_SHAPES = {"mixtral-like": (32, 48, 8, 32)}


def measure(shapes: dict, repeats: int) -> str:
    linear = onednn_linear()
    rows = []
    for name, (hidden, width, block_rows, floor_rows) in shapes.items():
        for product, (in_features, out_features) in {"gate/up": (hidden, 2 * width), "down": (width, hidden)}.items():
            torch.manual_seed(0)
            weight = torch.randn(out_features, in_features)  # [out, in]
            gradient = torch.zeros(out_features, in_features)  # one expert's slot, its pages already faulted in
            for label, count in (("block", block_rows), ("floor", floor_rows)):
                x, out = torch.randn(count, in_features), torch.empty(count, out_features)
                grad_out = torch.randn(count, out_features)
                products = {
                    f"{label} {product}": (f"[{count}, {in_features}] x [{in_features}, {out_features}]", {
                        "torch.mm": lambda x=x, out=out: torch.mm(x, weight.t(), out=out),
                        "oneDNN": lambda x=x: linear(x, weight, None, "none", [], ""),
                    }),
                    f"{label} {product} weight gradient": (f"[{out_features}, {count}] x [{count}, {in_features}]", {
                        "torch.mm": lambda x=x, g=grad_out: torch.mm(g.t(), x, out=gradient),
                        "oneDNN": lambda x=x, g=grad_out: gradient.copy_(linear(g.t(), x.t(), None, "none", [], "")),
                    }),
                }
                flop = 2 * count * in_features * out_features
                for what, (sizes, candidates) in products.items():
                    times = round_robin_medians(candidates, repeats=repeats)
                    rows.append([name, what, sizes,
                                 *[f"{times[library]:.2f} ms, {flop / times[library] / 1e6:.0f}" for library in times],
                                 f"{times['torch.mm'] / times['oneDNN']:.2f}x"])
                    print(" | ".join(rows[-1]), flush=True)
    header = ["shape", "product", "sizes", "torch.mm (MKL): ms, GFLOP/s", "oneDNN: ms, GFLOP/s",
              "oneDNN speed-up"]
    return markdown_table(header, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.smoke:
        measure(SMOKE_SHAPES, 1)
        return
    table = measure(SHAPES, args.repeats)
    write_section("expert-gemm", "## Expert-block matrix products vs the floor's, fp32, torch.mm and oneDNN (T=512)\n\n"
                  "Weight-gradient rows: oneDNN's time includes copying its result into the gradient's slot.\n\n"
                  + table)


if __name__ == "__main__":
    main()
