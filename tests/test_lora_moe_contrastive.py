"""MoELoRA's contrastive loss among experts as an auxiliary loss of MixLoRA, LoRAMoE and MoLA: the formula, the expert
outputs each layer contrasts, gradient accumulation, logging, save/load, and that it is off by default."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftConfig, PeftModel
from test_lora_moe import adapter_state, peft_model, tiny_llama, token_ids, train_one_step
from torch.testing import assert_close

import hf_moe
from hf_moe.finetune.lora_moe import LoraMoeLinear, MixLoraFeedForward, MolaLinear
from hf_moe.finetune.lora_moe.losses import expert_contrastive_loss

COMMON = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "contrastive_loss_coef": 0.5, "contrastive_temperature": 0.2}
CONFIGS = {
    "mixlora": lambda **changes: hf_moe.MixLoraConfig(**{**COMMON, "num_experts": 4, "top_k": 2, "r": 4,
                                                         "router_aux_loss_coef": 0.0, **changes}),
    "loramoe": lambda **changes: hf_moe.LoraMoeConfig(**{**COMMON, "num_experts": 4, "r": 2, **changes}),
    "mola": lambda **changes: hf_moe.MolaConfig(**{**COMMON, "num_experts": [3, 4], "top_k": 2, "r": 4, **changes}),
}
LAYERS = {"mixlora": MixLoraFeedForward, "loramoe": LoraMoeLinear, "mola": MolaLinear}


def reference_loss(outputs: list[torch.Tensor], experts: list[int], temperature: float) -> torch.Tensor | None:
    """The multi-positive InfoNCE of one sequence, one anchor and one positive at a time: positives are the other
    outputs of the anchor's expert, the denominator runs over every other output. None without any anchor."""
    per_anchor = []
    for n, anchor in enumerate(outputs):
        others = [m for m in range(len(outputs)) if m != n]
        positives = [m for m in others if experts[m] == experts[n]]
        if not positives:
            continue
        similarity = {m: F.cosine_similarity(anchor, outputs[m], dim=0) / temperature for m in others}
        denominator = sum(torch.exp(similarity[m]) for m in others)
        per_anchor.append(-sum(torch.log(torch.exp(similarity[p]) / denominator) for p in positives) / len(positives))
    return torch.stack(per_anchor).mean() if per_anchor else None


def test_contrastive_loss_equals_the_infonce_formula_written_out():
    torch.manual_seed(0)
    outputs = torch.randn(3, 6, 5)
    experts = torch.tensor([[0, 1, 0, 2, 1, 0], [2, 2, 1, 1, 0, 2], [0, 1, 2, 3, 4, 5]])
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, :2] = False  # padding: neither anchor nor positive nor in any denominator
    loss, has_anchor = expert_contrastive_loss(outputs @ outputs.transpose(1, 2), experts, valid, temperature=0.3)
    for b in range(2):
        kept = valid[b].nonzero().flatten().tolist()
        expected = reference_loss([outputs[b, n] for n in kept], [int(experts[b, n]) for n in kept], 0.3)
        assert_close(loss[b], expected)
    assert has_anchor.tolist() == [True, True, False]  # every output of the last sequence has its own expert
    assert loss[2] == 0


def test_an_expert_output_of_norm_zero_gives_a_finite_loss_and_no_gradient():
    outputs = torch.randn(1, 4, 3)
    outputs[0, 0] = 0.0
    outputs.requires_grad_(True)
    loss, _ = expert_contrastive_loss(outputs @ outputs.transpose(1, 2), torch.tensor([[0, 0, 1, 1]]),
                                      torch.ones(1, 4, dtype=torch.bool), temperature=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(outputs.grad).all()


def capture_inputs(model, layer_class) -> list[tuple[torch.nn.Module, list[torch.Tensor]]]:
    """The input of every adapted module of `layer_class` at each call, in call order."""
    captured = []
    for module in model.modules():
        if isinstance(module, layer_class):
            inputs = []
            module.register_forward_pre_hook(lambda _, args, inputs=inputs: inputs.append(args[0].detach()))
            captured.append((module, inputs))
    return captured


def expert_outputs_written_out(method: str, module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Every (token, routed expert) output of one sequence x [S, in]: B_e A_e x for the Linear methods (every expert
    with LoRAMoE's dense routing, the top-k with MoLA), FFN_e(x) - FFN(x) for MixLoRA's FFN experts."""
    weights = module.adapter_tensors("default")
    probs = torch.softmax(x @ weights["router"].T, dim=-1)
    chosen = (probs.topk(module.top_k["default"]).indices if module.top_k["default"] is not None
              else torch.arange(probs.shape[-1]).expand(len(x), -1))
    outputs, experts = [], []
    for token, token_experts in zip(x, chosen.tolist()):
        for e in token_experts:
            if method == "mixlora":
                merged, ffn = module.expert_weights("default"), module.base_layer
                expert = F.linear(ffn.act_fn(merged["gate"][e] @ token) * (merged["up"][e] @ token), merged["down"][e])
                outputs.append(expert - ffn(token))
            else:
                outputs.append(weights["B"][e] @ (weights["A"][e] @ token))
            experts.append(e)
    return outputs, experts


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_the_loss_contrasts_each_layers_expert_outputs_on_the_real_tokens(method):
    """The model's `contrastive_loss` is the formula over the outputs each adapted module's experts give each real
    token they were routed to, averaged over (module, sequence); padding takes no part."""
    model = peft_model(CONFIGS[method]())
    captured = capture_inputs(model, LAYERS[method])
    ids = token_ids(2, 5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    expected = []
    for module, inputs in captured:
        (x,) = inputs
        for b in range(2):
            real = x[b][mask[b].bool()]
            outputs, experts = expert_outputs_written_out(method, module, real)
            value = reference_loss(outputs, experts, COMMON["contrastive_temperature"])
            if value is not None:
                expected.append(value)
    assert_close(out.aux_losses["contrastive_loss"], torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)
    assert_close(out.aux_loss, COMMON["contrastive_loss_coef"] * out.aux_losses["contrastive_loss"])


def test_a_long_sequence_contributes_a_random_subset_of_its_real_tokens():
    model = peft_model(CONFIGS["mola"](contrastive_max_tokens=3))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    layer.start_recording(mask)
    top_k_index = torch.zeros(14, 2, dtype=torch.long)
    rng = torch.get_rng_state()
    rows, experts, valid = layer._contrastive_slots("default", 14, 2, top_k_index)
    layer.stop_recording()
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator: dropout masks (and their replay) unchanged
    assert rows.shape == (2, 3) and experts.shape == valid.shape == (2, 3, 2) and valid.all()
    assert set(rows[0].tolist()) <= {2, 3, 4, 5, 6} and set(rows[1].tolist()) <= {7, 8, 9, 10}
    assert len(set(rows[0].tolist())) == 3 == len(set(rows[1].tolist()))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_off_by_default_and_the_forward_is_the_same_either_way(method):
    ids = token_ids(2, 6)
    default = CONFIGS[method](contrastive_loss_coef=0.0, contrastive_temperature=0.07)
    assert hf_moe.MixLoraConfig().contrastive_loss_coef == 0 == type(default)().contrastive_loss_coef
    off, on = peft_model(default), peft_model(CONFIGS[method]())
    assert all(module.contrastive_tokens["default"] == 0 for module in off.modules() if isinstance(
        module, LAYERS[method]))
    rng = torch.get_rng_state()
    with torch.no_grad():
        without, with_loss = off(input_ids=ids, labels=ids), on(input_ids=ids, labels=ids)
    assert torch.equal(torch.get_rng_state(), rng)  # sequences no longer than contrastive_max_tokens: no sampling
    assert "contrastive_loss" not in getattr(without, "aux_losses", {})  # LoRAMoE without type ids: no aux term
    assert torch.equal(without.logits, with_loss.logits)
    aux = getattr(without, "aux_loss", None) or 0.0
    assert_close(with_loss.loss - without.loss, with_loss.aux_loss - aux)


def test_gradient_accumulation_gives_the_same_contrastive_contribution(tmp_path):
    """One SGD step on 4 identical rows: batch 4 vs batch 1 with 4 accumulation steps and activation checkpointing
    (whose recomputation runs without recording: the loss's sample must not be recomputed)."""
    tokens = token_ids(1, 8, seed=7)[0].tolist()
    rows = [{"input_ids": tokens, "attention_mask": [1] * 8, "labels": tokens}] * 4

    def step(batch_size, accumulation, coef, **options):
        model = peft_model(CONFIGS["mixlora"](contrastive_loss_coef=coef))
        trainer = train_one_step(model, rows, tmp_path, batch_size, accumulation, **options)
        return adapter_state(model), trainer.state.log_history[0]

    full, full_log = step(4, 1, coef=1.0)
    accumulated, accumulated_log = step(1, 4, coef=1.0, activation_checkpointing=True)
    without, without_log = step(4, 1, coef=0.0)
    expert = "base_model.model.model.layers.0.mlp.mixlora_up_A.default"
    assert (full[expert] - without[expert]).abs().max() > 1e-4  # the loss moves the experts
    for name in full:
        assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)
    assert_close(accumulated_log["loss"], full_log["loss"], rtol=1e-5, atol=1e-6)
    for key in ("lora_moe/contrastive_loss", "lora_moe/aux_loss"):  # logged as their own scalars
        assert_close(accumulated_log[key], full_log[key], rtol=1e-5, atol=1e-6)
    assert full_log["lora_moe/contrastive_loss"] > 0 and "lora_moe/contrastive_loss" not in without_log


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_the_fields_are_saved_and_a_reloaded_adapter_computes_the_same_loss(method, tmp_path):
    config = CONFIGS[method](contrastive_max_tokens=32)
    model = peft_model(config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["contrastive_loss_coef"], saved["contrastive_temperature"], saved["contrastive_max_tokens"]) == (
        0.5, 0.2, 32)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and {**loaded.to_dict(), "inference_mode": False} == config.to_dict()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = token_ids(2, 6)
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).aux_losses["contrastive_loss"],
                     model(input_ids=ids).aux_losses["contrastive_loss"])


@pytest.mark.parametrize("field, value", [("contrastive_loss_coef", -0.1), ("contrastive_temperature", 0.0),
                                          ("contrastive_max_tokens", 0), ("contrastive_max_tokens", 2.5)])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_invalid_contrastive_fields_raise_naming_the_field(method, field, value):
    with pytest.raises(ValueError, match=f"`{field}`="):
        CONFIGS[method](**{field: value})


def test_moelora_has_no_contrastive_loss():
    """MOELoRA's gate depends on the task only: no token routing for the loss to guide (config.py)."""
    with pytest.raises(TypeError):
        hf_moe.MoeLoraConfig(num_tasks=2, contrastive_loss_coef=0.1)
