"""Trainer runs: data-parallel (DDP), FSDP2 sharded at load time, and LoRA-expert fine-tunes (MixLoRA, Expert Gate).

Every optimizer step takes ROWS_PER_STEP rows in micro-batches of one row, with as many gradient-accumulation steps
as the processes leave: 2 processes x 2 steps under torchrun, 1 process x 4 steps for the reference. Accelerate gives
rank r the micro-batches r, r + 2, ..., so both runs see the same rows in each optimizer step. Plain SGD, so the runs
must agree to float rounding.

    torchrun --nproc_per_node 2 -m distributed.train_worker MODEL_DIR OUT_DIR [--sharding fsdp2]
        [--adapter {mixlora,expert_gate,expert_gate_calibrated}]
        [--sync-each-batch]
"""

import argparse
import os

import torch
from conftest import random_input_ids
from datasets import Dataset
from peft import get_peft_model
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from transformers.distributed import DistributedConfig

import hf_moe
from hf_moe import ExpertGateConfig, MixLoraConfig
from hf_moe.finetune.lora_moe import TaskIdsCollator, add_lora_moe_callback
from hf_moe.finetune.lora_moe.expert_gate import calibrate_feature_statistics

from .results import exit_worker, write_results

ROWS_PER_STEP = 4
STEPS = 4
SEQ_LEN = 8
SHARDINGS = ("ddp", "fsdp2")
# Expert Gate's standardisation statistics come from the training forwards ("expert_gate") or from
# `calibrate_feature_statistics` before training, each rank on its own rows ("expert_gate_calibrated")
ADAPTERS = ("mixlora", "expert_gate", "expert_gate_calibrated")
PROMPT = 3  # Expert Gate's rows: the first PROMPT tokens are the prompt (label -100) its gate reads


def training_rows(adapter: str = "") -> list[dict]:
    """STEPS * ROWS_PER_STEP rows; row i ends in i % 3 padding positions, so the ranks count different label totals.
    For Expert Gate each row also has a prompt (PROMPT tokens without labels) and a task, i % 3."""
    rows = []
    for index, tokens in enumerate(random_input_ids(STEPS * ROWS_PER_STEP, SEQ_LEN, seed=3).tolist()):
        real = SEQ_LEN - index % 3
        padding = SEQ_LEN - real
        rows.append({
            "input_ids": tokens[:real] + [0] * padding,
            "attention_mask": [1] * real + [0] * padding,
            "labels": tokens[:real] + [-100] * padding,
        })
        if adapter.startswith("expert_gate"):
            rows[-1]["labels"][:PROMPT] = [-100] * PROMPT
            rows[-1]["task"] = index % 3
    return rows


def adapter_config(adapter: str):
    if adapter == "mixlora":
        return MixLoraConfig(task_type="CAUSAL_LM", num_experts=4, top_k=2, r=4, lora_dropout=0.0,
                             router_aux_loss_coef=0.01)
    # the statistics take 5 prompts: rows 0-3, then row 4, which only rank 0 contributes
    return ExpertGateConfig(task_type="CAUSAL_LM", task_names=["a", "b", "c"], r=4, lora_dropout=0.0,
                            autoencoder_dim=8, statistics_samples=5)


def load_model(model_dir: str, sharding: str, adapter: str | None, world_size: int):
    if sharding == "fsdp2" and world_size > 1:
        # sharded at load time; Trainer then leaves placement and gradient reduction to the model
        distributed_config = DistributedConfig(fsdp_size=world_size)
        model = AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=distributed_config)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        torch.manual_seed(0)
        model = get_peft_model(model, adapter_config(adapter))
        with torch.no_grad():  # every adapter tensor random (LoRA B included), the same on every rank
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(0.1 * torch.randn_like(param))
    return model


def train(model_dir: str, output_dir: str, sharding: str = "ddp", adapter: str | None = None, world_size: int = 1,
          sync_each_batch: bool = False):
    """STEPS optimizer steps of SGD on `training_rows()` -> (trained parameters as full tensors, the router biases
    and Expert Gate's feature statistics, Trainer's log history, how the model was trained). `sync_each_batch`:
    reduce gradients after every micro-batch instead of once per optimizer step (DDP then also broadcasts the buffers
    before every forward)."""
    model = load_model(model_dir, sharding, adapter, world_size)
    expert_gate = adapter is not None and adapter.startswith("expert_gate")
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=ROWS_PER_STEP // world_size,
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": sync_each_batch}},
        max_steps=STEPS,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        seed=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=not expert_gate,  # its collator turns the task column into task_ids
    )
    rows = training_rows(adapter or "")
    if adapter == "expert_gate_calibrated":  # one row per batch; rank r takes rows r, r + world_size, ...
        rank = torch.distributed.get_rank() if world_size > 1 else 0
        batches = [{name: torch.tensor([row[name]]) for name in ("input_ids", "attention_mask", "labels")}
                   for row in rows[rank::world_size]]
        calibrate_feature_statistics(model, batches)
    collator = TaskIdsCollator(column="task") if expert_gate else None
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator)
    if adapter is not None:
        add_lora_moe_callback(trainer)
    else:
        hf_moe.add_router_callback(trainer)
    trainer.train()
    parameters = {
        name: (param.full_tensor() if isinstance(param, DTensor) else param).detach()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    biases = {name: buffer for name, buffer in model.named_buffers()
              if name.endswith("e_score_correction_bias") or ".expert_gate_feature_" in name}
    setup = {
        "wrapper": type(trainer.model_wrapped).__name__,
        "sharded_parameters": sum(isinstance(param, DTensor) for param in model.parameters()),
    }
    return parameters | biases, trainer.state.log_history, setup


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--sharding", choices=SHARDINGS, default="ddp")
    parser.add_argument("--adapter", choices=ADAPTERS)
    parser.add_argument("--sync-each-batch", action="store_true")
    options = parser.parse_args()
    tensors, log_history, setup = train(
        options.model_dir, os.path.join(options.out_dir, "trainer"), options.sharding, options.adapter,
        int(os.environ["WORLD_SIZE"]), options.sync_each_batch,
    )
    if torch.distributed.get_rank() == 0:
        write_results(options.out_dir, tensors, log_history=log_history, **setup)
    exit_worker()


if __name__ == "__main__":
    main()
