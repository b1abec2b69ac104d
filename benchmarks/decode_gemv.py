"""Why greedy decoding at batch 1 stays below the floor: the FFN's matrix-vector products, one by one.

At batch 1 a decode step multiplies one token's vector by every weight it uses, so its time is bytes read over the
bandwidth each product reaches. The MoE FFN of the whole models in table (c) (`models.py`, H 512) reads the same
bytes as the floor's, but in more, smaller products (k experts, the shared expert, the router), and on this CPU a
product's bandwidth depends on its shape. This times each product of one layer as x @ W^T with W stored [out, in], as
nn.Linear and the fused experts store it, through `torch.mm` (MKL for fp32 on x86) and through oneDNN (what
`sorted_mm` runs the routed experts' products with), and, for comparison, with W stored [in, out]. The routed experts'
products are also timed two at a time, as `sorted_mm/torch.mm` runs a one-token call's experts: one `torch.bmm` over a
strided view of two experts' weights, W_e [out, in] @ x [in, 1] each (time per product: half the pair's). Each product
cycles through enough copies of its weight (>= 256 MB) that it is read from memory, not from cache. Round-robin
medians in one process, fp32.

    python benchmarks/decode_gemv.py            # writes BENCHMARKS.md
    python benchmarks/decode_gemv.py --smoke    # tiny shapes, prints only
"""

import argparse
import math

import torch
from common import device_names, markdown_table, onednn_linear, round_robin_medians, write_section
from models import COMMON, FAMILIES, SMOKE, SMOKE_FAMILIES

from hf_moe.modeling.experts_kernels import expert_pair

WORKING_SET = 256 * 2**20  # bytes cycled per product: well above the last-level cache
ROUTED = ("expert gate_up", "expert down")  # the products `sorted_mm` runs, through oneDNN in fp32 on x86-64
PAIRS = "pairs (bmm)"  # `sorted_mm/torch.mm` at one token: two experts per batched product


def pair_products(stored: torch.Tensor, vectors: torch.Tensor) -> list[torch.Tensor]:
    """W_a @ x_a and W_b @ x_b for copies a = i and b = i + half of stored [copies, out, in], each pair one
    `torch.bmm` over the kernel's strided view of the two (`expert_pair`, as `_LoopProducts._pairs_times`), vectors
    [2, 1, in] passed as the kernel passes its rows (`.mT`)."""
    half = len(stored) // 2
    return [torch.bmm(expert_pair(stored, i, i + half), vectors.mT) for i in range(half)]


def products(hidden: int, experts: int, top_k: int, width: int, shared: int) -> dict[str, list]:
    """model -> [(product, out, in, times per token)] of one FFN layer at batch 1."""
    floor_width = top_k * width + shared
    moe = [("router", experts, hidden, 1), ("expert gate_up", 2 * width, hidden, top_k),
           ("expert down", hidden, width, top_k)]
    if shared:
        moe += [("shared gate, up", shared, hidden, 2), ("shared down", hidden, shared, 1),
                ("shared-expert gate", 1, hidden, 1)]
    floor = [("floor gate, up", floor_width, hidden, 2), ("floor down", hidden, floor_width, 1)]
    return {"floor": floor, "MoE": moe}


def timed_products(shapes: dict, hidden: int, working_set: int, repeats: int) -> tuple[list[list], list[list]]:
    linear = onednn_linear()
    rows, totals = [], []
    for family, (experts, top_k, width, shared) in shapes.items():
        layer_us = {"floor": 0.0, "floor, oneDNN": 0.0, "MoE": 0.0, "MoE, pairs": 0.0}
        for model, model_products in products(hidden, experts, top_k, width, shared).items():
            for name, out_features, in_features, uses in model_products:
                torch.manual_seed(0)
                copies = 2 * max(1, math.ceil(working_set / (2 * out_features * in_features * 4)))  # even: pairs
                stored = torch.randn(copies, out_features, in_features)  # [out, in] as nn.Linear
                transposed = stored.transpose(1, 2).contiguous()  # [in, out]
                x, vectors = torch.randn(1, in_features), torch.randn(2, 1, in_features)
                candidates = {
                    "torch.mm": lambda w=stored: [torch.mm(x, w[i].t()) for i in range(len(w))],
                    "oneDNN": lambda w=stored: [linear(x, w[i], None, "none", [], "") for i in range(len(w))],
                    "[in, out]": lambda w=transposed: [torch.mm(x, w[i]) for i in range(len(w))],
                }
                if name in ROUTED:
                    candidates[PAIRS] = lambda w=stored, v=vectors: pair_products(w, v)
                times = {way: ms * 1000 / copies for way, ms in round_robin_medians(candidates, repeats).items()}
                gigabytes = out_features * in_features * 4 / 1e9
                if model == "floor":
                    layer_us["floor"] += uses * times["torch.mm"]
                    layer_us["floor, oneDNN"] += uses * times["oneDNN"]
                else:
                    layer_us["MoE"] += uses * times["oneDNN" if name in ROUTED else "torch.mm"]
                    layer_us["MoE, pairs"] += uses * times[PAIRS if name in ROUTED else "torch.mm"]
                rows.append([family, model, name, f"[{out_features}, {in_features}]", uses,
                             *[f"{times[way]:.0f} us, {gigabytes / times[way] * 1e6:.1f}" if way in times else "-"
                               for way in ("torch.mm", "oneDNN", "[in, out]", PAIRS)]])
                print(" | ".join(map(str, rows[-1])), flush=True)
                del stored, transposed, candidates  # free this product's copies before the next one's
        totals.append([family, f"{layer_us['floor']:.0f}", f"{layer_us['floor, oneDNN']:.0f}",
                       *[f"{layer_us[moe]:.0f} us: {layer_us['floor'] / layer_us[moe]:.2f}x, "
                         f"{layer_us['floor, oneDNN'] / layer_us[moe]:.2f}x" for moe in ("MoE", "MoE, pairs")]])
        print(" | ".join(totals[-1]), flush=True)
    return rows, totals


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.smoke:
        timed_products(SMOKE_FAMILIES, SMOKE["hidden_size"], 2**16, 1)
        return
    rows, totals = timed_products(FAMILIES, COMMON["hidden_size"], WORKING_SET, args.repeats)
    suffix, on = device_names("cpu")  # a section per CPU, as tables (a)-(c)
    body = (
        f"## Decode at batch 1: the FFN's matrix-vector products, fp32{on} (whole models of table (c), H 512)\n\n"
        + markdown_table(["family", "model", "product", "W [out, in]", "per token", "torch.mm: us, GB/s",
                          "oneDNN: us, GB/s", "torch.mm, W stored [in, out]: us, GB/s",
                          "two experts per torch.bmm: us per product, GB/s"], rows)
        + "\n\nOne FFN layer, the sum of its products per token, W as stored. The MoE runs its routed experts' "
        "products through oneDNN\n(`sorted_mm`) or two at a time (`sorted_mm/torch.mm` at one token), and the rest "
        "(router, shared expert)\nthrough torch.mm, as our models do; the floor through torch.mm, as a dense model "
        "does, and through oneDNN.\nCells: the layer's time, its speed vs the floor and vs the oneDNN floor:\n\n"
        + markdown_table(["family", "floor us (torch.mm)", "floor us (oneDNN)", "MoE, routed through oneDNN",
                          "MoE, routed in pairs"], totals)
    )
    write_section(f"decode-gemv{suffix}", body)


if __name__ == "__main__":
    main()
