"""Sparse upcycling and routing presets, measured by continued pretraining of the shipped tiny Llama.

    python benchmarks/quality_pretraining.py            # writes QUALITY.md sections and docs/images/*.png
    python benchmarks/quality_pretraining.py --smoke    # a few steps on a few files; prints only

Every run starts from the shipped dense model (`hf_moe.data.tiny_llama_path()`) and trains on the same windows of
the standard library's training files, in the same order, for the same number of steps; eval loss is the mean
next-token loss on fixed blocks of the held-out files (the split the dense model never trained on).

    dense           the dense model, continued
    mixtral         its exact upcycle to 8 experts (copies of the FFN), top-2, Switch aux loss 0.02 (preset `mixtral`)
    deepseek_v3     the same MoE with the routing of preset `deepseek_v3`: sigmoid scores, selection bias updated
                    without a loss (gamma 0.001), sequence-wise balance loss 1e-4, top-2 kept
    switch          preset `switch`: top-1, gate = router probability, jitter, capacity 1.25 in training
    expert_choice   preset `expert_choice`: each expert takes its top T*2/E tokens of the batch

The MoE runs share one upcycled checkpoint; only the routing fields of the config differ. Training FLOPs are
6 * (active parameters per token, embeddings excluded, lm_head included) + 6 * layers * seq_len * hidden (causal
attention), times the tokens.
"""

import argparse
import math
import random
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import ROOT, markdown_table, write_section  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hf_moe  # noqa: E402
from hf_moe.conversion import upcycle  # noqa: E402
from hf_moe.data import tiny_llama_path  # noqa: E402
from hf_moe.data.corpus import split_stdlib_sources, token_stream  # noqa: E402
from hf_moe.modeling.configuration_hf_moe import PRESETS  # noqa: E402

# Preset fields that change the model's shape rather than its routing: the runs keep the upcycled shape.
SHAPE_FIELDS = {"num_local_experts", "n_routed_experts", "n_shared_experts", "n_group", "topk_group",
                "routed_scaling_factor", "num_device_groups", "qkv_bias", "first_k_dense_replace",
                "shared_expert_gate", "attention_type", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "rope_interleave"}
MOE_RUNS = ("mixtral", "deepseek_v3", "switch", "expert_choice")
NUM_EXPERTS, TOP_K = 8, 2


def routing_fields(preset: str) -> dict:
    """The preset's routing and balancing fields; top-k stays 2 except for Switch, whose design is top-1."""
    fields = {key: value for key, value in PRESETS[preset].settings.items() if key not in SHAPE_FIELDS}
    if fields.get("num_experts_per_tok", TOP_K) > TOP_K:
        fields["num_experts_per_tok"] = TOP_K
    return fields


def windows(ids: torch.Tensor, seq_len: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """[steps, batch, seq_len] random windows of `ids`, the same for every run."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (steps, batch_size), generator=generator)
    return ids[starts[..., None] + torch.arange(seq_len)]


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int = 16) -> tuple[float, float | None]:
    """(mean next-token loss on the blocks, mean over MoE layers of the load max-violation or None)."""
    model.eval()
    total, count, violations = 0.0, 0, []
    is_moe = getattr(model.config, "model_type", "").startswith("hf_moe")
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        outputs = model(input_ids=batch, output_router_stats=True) if is_moe else model(input_ids=batch)
        total += F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
        if is_moe:
            violations += [float(layer["max_violation"]) for layer in outputs.router_stats]
    model.train()
    return total / count, (sum(violations) / len(violations) if violations else None)


def active_parameters(model) -> int:
    """Parameters a token uses: all but the input embedding, with only k (or, for expert choice, capacity) of the
    E experts of each MoE layer."""
    config = model.config
    total = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if config.tie_word_embeddings:
        total += model.get_input_embeddings().weight.numel()  # the tied lm_head
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    if experts:
        used = (config.capacity_factor if config.router_type == "expert_choice" else config.num_experts_per_tok)
        total -= experts - experts * used / config.num_local_experts
    return int(total)


def train(name: str, model, batches: torch.Tensor, eval_blocks: torch.Tensor, lr: float, eval_every: int,
          seed: int) -> dict:
    torch.manual_seed(seed)
    random.seed(seed)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps = len(batches)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))))
    is_moe = model.config.model_type.startswith("hf_moe")
    curve = [(0, *evaluate(model, eval_blocks))]
    for step, batch in enumerate(batches, start=1):
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if is_moe:
            hf_moe.update_router_bias(model)  # the aux-loss-free update (a no-op without a selection bias)
        if step % eval_every == 0 or step == steps:
            curve.append((step, *evaluate(model, eval_blocks)))
            print(f"{name:>14} step {step:>4}: eval loss {curve[-1][1]:.4f}"
                  + (f", max violation {curve[-1][2]:.2f}" if curve[-1][2] is not None else ""), flush=True)
    seq_len = batches.shape[-1]
    tokens = batches.numel()
    attention_flops_per_token = 6 * model.config.num_hidden_layers * seq_len * model.config.hidden_size
    flops_per_token = 6 * active_parameters(model) + attention_flops_per_token
    return {"curve": curve, "tokens": tokens, "flops": flops_per_token * tokens, "active": active_parameters(model)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.eval_blocks = 4, 2, 32, 4
    torch.set_num_threads(2)

    base = tiny_llama_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_files, heldout_files = split_stdlib_sources()
    tokens_needed = args.steps * args.batch_size * args.seq_len
    random.Random(args.seed).shuffle(train_files)
    files = train_files[: max(4, tokens_needed // 2000)]  # ~3.5k tokens a file: every window new text, mostly
    train_ids = token_stream(tokenizer, files)
    eval_ids = token_stream(tokenizer, heldout_files[:40])
    eval_blocks = eval_ids[: args.eval_blocks * args.seq_len].view(-1, args.seq_len)
    batches = windows(train_ids, args.seq_len, args.batch_size, args.steps, args.seed)
    eval_every = max(1, args.steps // 10)
    print(f"{len(files)} training files ({len(train_ids)} tokens), {len(eval_blocks)} eval blocks of {args.seq_len}")

    results = {}
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    results["dense"] = train("dense", dense, batches, eval_blocks, args.lr, eval_every, args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        folder = f"{scratch}/moe"
        upcycle(base, folder, arch="mixtral", num_experts=NUM_EXPERTS, top_k=TOP_K, seed=args.seed, verbose=False)
        for preset in MOE_RUNS:
            config = AutoConfig.from_pretrained(folder)
            for key, value in routing_fields(preset).items():
                setattr(config, key, value)
            config.output_router_logits = True
            config.validate_moe_fields()
            model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
            results[preset] = train(preset, model, batches, eval_blocks, args.lr, eval_every, args.seed)

    rows, dense_flops = [], results["dense"]["flops"]
    for name, result in results.items():
        start_loss, final_loss = result["curve"][0][1], result["curve"][-1][1]
        violation = result["curve"][-1][2]
        rows.append([name, f"{result['active'] / 1e6:.2f}M", f"{result['flops'] / 1e12:.2f}",
                     f"{result['flops'] / dense_flops:.2f}x", f"{start_loss:.4f}", f"{final_loss:.4f}",
                     "-" if violation is None else f"{violation:.2f}"])
    table = markdown_table(["run", "active params / token", "training TFLOPs", "vs dense", "eval loss at start",
                            "eval loss at end", "load max-violation (eval)"], rows)
    print(table)
    if args.smoke:
        return
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    for name, result in results.items():
        steps, losses = zip(*[(step, loss) for step, loss, _ in result["curve"]])
        axis.plot([step * args.batch_size * args.seq_len / 1e3 for step in steps], losses, marker="o", markersize=3,
                  label=name)
    axis.set_xlabel("training tokens (thousands)")
    axis.set_ylabel("held-out eval loss")
    axis.set_title("Shipped tiny Llama, continued pretraining: dense vs upcycled 8-expert MoE", fontsize=10)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(images / "continued_pretraining.png")
    body = (f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens ({results['dense']['tokens']} tokens) "
            f"from the shipped dense model, AdamW lr {args.lr} (warmup, cosine to 10%), seed {args.seed}; eval on "
            f"{len(eval_blocks)} held-out blocks.\n\n{table}\n\n![eval loss](docs/images/continued_pretraining.png)")
    write_section("quality-continued-pretraining", body, document="QUALITY.md")


if __name__ == "__main__":
    main()
