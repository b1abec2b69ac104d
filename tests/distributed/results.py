"""Results of a worker run: tensors in `tensors.safetensors`, everything else in `results.json`."""

import json
from pathlib import Path

import torch
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
