"""Shared measurement helpers: round-robin repeats in one process, medians, the machine, BENCHMARKS.md sections.

Run benchmarks with a warmed allocator (WARMED_MALLOC), e.g.
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=1073741824 python ...
(glibc otherwise returns large buffers to the OS and page-faults them back, adding 30-60% noise). Buffers above the
32 MB threshold are still fresh pages on every allocation: page_faults.py measures what that costs.
"""

import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# glibc keeps freed memory for reuse: the largest mmap threshold it takes (32 MB), no trimming, 1 GB of heap headroom
WARMED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                 "MALLOC_TOP_PAD_": "1073741824"}


def machine_description(malloc: str | None = None) -> str:
    """The CPU, cores, torch, threads and allocator settings (`malloc`: where the measuring processes' settings are not
    this process's)."""
    cpu = platform.processor() or platform.machine()
    try:  # the model name, and the family and model numbers that tell CPU generations apart under one name
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        cpu = f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError, ValueError):
        pass
    if malloc is None:
        malloc = "warmed malloc" if all(os.environ.get(name) for name in WARMED_MALLOC) else "default malloc"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_initialized() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{malloc}{gpu}")


def onednn_linear():
    """torch's oneDNN linear, as `sorted_mm` calls it (hf_moe/modeling/experts_kernels.py), for the scripts that compare
    it with `torch.mm`; exits where this machine has none (off x86-64, or torch without oneDNN)."""
    from hf_moe.modeling.experts_kernels import _onednn_linear
    if _onednn_linear is None:
        raise SystemExit("this torch has no oneDNN linear on this machine: nothing to compare")
    return _onednn_linear


def auto_choices() -> str:
    """Which kernel "auto" (our models' default) ran for each shape it met in this process, as Markdown bullets (on a
    CPU it times the candidates at the first call of each shape: hf_moe/modeling/kernel_choice.py). Printed by the
    scripts that run "ours auto", and written under their tables."""
    from hf_moe.modeling.kernel_choice import CALIBRATE, PIN_ENV, chosen_kernels
    if os.environ.get(PIN_ENV, CALIBRATE).strip() not in ("", CALIBRATE):
        return f"\"auto\" was pinned to `{os.environ[PIN_ENV].strip()}` ({PIN_ENV})."
    lines = []
    for key, kernel in chosen_kernels().items():
        fields = dict(part.split("=", 1) for part in key.split("; "))
        lines.append(f"- {fields['dtype']}, H {fields['hidden']}, {fields['experts']} experts of "
                     f"{fields['intermediate']}, top-{fields['top_k']}, gradients: {fields['gradients']}, token bucket "
                     f"{fields['tokens']} (candidates {fields['candidates']}): `{kernel}`")
    if not lines:
        return ""
    return "\"auto\" ran (timed on this machine at the first call of each shape):\n" + "\n".join(lines)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that wall time covers it (GPU kernels run asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_names(device: str) -> tuple[str, str]:
    """(BENCHMARKS.md section-name suffix, words for the heading) of results measured on `device`; none for the CPU."""
    if torch.device(device).type == "cpu":
        return "", ""
    return f"-{device}", f" on {torch.cuda.get_device_name(device)}"


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


def write_section(name: str, body: str, document: str = "BENCHMARKS.md", machine: str | None = None) -> None:
    """Replace (or append) the section between `<!-- name -->` markers in `document` (BENCHMARKS.md: speed and
    memory; QUALITY.md: the quality studies). `machine`: the machine line, `machine_description()` by default."""
    path = ROOT / document
    text = path.read_text() if path.exists() else f"# {Path(document).stem.title()}\n"
    script = Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix()
    command = " ".join(["python", script, *sys.argv[1:]])
    block = (f"<!-- {name} -->\n{body}\n\nCommand: `{command}`  \nMachine: {machine or machine_description()}\n"
             f"<!-- /{name} -->")
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
