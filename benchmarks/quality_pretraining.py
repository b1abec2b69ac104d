"""Sparse upcycling and routing presets, measured by continued pretraining of a dense model.

    python benchmarks/quality_pretraining.py            # the shipped tiny Llama; writes a QUALITY.md section and a plot
    python benchmarks/quality_pretraining.py --smoke    # a few steps on a few files; prints only
    python benchmarks/quality_pretraining.py --base SmolLM2-135M-Instruct.Q4_1.gguf --corpus pydoc \
        --runs dense mixtral fine_grained --steps 48 --batch-size 4 --seq-len 256 --lr 2e-4 --eval-blocks 32 \
        --section quality-continued-pretraining-smollm2

Every run starts from the dense model (`--base`: a folder or GGUF file; default the shipped tiny Llama,
`hf_moe.data.tiny_llama_path()`) and trains on the same windows of the corpus's training split, in the same order,
for the same number of steps; eval loss is the mean next-token loss on fixed blocks of the held-out split (text the
runs never train on). Corpora (`hf_moe.data.corpus`): `stdlib`, the standard library's source (the tiny Llama's
own pretraining text), and `pydoc`, the language reference's English topics (`pydoc_data.topics`).

    dense           the dense model, continued
    mixtral         its exact upcycle to 8 experts (copies of the FFN), top-2, Switch aux loss 0.02 (preset `mixtral`)
    deepseek_v3     the same MoE with the routing of preset `deepseek_v3`: sigmoid scores, selection bias updated
                    without a loss (gamma 0.001), sequence-wise balance loss 1e-4, top-2 kept
    switch          preset `switch`: top-1, gate = router probability, jitter, capacity 1.25 in training
    expert_choice   preset `expert_choice`: each expert takes its top T*2/E tokens of the batch
    soft_moe_causal preset `soft_moe_causal`: each token merges the 8 experts' weights by its router softmax (exact
                    start: the merged copies are the dense FFN)
    mixture_of_depths  preset `mixture_of_depths`: every other layer processes its top 12.5% of tokens (new routers;
                    not an exact start); evaluation uses the causal rule r > 0
    jetmoe          preset `jetmoe`: 8 attention experts (top-2) sharing the key/value projections, each with the dense
                    query and output projections (exact start), on the 8 FFN experts
    glam            preset `glam`: every other layer, the first included, upcycled to 64 experts, top-2 (exact start)
    brainformer     preset `brainformer` (3 attention, 3 MoE, 2 dense sub-blocks per layer, 64 experts, expert choice),
                    trained from scratch: no dense model has its layout. It is compared with `dense_scratch`, the
                    dense architecture trained from scratch on the same data
    fine_grained    its exact fine-grained upcycle (`arch="deepseek"`): each FFN split into 4 shards, 1 an always-on
                    shared expert, the other 3 copied 8 times into 24 routed experts, top-6 (1.75 FFNs a token)
    fine_grained_grouped  the same upcycle with `group_copies`: group-limited routing to the best 2 of the 8 copies,
                    so that a token takes two whole copies of the routed neurons however training moves the router

The runs named after routing presets share one upcycled checkpoint; only the routing fields of the config differ.
"eval loss at dense's FLOPs" interpolates each run's eval curve at the training FLOPs of the first run (dense); a run
cheaper per token than dense has none (it never spends that much). Training FLOPs are
6 * (active parameters per token, embeddings excluded, lm_head included) + 6 * layers * seq_len * hidden (causal
attention), times the tokens.
"""

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from common import ROOT, markdown_table, write_section
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import hf_moe
from hf_moe.cards import quiet_loading
from hf_moe.conversion import upcycle
from hf_moe.conversion.gguf import dense_source_folder
from hf_moe.data import tiny_llama_path
from hf_moe.data.corpus import split_pydoc_topics, split_stdlib_sources, text_token_stream, token_stream
from hf_moe.modeling.configuration_hf_moe import PRESETS, DeepSeekMoEConfig

# Preset fields that change the model's shape rather than its routing: the runs keep the upcycled shape.
SHAPE_FIELDS = {"num_local_experts", "n_routed_experts", "n_shared_experts", "n_group", "topk_group", "moe_layer_freq",
                "routed_scaling_factor", "num_device_groups", "qkv_bias", "first_k_dense_replace",
                "shared_expert_gate", "attention_type", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "rope_interleave"}
# presets whose fields apply to the 8-expert upcycle (jetmoe's attention experts get the dense q and o projections)
MOE_RUNS = ("mixtral", "deepseek_v3", "switch", "expert_choice", "soft_moe_causal", "mixture_of_depths", "jetmoe")
NUM_EXPERTS, TOP_K = 8, 2
FINE_GRAINED = {"arch": "deepseek", "granularity": 4, "shared_experts": 1, "num_experts": 24, "top_k": 6}
FINE_GRAINED_RUNS = {  # run -> (upcycle name, upcycle options)
    "fine_grained": ("fine-grained: 1 shared + 24 routed, top-6", FINE_GRAINED),
    "fine_grained_grouped": ("fine-grained, whole copies: the best 2 of 8 groups of 3",
                             {**FINE_GRAINED, "group_copies": True}),
}
RUNS = ("dense", *MOE_RUNS, "glam", "dense_scratch", "brainformer", *FINE_GRAINED_RUNS)
DEFAULT_RUNS = tuple(run for run in RUNS if run not in FINE_GRAINED_RUNS)
UPCYCLE_NAME = "8 experts, top-2"
GLAM_NAME = "GLaM: 64 experts, top-2, every other layer"


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
            violations += [float(layer["max_violation"]) for layer in outputs.router_stats or ()]  # soft: none
    model.train()
    return total / count, (sum(violations) / len(violations) if violations else None)


def active_parameters(model) -> float:
    """Parameters a token uses on average: all but the input embedding, with only k (or, for expert choice,
    capacity) of the E experts of each MoE layer, k of the E_a query and output projections of attention experts,
    and the capacity fraction of the parameters of a Mixture-of-Depths layer."""
    config = model.config
    depth_layers = set(config.mod_layers or ()) if config.model_type.startswith("hf_moe") else set()
    used_experts = None
    if ".experts." in str([name for name, _ in model.named_parameters()]):
        used_experts = (config.capacity_factor if config.router_type == "expert_choice"
                        else config.num_experts_per_tok) / config.num_local_experts
    total = 0.0
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name:
            continue
        share = 1.0
        if ".experts." in name:
            share = used_experts
        elif parameter.dim() == 3 and name.endswith(("self_attn.q_proj", "self_attn.o_proj")):  # attention experts
            share = config.num_attention_experts_per_tok / config.num_attention_experts
        layer = name.split("layers.", 1)[1].split(".", 1)[0] if "layers." in name else None
        if layer is not None and int(layer) in depth_layers:
            share *= config.mod_capacity
        total += parameter.numel() * share
    if config.tie_word_embeddings:
        total += model.get_input_embeddings().weight.numel()  # the tied lm_head
    return total


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
    attentions = (len(model.config.attention_layer_types()) if model.config.model_type.startswith("hf_moe")
                  else model.config.num_hidden_layers)  # a block_layout may have several per layer
    attention_flops_per_token = 6 * attentions * seq_len * model.config.hidden_size
    flops_per_token = 6 * active_parameters(model) + attention_flops_per_token
    return {"curve": curve, "tokens": tokens, "flops": flops_per_token * tokens, "active": active_parameters(model),
            "steps": steps}


def corpus_ids(corpus: str, tokenizer, tokens_needed: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training token ids, held-out token ids, the corpus in words)."""
    if corpus == "pydoc":
        train_texts, heldout_texts = split_pydoc_topics()
        words = (f"the language reference's topics (`pydoc_data.topics`): {len(train_texts)} training topics, "
                 f"{len(heldout_texts)} held out")
        return text_token_stream(tokenizer, train_texts), text_token_stream(tokenizer, heldout_texts), words
    train_files, heldout_files = split_stdlib_sources()
    random.Random(seed).shuffle(train_files)
    files = train_files[: max(4, tokens_needed // 2000)]  # ~3.5k tokens a file: every window new text, mostly
    return (token_stream(tokenizer, files), token_stream(tokenizer, heldout_files[:40]),
            f"the standard library's source: {len(files)} training files, 40 held-out files")


@torch.no_grad()
def continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of `prompt`."""
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    try:
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    except ValueError as error:  # a design that reads later tokens refuses to generate
        if "cannot generate" not in str(error):
            raise
        return "(cannot generate: not causal)"
    finally:
        model.train()
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def moe_model(folder: str, preset: str | None):
    """The upcycled checkpoint at `folder`, with the routing fields of `preset` when given. Parameters the preset adds
    start from their init (Mixture-of-Depths routers); attention experts start as copies of the dense attention's
    query and output projections, which computes the dense attention whatever the router picks."""
    config = AutoConfig.from_pretrained(folder)
    fields = {**config.to_dict(), **(routing_fields(preset) if preset else {}), "output_router_logits": True}
    config = type(config).from_dict(fields)  # a new config: fields derived from the preset's (mod_layers) are set
    if not config.num_attention_experts:
        return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
    with quiet_loading():  # the q and o projections' shapes differ from the checkpoint's on purpose
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                     ignore_mismatched_sizes=True)
    dense = load_safetensors(folder)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for name in ("q_proj", "o_proj"):  # [out, in] -> each expert's copy [E_a, out, in]
                getattr(layer.self_attn, name).copy_(dense[f"model.layers.{index}.self_attn.{name}.weight"])
    return model


def load_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `folder` (all its shards)."""
    return {name: tensor for path in sorted(Path(folder).glob("*.safetensors")) for name, tensor in
            load_file(path).items()}


def loss_at_flops(result: dict, flops: float) -> float | None:
    """The run's eval loss interpolated at `flops` training FLOPs; None when the run never spent that much."""
    flops_per_step = result["flops"] / result["steps"]
    steps, losses = [step for step, _, _ in result["curve"]], [loss for _, loss, _ in result["curve"]]
    target = flops / flops_per_step
    if target > steps[-1] * (1 + 1e-9):
        return None
    for (left, low), (right, high) in zip(zip(steps, losses), zip(steps[1:], losses[1:])):
        if left <= target <= right:
            return low + (high - low) * (target - left) / (right - left)
    return losses[-1]


def scratch_model(base: str, preset: str | None, seed: int):
    """A randomly initialised model with `base`'s sizes: the dense architecture, or `preset`'s (DeepSeek family, its
    experts a quarter of the dense FFN's width so that a token's MoE sub-block costs about half a dense FFN)."""
    dense = AutoConfig.from_pretrained(base)
    torch.manual_seed(seed)
    if preset is None:
        return AutoModelForCausalLM.from_config(dense, dtype=torch.float32)
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    sizes = {key: getattr(dense, key) for key in names if hasattr(dense, key)}
    config = DeepSeekMoEConfig.from_preset(preset, num_hidden_layers=max(1, dense.num_hidden_layers // 2),
                                           moe_intermediate_size=dense.intermediate_size // 4,
                                           output_router_logits=True, **sizes)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--base", default=None, help="dense checkpoint folder or GGUF file (default: shipped tiny)")
    parser.add_argument("--corpus", choices=("stdlib", "pydoc"), default="stdlib")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(DEFAULT_RUNS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--section", default="quality-continued-pretraining", help="QUALITY.md section to write")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.eval_blocks = 4, 2, 32, 4
    torch.set_num_threads(2)

    with dense_source_folder(args.base or tiny_llama_path()) as base, tempfile.TemporaryDirectory() as scratch:
        tokenizer = AutoTokenizer.from_pretrained(base)
        train_ids, eval_ids, corpus = corpus_ids(args.corpus, tokenizer, args.steps * args.batch_size * args.seq_len,
                                                 args.seed)
        eval_blocks = eval_ids[: args.eval_blocks * args.seq_len].view(-1, args.seq_len)
        batches = windows(train_ids, args.seq_len, args.batch_size, args.steps, args.seed)
        eval_every = max(1, args.steps // 10)
        print(f"{corpus} ({len(train_ids)} training tokens), {len(eval_blocks)} eval blocks of {args.seq_len}")
        prompt = tokenizer.decode(eval_blocks[0, :48], skip_special_tokens=True)  # held-out text
        sample_tokens = 8 if args.smoke else 40

        def upcycled(name: str, **options) -> str:
            """The folder of the upcycle `name` (written and verified on first use)."""
            if name not in folders:
                folders[name] = f"{scratch}/upcycle-{len(folders)}"
                verification[name] = upcycle(base, folders[name], seed=args.seed, verbose=False,
                                             **options).verification
            return folders[name]

        results, samples, verification, seconds, folders = {}, {}, {}, {}, {}
        for run in args.runs:
            start = time.perf_counter()
            if run == "dense":
                model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
                samples["dense, before training"] = continuation(model, tokenizer, prompt, sample_tokens)
            elif run in FINE_GRAINED_RUNS:
                name, options = FINE_GRAINED_RUNS[run]
                model = moe_model(upcycled(name, **options), None)
            elif run == "glam":
                layers = AutoConfig.from_pretrained(base).num_hidden_layers
                model = moe_model(upcycled(GLAM_NAME, arch="deepseek", num_experts=64, top_k=2,
                                           moe_layers=",".join(map(str, range(0, layers, 2)))), run)
            elif run in ("dense_scratch", "brainformer"):
                model = scratch_model(base, None if run == "dense_scratch" else run, args.seed)
            else:
                folder = upcycled(UPCYCLE_NAME, arch="mixtral", num_experts=NUM_EXPERTS, top_k=TOP_K)
                model = moe_model(folder, preset=run)
            results[run] = train(run, model, batches, eval_blocks, args.lr, eval_every, args.seed)
            samples[f"{run}, after training"] = continuation(model, tokenizer, prompt, sample_tokens)
            seconds[run] = time.perf_counter() - start
            del model

    rows, dense_flops = [], results[args.runs[0]]["flops"]
    for name, result in results.items():
        start_loss, final_loss = result["curve"][0][1], result["curve"][-1][1]
        violation = result["curve"][-1][2]
        at_dense = loss_at_flops(result, dense_flops)
        rows.append([name, f"{result['active'] / 1e6:.2f}M", f"{result['flops'] / 1e12:.2f}",
                     f"{result['flops'] / dense_flops:.2f}x", f"{start_loss:.4f}",
                     "-" if at_dense is None else f"{at_dense:.4f}", f"{final_loss:.4f}",
                     "-" if violation is None else f"{violation:.2f}", f"{seconds[name] / 60:.1f}"])
    table = markdown_table(["run", "active params / token", "training TFLOPs", f"vs {args.runs[0]}",
                            "eval loss at start", f"eval loss at {args.runs[0]}'s FLOPs", "eval loss at end",
                            "load max-violation (eval)", "minutes"], rows)
    checks = markdown_table(["upcycle", "max relative logit error", "top-1 agreement"], [
        [name, f"{report['max_rel_error']:.1e}", f"{report['top1_agreement']:.1%}"]
        for name, report in verification.items()])
    sample_rows = markdown_table(["model", f"greedy continuation ({sample_tokens} tokens)"],
                                 [[name, "`" + " ".join(text.split()).replace("|", "\\|") + "`"]
                                  for name, text in samples.items()])
    prompt_line = "`" + " ".join(prompt.split()).replace("|", "\\|") + "`"
    print(f"{table}\n\n{checks}\n\nprompt: {prompt_line}\n{sample_rows}")
    if args.smoke:
        return
    image = f"{args.section.removeprefix('quality-').replace('-', '_')}.png"
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    for name, result in results.items():
        steps, losses = zip(*[(step, loss) for step, loss, _ in result["curve"]])
        axis.plot([step * args.batch_size * args.seq_len / 1e3 for step in steps], losses, marker="o", markersize=3,
                  label=name)
    base_name = "shipped tiny Llama" if args.base is None else Path(args.base).name
    axis.set_xlabel("training tokens (thousands)")
    axis.set_ylabel("held-out eval loss")
    axis.set_title(f"{base_name}, continued pretraining: dense vs upcycled MoE", fontsize=10)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(images / image)
    body = (f"Base: {base_name}. Corpus: {corpus}. {args.steps} steps of {args.batch_size} x {args.seq_len} tokens "
            f"({results[args.runs[0]]['tokens']} tokens), AdamW lr {args.lr} (warmup, cosine to 10%), seed "
            f"{args.seed}; eval on {len(eval_blocks)} held-out blocks.\n\n{table}\n\n![eval loss](docs/images/{image})"
            f"\n\nVerification of the upcycles (fp32 logits against the dense model):\n\n{checks}\n\nGreedy "
            f"continuations of held-out text {prompt_line}:\n\n{sample_rows}")
    write_section(args.section, body, document="QUALITY.md")


if __name__ == "__main__":
    main()
