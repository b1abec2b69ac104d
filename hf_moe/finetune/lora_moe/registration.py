"""Registration of MIXLORA, LORAMOE and MOLA as PEFT methods, so that stock peft saves and loads them.

PEFT 0.21 keeps its methods in dicts filled by `peft.utils.register_peft_method` (config class, tuner class,
parameter prefix). After `register_lora_moe_methods()` (called by `import hf_moe`):

    get_peft_model(base, MixLoraConfig(...))               # builds the tuner
    PeftModel.from_pretrained(base, folder)                 # adapter_config.json "peft_type": "MIXLORA" -> our classes
    AutoPeftModelForCausalLM.from_pretrained(folder)

peft has no plugin discovery: every process that loads such an adapter must import hf_moe first. Registration is
idempotent; a reloaded module (new class objects) replaces its stale registration.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import LoraMoeConfig, MixLoraConfig, MolaConfig
from .model import LoraMoeModel, MixLoraModel, MolaModel
from .peft_types import LORAMOE, MIXLORA, MOLA

METHODS = {MIXLORA: (MixLoraConfig, MixLoraModel), LORAMOE: (LoraMoeConfig, LoraMoeModel),
           MOLA: (MolaConfig, MolaModel)}


def register_lora_moe_methods() -> None:
    """Make MIXLORA, LORAMOE and MOLA known to peft."""
    for peft_type, (config_class, model_class) in METHODS.items():
        if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_class:
            continue
        PEFT_TYPE_TO_CONFIG_MAPPING.pop(peft_type, None)
        PEFT_TYPE_TO_TUNER_MAPPING.pop(peft_type, None)
        register_peft_method(name=peft_type.lower(), config_cls=config_class, model_cls=model_class,
                             prefix=model_class.prefix)
