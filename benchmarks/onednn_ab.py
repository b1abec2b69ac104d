"""Where `sorted_mm`'s oneDNN products pay: one MoE layer and a whole training step, in repeated rounds.

`sorted_mm` runs its fp32 products through oneDNN on x86-64 CPUs (BENCHMARKS.md, "Expert-block matrix
products"). This compares, in one process on the same weights, `sorted_mm` with oneDNN in both passes, in the forward
only (`torch.backends.mkldnn` switched off around the backward), and not at all (`torch.mm`), against our model or
block under transformers' `grouped_mm` and transformers' own. Each round is a set of round-robin medians; the rounds
show how far whole steps move between repeats on this machine. The layer part adds a plain loop over separate
per-expert `nn.Linear` weights (autograd's own backward) at the layer shapes of table (a), and the floor's FFN through
oneDNN: its weights as one expert that every token picks, run by `sorted_mm`, so that the MoE's speed can also be read
against a floor on the same library (torch's dense layers call MKL for fp32 products).

    python benchmarks/onednn_ab.py              # writes BENCHMARKS.md
    python benchmarks/onednn_ab.py --profile    # also the top operations of one profiled step per candidate
    python benchmarks/onednn_ab.py --smoke      # tiny shapes, prints only
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from common import markdown_table, onednn_linear, round_robin_medians, write_section
from models import FAMILIES, build_models
from moe_block import SHAPES, SMOKE_SHAPES, build_blocks
from torch import nn

from hf_moe import MixtralMoEConfig
from hf_moe.modeling.modeling_hf_moe import MoEExperts

# the MoE layer of the Qwen2-MoE-like model of table (b): (hidden, experts, top-k, width, shared width)
LAYER_SHAPES = {"mixtral-like": (SHAPES["mixtral-like"], 512), "deepseek-like": (SHAPES["deepseek-like"], 512),
                "qwen2moe-like model's layer": ((512, 16, 4, 352, 704), 1024)}
SMOKE_LAYER_SHAPES = {name: (shape, 16) for name, shape in SMOKE_SHAPES.items()}
ONEDNN = {"sorted_mm, oneDNN both passes": (True, True), "sorted_mm, oneDNN forward only": (True, False),
          "sorted_mm, torch.mm": (False, False)}


class PerExpertLinears(nn.Module):
    """The routed experts of `block` as separate per-expert nn.Linear weights, looped over with autograd."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block, experts = block, block.experts
        self.gate_up = nn.ModuleList(nn.Linear(1, 1, bias=False) for _ in range(experts.num_experts))
        self.down = nn.ModuleList(nn.Linear(1, 1, bias=False) for _ in range(experts.num_experts))
        for expert in range(experts.num_experts):
            self.gate_up[expert].weight = nn.Parameter(experts.gate_up_proj[expert].detach().clone())
            self.down[expert].weight = nn.Parameter(experts.down_proj[expert].detach().clone())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        _, weights, index, _ = self.block.gate(hidden_states)  # [T, k]
        sorted_ids, order = torch.sort(index.reshape(-1), stable=True)
        token_of, pair_weights = order // index.shape[1], weights.reshape(-1)[order]
        rows, outputs, start = hidden_states[token_of], [], 0
        for expert, count in enumerate(torch.bincount(sorted_ids, minlength=len(self.down)).tolist()):
            if count:
                gate, up = self.gate_up[expert](rows[start:start + count]).chunk(2, dim=-1)
                outputs.append(self.down[expert](F.silu(gate) * up))
                start += count
        output = torch.zeros_like(hidden_states).index_add_(0, token_of, torch.cat(outputs) * pair_weights[:, None])
        if self.block.shared_experts is not None:
            shared = self.block.shared_experts(hidden_states)
            output = output + torch.sigmoid(self.block.shared_expert_gate(hidden_states)) * shared
        return output.reshape(shape)


class OneDNNFloor(nn.Module):
    """The floor's dense SwiGLU FFN as ONE expert that every token picks with weight 1, run by `sorted_mm`: the same
    products through oneDNN (forward, input and weight gradients) as the MoE's experts, plus a few elementwise passes
    over the rows (the gather, the weighting, the sum per token)."""

    def __init__(self, floor: nn.Module):
        super().__init__()
        width, hidden = floor.gate_proj.weight.shape
        config = MixtralMoEConfig(hidden_size=hidden, intermediate_size=width, num_local_experts=1,
                                  num_experts_per_tok=1, num_attention_heads=8)
        config._experts_implementation = "sorted_mm"
        self.experts = MoEExperts(config)
        with torch.no_grad():
            self.experts.gate_up_proj[0] = torch.cat([floor.gate_proj.weight, floor.up_proj.weight])
            self.experts.down_proj[0] = floor.down_proj.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        every_token = torch.zeros(len(tokens), 1, dtype=torch.long)
        return self.experts(tokens, every_token, tokens.new_ones(len(tokens), 1)).reshape(hidden_states.shape)


def timed(run, forward_onednn: bool, backward_onednn: bool):
    """run() -> loss; the forward under one oneDNN switch, the backward under the other."""
    def step():
        with torch.backends.mkldnn.flags(enabled=forward_onednn):
            loss = run()
        with torch.backends.mkldnn.flags(enabled=backward_onednn):
            loss.backward()
    return step


def layer_rounds(shapes: dict, rounds: int, repeats: int) -> list[list]:
    rows = []
    for name, (shape, tokens) in shapes.items():
        ours, config, native, floor = build_blocks(shape, torch.float32, "cpu")
        per_expert, onednn_floor = PerExpertLinears(ours), OneDNNFloor(floor)
        inputs = torch.randn(1, tokens, shape[0], requires_grad=True)
        grad = torch.randn(1, tokens, shape[0])

        def loss_of(module, implementation=None):
            def run():
                inputs.grad = None
                module.zero_grad(set_to_none=True)
                if implementation:
                    config._experts_implementation = implementation
                return (module(inputs) * grad).sum()
            return run

        with torch.no_grad():
            assert torch.allclose(onednn_floor(inputs), floor(inputs), atol=1e-4), "the two floors disagree"
        candidates = {"floor": timed(loss_of(floor), True, True),
                      "floor through oneDNN": timed(loss_of(onednn_floor), True, True),
                      "transformers grouped_mm": timed(loss_of(native), True, True),
                      "ours grouped_mm": timed(loss_of(ours, "grouped_mm"), True, True),
                      "per-expert nn.Linear loop": timed(loss_of(per_expert), True, True)}
        candidates |= {label: timed(loss_of(ours, "sorted_mm"), *switches) for label, switches in ONEDNN.items()}
        rows += rounds_of(f"{name}, T={tokens}, fwd+bwd", candidates, rounds, repeats)
    return rows


def step_rounds(smoke: bool, rounds: int, repeats: int, profile: bool) -> list[list]:
    rows = []
    for family in FAMILIES:
        models = build_models(family, smoke)
        sorted_mm = models["ours sorted_mm"]
        chosen = {"floor": models["dense floor"], "transformers grouped_mm": models["transformers grouped_mm"],
                  "ours grouped_mm": models["ours grouped_mm"]}
        for label in ONEDNN:  # each its own copy, so that no two candidates share optimizer state
            chosen[label] = type(sorted_mm)(copy.deepcopy(sorted_mm.config))
            chosen[label].load_state_dict(sorted_mm.state_dict())
            chosen[label].set_experts_implementation("sorted_mm")
        vocab = sorted_mm.config.vocab_size
        batch = (2, 8) if smoke else (4, 256)  # table (b)'s batch
        input_ids = torch.randint(0, vocab, batch, generator=torch.Generator().manual_seed(1))
        optimizers = {label: torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
                      for label, model in chosen.items()}

        def training_step(label):
            model, optimizer = chosen[label], optimizers[label]
            forward_onednn, backward_onednn = ONEDNN.get(label, (True, True))

            def run():
                model.train()
                return model(input_ids, labels=input_ids).loss

            timed(run, forward_onednn, backward_onednn)()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        candidates = {label: (lambda label=label: training_step(label)) for label in chosen}
        rows += rounds_of(f"{family} model, training step", candidates, rounds, repeats)
        if profile:
            print_profiles(candidates)
    return rows


def rounds_of(what: str, candidates: dict, rounds: int, repeats: int) -> list[list]:
    times = [round_robin_medians(candidates, repeats=repeats) for _ in range(rounds)]
    rows = []
    for label in candidates:
        row = [what, label, " / ".join(f"{round_times[label]:.0f}" for round_times in times)]
        for floor in ("floor", "floor through oneDNN"):
            row.append(" / ".join(f"{round_times[floor] / round_times[label]:.2f}" for round_times in times)
                       if floor in candidates else "-")
        rows.append(row)
        print(" | ".join(row), flush=True)
    return rows


def print_profiles(candidates: dict) -> None:
    for label, step in candidates.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            step()
        print(f"--- {label}")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print the top operations of one step per candidate")
    args = parser.parse_args()
    onednn_linear()  # exits where this machine has none
    if args.smoke:
        layer_rounds(SMOKE_LAYER_SHAPES, 1, 1)
        step_rounds(True, 1, 1, args.profile)
        return
    rows = layer_rounds(LAYER_SHAPES, args.rounds, args.repeats) + step_rounds(False, args.rounds, args.repeats,
                                                                                args.profile)
    write_section("onednn-ab", "## `sorted_mm` with and without oneDNN: one layer and a whole training step, fp32\n\n"
                  "Each cell: one value per round (round-robin medians). Speed is floor time / time; the floor through "
                  "oneDNN is the floor's FFN run by `sorted_mm` as one expert that every token picks.\n\n"
                  + markdown_table(["what", "candidate", "ms per round", "speed vs floor per round",
                                    "speed vs the floor through oneDNN per round"], rows))


if __name__ == "__main__":
    main()
