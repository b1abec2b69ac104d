"""(c) Greedy decoding with a KV cache, new tokens per second, batch 1 and 8.

Ours under each experts implementation vs transformers' native class on the same weights vs the dense Llama floor
with the same active FLOPs per token, in two forms where they differ (fp32 on x86-64): the fair floor, its MLP
products through oneDNN as `sorted_mm` runs the experts' (checked to compute the same logits), and torch's own (MKL)
floor; speeds are given against both (models.py).

    python benchmarks/decode.py             # writes BENCHMARKS.md
    python benchmarks/decode.py --dtype bfloat16
    python benchmarks/decode.py --device cuda   # on a GPU (its own BENCHMARKS.md sections)
    python benchmarks/decode.py --smoke     # tiny models, prints only
"""

import argparse

import torch
from common import auto_choices, device_names, markdown_table, round_robin_medians, write_section
from models import FAIR_FLOOR, FAMILIES, FLOOR, build_models
from train_step import floors_note


def measure(smoke: bool, prompt_len: int, new_tokens: int, repeats: int, dtype: torch.dtype = torch.float32,
            device: str = "cpu"):
    rows = []
    for family in FAMILIES:
        models = build_models(family, smoke, dtype, device)
        vocab = next(iter(models.values())).config.vocab_size
        fair = FAIR_FLOOR in models
        for batch in (1, 8):
            torch.manual_seed(2)
            prompt = torch.randint(1, vocab, (batch, prompt_len)).to(device)

            def decode(model):
                with torch.no_grad():
                    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

            if dtype == torch.float32:  # in bf16 near-ties of the logits may pick different tokens
                outputs = {name: model.generate(prompt, max_new_tokens=4, do_sample=False) for name, model in
                           models.items() if name not in (FLOOR, FAIR_FLOOR)}
                assert all(torch.equal(out, outputs["ours sorted_mm"]) for out in outputs.values()), family
            if fair:  # the fair floor's logits are the floor's (up to rounding)
                with torch.no_grad():
                    torch.testing.assert_close(models[FAIR_FLOOR](prompt).logits, models[FLOOR](prompt).logits,
                                               atol=1e-4, rtol=1e-4)
            times = round_robin_medians({name: (lambda m=model: decode(m)) for name, model in models.items()},
                                        repeats=repeats, device=device)
            floor = times[FAIR_FLOOR if fair else FLOOR]
            for name, ms in times.items():
                rows.append([family, batch, name, f"{batch * new_tokens / ms * 1000:.1f}", f"{floor / ms:.2f}",
                             *([f"{times[FLOOR] / ms:.2f}"] if fair else [])])
                print(" | ".join(map(str, rows[-1])), flush=True)
    speeds = ["speed vs fair floor", "speed vs MKL floor"] if fair else ["speed vs dense floor"]
    return markdown_table(["family", "batch", "model", "new tokens / s", *speeds], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the current CUDA GPU")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        measure(True, 4, 3, 1, dtype, args.device)
        print(auto_choices())
        return
    table = measure(False, args.prompt_len, args.new_tokens, args.repeats, dtype, args.device)
    choices = auto_choices()
    print(choices)
    table += f"\n\n{choices}" if choices else ""
    suffix, on = device_names(args.device)
    section = "decode" + ("" if args.dtype == "float32" else f"-{args.dtype}") + suffix
    switch = ("On a GPU, `generate()` runs `batched_mm` for the decoding steps of the models set to `grouped_mm` "
              "(transformers' `_optimize_model_for_decode`), and of ours set to `sorted_mm`.\n\n"
              ) if args.device != "cpu" else ""
    write_section(section, f"## (c) Greedy decoding with a KV cache, {args.dtype}{on} (prompt {args.prompt_len}, "
                  f"{args.new_tokens} new tokens)\n\n" + floors_note(dtype, args.device).replace(
                      "loss and gradients", "logits") + switch + table)


if __name__ == "__main__":
    main()
