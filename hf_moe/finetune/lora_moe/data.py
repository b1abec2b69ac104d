"""Per-sample ids from a dataset column to a forward kwarg: LoRAMoE's types (`lora_moe_type_ids`) and the task ids
(`task_ids`) of MOELoRA, Mixture-of-LoRAs, Expert Gate and the MMoE task gates of MixLoRA, LoRAMoE and MoLA.

    collator = TypeIdsCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False), column="task_type")
    args = TrainingArguments(..., remove_unused_columns=False)   # Trainer drops columns the forward does not name
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)

Each example's `column` value (an int type, e.g. 1 = world-knowledge sample, 0 = other, as in LoRAMoE's data) is
removed from the example before the wrapped collator runs, and the batch gets `lora_moe_type_ids` [batch_size] long;
`TaskIdsCollator` does the same with `task_ids` (the column holding the int task ids).
"""

import torch
from transformers import default_data_collator

from .aux_loss import TYPE_IDS_KWARG
from .model import TASK_IDS_KWARG


class TypeIdsCollator:
    """Wraps a data collator and adds `lora_moe_type_ids` from the per-example `column`."""

    key, role = TYPE_IDS_KWARG, "LoRAMoE's type ids"

    def __init__(self, collator=None, column: str = "task_type"):
        self.collator = collator or default_data_collator
        self.column = column

    def __call__(self, examples: list[dict]) -> dict:
        missing = [index for index, example in enumerate(examples) if self.column not in example]
        if missing:
            raise ValueError(f"examples {missing} have no `{self.column}` column ({self.role}): add it to the "
                             f"dataset and pass remove_unused_columns=False to TrainingArguments.")
        types = [int(example[self.column]) for example in examples]
        batch = self.collator([{key: value for key, value in example.items() if key != self.column}
                               for example in examples])
        batch[self.key] = torch.tensor(types, dtype=torch.long)
        return batch


class TaskIdsCollator(TypeIdsCollator):
    """Wraps a data collator and adds `task_ids` from the per-example int `column`."""

    key, role = TASK_IDS_KWARG, "the task ids"

    def __init__(self, collator=None, column: str = "task_ids"):
        super().__init__(collator, column)
