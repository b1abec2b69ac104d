"""Random valid configs train: a forward and backward over padded batches gives a finite loss and finite gradients.

Each seed draws a small config of one family (the two alternate), valid by construction: odd and tiny hidden sizes,
explicit or derived head dims, 1-8 experts with any top-k, every activation of transformers' ACT2FN, rms_norm_eps down
to 1e-12, random loss coefficients, capacity factors, routers and paper presets, attention and experts
implementations. Each model sees a batch with a full row, a left-padded row and an all-padding row, then a batch that
is all padding. The last cases are the configs an issue reported as NaN (see REGRESSIONS).
"""

import random

import pytest
import torch
from transformers.activations import ACT2FN

from hf_moe import DeepSeekMoEConfig, DeepSeekMoEForCausalLM, MixtralMoEConfig, MixtralMoEForCausalLM
from hf_moe.modeling.configuration_hf_moe import PRESETS

NUM_SEEDS = 40
ACTIVATIONS = sorted(ACT2FN)
LOSS_COEFS = ("router_aux_loss_coef", "router_z_loss_coef", "router_importance_loss_coef", "router_load_loss_coef",
              "expert_balance_loss_coef", "device_balance_loss_coef", "sequence_balance_loss_coef")
FAMILIES = {
    "mixtral": (MixtralMoEConfig, MixtralMoEForCausalLM, "num_local_experts"),
    "deepseek": (DeepSeekMoEConfig, DeepSeekMoEForCausalLM, "n_routed_experts"),
}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_divisor_at_most(n: int, bound: int) -> int:
    return max(d for d in divisors(n) if d <= bound)


def draw_routing(rng: random.Random, num_experts: int) -> dict:
    """Routing knobs from a paper preset of the family or drawn freely, made consistent with `num_experts`."""
    routing = {
        "num_experts_per_tok": rng.randint(1, num_experts),
        "scoring_func": rng.choice(["softmax", "sigmoid"]),
        "norm_topk_prob": rng.random() < 0.5,
        "routed_scaling_factor": rng.choice([1.0, 0.5, 2.5, 16.0]),
        "router_jitter_noise": rng.choice([0.0, 0.01, 0.5]),
        "noisy_gating": rng.random() < 0.3,
        "random_routing": rng.random() < 0.2,
        "router_selection_bias": rng.random() < 0.3,
        "capacity_factor": rng.choice([None, None, 0.1, 1.0, 1.25]),
        "eval_capacity_factor": rng.choice([None, 2.0]),
        "dispatch_groups": rng.choice([1, 2, 5]),
        "n_group": rng.choice(divisors(num_experts)),
        "num_device_groups": rng.choice(divisors(num_experts)),
        "aux_loss_per_layer": rng.random() < 0.5,
        **{name: rng.choice([0.0, 0.001, 0.1, 1.0]) for name in LOSS_COEFS},
    }
    routing["topk_group"] = rng.randint(1, routing["n_group"])
    if rng.random() < 0.15:
        routing.update(router_type="expert_choice", capacity_factor=rng.choice([0.5, 1.0, 2.0]))
    return routing


def make_consistent(settings: dict, num_experts: int) -> dict:
    """The rules of `check_routing_fields`, applied as repairs (a drawn or preset value that the tiny expert count
    cannot hold is shrunk, not refused)."""
    s = dict(settings)
    s["n_group"] = largest_divisor_at_most(num_experts, s.get("n_group", 1))
    s["topk_group"] = min(s.get("topk_group", 1), s["n_group"])
    s["num_device_groups"] = largest_divisor_at_most(num_experts, s.get("num_device_groups", 1))
    top_k = min(s.get("num_experts_per_tok", 2), s["topk_group"] * num_experts // s["n_group"])
    if s.get("random_routing") and top_k < 2 <= num_experts // s["n_group"] * s["topk_group"]:
        top_k = 2
    s["num_experts_per_tok"] = top_k
    s["random_routing"] = bool(s.get("random_routing")) and top_k == 2
    if not s.get("noisy_gating"):
        s["router_load_loss_coef"] = 0.0
    if not s.get("router_selection_bias"):
        s["router_bias_update_rate"] = 0.0
    elif s.get("router_bias_update_rate", 0.0) == 0.0:
        s["router_bias_update_rate"] = 0.001
    if s.get("router_type") == "expert_choice":
        s.update(noisy_gating=False, random_routing=False, router_selection_bias=False, router_bias_update_rate=0.0,
                 n_group=1, topk_group=1, scoring_func="softmax", router_load_loss_coef=0.0)
        s["capacity_factor"] = s.get("capacity_factor") or 2.0
    return s


def draw_config(seed: int):
    """-> (family, config): a small valid config of the family seed % 2 selects."""
    rng = random.Random(seed)
    family = ("mixtral", "deepseek")[seed % 2]
    config_class, _, experts_field = FAMILIES[family]
    heads = rng.choice([1, 2, 3, 4])
    head_dim = rng.choice([2, 4, 6, 8])
    hidden_size = rng.choice([4, 8, 17, 33, heads * head_dim])
    num_layers = rng.choice([1, 2, 3])
    num_experts = rng.randint(1, 8)
    presets = [name for name, preset in PRESETS.items() if preset.family == config_class.__name__]
    preset = rng.choice([None, None, *presets])
    routing = dict(PRESETS[preset].settings) if preset else draw_routing(rng, num_experts)
    routing.pop(experts_field, None)  # the preset's 64 experts: the drawn count replaces it
    fields = dict(
        vocab_size=rng.choice([16, 50]),
        hidden_size=hidden_size,
        intermediate_size=rng.choice([1, 4, 12]),
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=rng.choice(divisors(heads)),
        # derived (None) where hidden_size / heads is the drawn even head_dim, explicit otherwise
        head_dim=None if hidden_size == heads * head_dim and rng.random() < 0.5 else head_dim,
        hidden_act=rng.choice(ACTIVATIONS),
        rms_norm_eps=10 ** rng.uniform(-12, -3),
        initializer_range=rng.choice([0.0, 0.02, 0.5]),
        max_position_embeddings=32,
        sliding_window=rng.choice([None, None, 3]),
        pad_token_id=0,
        tie_word_embeddings=rng.random() < 0.3,
        attn_implementation=rng.choice(["eager", "sdpa"]),
        output_router_logits=True,
        **{experts_field: num_experts},
        **make_consistent(routing, num_experts),
    )
    if family == "deepseek":
        n_shared = rng.choice([0, 1, 2])
        fields.update(
            moe_intermediate_size=rng.choice([1, 4, 8]), n_shared_experts=n_shared,
            shared_expert_gate=n_shared > 0 and rng.random() < 0.5, first_k_dense_replace=rng.randint(0, num_layers),
            moe_layer_freq=rng.choice([1, 2]), qk_norm=rng.random() < 0.5, qkv_bias=rng.random() < 0.5,
        )
        if "block_layout" in fields:  # the brainformer preset names every layer's feed-forwards itself
            del fields["first_k_dense_replace"], fields["moe_layer_freq"]
        if fields.get("attention_type") == "mla":  # the DeepSeek-V2/V3 presets: tiny ranks, one kv head per head
            fields.update(
                num_key_value_heads=heads, head_dim=None, qk_norm=False, qkv_bias=False,
                q_lora_rank=rng.choice([None, 4]), kv_lora_rank=rng.choice([1, 4]), qk_nope_head_dim=rng.choice([1, 4]),
                qk_rope_head_dim=rng.choice([2, 4]), v_head_dim=rng.choice([1, 6]), rope_interleave=rng.random() < 0.5,
            )
    return family, config_class(**fields)


def padded_batches(vocab_size: int, seed: int):
    """-> [(input_ids, attention_mask, labels)]: a full row, an all-padding row and a left-padded row; then a batch
    that is all padding. Its labels are its (pad) ids: the LM loss of a batch without a single label is a mean over
    nothing (NaN) in torch and every transformers model; here it stays defined, so that only the routing is tested."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (3, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1] = 0
    attention_mask[2, :2] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    all_padding = torch.zeros_like(input_ids)
    return [(input_ids, attention_mask, input_ids.masked_fill(attention_mask == 0, -100)),
            (all_padding, torch.zeros_like(attention_mask), all_padding)]


def assert_trains(model_class, config, seed: int, experts_implementation: str = "eager"):
    torch.manual_seed(seed)
    model = model_class(config).train()
    model.set_experts_implementation(experts_implementation)
    for batch, (input_ids, attention_mask, labels) in enumerate(padded_batches(config.vocab_size, seed)):
        model.zero_grad()
        out = model(input_ids, attention_mask=attention_mask, labels=labels)
        assert torch.isfinite(out.loss), (batch, out.loss, out.router_losses)
        for name, value in (out.router_losses or {}).items():
            assert torch.isfinite(value), (batch, name, value)
            if batch == 1:  # all padding: every balancing loss is a mean over zero tokens
                assert value.item() == 0.0, (name, value)
        out.loss.backward()
        bad = [name for name, param in model.named_parameters()
               if param.grad is not None and not torch.isfinite(param.grad).all()]
        assert not bad, (batch, bad)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def experts_implementation_for(config, seed: int) -> str:
    """Any experts kernel; transformers' `grouped_mm` (torch._grouped_mm) needs 16-byte aligned rows, i.e. fp32
    hidden and expert widths that are multiples of 4."""
    implementations = ["eager", "sorted_mm", "batched_mm"]
    if config.hidden_size % 4 == 0 and config.moe_intermediate_size % 4 == 0:
        implementations.append("grouped_mm")
    return random.Random(-seed).choice(implementations)


@pytest.mark.parametrize("seed", range(NUM_SEEDS))
def test_random_valid_config_trains_with_finite_loss_and_gradients(seed):
    family, config = draw_config(seed)
    assert_trains(FAMILIES[family][1], config, seed, experts_implementation_for(config, seed))


def test_draws_cover_both_families_one_expert_every_expert_chosen_and_expert_choice():
    configs = [draw_config(seed)[1] for seed in range(NUM_SEEDS)]
    assert {type(config) for config in configs} == {MixtralMoEConfig, DeepSeekMoEConfig}
    assert any(config.num_experts == 1 for config in configs)
    assert any(config.num_experts_per_tok == config.num_experts > 1 for config in configs)
    assert any(config.router_type == "expert_choice" for config in configs)
    assert any(config.noisy_gating for config in configs)
    assert any(config.hidden_size % 2 for config in configs)


# The reported NaNs: one expert with a CV^2 loss (importance, or load under noisy gating), noisy gating choosing every
# expert, and the small configs of the issue (odd hidden size, hidden 4, relu / linear, tiny rms_norm_eps).
TINY = dict(vocab_size=16, hidden_size=8, intermediate_size=4, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, output_router_logits=True)
REGRESSIONS = {
    "one_expert_importance_loss": dict(num_local_experts=1, num_experts_per_tok=1, router_importance_loss_coef=0.1),
    "one_expert_load_loss": dict(num_local_experts=1, num_experts_per_tok=1, noisy_gating=True,
                                 router_load_loss_coef=0.1),
    "noisy_gating_every_expert_chosen": dict(num_local_experts=3, num_experts_per_tok=3, noisy_gating=True,
                                             router_load_loss_coef=0.1),
    "hidden_33_head_dim_8_relu": dict(hidden_size=33, head_dim=8, hidden_act="relu", num_local_experts=4),
    "hidden_4_linear_tiny_eps": dict(hidden_size=4, num_attention_heads=1, hidden_act="linear", rms_norm_eps=1e-12,
                                     num_local_experts=2, num_experts_per_tok=1),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_reported_nan_config_trains_with_finite_loss_and_gradients(name):
    assert_trains(MixtralMoEForCausalLM, MixtralMoEConfig(**{**TINY, **REGRESSIONS[name]}), seed=0)
