"""Registration of our model types with transformers' Auto classes, in-process and for remote code.

In-process: `AutoConfig.register` / `AutoModel*.register`, so that loading needs no `trust_remote_code`.
Remote code: every class is marked with `register_for_auto_class`, so `save_pretrained` copies the flat modeling
files next to the weights; the configs themselves carry an `auto_map` entry for every Auto class (see
`remote_code_auto_map`), so that a process without hf_moe loads any head of the folder with `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .modeling import configuration_hf_moe, modeling_hf_moe

FAMILIES = {
    "MixtralMoE": configuration_hf_moe.MixtralMoEConfig,
    "DeepSeekMoE": configuration_hf_moe.DeepSeekMoEConfig,
}
# Auto class -> class-name suffix
AUTO_CLASSES = {
    AutoModel: "Model",
    AutoModelForCausalLM: "ForCausalLM",
    AutoModelForSequenceClassification: "ForSequenceClassification",
}


def register_auto_classes() -> None:
    for family, config_class in FAMILIES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class("AutoConfig")
        for auto_class, suffix in AUTO_CLASSES.items():
            model_class = getattr(modeling_hf_moe, f"{family}{suffix}")
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)
