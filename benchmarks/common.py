"""Shared measurement helpers: round-robin repeats in one process, medians, the machine, BENCHMARKS.md sections.

Run benchmarks with a warmed allocator (WARMED_MALLOC), e.g.
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 python ...
(glibc otherwise returns large buffers to the OS and page-faults them back, adding 30-60% noise). Buffers above the
32 MB threshold are still fresh pages on every allocation: page_faults.py measures what that costs. README's setting
for CPU training adds MALLOC_MMAP_MAX_=0 (glibc keeps those too); the training benchmarks then write sections of their
own (`allocator_names`).
"""

import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# glibc keeps freed memory for reuse: the largest mmap threshold it takes (32 MB), no trimming, 1 GB of heap headroom
WARMED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                 "MALLOC_TOP_PAD_": "1073741824"}


def machine_description(malloc: str | None = None) -> str:
    """The CPU, cores, torch, threads and allocator settings (`malloc`: where the measuring processes' settings are not
    this process's)."""
    cpu = cpu_model()[1]
    if malloc is None:
        malloc = "warmed malloc" if all(os.environ.get(name) for name in WARMED_MALLOC) else "default malloc"
        malloc += allocator_names()[1]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_initialized() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{malloc}{gpu}")


def cpu_model() -> tuple[str, str]:
    """(a section-name tag, words) for this CPU, e.g. ("amd-epyc-f25-m17", "AMD EPYC (family 25, model 17)"): the
    family and model numbers tell CPU generations apart under one model name (Zen 4 and Zen 5 EPYCs are both "AMD
    EPYC"). The words are the CPU of "auto"'s kernel choices (kernel_choice.cpu_name)."""
    from hf_moe.modeling.kernel_choice import cpu_identity, cpu_name
    name, family, model = cpu_identity()
    tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"
    return (tag if family is None else f"{tag}-f{family}-m{model}"), cpu_name()


def onednn_linear():
    """torch's oneDNN linear, as `sorted_mm` calls it (hf_moe/modeling/experts_kernels.py), for the scripts that compare
    it with `torch.mm`; exits where this machine has none (off x86-64, or torch without oneDNN)."""
    from hf_moe.modeling.experts_kernels import _onednn_linear
    if _onednn_linear is None:
        raise SystemExit("this torch has no oneDNN linear on this machine: nothing to compare")
    return _onednn_linear


# the matrix library of each kernel "auto" chooses from, for fp32 on x86-64 (torch's fp32 `mm`, `bmm` and
# `_grouped_mm` call MKL there; `sorted_mm` calls oneDNN); in bf16 torch's own products go through oneDNN too
KERNEL_LIBRARIES = {"sorted_mm": "oneDNN", "sorted_mm/torch.mm": "MKL", "grouped_mm": "MKL", "batched_mm": "MKL"}


def auto_choices() -> str:
    """Which kernel "auto" (our models' default) ran for each shape it met in this process, and its matrix library,
    as Markdown bullets (on a CPU it times the candidates at the first call of each shape:
    hf_moe/modeling/kernel_choice.py). Printed by the scripts that run "ours auto", and written under their tables."""
    from hf_moe.modeling.kernel_choice import CALIBRATE, PIN_ENV, chosen_kernels
    if os.environ.get(PIN_ENV, CALIBRATE).strip() not in ("", CALIBRATE):
        return f"\"auto\" was pinned to `{os.environ[PIN_ENV].strip()}` ({PIN_ENV})."
    lines = []
    for key, kernel in chosen_kernels().items():
        fields = dict(part.split("=", 1) for part in key.split("; "))
        library = KERNEL_LIBRARIES.get(kernel, "?") if fields["dtype"] == "float32" else "oneDNN"
        lines.append(f"- {fields['dtype']}, H {fields['hidden']}, {fields['experts']} experts of "
                     f"{fields['intermediate']}, top-{fields['top_k']}, gradients: {fields['gradients']}, token bucket "
                     f"{fields['tokens']} (candidates {fields['candidates']}): `{kernel}` ({library})")
    if not lines:
        return ""
    return "\"auto\" ran (timed on this machine at the first call of each shape):\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# The fair floor: the dense floor's FFN products on the matrix library the MoE's experts run on
# ------------------------------------------------------------------------------------------------------------------

def fair_floor_applies(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether the fair floor differs from torch's own floor: fp32 on an x86-64 CPU with oneDNN, where `sorted_mm`
    runs its products through oneDNN and torch's `nn.Linear` through MKL. In bf16 torch's `nn.Linear` already calls
    oneDNN, and on a GPU both run cuBLAS: there the floor is the fair floor."""
    from hf_moe.modeling.experts_kernels import _onednn_linear
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _onednn_linear is not None


class _OneDNNLinearFunction(torch.autograd.Function):
    """y = x @ W^T (+ b) with all three products (forward, input gradient, weight gradient) through oneDNN's linear,
    called as `sorted_mm` calls it (src @ weight^T, transposed views where the product needs them)."""

    @staticmethod
    def forward(ctx, inputs, weight, bias):
        rows = inputs.reshape(-1, inputs.shape[-1])  # [N, in]
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.shape = bias is not None, inputs.shape
        out = onednn_linear()(rows, weight, bias, "none", [], "")  # [N, out]
        return out.view(*inputs.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        rows, weight = ctx.saved_tensors
        linear = onednn_linear()
        grad = grad_output.reshape(-1, grad_output.shape[-1])  # [N, out]
        grad_inputs = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # grad @ W = grad @ (W^T)^T
            grad_inputs = linear(grad, weight.t(), None, "none", [], "").view(ctx.shape)
        if ctx.needs_input_grad[1]:  # grad^T @ x = src @ W'^T for src = grad^T, W' = x^T: sums over the N rows
            grad_weight = linear(grad.t(), rows.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=0)
        return grad_inputs, grad_weight, grad_bias


class OneDNNLinear(nn.Linear):
    """nn.Linear whose products (forward and backward) run through oneDNN: what `through_onednn` turns a floor's
    layers into."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (inputs.requires_grad or any(p.requires_grad for p in self.parameters())):
            return _OneDNNLinearFunction.apply(inputs, self.weight, self.bias)
        rows = inputs.reshape(-1, inputs.shape[-1])
        return onednn_linear()(rows, self.weight, self.bias, "none", [], "").view(*inputs.shape[:-1], -1)


def through_onednn(module: nn.Module, select: Callable[[str], bool] = lambda name: True) -> nn.Module:
    """`module` (in place) with each of its nn.Linear layers whose qualified name `select` accepts running through
    oneDNN (OneDNNLinear: same weights, same outputs up to rounding)."""
    for name, layer in module.named_modules():
        if type(layer) is nn.Linear and select(name):
            layer.__class__ = OneDNNLinear
    return module


def check_fair_floor(floor: nn.Module, fair: nn.Module, run: Callable[[nn.Module], torch.Tensor],
                     inputs: torch.Tensor | None = None, tolerance: float = 1e-4) -> None:
    """Assert that the fair floor computes the floor's outputs and gradients up to fp32 rounding: run(module) -> the
    module's output, backpropagated from the same random gradient; compared are the outputs, every parameter's
    gradient and that of `inputs` (a leaf the outputs depend on), each to `tolerance` of its largest magnitude."""
    def close(actual, expected, what):
        scale = tolerance * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual, expected, atol=scale, rtol=tolerance,
                                   msg=lambda message: f"fair floor and floor differ in {what}: {message}")

    results = []
    for module in (floor, fair):
        module.zero_grad(set_to_none=True)
        if inputs is not None:
            inputs.grad = None
        output = run(module)
        output.backward(torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(output))
        results.append((output.detach(), None if inputs is None else inputs.grad,
                        {name: p.grad for name, p in module.named_parameters()}))
    (output, inputs_grad, grads), (fair_output, fair_inputs_grad, fair_grads) = results
    close(fair_output, output, "the outputs")
    if inputs is not None:
        close(fair_inputs_grad, inputs_grad, "the inputs' gradient")
        inputs.grad = None
    assert fair_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert (grad is None) == (fair_grads[name] is None), f"fair floor and floor differ in which {name} get a grad"
        if grad is not None:
            close(fair_grads[name], grad, f"the gradient of {name}")
    for module in (floor, fair):
        module.zero_grad(set_to_none=True)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that wall time covers it (GPU kernels run asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_names(device: str) -> tuple[str, str]:
    """(BENCHMARKS.md section-name suffix, words for the heading) of results measured on `device`: the GPU, or the
    CPU model with its family and model numbers (so that a run on one CPU never replaces another CPU's tables)."""
    if torch.device(device).type == "cpu":
        tag, words = cpu_model()
        return f"-{tag}", f" on {words}"
    return f"-{device}", f" on {torch.cuda.get_device_name(device)}"


def allocator_names() -> tuple[str, str]:
    """(section-name suffix, words) for glibc's allocator setting where it keeps large freed blocks too
    (`MALLOC_MMAP_MAX_=0`, README's setting for CPU training: no fresh, faulted-in pages for the [E, ...] weight
    gradients of each step), else ("", ""): a training table measured that way never replaces one measured without."""
    if os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return "-mmap-off", ", mmap off (MALLOC_MMAP_MAX_=0)"
    return "", ""


def round_robin_medians(candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """Median wall time (ms) of each candidate, measured in turns (a, b, c, a, b, c, ...) so that slow drifts of
    the machine hit every candidate alike. On a GPU each time covers the candidate's kernels too."""
    for _ in range(warmup):
        for run in candidates.values():
            run()
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _section_pattern(name: str) -> re.Pattern:
    """The section `name` of a document: `<!-- name -->`, its body, `<!-- /name -->`."""
    return re.compile(rf"<!-- {re.escape(name)} -->\n?(.*?)<!-- /{re.escape(name)} -->", re.DOTALL)


def read_section(name: str, document: str = "BENCHMARKS.md") -> str | None:
    """The body of the section `name` of `document` as `write_section` wrote it (its Command and Machine lines
    included), or None where there is none."""
    path = ROOT / document
    match = _section_pattern(name).search(path.read_text()) if path.exists() else None
    return match.group(1) if match else None


def write_section(name: str, body: str, document: str = "BENCHMARKS.md", machine: str | None = None) -> None:
    """Replace (or append) the section between `<!-- name -->` markers in `document` (BENCHMARKS.md: speed and
    memory; QUALITY.md: the quality studies). `machine`: the machine line, `machine_description()` by default."""
    path = ROOT / document
    text = path.read_text() if path.exists() else f"# {Path(document).stem.title()}\n"
    script = Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix()
    command = " ".join(["python", script, *sys.argv[1:]])
    block = (f"<!-- {name} -->\n{body}\n\nCommand: `{command}`  \nMachine: {machine or machine_description()}\n"
             f"<!-- /{name} -->")
    pattern = _section_pattern(name)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
