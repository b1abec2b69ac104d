"""(a) One MoE layer, forward and forward+backward, for T = 1, 16, 512, 4096 tokens.

Compares, in one process, on the same weights and inputs: our MoE block under every experts implementation ("auto",
our default, first), transformers' own block (MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock, default `grouped_mm`),
and two floors: a dense SwiGLU FFN with the same active FLOPs per token, as torch runs it (its fp32 products on MKL on
x86-64), and the same FFN with its products (forward and backward) through oneDNN, the library `sorted_mm` runs the
experts' products on: the fair floor (common.through_onednn; checked to compute the same outputs and gradients). In
bf16 and on a GPU both floors run the same library and only one is timed. Reports medians (ms) and speed relative to
the fair floor (floor time / time: 1.0 = at the floor, higher is faster), and our default's and transformers' speed
relative to torch's floor in two more columns. With `--rounds N` each point is timed in N rounds (each a round-robin
median) and the cells give the median over the rounds; three more columns list each round's speeds of our default and
of transformers' block against the floor, and of our default against the best transformers path: the spread between
rounds of one process.

    python benchmarks/moe_block.py                 # full run, writes BENCHMARKS.md
    python benchmarks/moe_block.py --dtype bfloat16 --token-counts 1 16 512   # the bf16 table
    python benchmarks/moe_block.py --device cuda   # on a GPU (its own BENCHMARKS.md sections)
    python benchmarks/moe_block.py --smoke         # tiny shapes, prints only (used by the test suite)
    python benchmarks/moe_block.py --token-counts 512 4096 --rounds 3   # three rounds of each point: the spread
"""

import argparse
import copy
import statistics

import torch
from common import (
    allocator_names,
    auto_choices,
    check_fair_floor,
    device_names,
    fair_floor_applies,
    markdown_table,
    round_robin_medians,
    through_onednn,
    write_section,
)
from torch import nn
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from hf_moe import DeepSeekMoEConfig, MixtralMoEConfig
from hf_moe.modeling.modeling_hf_moe import MoEMLP, MoESparseBlock

SHAPES = {
    # name: (hidden, experts, top-k, expert width, gated shared expert width or 0)
    "mixtral-like": (1024, 8, 2, 2816, 0),
    "deepseek-like": (1024, 64, 6, 704, 1408),  # 2 shared experts of width 704, as one gated FFN (Qwen2-MoE)
}
SMOKE_SHAPES = {"mixtral-like": (32, 4, 2, 48, 0), "deepseek-like": (32, 8, 3, 16, 32)}
TOKEN_COUNTS = (1, 16, 512, 4096)
IMPLEMENTATIONS = ("auto", "sorted_mm", "grouped_mm", "batched_mm", "eager")  # "auto": our default


def build_blocks(shape, dtype, device):
    hidden, experts, top_k, width, shared = shape
    common = dict(hidden_size=hidden, num_attention_heads=8, num_hidden_layers=1, num_experts_per_tok=top_k)
    if shared:
        ours_config = DeepSeekMoEConfig(**common, n_routed_experts=experts, moe_intermediate_size=width,
                                        n_shared_experts=1, shared_expert_intermediate_size=shared,
                                        shared_expert_gate=True, first_k_dense_replace=0, norm_topk_prob=False)
        native_config = Qwen2MoeConfig(**common, num_experts=experts, moe_intermediate_size=width,
                                       shared_expert_intermediate_size=shared, norm_topk_prob=False)
        native = Qwen2MoeSparseMoeBlock(native_config)
    else:
        ours_config = MixtralMoEConfig(**common, num_local_experts=experts, intermediate_size=width)
        native_config = MixtralConfig(**common, num_local_experts=experts, intermediate_size=width)
        native = MixtralSparseMoeBlock(native_config)
    native_config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    for parameter in native.parameters():
        nn.init.normal_(parameter, std=0.02)
    ours = MoESparseBlock(ours_config)
    state = {key.replace("shared_expert.", "shared_experts."): value for key, value in native.state_dict().items()}
    ours.load_state_dict(state)
    floor = MoEMLP(ours_config, top_k * width + shared)
    for parameter in floor.parameters():
        nn.init.normal_(parameter, std=0.02)
    return ours.to(device, dtype), ours_config, native.to(device, dtype), floor.to(device, dtype)


def repeats(tokens: int, device: str) -> int:
    if device == "cpu":
        return 15 if tokens <= 16 else (5 if tokens <= 512 else 3)
    return 100 if tokens <= 512 else 30  # a GPU: a millisecond or less per pass


def step(module, inputs, grad, backward):
    if backward:  # a training step's: gradients start empty (Trainer's zero_grad sets them to None)
        inputs.grad = None
        module.zero_grad(set_to_none=True)
        module(inputs).backward(grad)
    else:
        with torch.no_grad():
            module(inputs)


def best_transformers(times: dict[str, float]) -> float:
    """The time of the fastest transformers path: its own block, or our block under one of its kernels."""
    return min(ms for name, ms in times.items()
               if name in ("transformers", "ours grouped_mm", "ours batched_mm", "ours eager"))


def timed_rounds(candidates, repeats: int, rounds: int, device: str) -> tuple[dict[str, float], list[dict]]:
    """(median over the rounds of each candidate's round-robin median, the rounds' medians)."""
    each = [round_robin_medians(candidates, repeats=repeats, device=device) for _ in range(rounds)]
    return {name: statistics.median(round_times[name] for round_times in each) for name in candidates}, each


def measure(shapes, token_counts, dtype, repeats_for, device="cpu", rounds=1):
    fair = fair_floor_applies(dtype, device)  # else the floor is the fair floor (the same library)
    floor_name = "fair floor" if fair else "floor"
    header = ["shape", "T", "pass", f"{floor_name} ms", "transformers grouped_mm",
              *[f"ours {i}" for i in IMPLEMENTATIONS], "ours auto vs best transformers path"]
    if fair:
        header[4:4] = ["MKL floor ms (speed vs fair floor)"]
        header += ["ours auto vs MKL floor", "transformers vs MKL floor"]
    if rounds > 1:
        header += [f"rounds: ours auto vs {floor_name}", f"rounds: transformers vs {floor_name}",
                   "rounds: ours auto vs best transformers path"]
    print(" | ".join(header), flush=True)
    rows = []
    for shape_name, shape in shapes.items():
        ours, ours_config, native, floor = build_blocks(shape, dtype, device)
        fair_floor = through_onednn(copy.deepcopy(floor)) if fair else floor
        for tokens in token_counts:
            inputs = torch.randn(1, tokens, shape[0], dtype=dtype).to(device).requires_grad_()
            grad = torch.randn(1, tokens, shape[0], dtype=dtype).to(device)
            with torch.no_grad():
                ours_config._experts_implementation = "eager"
                reference = ours(inputs)
                tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: 8 mantissa bits, outputs of ~1
                assert torch.allclose(native(inputs), reference, atol=tolerance), "native and ours disagree"
            if fair:  # the same outputs and gradients (of the inputs and of every weight) as torch's floor
                check_fair_floor(floor, fair_floor, lambda module: module(inputs), inputs)
            for backward in (False, True):
                candidates = {"fair floor": lambda b=backward: step(fair_floor, inputs, grad, b)} if fair else {}
                candidates |= {"floor": lambda b=backward: step(floor, inputs, grad, b),
                               "transformers": lambda b=backward: step(native, inputs, grad, b)}
                for implementation in IMPLEMENTATIONS:
                    if implementation == "batched_mm" and tokens * shape[2] > 64:
                        continue  # copies one weight matrix per (token, expert): gigabytes at this size
                    if implementation == "eager" and backward and tokens > 16:
                        continue  # autograd allocates a full [E, ...] gradient per expert slice: seconds to minutes

                    def run(b=backward, impl=implementation):
                        ours_config._experts_implementation = impl
                        step(ours, inputs, grad, b)

                    candidates[f"ours {implementation}"] = run
                times, each_round = timed_rounds(candidates, repeats_for(tokens), rounds, device)
                floor_ms = times[floor_name]
                row = [shape_name, tokens, "fwd+bwd" if backward else "fwd", f"{floor_ms:.1f}"]
                if fair:
                    row.append(f"{times['floor']:.1f} ({floor_ms / times['floor']:.2f}x)")
                for name in ("transformers", *[f"ours {impl}" for impl in IMPLEMENTATIONS]):
                    row.append(f"{times[name]:.1f} ({floor_ms / times[name]:.2f}x)" if name in times else "-")
                row.append(f"{best_transformers(times) / times['ours auto']:.2f}")
                if fair:
                    row += [f"{times['floor'] / times[name]:.2f}x" for name in ("ours auto", "transformers")]
                if rounds > 1:
                    row += [", ".join(f"{t[floor_name] / t[name]:.2f}x" for t in each_round)
                            for name in ("ours auto", "transformers")]
                    row.append(", ".join(f"{best_transformers(t) / t['ours auto']:.2f}" for t in each_round))
                rows.append(row)
                print(" | ".join(map(str, row)), flush=True)
    return markdown_table(header, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat, print only")
    parser.add_argument("--token-counts", type=int, nargs="+", default=TOKEN_COUNTS, metavar="T")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the current CUDA GPU")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time each point in this many rounds: cells give the median, more columns each round")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        measure(SMOKE_SHAPES, (1, 16), dtype, lambda tokens: 1, args.device, args.rounds)
        print(auto_choices())
        return
    table = measure(SHAPES, args.token_counts, dtype, lambda tokens: repeats(tokens, args.device), args.device,
                    args.rounds)
    choices = auto_choices()
    print(choices)
    suffix, on = device_names(args.device)
    allocator_suffix, allocator = allocator_names()
    if fair_floor_applies(dtype, args.device):
        floors = ("Fair floor: a dense SwiGLU FFN with the same active FLOPs per token, its three products (forward, "
                  "input and weight gradients) through oneDNN, the library `sorted_mm` runs the experts' products on "
                  "(same outputs and gradients as torch's FFN, checked at every point). MKL floor: the same FFN as "
                  "torch runs it (`nn.Linear`: MKL for fp32 on x86-64). Cells: time in ms (fair floor time / time); "
                  "the last two columns: MKL floor time / time.\n")
    else:
        floors = ("Floor: a dense SwiGLU FFN with the same active FLOPs per token (torch's `nn.Linear`, which runs "
                  "the same matrix library as the experts' products here). Cells: time in ms (floor time / time).\n")
    write_section(
        f"moe-block-{args.dtype}{suffix}{allocator_suffix}",
        f"## (a) One MoE layer, {args.dtype}{on}{allocator}: median ms (speed relative to the fair floor)\n\n"
        + floors +
        "\"ours auto vs best transformers path\": time of the best transformers path (its own block or our block "
        "under transformers' kernels) divided by the time of \"ours auto\" (our default).\n\n" + table
        + (f"\n\n{choices}" if choices else ""),
    )


if __name__ == "__main__":
    main()
