"""hf-moe: mixture-of-experts decoders, converters and LoRA-expert fine-tuning for the Hugging Face stack.

Importing the package registers the model types `hf_moe_mixtral` and `hf_moe_deepseek` with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained` loads our checkpoints without `trust_remote_code`, and registers
the PEFT methods MIXLORA, LORAMOE and MOLA with peft as soon as peft is imported (peft itself is not imported here).
"""

import os as _os
import sys as _sys

if _os.path.basename(_sys.argv[0]) == "hf-moe":  # the command: Ctrl-C while the libraries load needs no traceback
    def _quiet_interrupt(kind, value, traceback, default=_sys.excepthook):
        if issubclass(kind, KeyboardInterrupt):
            print("hf-moe: interrupted", file=_sys.stderr)
        else:
            default(kind, value, traceback)

    _sys.excepthook = _quiet_interrupt

from .modeling.configuration_hf_moe import DeepSeekMoEConfig, MixtralMoEConfig, list_presets
from .modeling.modeling_hf_moe import (
    DeepSeekMoEForCausalLM,
    DeepSeekMoEForQuestionAnswering,
    DeepSeekMoEForSequenceClassification,
    DeepSeekMoEForTokenClassification,
    DeepSeekMoEModel,
    MixtralMoEForCausalLM,
    MixtralMoEForQuestionAnswering,
    MixtralMoEForSequenceClassification,
    MixtralMoEForTokenClassification,
    MixtralMoEModel,
)
from .modeling.routing import collect_router_statistics, update_router_bias
from .registration import (
    register_auto_classes,
    register_checkpoint_conversions,
    register_peft_methods_when_peft_is_imported,
)

__version__ = "0.1.0"

register_auto_classes()
register_checkpoint_conversions()
# MIXLORA, LORAMOE, MOLA, MOELORA: get_peft_model / PeftModel.from_pretrained find them. peft takes seconds to import, so they
# are registered when peft is imported (now, if it already is).
register_peft_methods_when_peft_is_imported()

# Imported on first use: they need peft or transformers' Trainer (seconds of imports the command line and plain model
# loading do not need).
_LAZY = {
    "MixLoraConfig": "finetune.lora_moe",
    "LoraMoeConfig": "finetune.lora_moe",
    "MolaConfig": "finetune.lora_moe",
    "MoeLoraConfig": "finetune.lora_moe",
    "ExpertGateConfig": "finetune.lora_moe",
    "MixtureOfLorasConfig": "finetune.lora_moe",
    "MocleConfig": "finetune.lora_moe",
    "PescConfig": "finetune.lora_moe",
    "MoERouterCallback": "finetune.trainer",
    "add_router_callback": "finetune.trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "DeepSeekMoEConfig",
    "DeepSeekMoEForCausalLM",
    "DeepSeekMoEForQuestionAnswering",
    "DeepSeekMoEForSequenceClassification",
    "DeepSeekMoEForTokenClassification",
    "DeepSeekMoEModel",
    "ExpertGateConfig",
    "LoraMoeConfig",
    "MixLoraConfig",
    "MixtralMoEConfig",
    "MixtralMoEForCausalLM",
    "MixtralMoEForQuestionAnswering",
    "MixtralMoEForSequenceClassification",
    "MixtralMoEForTokenClassification",
    "MixtralMoEModel",
    "MixtureOfLorasConfig",
    "MoERouterCallback",
    "MocleConfig",
    "MoeLoraConfig",
    "MolaConfig",
    "PescConfig",
    "add_router_callback",
    "collect_router_statistics",
    "list_presets",
    "update_router_bias",
]
