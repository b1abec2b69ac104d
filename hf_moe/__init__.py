"""hf-moe: mixture-of-experts decoders, converters and LoRA-expert fine-tuning for the Hugging Face stack.

Importing the package registers the model types `hf_moe_mixtral` and `hf_moe_deepseek` with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained` loads our checkpoints without `trust_remote_code`.
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

from .finetune.lora_moe import LoraMoeConfig, MixLoraConfig, MolaConfig, register_lora_moe_methods
from .finetune.trainer import MoERouterCallback, add_router_callback
from .modeling.configuration_hf_moe import DeepSeekMoEConfig, MixtralMoEConfig, list_presets
from .modeling.modeling_hf_moe import (
    DeepSeekMoEForCausalLM,
    DeepSeekMoEForSequenceClassification,
    DeepSeekMoEModel,
    MixtralMoEForCausalLM,
    MixtralMoEForSequenceClassification,
    MixtralMoEModel,
)
from .modeling.routing import collect_router_statistics, update_router_bias
from .registration import register_auto_classes

__version__ = "0.1.0"

register_auto_classes()
register_lora_moe_methods()  # MIXLORA, LORAMOE, MOLA: get_peft_model / PeftModel.from_pretrained find them

__all__ = [
    "MixtralMoEConfig",
    "MixtralMoEModel",
    "MixtralMoEForCausalLM",
    "MixtralMoEForSequenceClassification",
    "DeepSeekMoEConfig",
    "DeepSeekMoEModel",
    "DeepSeekMoEForCausalLM",
    "DeepSeekMoEForSequenceClassification",
    "list_presets",
    "collect_router_statistics",
    "update_router_bias",
    "MoERouterCallback",
    "add_router_callback",
    "MixLoraConfig",
    "LoraMoeConfig",
    "MolaConfig",
]
