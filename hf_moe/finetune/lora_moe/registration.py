"""Registration of MIXLORA, LORAMOE, MOLA and MOELORA as PEFT methods, so that stock peft saves and loads them.

PEFT 0.21 keeps its methods in dicts filled by `peft.utils.register_peft_method` (config class, tuner class,
parameter prefix). After `register_lora_moe_methods()` (called by `import hf_moe`):

    get_peft_model(base, MixLoraConfig(...))               # builds the tuner
    PeftModel.from_pretrained(base, folder)                 # adapter_config.json "peft_type": "MIXLORA" -> our classes
    AutoPeftModelForCausalLM.from_pretrained(folder)

peft has no plugin discovery: every process that loads such an adapter must import hf_moe first. Registration is
idempotent; a reloaded module (new class objects) replaces its stale registration.
"""

import functools

from peft import PeftModelForCausalLM
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import LoraMoeConfig, MixLoraConfig, MoeLoraConfig, MolaConfig
from .expert_gate import EXPERT_GATE, ExpertGateConfig, ExpertGateModel
from .mixture_of_loras import MIXTURE_OF_LORAS, MixtureOfLorasConfig, MixtureOfLorasModel
from .mocle import MOCLE, MocleConfig, MocleModel
from .model import (
    FORWARDED_TASK_IDS_KWARG,
    LoraMoeModel,
    MixLoraModel,
    MoeLoraModel,
    MolaModel,
    generation_task_ids,
    uses_task_ids,
)
from .peft_types import LORAMOE, MIXLORA, MOELORA, MOLA
from .pesc import PESC, PescConfig, PescModel
from .prompt_routing import generation_routing

METHODS = {MIXLORA: (MixLoraConfig, MixLoraModel), LORAMOE: (LoraMoeConfig, LoraMoeModel),
           MOLA: (MolaConfig, MolaModel), MOELORA: (MoeLoraConfig, MoeLoraModel), PESC: (PescConfig, PescModel),
           MIXTURE_OF_LORAS: (MixtureOfLorasConfig, MixtureOfLorasModel), MOCLE: (MocleConfig, MocleModel),
           EXPERT_GATE: (ExpertGateConfig, ExpertGateModel)}


def register_lora_moe_methods() -> None:
    """Make MIXLORA, LORAMOE, MOLA, MOELORA, PESC, MIXTURE_OF_LORAS, MOCLE and EXPERT_GATE known to peft."""
    for peft_type, (config_class, model_class) in METHODS.items():
        if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_class:
            continue
        PEFT_TYPE_TO_CONFIG_MAPPING.pop(peft_type, None)
        PEFT_TYPE_TO_TUNER_MAPPING.pop(peft_type, None)
        register_peft_method(name=peft_type.lower(), config_cls=config_class, model_cls=model_class,
                             prefix=model_class.prefix)
    forward_task_ids_to_moelora()


def forward_task_ids_to_moelora() -> None:
    """`PeftModelForCausalLM.forward` has a `task_ids` argument of its own, which it hands on to POLY adapters only
    and drops otherwise. Wrap it (once) so that with an active adapter that reads them (`model.uses_task_ids`: MOELORA,
    MIXTURE_OF_LORAS, MMoE-gated MIXLORA / LORAMOE / MOLA) the ids travel on, under `FORWARDED_TASK_IDS_KWARG`, to
    the adapted model, whose forward pre-hook gives them to the layers.
    `generate` passes unknown model kwargs to transformers, which refuses them: wrap it too, so that `task_ids` given
    once to generate reach every decoding step (`model.generation_task_ids`), and so that the methods that route per
    sequence (`routes_per_sequence`: Mixture-of-LoRAs, MoCLE) keep what they decided on the prompt for every generated
    token (`prompt_routing.generation_routing`)."""
    forward, generate = PeftModelForCausalLM.forward, PeftModelForCausalLM.generate
    if getattr(forward, "_forwards_task_ids_to_moelora", False):
        return

    @functools.wraps(forward)
    def forward_with_task_ids(self, *args, task_ids=None, **kwargs):
        if task_ids is not None and uses_task_ids(self.active_peft_config):
            kwargs[FORWARDED_TASK_IDS_KWARG] = task_ids
            task_ids = None
        return forward(self, *args, task_ids=task_ids, **kwargs)

    @functools.wraps(generate)
    def generate_with_task_ids(self, *args, **kwargs):
        if getattr(self.active_peft_config, "routes_per_sequence", False):  # decided on the prompt, kept for every token
            with generation_routing(self.get_base_model(), kwargs.pop("task_ids", None)):
                return generate(self, *args, **kwargs)
        if kwargs.get("task_ids") is None or not uses_task_ids(self.active_peft_config):
            return generate(self, *args, **kwargs)
        with generation_task_ids(self.get_base_model(), kwargs.pop("task_ids")):
            return generate(self, *args, **kwargs)

    forward_with_task_ids._forwards_task_ids_to_moelora = True
    PeftModelForCausalLM.forward = forward_with_task_ids
    PeftModelForCausalLM.generate = generate_with_task_ids
