"""MixLoRA training step vs plain LoRA of the same rank on the same dense base (goal: <= 1.3x the time at 8 experts,
top-2), plus LoRAMoE and MoLA for reference. Forward + backward + AdamW step, round-robin medians in one process.

    python benchmarks/lora_step.py            # writes BENCHMARKS.md
    python benchmarks/lora_step.py --smoke    # tiny base, prints only
"""

import argparse

import torch
from common import markdown_table, round_robin_medians, write_section
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from hf_moe import LoraMoeConfig, MixLoraConfig, MolaConfig

BASE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8)
SMOKE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
DROPOUT = 0.05  # MixLoRA's default, given to every adapter (peft's LoRA defaults to 0, ours to 0.05)


def adapters(rank: int, dropout: float) -> dict:
    shared = dict(r=rank, lora_alpha=2 * rank, lora_dropout=dropout)
    return {
        "LoRA (all linears)": LoraConfig(**shared, target_modules=ATTENTION + FFN),
        "MixLoRA 8 experts top-2": MixLoraConfig(**shared, num_experts=8, top_k=2, target_modules=["mlp", *ATTENTION]),
        "MoLA 8 experts top-2": MolaConfig(**shared, num_experts=8, top_k=2, target_modules=ATTENTION + FFN),
        "LoRAMoE 6 experts (dense)": LoraMoeConfig(**shared, num_experts=6, target_modules=FFN),
    }


def measure(smoke: bool, batch: int, seq_len: int, repeats: int, rank: int, dropout: float) -> str:
    shapes = SMOKE if smoke else BASE
    torch.manual_seed(0)
    base_state = LlamaForCausalLM(LlamaConfig(**shapes)).state_dict()
    models, optimizers = {}, {}
    for name, config in adapters(rank, dropout).items():
        base = LlamaForCausalLM(LlamaConfig(**shapes))
        base.load_state_dict(base_state)
        models[name] = get_peft_model(base, config).train()
        optimizers[name] = torch.optim.AdamW([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
    input_ids = torch.randint(0, shapes["vocab_size"], (batch, seq_len))

    def step(name):
        models[name](input_ids=input_ids, labels=input_ids).loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    times = round_robin_medians({name: (lambda n=name: step(n)) for name in models}, repeats=repeats)
    lora_ms = times["LoRA (all linears)"]
    rows = []
    for name, ms in times.items():
        trainable = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
        rows.append([name, f"{trainable / 1e6:.2f}M", f"{ms:.0f}", f"{ms / lora_ms:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)
    return markdown_table(["adapter", "trainable parameters", "ms / step", "time vs LoRA"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dropout", type=float, default=DROPOUT, help="LoRA dropout of every adapter")
    args = parser.parse_args()
    if args.smoke:
        measure(True, 2, 8, 1, 4, args.dropout)
        return
    table = measure(False, args.batch, args.seq_len, args.repeats, args.rank, args.dropout)
    write_section("lora-step", "## LoRA-expert training step, fp32 (dense Llama H 512, 4 layers, FFN 1408, vocab "
                  f"32000; rank {args.rank}, dropout {args.dropout}; batch {args.batch} x {args.seq_len} tokens; "
                  "AdamW)\n\n" + table)


if __name__ == "__main__":
    main()
