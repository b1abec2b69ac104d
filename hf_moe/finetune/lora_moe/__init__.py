"""LoRA-expert PEFT methods for dense decoders: MixLoRA, LoRAMoE, MoLA and MOELoRA, and PESC (adapter experts over
the frozen FFN, in `pesc.py`), Mixture-of-LoRAs (one LoRA expert per task, chosen per sequence, in
`mixture_of_loras.py`), MoCLE (one LoRA expert per sequence chosen by its prompt's k-means cluster, plus a universal
expert, in `mocle.py`) and Expert Gate (one LoRA expert and one autoencoder per task, the expert of the autoencoder
that reconstructs the prompt best, in `expert_gate.py`), registered with peft by `import hf_moe`. Options shared
by several methods: MMoE task gates for MixLoRA, LoRAMoE and MoLA (one router per task, `task_gates`), MOELoRA's one
global task gate (`gate_sharing="global"`), MoELoRA's contrastive loss among experts (`contrastive_loss_coef`).

    import hf_moe
    from peft import get_peft_model
    model = get_peft_model(base, hf_moe.MixLoraConfig(task_type="CAUSAL_LM"))
    out = model(input_ids=ids, labels=ids)   # out.loss includes the aux loss; out.aux_loss, out.aux_losses
    model.save_pretrained(folder)            # adapter_config.json + adapter_model.safetensors

Files, following peft's split: `config.py` (what is saved), `layer.py` (what an adapted module computes, shared maths
in `functional.py`), `model.py` (which module gets which layer; which auxiliary losses), `losses.py` and
`aux_loss.py` (how those losses are computed and reach `outputs.loss`), `data.py` (LoRAMoE's type ids and the task ids
of the methods that read tasks, from a dataset column), `registration.py`. `materialize.py` (MixLoRA adapter + base
-> standalone MoE checkpoint) is imported on demand: `from hf_moe.finetune.lora_moe.materialize import materialize`.
"""

from .aux_loss import TYPE_IDS_KWARG, LoraMoeLossCallback, add_lora_moe_callback, pop_logged_aux_losses
from .config import MOLA_PRESETS, LoraExpertConfig, LoraMoeConfig, MixLoraConfig, MoeLoraConfig, MolaConfig
from .data import TaskIdsCollator, TypeIdsCollator
from .expert_gate import ExpertGateConfig, ExpertGateLinear, ExpertGateModel
from .layer import LoraMoeLinear, MixLoraFeedForward, MixLoraLinear, MoeLoraLinear, MolaLinear, RoutedLoraLinear
from .mixture_of_loras import MixtureOfLorasConfig, MixtureOfLorasLinear, MixtureOfLorasModel
from .mocle import MocleConfig, MocleLinear, MocleModel, fit_clusters
from .model import TASK_IDS_KWARG, LoraMoeModel, MixLoraModel, MoeLoraModel, MolaModel
from .pesc import PescConfig, PescFeedForward, PescLinear, PescModel
from .registration import register_lora_moe_methods

__all__ = [
    "MOLA_PRESETS",
    "TASK_IDS_KWARG",
    "TYPE_IDS_KWARG",
    "ExpertGateConfig",
    "ExpertGateLinear",
    "ExpertGateModel",
    "LoraExpertConfig",
    "LoraMoeConfig",
    "LoraMoeLinear",
    "LoraMoeLossCallback",
    "LoraMoeModel",
    "MixLoraConfig",
    "MixLoraFeedForward",
    "MixLoraLinear",
    "MixLoraModel",
    "MixtureOfLorasConfig",
    "MixtureOfLorasLinear",
    "MixtureOfLorasModel",
    "MocleConfig",
    "MocleLinear",
    "MocleModel",
    "MoeLoraConfig",
    "MoeLoraLinear",
    "MoeLoraModel",
    "MolaConfig",
    "MolaLinear",
    "MolaModel",
    "PescConfig",
    "PescFeedForward",
    "PescLinear",
    "PescModel",
    "RoutedLoraLinear",
    "TaskIdsCollator",
    "TypeIdsCollator",
    "add_lora_moe_callback",
    "fit_clusters",
    "pop_logged_aux_losses",
    "register_lora_moe_methods",
]
