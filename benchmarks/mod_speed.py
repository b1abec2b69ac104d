"""Mixture-of-Depths speed: a training step (forward + backward) of one Mixtral-like model, without MoD and with MoD
at several capacities, for two layouts of routed layers.

Every candidate is the same model (same weights, same inputs); only `mod_capacity` / `mod_layers` differ, so the
times show what skipping tokens saves and what the router and the gather/scatter cost (capacity 1.0: every token is
chosen, nothing is saved). Round-robin medians in one process; speed = time without MoD / time (higher is faster).
Training only: inference routes each token by the sign of its router logit (causal), not by the capacity, so with
untrained routers an inference time says nothing about a capacity.

    python benchmarks/mod_speed.py            # full run, writes BENCHMARKS.md
    python benchmarks/mod_speed.py --smoke    # tiny shapes, prints only (used by the test suite)
"""

import argparse

import torch
from common import markdown_table, round_robin_medians, write_section

from hf_moe import MixtralMoEConfig, MixtralMoEForCausalLM

SHAPE = {"hidden_size": 512, "intermediate_size": 1408, "num_local_experts": 8, "num_experts_per_tok": 2,
         "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 2048}
SMOKE_SHAPE = {**SHAPE, "hidden_size": 32, "intermediate_size": 48, "num_local_experts": 4, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64}
CAPACITIES = (1.0, 0.5, 0.125)


def layouts(num_layers: int) -> dict[str, list[int]]:
    """The paper's every other block (from the second), and every block but the first."""
    return {"every other layer": list(range(1, num_layers, 2)), f"layers 1-{num_layers - 1}": list(range(1, num_layers))}


def build(shape: dict, capacity: float | None, layers: list[int] | None, state: dict | None):
    config = MixtralMoEConfig(**shape, mod_capacity=capacity, mod_layers=layers if capacity is not None else None)
    torch.manual_seed(0)
    model = MixtralMoEForCausalLM(config)
    if state is not None:  # the shared weights; the MoD routers (absent without MoD) keep their seeded init
        model.load_state_dict(state, strict=False)
    return model


def measure(shape: dict, batch: int, seq_len: int, repeats: int) -> list[list]:
    input_ids = torch.randint(1, shape["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(1))
    baseline = build(shape, None, None, None)
    state = baseline.state_dict()
    models = {("no MoD", "-"): baseline}
    for name, layers in layouts(shape["num_hidden_layers"]).items():
        for capacity in CAPACITIES:
            models[(name, capacity)] = build(shape, capacity, layers, state)

    def train_step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids, labels=input_ids).loss.backward()
        return run

    for model in models.values():
        model.train()
    train = round_robin_medians({key: train_step(model) for key, model in models.items()}, repeats)
    base = train[("no MoD", "-")]
    return [[*key, f"{train[key]:.1f}", f"{base / train[key]:.2f}x"] for key in models]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, print only")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    seq_len, repeats = (16, 1) if args.smoke else (args.seq_len, args.repeats)
    rows = measure(shape, args.batch, seq_len, repeats)
    header = ["routed layers", "mod_capacity", "train step ms", "speed"]
    table = markdown_table(header, rows)
    print(table)
    if args.smoke:
        return
    body = (f"Mixtral-like model: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"{shape['num_local_experts']} experts of {shape['intermediate_size']}, top-2; batch {args.batch} x "
            f"{seq_len} tokens; medians of {repeats} rounds; speed = time without MoD / time.\n\n{table}")
    write_section("mod-speed", body)


if __name__ == "__main__":
    main()
