"""Results of a worker run: tensors in `tensors.safetensors`, everything else in `results.json`; and its exit."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


def write_results(folder: str | Path, tensors: dict[str, torch.Tensor], **values) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
              folder / "tensors.safetensors")
    (folder / "results.json").write_text(json.dumps(values, indent=1))


def read_results(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    return load_file(folder / "tensors.safetensors"), json.loads((folder / "results.json").read_text())


def exit_worker() -> None:
    """Destroy the process group, then leave without the interpreter's finalization.

    With the process group destroyed, a rank can still abort at exit ("terminate called without an active exception",
    SIGABRT from a thread with no Python frame) while the interpreter tears down torch's native state: seen about once
    in 50 tensor-parallel runs on a loaded 2-core machine, after rank 0 had written its results. Nothing is left to
    run at that point, so the worker flushes its output and ends the process itself.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
