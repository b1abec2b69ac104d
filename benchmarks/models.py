"""The whole models compared by train_step.py and decode.py: ours, transformers' native class on the same weights,
and the dense Llama floor with the same active FLOPs per token."""

import copy

import torch
from common import fair_floor_applies, through_onednn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig, MixtralMoEForCausalLM

COMMON = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
              max_position_embeddings=2048, tie_word_embeddings=False)
SMOKE = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=256, tie_word_embeddings=False)
# family: (experts, top-k, expert width, gated shared expert width or 0)
FAMILIES = {"mixtral-like": (8, 2, 1408, 0), "qwen2moe-like": (16, 4, 352, 704)}
SMOKE_FAMILIES = {"mixtral-like": (4, 2, 16, 0), "qwen2moe-like": (8, 2, 8, 16)}


FAIR_FLOOR, FLOOR = "fair floor", "dense floor"


def build_models(family: str, smoke: bool = False, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> dict[str, torch.nn.Module]:
    """name -> model (eval mode, in `dtype` on `device`), all with the same weights where the architecture is
    shared. "dense floor": the dense Llama as torch runs it (fp32 `nn.Linear` on MKL on x86-64); "fair floor", where
    the two differ (`fair_floor_applies`): the same Llama with its MLP products (forward and backward) through oneDNN,
    the library `sorted_mm` runs the experts' products on. Attention, LM head and embeddings stay as torch runs them in
    both, as they do in the MoE models (their router and shared experts are `nn.Linear` too)."""
    common = SMOKE if smoke else COMMON
    experts, top_k, width, shared = (SMOKE_FAMILIES if smoke else FAMILIES)[family]
    torch.manual_seed(0)
    if shared:
        native = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            **common, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
            shared_expert_intermediate_size=shared, intermediate_size=width, norm_topk_prob=False, qkv_bias=False))
        ours = DeepSeekMoEForCausalLM(DeepSeekMoEConfig(
            **common, n_routed_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
            n_shared_experts=1, shared_expert_intermediate_size=shared, shared_expert_gate=True,
            first_k_dense_replace=0, norm_topk_prob=False))
        state = {k.replace("shared_expert.", "shared_experts."): v for k, v in native.state_dict().items()}
    else:
        native = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=top_k,
                                                  intermediate_size=width))
        ours = MixtralMoEForCausalLM(MixtralMoEConfig(**common, num_local_experts=experts,
                                                      num_experts_per_tok=top_k, intermediate_size=width))
        state = native.state_dict()
    ours.load_state_dict(state)
    floor = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=top_k * width + shared))
    models = {FLOOR: floor}
    if fair_floor_applies(dtype, device):
        models[FAIR_FLOOR] = through_onednn(copy.deepcopy(floor), lambda name: ".mlp." in name)
    models["transformers grouped_mm"] = native
    for implementation in ("auto", "sorted_mm", "grouped_mm", "eager"):  # "auto": our default
        model = type(ours)(copy.deepcopy(ours.config))  # its own config: the experts kernel is a config setting
        model.load_state_dict(ours.state_dict())
        model.set_experts_implementation(implementation)
        models[f"ours {implementation}"] = model
    native.set_experts_implementation("grouped_mm")
    for model in models.values():
        model.to(device, dtype).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return models
