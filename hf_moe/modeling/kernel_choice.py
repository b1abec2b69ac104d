# Copyright 2026 The hf-moe Authors. Licensed under the Apache License, Version 2.0.
"""Which experts kernel "auto" runs on a CPU: the fastest of its candidates, timed once on this machine.

Which kernel (and matrix library) is fastest depends on the CPU: on an AMD EPYC torch's fp32 products (MKL) ran at
about half oneDNN's rate, so `sorted_mm` through oneDNN won there; on an Intel Xeon whose MKL is fast transformers'
`grouped_mm` won (BENCHMARKS.md, issue #27). So rather than a rule written for one CPU, "auto"
(experts_kernels.py) hands the kernels that apply to a call to `choose_kernel`, which times each of them once on
synthetic inputs of the call's shapes (round-robin: a warm-up call each, then the fastest of at least
`_MIN_ROUNDS` calls) and keeps the fastest, per key:

    cpu (model name, family, model), torch version, intra-op threads, dtype (and CPU autocast), hidden size,
    expert width, number of experts, top-k, gradients (none / inputs / weights too), token bucket, candidates

The token bucket is the call's token count rounded up to a power of two, timed at that many tokens and capped at
`MAX_TIMED_TOKENS` (larger calls share the capped bucket). "gradients": the forward alone is timed in inference,
forward and backward where autograd records the call (the weight gradients too where the expert weights train).

Decisions are kept in memory and in a JSON file, `$HF_MOE_CACHE/experts_kernels.json` (by default
`$HF_HOME/hf_moe/`, i.e. `~/.cache/huggingface/hf_moe/`), written atomically (a temporary file, then `os.replace`).
A corrupt file is ignored with a warning (its keys are timed again and the file rewritten); a folder that cannot be
written keeps the decisions in memory only. Each decision is logged once per process (info level, transformers'
logging). `HF_MOE_AUTO_KERNEL=<kernel>` pins "auto" to one kernel instead (`calibrate`, the default, measures).

The timing runs in the caller's thread, where the real calls run: the OpenMP thread team that torch's, oneDNN's and
MKL's parallel regions use belongs to the calling thread, and from a thread of its own the kernels made of many small
parallel regions (`sorted_mm` through oneDNN) timed up to 1.3x slower than the caller would run them (on 2 cores,
BENCHMARKS.md), which picked `grouped_mm` where `sorted_mm` decoded faster. It is shielded from the caller's
autograd state: its tensors are its own (the expert weights are used detached, no copy, and no gradient reaches
them; the inputs are drawn from a private generator, leaving torch's random state as it was), its graph is
differentiated on its own, and its saved tensors bypass the caller's saved-tensor hooks (activation checkpointing's,
for one). Only CPU calls on plain tensors outside any torch dispatch mode are timed (`timeable`): GPU, meta tensors,
DTensors, a dispatch mode's interception (e.g. a FLOP counter) and `torch.compile` tracing never get here. Imports
torch, transformers and huggingface_hub only (this folder is copied next to saved checkpoints as remote code).
"""

import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from transformers.utils import logging

logger = logging.get_logger(__name__)

PIN_ENV = "HF_MOE_AUTO_KERNEL"
CACHE_ENV = "HF_MOE_CACHE"
CALIBRATE = "calibrate"
CACHE_FILE = "experts_kernels.json"
MAX_TIMED_TOKENS = 256  # calls of more tokens are timed at this many: the ranking settles as the blocks grow
_FORMAT = 4  # of the JSON file; other formats' decisions are timed again (format 1: timed in a thread of its own;
# 2: the median of as few as 2 calls; 3: before `sorted_mm/torch.mm` ran one-token calls' experts in pairs)
# Timed calls per candidate: at least `_MIN_ROUNDS`, more while the rounds take under `_ROUNDS_BUDGET_S`. Each keeps
# its fastest call: the noise of a shared machine (page faults of fresh gradient buffers, other processes) only adds
# time. Training calls of a fine-grained layer (DeepSeek-like, 16 tokens, kernels 6-10% apart) picked the fastest
# kernel in 6 of 6 timings with the fastest of 5 calls and in 3 of 6 with the median of 2, in a one-off run where each
# call took about 300 ms with its page faults; where they took about 100 ms every rule picked it 8 of 8 times
# (BENCHMARKS.md, "What "auto" picked on the Zen 4"; `benchmarks/auto_choice.py --training` compares the rules).
_MIN_ROUNDS, _MAX_ROUNDS = 5, 9
_ROUNDS_BUDGET_S = 0.2
_DROP_AFTER_WARMUP = 3.0  # a candidate whose warm-up took this many times the fastest warm-up is not timed further
# the weights transformers' kernels and ours read, as `@use_experts_implementation` modules name them
_WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias")

Kernel = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_decisions: dict[tuple, tuple[str, str]] = {}  # (cache folder, what the key depends on) -> (key, kernel)
_unwritable: set[Path] = set()  # cache files that could not be written (warned once)


def pinned_kernel(kernels: Iterable[str]) -> str | None:
    """The kernel `HF_MOE_AUTO_KERNEL` pins "auto" to, or None where it is unset or `calibrate` (measure);
    ValueError naming the allowed values for anything else."""
    value = os.environ.get(PIN_ENV, "").strip()
    if value in ("", CALIBRATE):
        return None
    if value not in kernels:
        allowed = ", ".join([CALIBRATE, *kernels])
        raise ValueError(f"{PIN_ENV}={value!r} is not an experts kernel \"auto\" can run; allowed: {allowed}")
    return value


def token_bucket(tokens: int) -> int:
    """`tokens` rounded up to a power of two, at most `MAX_TIMED_TOKENS`: the token count that a call is timed at."""
    return min(1 << max(tokens - 1, 0).bit_length(), MAX_TIMED_TOKENS)


def gradients_needed(experts: nn.Module, hidden_states: torch.Tensor, top_k_weights: torch.Tensor) -> str:
    """"none" (inference), "inputs" (autograd records the call, the expert weights are frozen) or "weights"."""
    if not torch.is_grad_enabled():
        return "none"
    weights = list(experts._parameters.values())
    parametrizations = experts._modules.get("parametrizations")  # LoRA's on the weights, for one
    for module in parametrizations.modules() if parametrizations is not None else ():
        # parameters, and tensors held as plain attributes (peft's LoRA proxy keeps its factors so)
        weights += [*module._parameters.values(), *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
    if any(weight is not None and weight.requires_grad for weight in weights):
        return "weights"
    return "inputs" if hidden_states.requires_grad or top_k_weights.requires_grad else "none"


def timeable(experts: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether a call can be timed: on a CPU, with plain tensors (a DTensor's operations, under tensor parallelism,
    may talk to other ranks, which are not timing), outside torch dispatch modes (which would intercept the timing's
    operations too). Not under `torch.compile`: the caller checks that first."""
    return hidden_states.device.type == "cpu" and not is_in_torch_dispatch_mode() and all(
        type(tensor) in (torch.Tensor, nn.Parameter) for tensor in (hidden_states, _stored(experts, "down_proj")))


@functools.cache
def cpu_identity() -> tuple[str, str | None, str | None]:
    """(model name, family, model) of this CPU from /proc/cpuinfo; (the platform's processor name, None, None) where it
    cannot be read."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        return fields["model name"], fields["cpu family"], fields["model"]
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine() or "unknown CPU", None, None


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (which tell CPU generations apart under one name)."""
    name, family, model = cpu_identity()
    return name if family is None else f"{name} (family {family}, model {model})"


def _cache_folder() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("HF_HOME") or hub_constants.HF_HOME, "hf_moe")


def cache_path() -> Path:
    """The JSON file of decisions: in `$HF_MOE_CACHE`, else in `$HF_HOME/hf_moe`."""
    return Path(_cache_folder()).expanduser() / CACHE_FILE


def choose_kernel(experts: nn.Module, hidden_states: torch.Tensor, top_k: int, gradients: str,
                  candidates: dict[str, Kernel], fallback: str) -> str:
    """The name of the fastest of `candidates` (name -> experts forward, each applicable to `experts`) for this
    call's key: from memory, else from the cache file, else timed now. `gradients`: `gradients_needed`'s answer;
    `fallback` where timing fails."""
    if len(candidates) == 1:
        return next(iter(candidates))
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    folder, weight = _cache_folder(), _stored(experts, "down_proj")
    memo = (folder, torch.get_num_threads(), hidden_states.dtype, weight.dtype, autocast, hidden_states.shape[-1],
            weight.shape, top_k, gradients, token_bucket(hidden_states.shape[0]), *candidates)  # the key's fields, fast
    if (known := _decisions.get(memo)) is not None:
        return known[1]
    fields = decision_key(experts, hidden_states, top_k, gradients, candidates, autocast)
    key = "; ".join(f"{name}={value}" for name, value in fields.items())
    path = Path(folder).expanduser() / CACHE_FILE
    stored = _read(path).get(key, {}).get("kernel")
    if stored in candidates:
        logger.info(f"experts kernel \"auto\" runs {stored} for {key} (measured before, {path})")
        _decisions[memo] = (key, stored)
        return stored
    try:
        with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):  # not the caller's hooks
            timings = _time(experts, candidates, hidden_states.dtype, hidden_states.shape[-1], top_k, gradients,
                            fields["tokens"])
    except Exception as error:  # noqa: BLE001 (never fail the forward: the fallback kernel does the work)
        logger.warning(f"experts kernel \"auto\" could not time its candidates for {key} ({error!r}); it runs "
                       f"{fallback}")
        _decisions[memo] = (key, fallback)
        return fallback
    kernel = min(timings, key=timings.get)
    measured = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(timings.items(), key=lambda item: item[1]))
    logger.info(f"experts kernel \"auto\" runs {kernel} for {key} (measured: {measured})")
    _decisions[memo] = (key, kernel)
    _write(path, key, {"kernel": kernel, "ms": {name: round(ms, 4) for name, ms in timings.items()},
                       "timed_tokens": fields["tokens"], "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return kernel


def decision_key(experts: nn.Module, hidden_states: torch.Tensor, top_k: int, gradients: str,
                 candidates: Iterable[str], autocast: torch.dtype | None = None) -> dict[str, object]:
    """The fields a decision is kept under (their order is the key's)."""
    weight = _stored(experts, "down_proj")  # [E, H, I], or [E, I, H] transposed
    dtype = str(hidden_states.dtype).removeprefix("torch.")
    if weight.dtype != hidden_states.dtype:
        dtype += f" x {str(weight.dtype).removeprefix('torch.')}"
    if autocast is not None:
        dtype += f" autocast {str(autocast).removeprefix('torch.')}"
    return {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": dtype,
            "hidden": hidden_states.shape[-1],
            "intermediate": weight.shape[1] if getattr(experts, "is_transposed", False) else weight.shape[-1],
            "experts": experts.num_experts, "top_k": top_k, "gradients": gradients,
            "tokens": token_bucket(hidden_states.shape[0]), "candidates": ",".join(sorted(candidates))}


def chosen_kernels() -> dict[str, str]:
    """key -> kernel for every decision this process made or read, e.g. for a benchmark to print."""
    return dict(_decisions.values())


# ------------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------------

def _stored(experts: nn.Module, name: str) -> torch.Tensor:
    """The weight `name` as stored: a parametrized one (e.g. LoRA-adapted) is not computed."""
    parametrizations = experts._modules.get("parametrizations")  # (not `parametrize.is_parametrized`: at each call)
    if parametrizations is not None and name in parametrizations:
        return parametrizations[name].original
    return getattr(experts, name)


def _weights(experts: nn.Module) -> dict[str, torch.Tensor]:
    """The expert weights the kernels read, by name. A parametrized weight (e.g. a LoRA-adapted one) is computed from
    its parametrization, not read through the module's property: inside `parametrize.cached()`, where peft runs its
    adapted modules, the property would cache the value computed here, and the real call would then read that value,
    computed for the timing, without the adapter's autograd graph (and a checkpointed layer's recomputation, which does
    not time, would save other tensors than its forward)."""
    parametrizations = experts._modules.get("parametrizations")
    weights = {}
    for name in _WEIGHT_NAMES:
        if parametrizations is not None and name in parametrizations:
            weights[name] = parametrizations[name]()
        elif isinstance(value := getattr(experts, name, None), torch.Tensor):
            weights[name] = value
    return weights


def _stand_in(experts: nn.Module, weights_train: bool) -> nn.Module:
    """A shallow copy of `experts` (its class, flags, activation and gate) whose weights are detached views of its
    own, so that no gradient of the timing reaches them (nor their hooks)."""
    cls = parametrize.type_before_parametrizations(experts)
    stand_in = cls.__new__(cls)
    stand_in.__dict__.update(experts.__dict__)
    with torch.no_grad():
        weights = _weights(experts)
    stand_in.__dict__["_parameters"] = {
        name: nn.Parameter(value.detach(), requires_grad=weights_train and value.is_floating_point())
        for name, value in weights.items()}
    stand_in.__dict__["_modules"] = {name: module for name, module in experts._modules.items()
                                     if name != "parametrizations"}
    return stand_in


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _time(experts, candidates, dtype, hidden_size, top_k, gradients, tokens) -> dict[str, float]:
    """Fastest ms of each candidate's timed calls (`_timed_calls`); a candidate not timed further keeps its warm-up
    call's time."""
    warmup, timed = _timed_calls(experts, candidates, dtype, hidden_size, top_k, gradients, tokens)
    return {**warmup, **{name: min(samples) for name, samples in timed.items()}}


def _timed_calls(experts, candidates, dtype, hidden_size, top_k, gradients, tokens,
                 min_rounds: int = _MIN_ROUNDS) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(ms of each candidate's warm-up call, ms of each timed call of the candidates timed further) on synthetic inputs
    of `tokens` tokens: a warm-up call each, then round-robin rounds, at least `min_rounds` and more while they take
    under `_ROUNDS_BUDGET_S` (at most `_MAX_ROUNDS`). A candidate still far behind after a second warm-up call is not
    timed further."""
    generator = torch.Generator().manual_seed(0)  # private: torch's global random state is left alone
    num_experts = experts.num_experts
    hidden = torch.randn(tokens, hidden_size, generator=generator, device="cpu").to(dtype)
    scores = torch.rand(tokens, num_experts, generator=generator, device="cpu")
    if top_k <= num_experts:  # distinct experts per token, as routers pick them
        top_k_weights, top_k_index = scores.topk(top_k, dim=-1)
    else:
        top_k_index = torch.randint(num_experts, (tokens, top_k), generator=generator)
        top_k_weights = torch.rand(tokens, top_k, generator=generator)
    top_k_weights = top_k_weights.softmax(dim=-1).to(dtype)
    grad_output = torch.randn(tokens, hidden_size, generator=generator).to(dtype)
    stand_in = _stand_in(experts, weights_train=gradients == "weights")
    inputs = [hidden.requires_grad_(gradients != "none"), top_k_weights.requires_grad_(gradients != "none")]
    leaves = inputs + [weight for weight in stand_in._parameters.values() if weight.requires_grad]

    def run(forward: Kernel) -> float:
        start = time.perf_counter()
        if gradients == "none":
            with torch.no_grad():
                forward(stand_in, hidden, top_k_index, top_k_weights)
        else:
            output = forward(stand_in, hidden, top_k_index, top_k_weights)
            torch.autograd.grad(output, leaves, grad_output, allow_unused=True)
        return (time.perf_counter() - start) * 1000

    warmup = {name: run(forward) for name, forward in candidates.items()}
    for name, ms in warmup.items():  # a first call may carry one-time costs (oneDNN compiling its kernels): again
        if ms > _DROP_AFTER_WARMUP * min(warmup.values()):
            warmup[name] = run(candidates[name])
    timed = {name: [] for name, ms in warmup.items() if ms <= _DROP_AFTER_WARMUP * min(warmup.values())}
    start = time.perf_counter()
    for rounds in range(1, _MAX_ROUNDS + 1):
        for name, samples in timed.items():
            samples.append(run(candidates[name]))
        if rounds >= min_rounds and time.perf_counter() - start > _ROUNDS_BUDGET_S:
            break
    return warmup, timed


# ------------------------------------------------------------------------------------------------------------------
# The cache file
# ------------------------------------------------------------------------------------------------------------------

def _read(path: Path) -> dict[str, dict]:
    """key -> entry from the cache file; empty (with a warning) where it is unreadable or not ours."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        logger.warning(f"cannot read the experts kernel choices in {path} ({error}); timing the kernels again")
        return {}
    try:
        content = json.loads(text)
        if isinstance(content, dict) and content.get("format", _FORMAT) != _FORMAT:
            logger.info(f"the experts kernel choices in {path} were timed by another version of hf-moe; timing "
                        f"again")
            return {}
        entries = content["decisions"]
        if not all(isinstance(entry, dict) and isinstance(entry.get("kernel"), str) for entry in entries.values()):
            raise TypeError("an entry without a kernel name")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning(f"ignoring the corrupt experts kernel choices in {path} ({error!r}); timing the kernels "
                       f"again and rewriting the file")
        return {}
    return entries


def _write(path: Path, key: str, entry: dict) -> None:
    """Add `entry` under `key` to the cache file (re-read first: other processes may have added theirs), through a
    temporary file in the same folder and `os.replace`, so that a reader never sees half a file."""
    if path in _unwritable:
        return
    temporary = None
    try:
        entries = {**_read(path), key: entry}
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(descriptor, "w") as file:
            json.dump({"format": _FORMAT, "decisions": entries}, file, indent=1, sort_keys=True)
        os.chmod(temporary, 0o644)  # mkstemp's 0o600 would hide the choices from the other users of a shared cache
        os.replace(temporary, path)
    except OSError as error:
        _unwritable.add(path)
        logger.warning(f"cannot write the experts kernel choices to {path} ({error}); they are kept in memory only "
                       f"(set {CACHE_ENV} to a writable folder to keep them)")
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
