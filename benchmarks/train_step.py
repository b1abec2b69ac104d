"""(b) Whole-model training step (forward + backward + fused AdamW step, as Trainer runs it), tokens per second, and
activation memory.

Ours under each experts implementation vs transformers' native class on the same weights (MixtralForCausalLM,
Qwen2MoeForCausalLM) vs the dense Llama floor with the same active FLOPs per token, in two forms where they differ
(fp32 on x86-64): the fair floor, its MLP products (forward and backward) through oneDNN as `sorted_mm` runs the
experts' (checked to compute the same loss and gradients), and torch's own (MKL) floor; speeds are given against
both (models.py). Activation memory is what the
forward keeps for the backward at its end (the peak of a training step's activations): the bytes of the distinct
storages autograd saves, parameters excluded, counted through `torch.autograd.graph.saved_tensors_hooks` (custom
autograd functions such as `sorted_mm` save through the same hooks). The AdamW step is also timed on its own: it reads
and writes every parameter, and an MoE has more parameters than its floor for the same active FLOPs.

    python benchmarks/train_step.py            # writes BENCHMARKS.md
    python benchmarks/train_step.py --dtype bfloat16   # parameters, activations and AdamW states in bf16
    python benchmarks/train_step.py --device cuda      # on a GPU (its own BENCHMARKS.md sections)
    python benchmarks/train_step.py --smoke    # tiny models, prints only
"""

import argparse
import statistics
import time

import torch
from common import (
    allocator_names,
    auto_choices,
    check_fair_floor,
    device_names,
    markdown_table,
    round_robin_medians,
    synchronize,
    write_section,
)
from models import FAIR_FLOOR, FAMILIES, FLOOR, build_models


def saved_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages saved for the backward by one training forward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids, labels=input_ids)
    return sum(saved.values())


def fused_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Fused AdamW, Trainer's default (optim="adamw_torch_fused"); the for-loop AdamW takes several times as long on
    CPU, and an optimizer's time grows with the parameters, not with the active FLOPs."""
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
                  device: str = "cpu") -> float:
    """One training step as Trainer runs it (zero_grad sets the gradients to None); returns the AdamW step's ms."""
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    synchronize(device)
    optimizer_ms = (time.perf_counter() - start) * 1000
    optimizer.zero_grad(set_to_none=True)
    return optimizer_ms


def measure(smoke: bool, batch: int, seq_len: int, repeats: int, dtype: torch.dtype = torch.float32,
            device: str = "cpu"):
    rows = []
    for family in FAMILIES:
        models = build_models(family, smoke, dtype, device)
        vocab = next(iter(models.values())).config.vocab_size
        torch.manual_seed(1)
        input_ids = torch.randint(0, vocab, (batch, seq_len)).to(device)
        fair = FAIR_FLOOR in models
        if fair:  # the same loss and gradients as torch's floor (training mode: no dropout in these models)
            check_fair_floor(models[FLOOR], models[FAIR_FLOOR],
                             lambda model, ids=input_ids: model.train()(ids, labels=ids).loss)
        optimizers = {name: fused_adamw(model) for name, model in models.items()}
        optimizer_ms = {name: [] for name in models}  # the AdamW step alone in each step, warm-up included

        def train_step(name):
            optimizer_ms[name].append(training_step(models[name], optimizers[name], input_ids, device))

        candidates = {name: (lambda n=name: train_step(n)) for name in models}
        times = round_robin_medians(candidates, repeats=repeats, device=device)
        tokens = batch * seq_len
        floor = times[FAIR_FLOOR if fair else FLOOR]
        for name, ms in times.items():
            activations = saved_activation_bytes(models[name], input_ids) / 2**20
            parameters = sum(p.numel() for p in models[name].parameters()) / 1e6
            adamw_ms = statistics.median(optimizer_ms[name][-repeats:])  # the timed steps, not the warm-up
            rows.append([family, name, f"{ms:.0f}", f"{tokens / ms * 1000:.0f}", f"{floor / ms:.2f}",
                         *([f"{times[FLOOR] / ms:.2f}"] if fair else []), f"{activations:.0f}", f"{parameters:.0f}",
                         f"{adamw_ms:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    speeds = ["speed vs fair floor", "speed vs MKL floor"] if FAIR_FLOOR in models else ["speed vs dense floor"]
    return markdown_table(["family", "model", "ms / step", "tokens / s", *speeds, "saved activations (MiB)",
                           "parameters (M)", "of which AdamW step (ms)"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the current CUDA GPU")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        measure(True, 2, 8, 1, dtype, args.device)
        print(auto_choices())
        return
    table = measure(False, args.batch, args.seq_len, args.repeats, dtype, args.device)
    choices = auto_choices()
    print(choices)
    table += f"\n\n{choices}" if choices else ""
    suffix, on = device_names(args.device)
    allocator_suffix, allocator = allocator_names()
    section = "train-step" + ("" if args.dtype == "float32" else f"-{args.dtype}") + suffix + allocator_suffix
    heading = (f"## (b) Whole-model training step, {args.dtype}{on}{allocator} (H 512, 4 layers, vocab 32000, batch "
               f"{args.batch} x {args.seq_len} tokens, fused AdamW)\n\n")
    write_section(section, heading + floors_note(dtype, args.device) + table)


def floors_note(dtype: torch.dtype, device: str) -> str:
    """What the floor rows of tables (b) and (c) are."""
    from common import fair_floor_applies
    if not fair_floor_applies(dtype, device):
        return ("Dense floor: a dense Llama with the same active FLOPs per token, as torch runs it (its products "
                "run the same matrix library as the experts' here).\n\n")
    return ("Fair floor: a dense Llama with the same active FLOPs per token whose MLP products (forward, input and "
            "weight gradients) run through oneDNN, the library `sorted_mm` runs the experts' products on; its "
            "attention, LM head and embeddings run as torch runs them (MKL), as in the MoE models, whose router and "
            "shared experts are `nn.Linear` layers on MKL too. Checked to compute the same loss and gradients as the "
            "dense floor, the same Llama as torch runs it (`nn.Linear`: MKL for fp32 on x86-64).\n\n")


if __name__ == "__main__":
    main()
