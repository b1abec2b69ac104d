"""Registration of our model types with transformers' Auto classes, in-process and for remote code.

In-process: `AutoConfig.register` / `AutoModel*.register`, so that loading needs no `trust_remote_code`.
Remote code: every class is marked with `register_for_auto_class`, so `save_pretrained` copies the flat modeling
files next to the weights; the configs themselves carry an `auto_map` entry for every Auto class (see
`remote_code_auto_map`), so that a process without hf_moe loads any head of the folder with `trust_remote_code=True`.

PEFT methods (MIXLORA, LORAMOE, MOLA): registered with peft as soon as peft is imported (see the end of this file).
"""

import functools
import sys
import threading

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
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
    AutoModelForTokenClassification: "ForTokenClassification",
    AutoModelForQuestionAnswering: "ForQuestionAnswering",
}


# transformers' load-time conversions of the per-expert layout into fused experts: Mixtral's (w1/w3/w2 under
# block_sparse_moe) and Qwen2-MoE's (gate/up/down_proj under mlp, as DeepSeek-MoE, DeepSeek-V2/V3, GLM-4.5, OLMoE)
CHECKPOINT_CONVERSIONS = {"hf_moe_mixtral": "mixtral", "hf_moe_deepseek": "qwen2_moe"}


def register_checkpoint_conversions() -> None:
    """Let `from_pretrained` of our model types read per-expert checkpoints: one of our folders saved with
    `save_original_format=True`, or a native per-expert checkpoint given our config (`config=`), e.g. the DeepSeek-MoE
    16B remote-code layout. In-process only: remote code loads the fused layout our folders hold."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for model_type, native in CHECKPOINT_CONVERSIONS.items():
        register_checkpoint_conversion_mapping(model_type, get_checkpoint_conversion_mapping(native), overwrite=True)


def register_auto_classes() -> None:
    for family, config_class in FAMILIES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        config_class.register_for_auto_class("AutoConfig")
        for auto_class, suffix in AUTO_CLASSES.items():
            model_class = getattr(modeling_hf_moe, f"{family}{suffix}")
            auto_class.register(config_class, model_class, exist_ok=True)
            model_class.register_for_auto_class(auto_class.__name__)


# ---------------------------------------------------------------------------------------------------------------
# PEFT methods: registered once peft is imported
# ---------------------------------------------------------------------------------------------------------------
# peft (and transformers' Trainer, which imports it) costs seconds to import, so `import hf_moe` does not import it.
# MIXLORA, LORAMOE and MOLA are registered with peft when peft is imported, wherever that happens: `import hf_moe`
# installs an import hook that notices the end of peft's import and registers then, so `PeftModel.from_pretrained`
# of our adapters works right after `import hf_moe`.
#
# The registration imports hf_moe.finetune.lora_moe, which imports transformers' Trainer, which imports peft: it
# cannot run while any of those modules is half-imported (that is where peft's import often comes from). So the hook
# also watches the imports of hf_moe's and transformers' modules, and registers when the outermost of them ends.

_WATCHED_PREFIXES = ("hf_moe.", "transformers.")


def _register_peft_methods() -> None:
    from .finetune.lora_moe.registration import register_lora_moe_methods

    register_lora_moe_methods()


class _PeftRegistrationHook:
    """A `sys.meta_path` finder that finds nothing itself: it wraps the loaders of peft and of the watched modules
    to register our PEFT methods once peft is imported and no watched import is in progress (per thread)."""

    def __init__(self) -> None:
        self.state = threading.local()  # depth: watched imports in progress; pending: peft imported, not yet used
        self.done = False

    def find_spec(self, fullname, path=None, target=None):
        if self.done or not (fullname == "peft" or fullname.startswith(_WATCHED_PREFIXES)):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            try:
                loader.exec_module = functools.partial(self._exec_module, loader.exec_module, fullname == "peft")
            except AttributeError:  # a loader whose attributes are fixed: not watched
                pass
        return spec

    def _exec_module(self, exec_module, is_peft: bool, module) -> None:
        self.state.depth = getattr(self.state, "depth", 0) + 1
        try:
            exec_module(module)
            if is_peft:
                self.state.pending = True
        finally:
            self.state.depth -= 1
        if self.state.depth == 0 and getattr(self.state, "pending", False):
            self.register()

    def register(self) -> None:
        if self.done:
            return
        self.done = True  # first: the registration's own imports pass through here
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _register_peft_methods()


def register_peft_methods_when_peft_is_imported() -> None:
    """Register MIXLORA, LORAMOE and MOLA with peft now if peft is imported, else as soon as it is (idempotent)."""
    peft = sys.modules.get("peft")
    if peft is not None and not getattr(getattr(peft, "__spec__", None), "_initializing", False):
        _register_peft_methods()
        return
    if not any(isinstance(finder, _PeftRegistrationHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PeftRegistrationHook())
