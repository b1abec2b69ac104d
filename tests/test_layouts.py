"""Layer layouts of published models built from the existing fields: GLaM's every-other-layer MoE (preset `glam`).

Training, save/reload and cached generation of the preset run with every other preset in test_presets.py.
"""

import torch
import torch.nn.functional as F
from conftest import PAD_TOKEN_ID, randomize_weights_
from torch.testing import assert_close

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM
from hf_moe.modeling.modeling_hf_moe import MoEMLP, MoESparseBlock

# GLaM's gated GELU and experts as wide as the dense FFN are shape settings, given next to the preset
TINY = {"hidden_act": "gelu", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "n_routed_experts": 8,
        "max_position_embeddings": 256, "pad_token_id": PAD_TOKEN_ID}


def test_glam_preset_is_every_other_layer_sparse_starting_with_the_first():
    config = DeepSeekMoEConfig.from_preset("glam", num_hidden_layers=6)
    assert config.mlp_layer_types == ["sparse", "dense"] * 3
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (64, 2, 0)
    assert (config.norm_topk_prob, config.router_aux_loss_coef) == (True, 0.01)
    assert (config.capacity_factor, config.moe_block_type) == (None, "routed")


def test_glam_layers_alternate_sparse_and_dense_blocks():
    model = DeepSeekMoEForCausalLM(DeepSeekMoEConfig.from_preset("glam", **TINY))
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [MoESparseBlock, MoEMLP, MoESparseBlock, MoEMLP]
    assert model.model.layers[0].mlp.shared_experts is None


def test_glam_sparse_layer_is_top2_of_softmax_renormalised_with_gated_gelu_experts():
    torch.manual_seed(0)
    block = randomize_weights_(MoESparseBlock(DeepSeekMoEConfig.from_preset("glam", **TINY)))
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        output = block(x)[0]
        experts = block.experts
        for t in range(5):
            probs = (block.gate.weight @ x[0, t]).softmax(dim=-1)
            top = probs.topk(2)
            expected = torch.zeros(32)
            for weight, e in zip(top.values / top.values.sum(), top.indices.tolist()):
                gate_w, up_w = experts.gate_up_proj[e].chunk(2, dim=0)
                hidden = F.gelu(gate_w @ x[0, t]) * (up_w @ x[0, t])  # GEGLU
                expected = expected + weight * (experts.down_proj[e] @ hidden)
            assert_close(output[t], expected, atol=1e-5, rtol=0)
