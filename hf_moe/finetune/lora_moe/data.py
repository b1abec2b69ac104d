"""LoRAMoE's per-sample types, from a dataset column to the `lora_moe_type_ids` forward kwarg.

    collator = TypeIdsCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False), column="task_type")
    args = TrainingArguments(..., remove_unused_columns=False)   # Trainer drops columns the forward does not name
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)

Each example's `column` value (an int type, e.g. 1 = world-knowledge sample, 0 = other, as in LoRAMoE's data) is
removed from the example before the wrapped collator runs, and the batch gets `lora_moe_type_ids` [batch_size] long.
"""

import torch
from transformers import default_data_collator

from .aux_loss import TYPE_IDS_KWARG


class TypeIdsCollator:
    """Wraps a data collator and adds `lora_moe_type_ids` from the per-example `column`."""

    def __init__(self, collator=None, column: str = "task_type"):
        self.collator = collator or default_data_collator
        self.column = column

    def __call__(self, examples: list[dict]) -> dict:
        missing = [index for index, example in enumerate(examples) if self.column not in example]
        if missing:
            raise ValueError(f"examples {missing} have no `{self.column}` column (LoRAMoE's type ids): add it to the "
                             f"dataset and pass remove_unused_columns=False to TrainingArguments.")
        types = [int(example[self.column]) for example in examples]
        batch = self.collator([{key: value for key, value in example.items() if key != self.column}
                               for example in examples])
        batch[TYPE_IDS_KWARG] = torch.tensor(types, dtype=torch.long)
        return batch
