"""(b) Whole-model training step (forward + backward + AdamW step), tokens per second.

Ours under each experts implementation vs transformers' native class on the same weights (MixtralForCausalLM,
Qwen2MoeForCausalLM) vs the dense Llama floor with the same active FLOPs per token.

    python benchmarks/train_step.py            # writes BENCHMARKS.md
    python benchmarks/train_step.py --smoke    # tiny models, prints only
"""

import argparse

import torch
from common import markdown_table, round_robin_medians, write_section
from models import FAMILIES, build_models


def measure(smoke: bool, batch: int, seq_len: int, repeats: int):
    rows = []
    for family in FAMILIES:
        models = build_models(family, smoke)
        vocab = next(iter(models.values())).config.vocab_size
        torch.manual_seed(1)
        input_ids = torch.randint(0, vocab, (batch, seq_len))
        optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, model in models.items()}

        def train_step(name):
            model, optimizer = models[name], optimizers[name]
            model.train()
            model(input_ids, labels=input_ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        candidates = {name: (lambda n=name: train_step(n)) for name in models}
        times = round_robin_medians(candidates, repeats=repeats)
        tokens = batch * seq_len
        floor = times["dense floor"]
        for name, ms in times.items():
            rows.append([family, name, f"{ms:.0f}", f"{tokens / ms * 1000:.0f}", f"{floor / ms:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    return markdown_table(["family", "model", "ms / step", "tokens / s", "speed vs dense floor"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.smoke:
        measure(True, 2, 8, 1)
        return
    table = measure(False, args.batch, args.seq_len, args.repeats)
    write_section("train-step", "## (b) Whole-model training step, fp32 (H 512, 4 layers, vocab 32000, batch "
                  f"{args.batch} x {args.seq_len} tokens, AdamW)\n\n" + table)


if __name__ == "__main__":
    main()
