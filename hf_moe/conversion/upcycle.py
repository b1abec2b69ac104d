# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Dense -> MoE upcycling: plan (every option checked against the source first) -> stream -> verify -> card.

Designs (G = granularity, K_s = shared experts, G_r = G - K_s routed shards, w = intermediate_size / G):

- `arch="mixtral"`: each MoE layer gets E copies of the dense FFN and a top-k router (G = 1).
- `arch="deepseek"`: the FFN's neurons are partitioned into G shards of width w (`partition.py`); the first K_s
  shards (for `clustered`: the most active) become the (fused) shared expert, the G_r others are replicated
  C = E / G_r times into E fine-grained routed experts. Expert i holds routed shard (i mod G_r) of copy (i div G_r):
  the G_r experts of one copy form a "virtual group" that shares one router row (NVIDIA, arXiv 2410.07524). With
  k = m * G_r, top-k then picks m whole copies; renormalised, every expert of selected copy c weighs
  p_c / (G_r * sum of the m selected p), so the routed sum is (1/G_r) * (the FFN of the routed neurons), and a
  routed scale s = G_r makes the layer exactly the dense FFN for any router whose rows differ between copies
  (normal, kmeans). Training unties the rows of one copy, and top-k then mixes shards of different copies (some
  neurons twice, others not at all). Group-limited routing (`n_group` = C, `topk_group` = m: `group_copies`) keeps
  whole copies together however the rows move; a zero router, which ties every expert, always gets it. It stays in
  the config: set both to 1 to let the trained router pick single fine-grained experts.

Where the routed scale s goes: `routed_scaling_factor` in our format; native formats have no such field, so s is
folded into the experts' weights (up rows x a, down x b, a * b = s: powers of two when s is one, else sqrt(s)
each). Qwen2-MoE gates its shared expert with sigmoid(w . x): a gate that is exactly 1/2 in fp32
(`native.constant_shared_gate`: one tiny power-of-two entry, not w = 0, which llama.cpp turns into 0/0),
compensated by x2 on its down_proj. Native formats get the layout engines read: a tied head is written untied
where llama.cpp needs `output.weight` (qwen2_moe), and what llama.cpp would still compute differently (e.g. its fixed
`norm_topk_prob`) is printed with the plan and logged as a warning.

Exact (verified <= 1e-5 relative logit error, or the output is not published): copies / virtual groups with
renormalised top-k, any router init, any partition (contiguous, random, clustered, shuffled), shared experts. Not
exact, deviation measured and recorded: Gaussian noise, Drop-Upcycling (re-initialised neurons), top-k without
renormalisation (except with a zero router, where s = E * G_r / k is exact), and a non-power-of-two scale folded
into half-precision weights.

Memory: tensors are read lazily (memory-mapped), one layer at a time, and each output tensor goes to disk as soon as
it is made, at its place in a shard whose header is known from the plan. Experts that are copies of one block (full
copies of the FFN, one routed shard) are that block, expanded, never E copies. Peak memory is therefore at most one
output MoE layer plus the source layer (with copies: one block plus the source layer), or the largest source tensor
(the embeddings, often), whatever the depth and the shard size.
"""

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm
from transformers import PreTrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging

from ..cards import UPCYCLE_FILE, conversion_heatmap, format_report, write_card
from ..modeling.configuration_hf_moe import DeepSeekMoEConfig, MixtralMoEConfig, MoEDecoderConfig
from ..outputs import atomic_output_dir, check_output_dir
from .dense import SOURCE_FILES_NOT_COPIED, DenseSource, layer_prefix, read_dense_source, resolve_source
from .gguf import dense_source_folder, find_gguf_file
from .layout import (
    EXPORT_FORMATS,
    LAYOUTS,
    SELECTION_BIAS,
    build_config,
    constant_shared_gate,
    dtype_name,
    engine_warnings,
    ensure_generation_config,
    explicit_layer_fields,
    layer_of,
    native_config_dict,
    our_model_code_files,
    our_tensor_shapes,
    ours_to_native_config,
    parameter_counts,
    remote_code_files,
    save_our_config,
    tensor_mapping,
)
from .partition import PARTITIONS, clustered_partition, contiguous_partition, kmeans, random_partition
from .safetensors_io import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointReader,
    ConversionError,
    ShardWriter,
    copy_side_files,
    parse_size,
)
from .verify import (
    DEFAULT_TOLERANCE,
    LayerwiseModel,
    VerificationError,
    verification_prompts,
    verify,
    write_verification,
)
from .verify import MODES as VERIFY_MODES

logger = logging.get_logger(__name__)

ARCHS = ("mixtral", "deepseek")
FORMATS = ("hf_moe", *EXPORT_FORMATS)
ROUTER_INITS = ("normal", "zeros", "kmeans")


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------


def _option(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class UpcycleOptions:
    """Every knob of `upcycle`, with its default. The command line, YAML files and the model card use these names
    (with dashes on the command line: `--num-experts`)."""

    arch: str = _option("mixtral", "mixtral: E full copies of the FFN per MoE layer; deepseek: fine-grained experts "
                        "(FFN split into --granularity shards), optional shared experts", choices=ARCHS)
    num_experts: int = _option(8, "routed experts per MoE layer (E); for deepseek a multiple of granularity - "
                               "shared_experts (E / that = copies of each shard)")
    top_k: int | None = _option(None, "experts per token; default: 2 for mixtral (at most E), one whole copy "
                                "(granularity - shared_experts) for deepseek, which must use a multiple of that")
    granularity: int = _option(1, "deepseek: split each FFN into G shards of width intermediate_size / G")
    shared_experts: int = _option(0, "deepseek: K_s < G shards (neurons) become always-on shared experts; the "
                                  "other G - K_s shards are replicated into the routed experts")
    partition: str = _option("contiguous", "how neurons are assigned to shards: contiguous; random (seeded); "
                             "clustered (balanced k-means on co-activation over calibration tokens); shuffled "
                             "(a different random partition per copy, as Qwen)", choices=PARTITIONS)
    norm_topk_prob: bool = _option(True, "renormalised top-k weights (exact for any router); off gives "
                                   "softmax-then-top-k with the scale E * G_r / k (exact only with a zero router)")
    noise_std: float = _option(0.0, "std of Gaussian noise added to every expert weight (not exact)")
    drop_ratio: float = _option(0.0, "Drop-Upcycling: fraction r in [0, 1) of each expert's neurons re-initialised "
                                "from N(mean, std) of the dense weights, the same neurons in gate, up and down "
                                "(not exact; 0.5 in the paper; with partition=shuffled: Qwen-style re-init)")
    router_init: str = _option("normal", "router weights: normal(0, router_std); zeros; kmeans: spherical k-means "
                               "centroids of the router's inputs (post-attention-norm activations) on calibration "
                               "tokens, scaled to the norm of a normal row", choices=ROUTER_INITS)
    router_std: float = _option(0.02, "std of the normal router init (and the row norm / sqrt(H) of kmeans)")
    group_copies: bool = _option(False, "deepseek with several copies of several routed shards: group-limited "
                                 "routing over whole copies (n_group = copies, topk_group = top_k / routed shards), "
                                 "so that the router keeps choosing whole copies of the FFN once training unties its "
                                 "rows; always on with router_init=zeros, which needs it")
    moe_layers: str = _option("all", "layers that become MoE: all; every-N (layers i with (i + 1) % N == 0, "
                              "GShard's every other layer for N=2); after-K (all but the first K, DeepSeek); or "
                              "indices like 1,3,5 (mixtral needs all)")
    format: str = _option("hf_moe", "output format: hf_moe (our model types) or a native transformers format when "
                          "the design is representable there", choices=FORMATS)
    seed: int = _option(0, "seed of every random choice (router, partitions, noise, drop); same options, same bytes")
    calibration_file: str | None = _option(None, "text file for kmeans / clustered, tokenized with SRC's tokenizer")
    calibration_tokens: list[int] | str | None = _option(
        None, "calibration token ids instead of a file: a list (YAML) or a string like '5,17,42'")
    calibration_max_tokens: int = _option(4096, "use at most this many calibration tokens")
    calibration_seq_len: int = _option(256, "calibration tokens are run in sequences of this length")
    max_shard_size: str = _option(DEFAULT_MAX_SHARD_SIZE, "largest safetensors shard to write, e.g. 500MB, 5GB")
    revision: str | None = _option(None, "revision of SRC when it is a Hub repository id")
    verify: bool = _option(True, "verification: fp32 logits compared with the dense model after writing (exact modes "
                           "must reach <= 1e-5 relative error, else nothing is published)")
    verify_mode: str = _option("auto", "full: load both models whole with their own classes; layerwise: run them one "
                               "layer at a time (bounded memory); auto: full when it fits in memory",
                               choices=VERIFY_MODES)
    dry_run: bool = _option(False, "print the plan and stop; nothing is written")
    overwrite: bool = _option(False, "replace OUT if it holds an earlier output of hf-moe or is empty (only once the "
                                     "new checkpoint is complete); any other content is refused")


OPTION_NAMES = tuple(f.name for f in fields(UpcycleOptions))
# Options that describe a run, not the model: left out of the saved upcycle.yaml.
RUN_OPTIONS = ("dry_run", "overwrite")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _invalid(name: str, value, allowed: str) -> ConversionError:
    return ConversionError(f"`{name}` ({_flag(name)}) = {value!r} is invalid: {allowed}")


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _invalid(name, value, f"must be an integer >= {minimum}")


def _check_float(name: str, value, low: float, high: float | None) -> None:
    """A number in [low, high) (high None: no upper bound)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise _invalid(name, value, "must be a number")
    if value < low or (high is not None and value >= high):
        raise _invalid(name, value, f"must be in [{low}, {high if high is not None else 'inf'})")


def options_from_dict(options: dict) -> UpcycleOptions:
    """`UpcycleOptions` from keyword arguments or a YAML mapping (dashes or underscores; `no_verify: true` too)."""
    normalized = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name == "no_verify":
            name, value = "verify", not value
        elif name == "no_norm_topk_prob":
            name, value = "norm_topk_prob", not value
        if name not in OPTION_NAMES:
            raise ConversionError(f"unknown upcycle option `{key}` (allowed: {', '.join(OPTION_NAMES)})")
        normalized[name] = value
    return UpcycleOptions(**normalized)


def load_options_file(path: str | os.PathLike) -> dict:
    """The mapping of a YAML options file (may hold `src` and `out` besides the options)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"--config {path}: no such file")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConversionError(f"--config {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(content, dict):
        raise ConversionError(f"--config {path} must hold a mapping of option names to values")
    return content


# ---------------------------------------------------------------------------------------------------------------
# Plan: every option checked against the source before anything is written
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class UpcyclePlan:
    """What will be written, derived from the options and the source; `describe()` prints it."""

    source: DenseSource
    options: UpcycleOptions
    config: MoEDecoderConfig  # our config of the result (exported to `native_config` for native formats)
    native_config: PreTrainedConfig | None
    dtype: torch.dtype
    top_k: int
    shards: int  # G
    routed_shards: int  # G_r = G - K_s
    copies: int  # C = E / G_r
    expert_width: int  # w = I / G
    routed_scale: float  # s: the factor the routed output needs
    weight_scales: tuple[float, float]  # (up, down) factors folded into the experts' weights (1, 1 if in config)
    deviations: list[str]  # why the result is not exactly the dense model (empty: exact)
    calibration: list[torch.Tensor] | None  # token id chunks for kmeans / clustered
    output_names: list[str]  # our tensor names, in writing order
    source_names: list[str]  # the dense source's tensor names
    engine_warnings: list[str] = field(default_factory=list)  # what llama.cpp computes differently (native formats)

    @property
    def exact(self) -> bool:
        return not self.deviations

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.config.mlp_layer_types) if kind == "sparse"]

    def parameter_counts(self) -> tuple[int, int, int]:
        """(total, active per token, dense source) parameter counts."""
        total, active = parameter_counts(self.config, self.output_names)
        dense, _ = parameter_counts(self.source.config, self.source_names)
        return total, active, dense

    def describe(self) -> str:
        """The plan as printed before any work: design, per-layer shapes, parameter counts, file size."""
        o, c = self.options, self.config
        hidden, shapes = c.hidden_size, our_tensor_shapes(c)
        total, active, dense = self.parameter_counts()
        shared = (f" + shared expert of width {c.shared_expert_intermediate_size} ({o.shared_experts} of "
                  f"{self.shards} shards"
                  f"{', gated by sigmoid(~0) = 1/2 x2' if c.shared_expert_gate else ''})") if c.n_shared_experts else ""
        routing = f"softmax, top-{self.top_k}, {'renormalised' if c.norm_topk_prob else 'not renormalised'}"
        if self.routed_scale != 1:
            where = ("routed_scaling_factor" if self.weight_scales == (1.0, 1.0)
                     else f"folded into the weights: up x{self.weight_scales[0]:g}, down x{self.weight_scales[1]:g}")
            routing += f", routed output x{self.routed_scale:g} ({where})"
        if c.n_group > 1:
            why = "group_copies" if o.group_copies else "the zero router ties"
            routing += (f", group-limited to the best {c.topk_group} of {c.n_group} copies ({why}; set n_group=1 "
                        f"later to free the router)")
        router = {"normal": f"normal(0, {o.router_std:g})", "zeros": "zeros",
                  "kmeans": f"k-means of the router inputs on {self.num_calibration_tokens} calibration tokens"}
        rows = self.copies if self.routed_shards > 1 else self.num_experts
        lines = [
            "hf-moe upcycle plan",
            f"  source      {self.source.name} ({self.source.model_type}, {c.num_hidden_layers} layers, hidden "
            f"{hidden}, FFN {c.intermediate_size}, {dtype_name(self.dtype)})",
            f"  output      {c.model_type if o.format == 'hf_moe' else o.format} (format {o.format})",
            f"  experts     {self.num_experts} routed of width {self.expert_width} per MoE layer "
            + (f"(full copies of the FFN){shared}" if self.shards == 1 else
               f"({self.copies} copies x {self.routed_shards} shards, partition {o.partition}){shared}"),
            f"  routing     {routing}",
            f"  router init {router[o.router_init]}, {rows} different rows"
            + (f" (one per virtual group of {self.routed_shards} experts)" if self.routed_shards > 1 else ""),
            f"  expert init noise std {o.noise_std:g}, drop ratio {o.drop_ratio:g}, seed {o.seed}",
            "  exact       " + ("yes: the output must match the dense logits within "
                                f"{DEFAULT_TOLERANCE:g} relative" if self.exact
                                else "no (deviation measured and recorded): " + "; ".join(self.deviations)),
        ]
        table = [["layer", "mlp", "router.weight", "experts.gate_up_proj", "experts.down_proj",
                  "shared_experts.down_proj"]]
        for layer, kind in enumerate(c.mlp_layer_types):
            p = f"{layer_prefix(layer)}mlp."
            if kind == "sparse":
                shared_shape = str(list(shapes[p + "shared_experts.down_proj.weight"])) if c.n_shared_experts else "-"
                table.append([str(layer), kind, str(list(shapes[p + "gate.weight"])),
                              str(list(shapes[p + "experts.gate_up_proj"])), str(list(shapes[p + "experts.down_proj"])),
                              shared_shape])
            else:
                table.append([str(layer), kind, "-", f"(dense FFN {list(shapes[p + 'up_proj.weight'])})", "-", "-"])
        widths = [max(len(row[col]) for row in table) for col in range(len(table[0]))]
        lines += ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                  for row in table]
        size = total * self.dtype.itemsize
        lines += [
            f"  parameters  total {total:,} ({total / dense:.2f}x the dense {dense:,}), active per token {active:,}",
            f"  file size   ~{_human_bytes(size)} ({dtype_name(self.dtype)}), shards of at most {o.max_shard_size}",
        ]
        lines += [f"  engines     {warning}" for warning in self.engine_warnings]
        return "\n".join(lines)

    @property
    def num_calibration_tokens(self) -> int:
        return sum(len(chunk) for chunk in self.calibration or [])


def _human_bytes(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size} B"
        size /= 1000
    return f"{size} B"


def parse_moe_layers(spec, num_layers: int) -> list[str]:
    """`mlp_layer_types` for --moe-layers: all, every-N, after-K, or layer indices ("1,3" or a list)."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(i) for i in spec)
    spec = str(spec).strip()
    allowed = (f"all, every-N (N >= 1), after-K (0 <= K < {num_layers}) or comma-separated layer indices in "
               f"[0, {num_layers})")
    if spec == "all":
        sparse = set(range(num_layers))
    elif match := re.fullmatch(r"every-(\d+)", spec):
        step = int(match.group(1))
        if step < 1:
            raise _invalid("moe_layers", spec, allowed)
        sparse = {i for i in range(num_layers) if (i + 1) % step == 0}
    elif match := re.fullmatch(r"after-(\d+)", spec):
        sparse = set(range(int(match.group(1)), num_layers))
    elif re.fullmatch(r"\d+(\s*,\s*\d+)*", spec):
        sparse = {int(i) for i in spec.split(",")}
        if max(sparse) >= num_layers:
            raise _invalid("moe_layers", spec, allowed)
    else:
        raise _invalid("moe_layers", spec, allowed)
    if not sparse:
        raise _invalid("moe_layers", spec, f"selects no layer of the {num_layers}; {allowed}")
    return ["sparse" if i in sparse else "dense" for i in range(num_layers)]


def _scale_factors(scale: float) -> tuple[float, float]:
    """(up, down) with up * down = scale: powers of two when scale is one (exact in every dtype), else sqrt each."""
    exponent = math.log2(scale)
    if exponent == int(exponent):
        return 2.0 ** (int(exponent) // 2), 2.0 ** (int(exponent) - int(exponent) // 2)
    return math.sqrt(scale), math.sqrt(scale)


def _calibration_chunks(o: UpcycleOptions, folder: Path, vocab_size: int) -> list[torch.Tensor] | None:
    """The calibration token ids, cut into sequences of `calibration_seq_len`, or None when none are needed."""
    if o.router_init != "kmeans" and o.partition != "clustered":
        return None
    needs = "router_init=kmeans" if o.router_init == "kmeans" else "partition=clustered"
    if o.calibration_file is None and o.calibration_tokens is None:
        raise _invalid("calibration_file", None, f"{needs} needs calibration text: give --calibration-file or "
                                                 f"--calibration-tokens")
    if o.calibration_file is not None and o.calibration_tokens is not None:
        raise _invalid("calibration_tokens", "...", "give either --calibration-file or --calibration-tokens")
    if o.calibration_tokens is not None:
        ids = o.calibration_tokens
        if isinstance(ids, str):
            if not re.fullmatch(r"\s*\d+([\s,]+\d+)*\s*", ids):
                raise _invalid("calibration_tokens", ids[:40], "must be token ids, e.g. '5,17,42'")
            ids = [int(i) for i in re.split(r"[\s,]+", ids.strip())]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            raise _invalid("calibration_tokens", "[...]", f"must be token ids in [0, vocab_size={vocab_size})")
    else:
        path = Path(o.calibration_file)
        if not path.is_file():
            raise _invalid("calibration_file", str(path), "no such file")
        ids = _tokenize_file(path, folder)
    ids = torch.tensor(list(ids)[: o.calibration_max_tokens], dtype=torch.long)
    if len(ids) == 0:
        raise _invalid("calibration_tokens" if o.calibration_tokens is not None else "calibration_file", "(empty)",
                       "needs at least one token")
    return list(ids.split(o.calibration_seq_len))


def _tokenize_file(path: Path, folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise _invalid("calibration_file", str(path), f"tokenizing it needs SRC's tokenizer, which cannot be loaded "
                                                      f"({type(error).__name__}); pass --calibration-tokens") from None
    return tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids


def _check_options(o: UpcycleOptions, source: DenseSource) -> None:
    """Types and ranges of every option, and what needs the source's sizes."""
    if o.arch not in ARCHS:
        raise _invalid("arch", o.arch, f"allowed: {', '.join(ARCHS)}")
    if o.format not in FORMATS:
        raise _invalid("format", o.format, f"allowed: {', '.join(FORMATS)}")
    if o.partition not in PARTITIONS:
        raise _invalid("partition", o.partition, f"allowed: {', '.join(PARTITIONS)}")
    if o.router_init not in ROUTER_INITS:
        raise _invalid("router_init", o.router_init, f"allowed: {', '.join(ROUTER_INITS)}")
    if o.verify_mode not in VERIFY_MODES:
        raise _invalid("verify_mode", o.verify_mode, f"allowed: {', '.join(VERIFY_MODES)}")
    for name, minimum in (("num_experts", 1), ("granularity", 1), ("shared_experts", 0), ("seed", 0),
                          ("calibration_max_tokens", 1), ("calibration_seq_len", 1)):
        _check_int(name, getattr(o, name), minimum)
    if o.top_k is not None:
        _check_int("top_k", o.top_k, 1)
    _check_float("noise_std", o.noise_std, 0.0, None)
    _check_float("drop_ratio", o.drop_ratio, 0.0, 1.0)
    _check_float("router_std", o.router_std, 0.0, None)
    if o.router_init in ("normal", "kmeans") and o.router_std <= 0:
        raise _invalid("router_std", o.router_std, f"router_init={o.router_init} needs a std > 0")
    for name in ("norm_topk_prob", "group_copies", "verify", "dry_run", "overwrite"):
        if not isinstance(getattr(o, name), bool):
            raise _invalid(name, getattr(o, name), "must be true or false")
    try:
        parse_size(o.max_shard_size)
    except ConversionError:
        raise _invalid("max_shard_size", o.max_shard_size, "a number of bytes or a size like 500MB, 5GB") from None

    width = source.fields["intermediate_size"]
    if o.arch == "mixtral":
        for name, value, allowed in (
            ("granularity", o.granularity, 1), ("shared_experts", o.shared_experts, 0), ("moe_layers", o.moe_layers,
                                                                                         "all"),
        ):
            if value != allowed:
                raise _invalid(name, value, f"arch=mixtral allows only {allowed!r} (use --arch deepseek)")
        for field_name, what in (("qkv_bias", "q/k/v biases (Qwen2)"), ("qk_norm", "q/k RMSNorm (Qwen3)")):
            if source.fields[field_name]:
                raise _invalid("arch", "mixtral", f"the {source.model_type} source has {what}, which hf_moe_mixtral "
                                                  f"cannot hold (use --arch deepseek, e.g. with --granularity 1)")
        if o.partition == "clustered":
            raise _invalid("partition", o.partition, "arch=mixtral copies whole FFNs (use --arch deepseek)")
    if width % o.granularity:
        raise _invalid("granularity", o.granularity, f"must divide intermediate_size={width}")
    if o.shared_experts >= o.granularity:
        raise _invalid("shared_experts", o.shared_experts,
                       f"must be < granularity={o.granularity} (at least one shard must stay routed)")
    routed = o.granularity - o.shared_experts
    design = f"with granularity {o.granularity} and shared_experts {o.shared_experts}"
    if o.num_experts % routed:
        allowed = ", ".join(str(routed * copies) for copies in range(1, 5))
        raise _invalid("num_experts", o.num_experts, f"{design}: allowed {allowed}, ... (multiples of granularity - "
                                                     f"shared_experts = {routed}: each copy of the routed neurons is "
                                                     f"{routed} experts)")
    top_k = o.top_k if o.top_k is not None else (min(2, o.num_experts) if o.arch == "mixtral" else routed)
    if top_k > o.num_experts:
        raise _invalid("top_k", top_k, f"must be at most num_experts={o.num_experts}")
    if top_k % routed:
        allowed = ", ".join(str(k) for k in range(routed, o.num_experts + 1, routed))
        raise _invalid("top_k", top_k, f"{design} and num_experts {o.num_experts}: allowed {allowed} (multiples of "
                                       f"granularity - shared_experts = {routed}, so that top-k selects whole copies "
                                       f"of the FFN: exactness)")
    if o.partition == "clustered" and o.granularity == 1:
        raise _invalid("partition", o.partition, "clustering needs granularity > 1")
    if o.group_copies and not grouped_copies(o, routed, o.num_experts // routed):
        raise _invalid("group_copies", True, f"needs arch=deepseek with more than one routed shard "
                                             f"(granularity - shared_experts > 1) and more than one copy of them "
                                             f"(num_experts > granularity - shared_experts); here arch={o.arch}, "
                                             f"granularity - shared_experts = {routed}, num_experts = {o.num_experts}")


def routed_scale(o: UpcycleOptions, top_k: int) -> float:
    """s, the factor the routed output needs to equal the dense FFN: G_r with renormalised top-k, else E * G_r / k
    (see the module docstring)."""
    routed = o.granularity - o.shared_experts
    return float(routed) if o.norm_topk_prob else o.num_experts * routed / top_k


def recorded_deviations(recorded: dict, dtype: torch.dtype) -> list[str]:
    """Why the upcycle recorded in upcycle.yaml (`recorded_options`, without `src`) is not exactly the dense model,
    for a checkpoint of `dtype` (empty: exact), as `UpcyclePlan.deviations` says."""
    o = options_from_dict(recorded)
    return _deviations(o, dtype, routed_scale(o, o.top_k), folded=o.format != "hf_moe")


def _deviations(o: UpcycleOptions, dtype: torch.dtype, scale: float, folded: bool) -> list[str]:
    reasons = []
    if o.noise_std > 0:
        reasons.append(f"Gaussian noise (std {o.noise_std:g}) on every expert")
    if o.drop_ratio > 0:
        reasons.append(f"Drop-Upcycling re-initialises {o.drop_ratio:g} of each expert's neurons")
    if not o.norm_topk_prob and o.router_init != "zeros":
        reasons.append("top-k weights are not renormalised, so the output scale depends on the router")
    if folded and not math.log2(scale).is_integer() and dtype != torch.float32:
        reasons.append(f"the routed scale {scale:g} is folded into {dtype_name(dtype)} weights as "
                       f"sqrt({scale:g}), which rounds")
    if o.format == "qwen2_moe" and o.shared_experts and dtype == torch.float16:
        reasons.append("the qwen2_moe shared-expert gate needs a weight below float16's smallest subnormal to be "
                       "exactly 1/2; it is 1/2 within 2^-26 * |norm| * sqrt(hidden) / 4")
    return reasons


def grouped_copies(o: UpcycleOptions, routed: int, copies: int) -> bool:
    """Whether group-limited routing keeps whole copies together: asked for, or needed by a zero router (which ties
    every expert)."""
    return (o.group_copies or o.router_init == "zeros") and routed > 1 and copies > 1


def _our_config(o: UpcycleOptions, source: DenseSource, top_k: int, scale: float, in_config: bool,
                layer_types: list[str]) -> MoEDecoderConfig:
    fields_ = dict(source.fields)
    routing = dict(num_experts_per_tok=top_k, norm_topk_prob=o.norm_topk_prob,
                   routed_scaling_factor=scale if in_config else 1.0)
    if o.arch == "mixtral":
        fields_.pop("qkv_bias"), fields_.pop("qk_norm")
        return build_config(MixtralMoEConfig, "upcycled config", **fields_, num_local_experts=o.num_experts,
                            **routing)
    routed = o.granularity - o.shared_experts
    width = fields_["intermediate_size"] // o.granularity
    copies = o.num_experts // routed
    groups = {}
    if grouped_copies(o, routed, copies):
        groups = dict(n_group=copies, topk_group=top_k // routed)
    return build_config(
        DeepSeekMoEConfig, "upcycled config", **fields_, **explicit_layer_fields(layer_types), **routing, **groups,
        moe_intermediate_size=width, n_routed_experts=o.num_experts, n_shared_experts=o.shared_experts,
        shared_expert_intermediate_size=o.shared_experts * width,
        shared_expert_gate=o.format == "qwen2_moe" and o.shared_experts > 0,
    )


def plan_upcycle(src: str | os.PathLike, out: str | os.PathLike | None = None, **options) -> UpcyclePlan:
    """Check every option against SRC (config and tensor headers; nothing is written) and derive the plan.

    Raises `ConversionError` naming the option, its value and what is allowed, or what the source lacks.
    """
    o = options_from_dict(options)
    source = read_dense_source(src, o.revision)
    _check_options(o, source)
    layer_types = parse_moe_layers(o.moe_layers, source.num_layers)
    routed = o.granularity - o.shared_experts
    top_k = o.top_k if o.top_k is not None else (min(2, o.num_experts) if o.arch == "mixtral" else routed)
    copies = o.num_experts // routed
    scale = routed_scale(o, top_k)
    in_config = o.format == "hf_moe"
    if not in_config and grouped_copies(o, routed, copies):
        if o.router_init == "zeros":
            raise _invalid("router_init", "zeros", f"ties every expert, and {o.format} has no group-limited routing "
                                                   f"to keep whole copies together (use normal or kmeans, or --format "
                                                   f"hf_moe)")
        raise _invalid("group_copies", True, f"{o.format} has no group-limited routing (use --format hf_moe)")
    config = _our_config(o, source, top_k, scale, in_config, layer_types)
    native_config = None
    if o.format != "hf_moe":
        try:
            native_config = ours_to_native_config(config, o.format)
        except ConversionError as error:
            raise ConversionError(f"`format` (--format) = {o.format!r} cannot hold this design: {error}") from None
    if out is not None and not o.dry_run:
        check_output_dir(out, o.overwrite, sources=[source.folder, o.calibration_file])

    source.folder = resolve_source(src, o.revision)  # the whole snapshot for a Hub id (weights included)
    untie = native_config is not None and config.tie_word_embeddings and not native_config.tie_word_embeddings
    with CheckpointReader(source.folder) as reader:
        source.check_tensors(reader)
        dtype = reader.dtype("model.embed_tokens.weight")
        source_names = source.tensor_names(reader)
        # a selection bias starts at zero by definition and loads as zeros when absent: not written
        names = [name for name in our_tensor_shapes(config) if not name.endswith(SELECTION_BIAS)]
        if "lm_head.weight" not in source_names and not untie:  # untie: the head is a copy of the embeddings
            names.remove("lm_head.weight")
    calibration = _calibration_chunks(o, source.folder, source.fields["vocab_size"])
    if calibration is not None:
        clusters = copies if o.router_init == "kmeans" else 0
        if sum(len(chunk) for chunk in calibration) < clusters:
            raise _invalid("calibration_tokens", f"{sum(len(c) for c in calibration)} tokens",
                           f"k-means of the router needs at least {clusters} calibration tokens (one per router row)")
    weight_scales = (1.0, 1.0) if in_config else _scale_factors(scale)
    config.dtype = dtype_name(dtype)
    if native_config is not None:
        native_config.dtype = dtype_name(dtype)
    return UpcyclePlan(
        source=source, options=o, config=config, native_config=native_config, dtype=dtype, top_k=top_k,
        shards=o.granularity, routed_shards=routed, copies=copies,
        expert_width=source.fields["intermediate_size"] // o.granularity, routed_scale=scale,
        weight_scales=weight_scales, deviations=_deviations(o, dtype, scale, folded=not in_config),
        calibration=calibration, output_names=names, source_names=source_names,
        engine_warnings=engine_warnings(config, native_config) if native_config is not None else [],
    )


# ---------------------------------------------------------------------------------------------------------------
# Building one MoE layer
# ---------------------------------------------------------------------------------------------------------------


def _generator(seed: int, *keys) -> torch.Generator:
    """An independent generator per (seed, purpose, layer, ...): no draw depends on the order of the others."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _neurons(plan: UpcyclePlan, layer: int, profiles: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared neuron ids [K_s * w], routed expert neuron ids [E, w]); expert i = routed shard i mod G_r of copy
    i div G_r."""
    o, width = plan.options, plan.config.intermediate_size
    generator = _generator(o.seed, "partition", layer)
    if o.partition == "contiguous":
        base = contiguous_partition(width, plan.shards)
    elif o.partition == "clustered":
        base = clustered_partition(profiles, plan.shards, generator)
    else:
        base = random_partition(width, plan.shards, generator)
    shared = base[: o.shared_experts].flatten().sort().values
    routed = base[o.shared_experts:]  # [G_r, w]
    copies = []
    for copy_idx in range(plan.copies):
        if o.partition == "shuffled" and copy_idx > 0:
            pool = routed.flatten()
            order = torch.randperm(len(pool), generator=_generator(o.seed, "shuffle", layer, copy_idx))
            copies.append(pool[order].reshape(routed.shape).sort(dim=1).values)
        else:
            copies.append(routed)
    return shared, torch.cat(copies)


def _neuron_slices(weight: torch.Tensor, ids: torch.Tensor, dim: int) -> torch.Tensor:
    """The FFN neurons `ids` of `weight` along `dim`: a view when they are one ascending run (copies, contiguous
    partitions), which copies about 3x faster into the expert tensors than a gather; a gather otherwise."""
    start = int(ids[0])
    if torch.equal(ids, torch.arange(start, start + len(ids))):
        return weight.narrow(dim, start, len(ids))
    return weight.index_select(dim, ids)


def _scaled(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    return tensor if factor == 1 else (tensor.float() * factor).to(tensor.dtype)


def _reinitialise_(weights: torch.Tensor, index: torch.Tensor, dim: int, mean: float, std: float,
                   generator: torch.Generator) -> None:
    """Drop-Upcycling: overwrite the slices `index` of `weights` along `dim` with N(mean, std)."""
    shape = list(weights.shape)
    shape[dim] = len(index)
    values = torch.randn(shape, generator=generator) * std + mean
    weights.index_copy_(dim, index, values.to(weights.dtype))


def _add_noise_(weights: torch.Tensor, std: float, generator: torch.Generator) -> None:
    weights.copy_((weights.float() + std * torch.randn(weights.shape, generator=generator)).to(weights.dtype))


def _router(plan: UpcyclePlan, layer: int, router_inputs: torch.Tensor | None, hidden: int) -> torch.Tensor:
    """[E, H]: one row per virtual group (a copy), repeated for its G_r experts."""
    o = plan.options
    generator = _generator(o.seed, "router", layer)
    if o.router_init == "zeros":
        rows = torch.zeros(plan.copies, hidden)
    elif o.router_init == "normal":
        rows = torch.randn(plan.copies, hidden, generator=generator) * o.router_std
    else:  # unit k-means centroids, scaled to the expected norm of a normal(0, std) row
        rows, _ = kmeans(router_inputs, plan.copies, generator)
        rows = rows * (o.router_std * math.sqrt(hidden))
    return rows.repeat_interleave(plan.routed_shards, dim=0).to(plan.dtype)


def build_sparse_mlp(plan: UpcyclePlan, layer: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                     router_inputs: torch.Tensor | None = None, profiles: torch.Tensor | None = None,
                     norm_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The MoE block of one layer from its dense FFN (gate/up [I, H], down [H, I]), keyed by our names relative to
    `model.layers.N.mlp.`. `norm_weight`: the layer's post-attention RMSNorm weight [H], which bounds the input of a
    Qwen2-MoE shared-expert gate (`constant_shared_gate`; all ones when not given)."""
    o, config = plan.options, plan.config
    shared, experts = _neurons(plan, layer, profiles)
    num_experts, width = experts.shape
    hidden = gate.shape[1]
    # Experts that are the same neurons, left as they are (full copies of the FFN, one routed shard), are one block
    # seen E times (`expand`: no copy); the shard writer writes it E times.
    if o.drop_ratio == 0 and o.noise_std == 0 and bool((experts == experts[0]).all()):
        experts = experts[:1]
    gate_up = torch.empty(len(experts), 2 * width, hidden, dtype=gate.dtype)  # [E or 1, 2w, H], gate then up rows
    down_proj = torch.empty(len(experts), hidden, width, dtype=down.dtype)  # [E or 1, H, w]
    for expert, ids in enumerate(experts):
        gate_up[expert, :width] = _neuron_slices(gate, ids, 0)
        gate_up[expert, width:] = _neuron_slices(up, ids, 0)
        down_proj[expert] = _neuron_slices(down, ids, 1)
    if o.drop_ratio > 0:
        dropped = int(o.drop_ratio * width)
        stats = [(w.float().mean().item(), w.float().std().item()) for w in (gate, up, down)]
        for expert in range(num_experts):
            generator = _generator(o.seed, "drop", layer, expert)
            index = torch.randperm(width, generator=generator)[:dropped].sort().values  # same neurons in all three
            _reinitialise_(gate_up[expert], index, 0, *stats[0], generator)
            _reinitialise_(gate_up[expert], index + width, 0, *stats[1], generator)
            _reinitialise_(down_proj[expert], index, 1, *stats[2], generator)
    if o.noise_std > 0:
        for expert in range(num_experts):
            generator = _generator(o.seed, "noise", layer, expert)
            _add_noise_(gate_up[expert], o.noise_std, generator)
            _add_noise_(down_proj[expert], o.noise_std, generator)
    up_scale, down_scale = plan.weight_scales
    if up_scale != 1:
        gate_up[:, width:] = _scaled(gate_up[:, width:], up_scale)
    down_proj = _scaled(down_proj, down_scale)
    tensors = {"gate.weight": _router(plan, layer, router_inputs, hidden),
               "experts.gate_up_proj": gate_up.expand(num_experts, -1, -1),
               "experts.down_proj": down_proj.expand(num_experts, -1, -1)}
    if config.n_shared_experts:
        shared_down = _neuron_slices(down, shared, 1)
        if config.shared_expert_gate:  # Qwen2-MoE: sigmoid(w . x) = 1/2 exactly, undone by x2 on the shared down_proj
            if norm_weight is None:
                norm_weight = torch.ones(hidden)
            tensors["shared_expert_gate.weight"] = constant_shared_gate(norm_weight, gate.dtype)
            shared_down = _scaled(shared_down, 2.0)
        tensors.update({"shared_experts.gate_proj.weight": _neuron_slices(gate, shared, 0),
                        "shared_experts.up_proj.weight": _neuron_slices(up, shared, 0),
                        "shared_experts.down_proj.weight": shared_down})
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------


class _Emitter:
    """Adds our tensors to the shard writer, under the native names when writing a native format."""

    def __init__(self, plan: UpcyclePlan, writer: ShardWriter | None = None):
        self.writer, self.plan = writer, plan
        self.layout = LAYOUTS[plan.options.format] if plan.options.format != "hf_moe" else None
        self.bytes = 0

    def parts(self, name: str, tensor: torch.Tensor):
        """(name, tensor) as written: ours, or the native tensors that hold it."""
        if self.layout is None:
            yield name, tensor
            return
        mapping = tensor_mapping(name, self.layout, self.plan.num_experts)
        yield from zip(mapping.native, mapping.to_native(tensor), strict=True)

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        for written, part in self.parts(name, tensor):
            self.writer.add(written, part)


# The source tensor whose dtype each tensor of a sparse layer's MoE block keeps (the router: the checkpoint's dtype).
_MADE_FROM = {"experts.gate_up_proj": "gate_proj", "experts.down_proj": "down_proj",
              "shared_expert_gate.weight": "gate_proj", "shared_experts.gate_proj.weight": "gate_proj",
              "shared_experts.up_proj.weight": "up_proj", "shared_experts.down_proj.weight": "down_proj"}


def write_plan(plan: UpcyclePlan, reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """Every tensor `stream` writes, in order, as written (native names for a native format): a meta tensor of its
    shape and dtype, so that the shard writer knows every shard's header before the first byte."""
    shapes, emitter = our_tensor_shapes(plan.config), _Emitter(plan)
    written = {}
    for name in plan.output_names:
        if name in reader:
            dtype = reader.dtype(name)
        elif name == "lm_head.weight":  # a tied head written untied: the embeddings
            dtype = reader.dtype("model.embed_tokens.weight")
        else:  # a tensor of a sparse layer's MoE block
            prefix, block_name = name.split("mlp.", 1)
            made_from = _MADE_FROM.get(block_name)
            dtype = plan.dtype if made_from is None else reader.dtype(f"{prefix}mlp.{made_from}.weight")
        written.update(emitter.parts(name, torch.empty(shapes[name], dtype=dtype, device="meta")))
    return written


def stream(plan: UpcyclePlan, reader: CheckpointReader, folder: Path) -> list[str]:
    """Write the upcycled weights into `folder`, one layer at a time; returns the weight file names.

    The shard writer lays out every shard from `write_plan` first, so each tensor goes to disk at its place as soon
    as it is made. Per layer, the source tensors are read once (memory-mapped), the MoE block is built from the dense
    FFN (experts that are copies of one block are that block, expanded), and everything is written. A source tensor's
    pages stay mapped only while it is referenced, so they do not accumulate in the process either.
    """
    o = plan.options
    writer = ShardWriter(folder, o.max_shard_size, plan=write_plan(plan, reader))
    emit = _Emitter(plan, writer)
    calibration = None
    if plan.calibration:  # the dense model, run layer by layer alongside the conversion
        calibration = LayerwiseModel(plan.source.config, reader.get("model.embed_tokens.weight"), plan.calibration)
    by_layer: dict[int, list[str]] = {}
    for name in plan.output_names:
        by_layer.setdefault(layer_of(name), []).append(name)
    outside_layers = by_layer.pop(-1)
    shard_bytes = parse_size(o.max_shard_size)
    emit("model.embed_tokens.weight", reader.get("model.embed_tokens.weight"))
    reader.close()  # its pages stay mapped while a handle is open: not through the first layer
    progress = tqdm(sorted(by_layer), desc="upcycle", unit="layer", disable=None)
    for layer in progress:
        prefix = layer_prefix(layer)
        sparse = plan.config.mlp_layer_types[layer] == "sparse"
        source = {name: reader.get(name) for name in plan.source_names if name.startswith(prefix)}
        router_inputs = profiles = None
        if calibration is not None:
            relative = {name.removeprefix(prefix): tensor for name, tensor in source.items()}
            router_inputs, acts = calibration.run_layer(layer, relative, capture=True,
                                                        activations=sparse and o.partition == "clustered")
            profiles = acts.abs().T if acts is not None else None  # [I, N]
        if sparse:
            gate, up, down = (source.pop(f"{prefix}mlp.{proj}_proj.weight") for proj in ("gate", "up", "down"))
            moe = build_sparse_mlp(plan, layer, gate, up, down, router_inputs, profiles,
                                   norm_weight=source[f"{prefix}post_attention_layernorm.weight"])
            source.update({f"{prefix}mlp.{name}": tensor for name, tensor in moe.items()})
            del gate, up, down, moe
        for name in by_layer[layer]:
            emit(name, source.pop(name))
        del source
        reader.close()  # handles reopen lazily on the next read
        progress.set_postfix(shards=max(1, math.ceil(emit.bytes / shard_bytes)))
    for name in outside_layers:
        if name == "lm_head.weight" and name not in reader:  # a tied head written untied (see plan_upcycle)
            emit(name, reader.get("model.embed_tokens.weight"))
        elif name != "model.embed_tokens.weight":
            emit(name, reader.get(name))
    return writer.finish()


# ---------------------------------------------------------------------------------------------------------------
# Output folder: config, side files, options, card
# ---------------------------------------------------------------------------------------------------------------


def recorded_options(plan: UpcyclePlan) -> dict:
    """The options as saved in upcycle.yaml and the card: SRC and every model-defining option (effective top_k)."""
    options = {name: value for name, value in asdict(plan.options).items() if name not in RUN_OPTIONS}
    options["top_k"] = plan.top_k
    return {"src": plan.source.name, **options}


def _save_config(plan: UpcyclePlan, folder: Path) -> None:
    if plan.native_config is None:
        save_our_config(plan.config, folder)
        generation_source = plan.config
    else:
        content = native_config_dict(plan.native_config)
        (folder / "config.json").write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        generation_source = plan.native_config
    excluded = {*SOURCE_FILES_NOT_COPIED, *remote_code_files(plan.source.config_dict)}
    if plan.native_config is None:
        excluded.update(our_model_code_files())  # ours were just written
    copy_side_files(plan.source.folder, folder, exclude=excluded)
    ensure_generation_config(folder, generation_source)


def _write_heatmap(plan: UpcyclePlan, folder: Path) -> None:
    """The expert load of the new checkpoint on the calibration tokens, else on the verification prompts."""
    if plan.calibration:
        batches, description = plan.calibration, "the calibration text"
    else:
        batches, description = verification_prompts(plan.source.folder, plan.config.vocab_size, seed=plan.options.seed)
        description = f"the verification prompts: {description}"
    conversion_heatmap(folder, batches, description)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class UpcycleResult:
    out: Path | None  # None after a dry run
    plan: UpcyclePlan
    verification: dict | None


def upcycle(src: str | os.PathLike, out: str | os.PathLike | None, verbose: bool = True, **options) -> UpcycleResult:
    """Upcycle the dense checkpoint SRC (folder, Hub id or GGUF file) into a mixture of experts at OUT.

    `options` are the fields of `UpcycleOptions` (see `hf-moe upcycle --help`). Every option is checked against the
    source before anything is written (`ConversionError` otherwise); the plan is printed when `verbose`; with
    `dry_run=True` nothing is written. The weights are streamed layer by layer into a temporary folder next to OUT
    that becomes OUT only when everything (verification included) succeeded. Exact modes whose verified relative
    logit error exceeds 1e-5 raise `VerificationError` and leave no OUT.

    SRC may also be a GGUF file, or a folder holding one (`hf_moe.conversion.gguf`): its header is checked first,
    then it is dequantized to fp32 into a temporary checkpoint that is upcycled and verified against, then removed.
    """
    gguf_file = find_gguf_file(src)
    o = options_from_dict(options)
    if gguf_file is not None and out is not None and not o.dry_run:  # before the dequantization
        check_output_dir(out, o.overwrite, sources=[gguf_file, o.calibration_file])
    with dense_source_folder(src) as folder:
        plan = plan_upcycle(folder, out, **options)
        plan.source.name = str(src)
        return _upcycle_plan(plan, out, verbose)


def _upcycle_plan(plan: UpcyclePlan, out: str | os.PathLike | None, verbose: bool) -> UpcycleResult:
    o = plan.options
    if verbose:
        print(plan.describe())
    if o.dry_run:
        return UpcycleResult(None, plan, None)
    if out is None:
        raise ConversionError("OUT is required (unless dry_run=True)")
    for warning in plan.engine_warnings:
        logger.warning(warning)
    verification = None
    sources = [plan.source.folder, o.calibration_file]
    with CheckpointReader(plan.source.folder) as reader, \
            atomic_output_dir(out, "upcycle", overwrite=o.overwrite, sources=sources) as folder:
        stream(plan, reader, folder)
        _save_config(plan, folder)
        (folder / UPCYCLE_FILE).write_text(yaml.safe_dump(recorded_options(plan), sort_keys=False), encoding="utf-8")
        if o.verify:
            verification = verify(plan.source.folder, folder, seed=o.seed, mode=o.verify_mode,
                                  tolerance=DEFAULT_TOLERANCE if plan.exact else None)
            verification["exact_mode"] = plan.exact
            verification["source_class"], verification["converted_class"] = (verification["dense_class"],
                                                                              verification["moe_class"])
            if verbose:
                print(f"verification: {format_report(verification)}")
            if verification.get("passed") is False:  # above the tolerance of an exact mode, or non-finite logits
                raise VerificationError(f"the upcycled model failed verification: {format_report(verification)}; "
                                        f"nothing was written to {out}")
            write_verification(verification, folder)
            if verification["mode"] == "full":  # the model fits in memory: measure its routing too
                _write_heatmap(plan, folder)
        write_card(folder, "upcycled")
    logger.info(f"upcycled {plan.source.name} into {out}")
    return UpcycleResult(Path(out), plan, verification)
