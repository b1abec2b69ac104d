"""Tensor and expert parallelism through `from_pretrained(distributed_config=...)`: logits, one SGD step, logits again.

Ranks that share a tensor-parallel group read the same batch; the others read their own (`batch_for_rank`). Rank 0
writes, per model folder, the logits before and after the step of every data-parallel batch and every parameter
after the step, as full tensors.

    torchrun --nproc_per_node 2 -m distributed.parallel_worker OUT_DIR MODEL_DIR [MODEL_DIR ...] --tp-size 2
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import random_input_ids
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import hf_moe  # noqa: F401  (registers the model types)

from .results import exit_worker, write_results

LEARNING_RATE = 0.5
BATCHES = [random_input_ids(2, 8, seed=seed) for seed in (1, 2)]


def batch_for_rank(rank: int, tp_size: int) -> torch.Tensor:
    """The ranks of one tensor-parallel group hold the same batch."""
    return BATCHES[rank // tp_size]


def gathered(tensor: torch.Tensor, tp_size: int) -> torch.Tensor:
    """[data-parallel batches, ...]: one copy of each batch's tensor, in batch order."""
    copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, tensor.contiguous())
    return torch.stack(copies[::tp_size])


def run(model_dir: str, distributed_config: DistributedConfig) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=distributed_config)
    tp_size = distributed_config.tp_size
    input_ids = batch_for_rank(dist.get_rank(), tp_size)
    results = {}
    with torch.no_grad():
        results["logits"] = gathered(model.eval()(input_ids).logits, tp_size)
    model.train()
    model(input_ids, labels=input_ids, output_router_logits=True).loss.backward()
    torch.optim.SGD(model.parameters(), lr=LEARNING_RATE).step()
    with torch.no_grad():
        results["logits_after_step"] = gathered(model.eval()(input_ids).logits, tp_size)
    for name, param in model.named_parameters():
        results[f"parameters.{name}"] = param.full_tensor() if isinstance(param, DTensor) else param.detach()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("model_dirs", nargs="+")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--ep-size", type=int, default=1)
    parser.add_argument("--fsdp-size", type=int, default=1)
    options = parser.parse_args()
    tensors = {}
    for model_dir in options.model_dirs:
        config = DistributedConfig(tp_size=options.tp_size, ep_size=options.ep_size, fsdp_size=options.fsdp_size)
        results = run(model_dir, config)
        tensors.update({f"{Path(model_dir).name}.{key}": value for key, value in results.items()})
    if dist.get_rank() == 0:
        write_results(options.out_dir, tensors)
    exit_worker()


if __name__ == "__main__":
    main()
