"""(a) One MoE layer, forward and forward+backward, for T = 1, 16, 512, 4096 tokens.

Compares, in one process, on the same weights and inputs: our MoE block under every experts implementation,
transformers' own block (MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock, default `grouped_mm`), and the floor: a
dense SwiGLU FFN with the same active FLOPs per token. Reports medians (ms) and speed relative to the floor
(floor time / time: 1.0 = at the floor, higher is faster).

    python benchmarks/moe_block.py                 # full run, writes BENCHMARKS.md
    python benchmarks/moe_block.py --dtype bfloat16 --token-counts 1 16 512   # the bf16 table
    python benchmarks/moe_block.py --device cuda   # on a GPU (its own BENCHMARKS.md sections)
    python benchmarks/moe_block.py --smoke         # tiny shapes, prints only (used by the test suite)
"""

import argparse

import torch
from common import auto_choices, device_names, markdown_table, round_robin_medians, write_section
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


def measure(shapes, token_counts, dtype, repeats_for, device="cpu"):
    header = ["shape", "T", "pass", "floor ms", "transformers grouped_mm", *[f"ours {i}" for i in IMPLEMENTATIONS],
              "sorted_mm speed-up vs best transformers path"]
    print(" | ".join(header), flush=True)
    rows = []
    for shape_name, shape in shapes.items():
        ours, ours_config, native, floor = build_blocks(shape, dtype, device)
        for tokens in token_counts:
            inputs = torch.randn(1, tokens, shape[0], dtype=dtype).to(device).requires_grad_()
            grad = torch.randn(1, tokens, shape[0], dtype=dtype).to(device)
            with torch.no_grad():
                ours_config._experts_implementation = "eager"
                reference = ours(inputs)
                tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: 8 mantissa bits, outputs of ~1
                assert torch.allclose(native(inputs), reference, atol=tolerance), "native and ours disagree"
            for backward in (False, True):
                candidates = {"floor": lambda b=backward: step(floor, inputs, grad, b),
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
                times = round_robin_medians(candidates, repeats=repeats_for(tokens), device=device)
                floor_ms = times["floor"]
                best_transformers = min(ms for name, ms in times.items() if name == "transformers"
                                        or name in ("ours grouped_mm", "ours batched_mm", "ours eager"))
                row = [shape_name, tokens, "fwd+bwd" if backward else "fwd", f"{floor_ms:.1f}"]
                for name in ("transformers", *[f"ours {impl}" for impl in IMPLEMENTATIONS]):
                    row.append(f"{times[name]:.1f} ({floor_ms / times[name]:.2f}x)" if name in times else "-")
                row.append(f"{best_transformers / times['ours sorted_mm']:.2f}")
                rows.append(row)
                print(" | ".join(map(str, row)), flush=True)
    return markdown_table(header, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat, print only")
    parser.add_argument("--token-counts", type=int, nargs="+", default=TOKEN_COUNTS, metavar="T")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the current CUDA GPU")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        measure(SMOKE_SHAPES, (1, 16), dtype, lambda tokens: 1, args.device)
        print(auto_choices())
        return
    table = measure(SHAPES, args.token_counts, dtype, lambda tokens: repeats(tokens, args.device), args.device)
    choices = auto_choices()
    print(choices)
    suffix, on_gpu = device_names(args.device)
    write_section(
        f"moe-block-{args.dtype}{suffix}",
        f"## (a) One MoE layer, {args.dtype}{on_gpu}: median ms (speed relative to the dense floor)\n\n"
        "Floor: a dense SwiGLU FFN with the same active FLOPs per token. Cells: time in ms (floor time / time).\n"
        "Last column: time of the best transformers path (its own block or our block under transformers' kernels) "
        "divided by the time of `sorted_mm`.\n\n" + table + (f"\n\n{choices}" if choices else ""),
    )


if __name__ == "__main__":
    main()
