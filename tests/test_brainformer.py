"""Heterogeneous layouts (`block_layout`, Brainformer, Zhou et al. 2023): a layer's forward written out as its
sub-blocks, the default layout unchanged, causality and cached generation with several attentions in one layer (one
KV-cache layer each), the balancing loss over every MoE sub-block, save/load and remote code, gradient checkpointing,
a Trainer step, the experts implementations against each other, the `brainformer` preset, the conversion layout and
config validation.

Every model is tiny and fp32 (conftest's shapes: hidden 32, 4 to 8 experts).
"""

import math
import re

import pytest
import torch
from conftest import (
    PAD_TOKEN_ID,
    load_as_remote_code_without_hf_moe,
    make_deepseek_config,
    make_mixtral_config,
    random_input_ids,
    randomize_weights_,
)
from huggingface_hub.errors import StrictDataclassFieldValidationError
from test_trainer import causal_lm_rows, train_one_step
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.cache_utils import DynamicSlidingWindowLayer

import hf_moe
from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEForCausalLM
from hf_moe.cards import expert_load
from hf_moe.cli import main
from hf_moe.conversion.layout import ConversionError, check_exportable, our_tensor_shapes, parameter_counts
from hf_moe.modeling import experts_kernels
from hf_moe.modeling.configuration_hf_moe import BRAINFORMER_BLOCK
from hf_moe.modeling.modeling_hf_moe import MoEAttention, MoEMLP, MoESparseBlock
from hf_moe.modeling.routing import TopKRouter, load_balancing_loss

ATOL = 1e-5
# layer 0: two attentions and two MoE feed-forwards; layer 1 starts with a dense feed-forward
LAYOUT = [["attention", "moe", "dense", "attention", "moe"], ["dense", "attention", "moe"]]
NUM_ATTENTIONS, NUM_MOE = 3, 3


def layout_model(family: str = "mixtral", seed: int = 0, layout=LAYOUT, **overrides):
    torch.manual_seed(seed)
    if family == "mixtral":
        model = MixtralMoEForCausalLM(make_mixtral_config(block_layout=layout, **overrides))
    else:  # conftest's 3 layers, or one per entry of the layout
        layers = {} if layout is None or isinstance(layout[0], str) else {"num_hidden_layers": len(layout)}
        model = DeepSeekMoEForCausalLM(make_deepseek_config(block_layout=layout, **layers, **overrides))
    return randomize_weights_(model).eval()


def causal_mask(seq_len: int) -> torch.Tensor:
    """The additive [1, 1, S, S] causal mask, written out."""
    blocked = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    return torch.zeros(seq_len, seq_len).masked_fill(blocked, torch.finfo(torch.float32).min)[None, None]


# --------------------------------------------------------------------------------------------------------------
# The forward is the sub-blocks composed in order
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_forward_equals_the_sub_blocks_composed_by_hand(family):
    model = layout_model(family)
    layer0, layer1 = model.model.layers
    assert [type(block.self_attn if block.kind == "attention" else block.mlp) for block in layer0.blocks] == [
        MoEAttention, MoESparseBlock, MoEMLP, MoEAttention, MoESparseBlock]
    assert [block.self_attn.layer_idx for block in (layer0.blocks[0], layer0.blocks[3], layer1.blocks[1])] == [0, 1, 2]
    input_ids = random_input_ids(2, 6)
    mask = causal_mask(6)

    def attention(block, hidden):  # x + attention(norm(x))
        positions = model.model.rotary_emb(hidden, torch.arange(6)[None])
        return hidden + block.self_attn(block.norm(hidden), position_embeddings=positions, attention_mask=mask)[0]

    def feed_forward(block, hidden):  # x + ffn(norm(x)), a dense MLP or the sparse block
        return hidden + block.mlp(block.norm(hidden))

    with torch.no_grad():
        hidden = model.model.embed_tokens(input_ids)
        hidden = attention(layer0.blocks[0], hidden)
        hidden = feed_forward(layer0.blocks[1], hidden)  # moe
        hidden = feed_forward(layer0.blocks[2], hidden)  # dense
        hidden = attention(layer0.blocks[3], hidden)
        hidden = feed_forward(layer0.blocks[4], hidden)  # moe
        hidden = feed_forward(layer1.blocks[0], hidden)  # dense
        hidden = attention(layer1.blocks[1], hidden)
        hidden = feed_forward(layer1.blocks[2], hidden)  # moe
        expected = model.lm_head(model.model.norm(hidden))
        assert_close(model(input_ids).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_none_and_the_equivalent_explicit_layout_give_identical_logits(family):
    default = layout_model(family, layout=None)
    for name in default.state_dict():  # the keys of every checkpoint saved before block_layout
        assert re.fullmatch(r"model\.(embed_tokens|norm)\.weight|lm_head\.weight|model\.layers\.\d+\."
                            r"(self_attn|mlp|input_layernorm|post_attention_layernorm)\..+", name), name
    assert default.config.block_layout is None
    explicit = layout_model(family, layout=default.config.layer_sub_blocks())
    renames = {"input_layernorm.": "blocks.0.norm.", "self_attn.": "blocks.0.self_attn.",
               "post_attention_layernorm.": "blocks.1.norm.", "mlp.": "blocks.1.mlp."}

    def renamed(name):
        for old, new in renames.items():
            name = re.sub(rf"(layers\.\d+\.){re.escape(old)}", rf"\g<1>{new}", name)
        return name

    explicit.load_state_dict({renamed(name): tensor for name, tensor in default.state_dict().items()}, strict=True)
    input_ids = random_input_ids(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    with torch.no_grad():
        assert torch.equal(explicit(input_ids, attention_mask=attention_mask).logits,
                           default(input_ids, attention_mask=attention_mask).logits)
    assert explicit.config.mlp_layer_types == default.config.mlp_layer_types
    assert explicit.config.num_sparse_layers == default.config.num_sparse_layers


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_a_later_token_leaves_the_earlier_logits_unchanged(family):
    model = layout_model(family)
    input_ids = random_input_ids(2, 8)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] % 100) + 5
    with torch.no_grad():
        original, other = model(input_ids).logits, model(changed).logits
    assert_close(other[:, :-1], original[:, :-1], atol=ATOL, rtol=0)
    assert not torch.allclose(other[:, -1], original[:, -1])


# --------------------------------------------------------------------------------------------------------------
# The KV cache: one layer per attention sub-block
# --------------------------------------------------------------------------------------------------------------


def greedy(model, prompt, attention_mask, use_cache: bool, new_tokens: int = 6):
    return model.generate(prompt, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=PAD_TOKEN_ID, use_cache=use_cache)


SLIDING = {"sliding_window": 3, "layer_types": ["full_attention", "sliding_attention", "full_attention"]}


@pytest.mark.parametrize(("family", "overrides"), [
    ("mixtral", {}),
    ("deepseek", {}),
    ("mixtral", SLIDING),  # the two attentions of layer 0 take different masks and cache layers
    ("mixtral", {"num_attention_experts": 2}),  # attention experts in every attention sub-block
], ids=["mixtral", "deepseek", "sliding", "attention_experts"])
def test_greedy_generation_with_cache_matches_without_cache_with_left_padding(family, overrides):
    model = layout_model(family, **overrides)
    prompt = random_input_ids(2, 5, seed=6)
    mask = torch.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = PAD_TOKEN_ID, 0  # a left-padded row
    with torch.no_grad():
        with_cache = greedy(model, prompt, mask, use_cache=True)
        without_cache = greedy(model, prompt, mask, use_cache=False)
        full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
        full = model(with_cache, attention_mask=full_mask).logits
        prefix = model(with_cache[:, :10], attention_mask=full_mask[:, :10], use_cache=True)
        step = model(with_cache[:, 10:], attention_mask=full_mask, cache=prefix.past_key_values, use_cache=True).logits
    assert torch.equal(with_cache, without_cache)
    assert_close(step[:, -1], full[:, -1], atol=ATOL, rtol=0)


def test_the_cache_holds_one_layer_per_attention_sub_block():
    model = layout_model("mixtral", **SLIDING)
    config = model.config
    assert config.num_attention_blocks() == NUM_ATTENTIONS > config.num_hidden_layers
    sliding = [kind == "sliding_attention" for kind in SLIDING["layer_types"]]
    caches = {"DynamicCache(config)": DynamicCache(config=config),
              "StaticCache(config)": StaticCache(config=config, max_cache_len=16)}
    with torch.no_grad():
        caches["forward"] = model(random_input_ids(2, 5), use_cache=True).past_key_values
        caches["generate"] = model.generate(random_input_ids(1, 4), max_new_tokens=2, do_sample=False,
                                            pad_token_id=PAD_TOKEN_ID, return_dict_in_generate=True).past_key_values
    for name, cache in caches.items():
        assert len(cache.layers) == NUM_ATTENTIONS, name
        assert cache.is_sliding == sliding, name
    for layer, windowed in zip(caches["forward"].layers, sliding):
        assert isinstance(layer, DynamicSlidingWindowLayer) == windowed
        assert layer.keys.shape[-2] == (2 if windowed else 5)  # a window keeps its last sliding_window - 1 tokens


def test_torch_compile_fullgraph_matches_eager_forward():
    model = layout_model("mixtral", **SLIDING)  # the cache, made in the forward, has 3 layers for 2 decoder layers
    input_ids = random_input_ids(2, 8)
    with torch.no_grad():
        expected = model(input_ids).logits
        actual = torch.compile(model, fullgraph=True)(input_ids).logits
    torch._dynamo.reset()
    assert_close(actual, expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Router outputs and the balancing loss
# --------------------------------------------------------------------------------------------------------------


def test_aux_loss_includes_the_router_of_every_moe_sub_block():
    model = layout_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.1).train()
    routers = model.model.routers()
    assert routers == [block.mlp.gate for layer in model.model.layers for block in layer.blocks
                       if block.kind == "moe"]
    assert len(routers) == NUM_MOE == model.config.num_sparse_layers
    decisions = []
    hooks = [router.register_forward_hook(lambda module, args, out: decisions.append(out[3])) for router in routers]
    input_ids = random_input_ids(2, 6)
    out = model(input_ids, labels=input_ids)
    for hook in hooks:
        hook.remove()
    assert len(out.router_logits) == NUM_MOE
    for logits, decision in zip(out.router_logits, decisions):
        assert torch.equal(logits, decision.logits)
    assert_close(out.aux_loss, load_balancing_loss(decisions), atol=1e-6, rtol=0)
    out.aux_loss.backward()
    for router in routers:  # each router's logits enter the loss
        assert router.weight.grad.abs().max() > 0
    assert sum(isinstance(module, TopKRouter) for module in model.modules()) == NUM_MOE


def test_expert_load_has_one_row_per_moe_sub_block():
    load = expert_load(layout_model("mixtral"), [random_input_ids(2, 6)])
    assert load["rows"] == ["layer 0 block 1", "layer 0 block 4", "layer 1 block 2"]


def test_attention_experts_routers_are_recorded_for_every_attention_sub_block():
    model = layout_model("mixtral", num_attention_experts=2, output_router_logits=True).train()
    input_ids = random_input_ids(2, 6)
    out = model.model(input_ids, output_attention_router_decisions=True)
    assert len(out.attention_router_decisions) == NUM_ATTENTIONS


# --------------------------------------------------------------------------------------------------------------
# Save/load, remote code, gradient checkpointing, Trainer, experts implementations
# --------------------------------------------------------------------------------------------------------------


def test_save_load_and_load_as_remote_code_without_hf_moe(tmp_path):
    model = layout_model("deepseek", seed=1)
    input_ids = random_input_ids(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.block_layout == LAYOUT
    assert (loaded.config.first_k_dense_replace, loaded.config.moe_layer_freq) == (None, None)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "generate": {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 4}}
    child = load_as_remote_code_without_hf_moe({"model": tmp_path / "model"}, inputs, tmp_path)["model"]
    assert child["classes"][""].startswith("transformers_modules.")
    assert child["cache_layers"] == NUM_ATTENTIONS
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        sequences = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=4,
                                   pad_token_id=PAD_TOKEN_ID)
    assert_close(child["logits"], expected, atol=1e-6, rtol=0)
    assert torch.equal(child["sequences"], sequences)


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids = random_input_ids(2, 6)
    grads = []
    for checkpointing in (False, True):
        model = layout_model("deepseek", output_router_logits=True).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(".blocks.4.mlp.gate." in name for name in grads[0])
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-6, rtol=0, msg=name)


def test_one_trainer_step_updates_every_sub_block(tmp_path):
    model = layout_model("mixtral", output_router_logits=True)
    before = {name: param.detach().clone() for name, param in model.named_parameters() if ".blocks." in name}
    result = train_one_step(model.train(), causal_lm_rows(), tmp_path)
    assert math.isfinite(result.training_loss)
    for block_prefix in ("layers.0.blocks.0.self_attn.q_proj", "layers.0.blocks.3.self_attn.q_proj",
                         "layers.0.blocks.1.mlp.gate", "layers.0.blocks.4.mlp.gate", "layers.1.blocks.0.mlp.up_proj",
                         "layers.1.blocks.2.mlp.experts.down_proj", "layers.1.blocks.1.norm"):
        name = next(name for name in before if block_prefix in name)
        assert not torch.equal(model.get_parameter(name), before[name]), name


def test_experts_implementations_agree_in_outputs_and_gradients(monkeypatch):
    model = layout_model("deepseek", output_router_logits=True).train()
    input_ids = random_input_ids(2, 12)

    def run(implementation):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        return out, {name: param.grad.clone() for name, param in model.named_parameters()}

    eager, eager_grads = run("eager")
    results = {implementation: run(implementation) for implementation in ("auto", "sorted_mm", "grouped_mm",
                                                                          "batched_mm")}
    monkeypatch.setattr(experts_kernels, "_grouped_kernel_applies", lambda hidden_states, weight: True)
    results["sorted_mm, grouped kernel"] = run("sorted_mm")
    for implementation, (out, grads) in results.items():
        assert_close(out.logits, eager.logits, atol=ATOL, rtol=0, msg=implementation)
        assert_close(out.loss, eager.loss, atol=ATOL, rtol=0, msg=implementation)
        for name, grad in grads.items():
            assert_close(grad, eager_grads[name], atol=ATOL, rtol=0, msg=f"{implementation}: {name}")


# --------------------------------------------------------------------------------------------------------------
# The brainformer preset
# --------------------------------------------------------------------------------------------------------------


TINY_DEEPSEEK = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "n_routed_experts": 8,
                 "max_position_embeddings": 256, "pad_token_id": PAD_TOKEN_ID}


def test_brainformer_preset_builds_the_published_block_and_the_cli_lists_it(capsys):
    config = DeepSeekMoEConfig.from_preset("brainformer", **TINY_DEEPSEEK)
    assert BRAINFORMER_BLOCK == ["attention", "moe", "dense", "attention", "moe", "dense", "moe", "dense"]
    assert config.block_layout == [BRAINFORMER_BLOCK] * 2  # the block is every layer's
    assert (config.router_type, config.capacity_factor, config.router_aux_loss_coef) == ("expert_choice", 1.0, 0.0)
    assert (config.n_shared_experts, config.num_experts_per_tok) == (0, 1)
    assert (config.num_attention_blocks(), config.num_sparse_layers) == (4, 6)
    torch.manual_seed(0)
    model = randomize_weights_(DeepSeekMoEForCausalLM(config))
    input_ids = random_input_ids(2, 8)
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    assert math.isfinite(out.loss.item()) and len(out.router_logits) == 6
    out.loss.backward()
    assert all(router.weight.grad.abs().max() > 0 for router in model.model.routers())
    with pytest.raises(ValueError, match="expert_choice"):  # expert choice reads later tokens
        model.eval().generate(input_ids, max_new_tokens=2)
    assert "brainformer" in hf_moe.list_presets()
    assert main(["presets"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("brainformer ")]
    assert "DeepSeekMoEConfig" in line and "Brainformer" in line


def test_brainformer_preset_with_token_choice_generates_with_the_cache():
    model = randomize_weights_(DeepSeekMoEForCausalLM(DeepSeekMoEConfig.from_preset(
        "brainformer", **TINY_DEEPSEEK, router_type="token_choice", capacity_factor=None))).eval()
    prompt = random_input_ids(2, 4, seed=6)
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        assert torch.equal(greedy(model, prompt, mask, use_cache=True), greedy(model, prompt, mask, use_cache=False))


# --------------------------------------------------------------------------------------------------------------
# The conversion layout and config validation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_tensor_shapes_parameter_counts_and_parallel_plans_follow_the_layout(family):
    model = layout_model(family)
    config = model.config
    assert our_tensor_shapes(config) == {name: tuple(t.shape) for name, t in model.state_dict().items()}
    total, active = parameter_counts(config)
    assert total == sum(p.numel() for p in model.parameters())
    idle_experts = config.num_experts - config.num_experts_per_tok
    assert total - active == NUM_MOE * idle_experts * 3 * config.hidden_size * config.moe_intermediate_size
    names = [name for name, _ in model.model.named_modules()] + [name for name, _ in model.model.named_parameters()]
    for plan in (config.base_model_tp_plan, config.base_model_ep_plan):
        for rule in plan:  # every rule names modules of this model
            pattern = re.escape(rule).replace(r"\*", r"\d+")
            assert any(re.fullmatch(pattern, name) for name in names), rule


@pytest.mark.parametrize("fmt", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_export_to_a_native_format_refuses_a_block_layout(fmt):
    with pytest.raises(ConversionError, match="`block_layout`="):
        check_exportable(make_mixtral_config(block_layout=LAYOUT), fmt)
    # even the layout that None means: its tensors live in sub-blocks
    with pytest.raises(ConversionError, match="`block_layout`="):
        check_exportable(make_mixtral_config(block_layout=["attention", "moe"]), fmt)


def test_one_list_is_every_layers_layout():
    config = make_deepseek_config(block_layout=["attention", "dense", "moe"])
    assert config.block_layout == [["attention", "dense", "moe"]] * 3
    assert config.mlp_layer_types == ["sparse"] * 3
    assert make_mixtral_config(block_layout=[["attention", "dense"], ["attention"]]).mlp_layer_types == ["dense",
                                                                                                         "dense"]


@pytest.mark.parametrize(("overrides", "field"), [
    ({"block_layout": [["attention", "ffn"], ["attention"]]}, "block_layout[0]"),
    ({"block_layout": [["attention"], []]}, "block_layout[1]"),
    ({"block_layout": [["attention", "moe"]]}, "block_layout"),  # one list per layer: 2 layers
    ({"block_layout": [["moe"], ["dense"]]}, "block_layout"),  # no attention anywhere
    ({"block_layout": LAYOUT, "layer_types": ["full_attention"] * 2}, "layer_types"),  # 3 attention sub-blocks
    ({"block_layout": LAYOUT, "mod_capacity": 0.5}, "mod_capacity"),
])
def test_invalid_layouts_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`=")):
        make_mixtral_config(**overrides)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"first_k_dense_replace": 2}, "first_k_dense_replace"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"mlp_layer_types": ["dense", "dense", "sparse"]}, "mlp_layer_types"),  # the layout's summary is all sparse
])
def test_layer_schedule_fields_that_contradict_the_layout_raise_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=re.escape(f"`{field}`=")):
        make_deepseek_config(block_layout=["attention", "moe"], **overrides)


def test_a_layout_of_another_type_raises_naming_the_field():
    for value in ("attention", [["attention"], "moe"], [[1]]):
        with pytest.raises(StrictDataclassFieldValidationError, match="block_layout"):
            make_mixtral_config(block_layout=value)


def test_per_layer_overrides_raise_naming_the_field():
    # transformers' caches read `per_layer_config` (one entry per attention); hf-moe fields hold for every layer
    assert make_mixtral_config(block_layout=LAYOUT).per_layer_config == [make_mixtral_config(block_layout=LAYOUT)] * 3
    with pytest.raises(ValueError, match=re.escape("`per_layer_config`=")):
        make_mixtral_config(per_layer_config={0: {"rms_norm_eps": 1e-6}})
