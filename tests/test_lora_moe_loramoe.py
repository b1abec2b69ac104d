"""LoRAMoE: the dense routed LoRA forward and the Localized Balancing Constraint (LBC), as the reference code."""

import pytest
import torch
import torch.nn.functional as F
from test_lora_moe import causal_lm_loss, peft_model, token_ids, train_one_step
from torch.testing import assert_close

import hf_moe
from hf_moe.finetune.lora_moe import LoraMoeLinear, TypeIdsCollator
from hf_moe.finetune.lora_moe.losses import localized_balancing_loss

LORAMOE = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, "num_experts": 4, "r": 2}


def reference_cv_squared(x):
    eps = 1e-10
    if x.shape[0] == 1:
        return torch.tensor([0], device=x.device, dtype=x.dtype)[0]
    return x.float().var() / (x.float().mean() ** 2 + eps)


def reference_lbc(route_weight, task_types, lora_num, blc_alpha, blc_weight):
    """`Linear.forward`'s blcls in Ablustrund/LoRAMoE (peft/tuners/lora.py), verbatim but for the names."""
    task_types = task_types.view(-1, 1)
    return reference_cv_squared((
        route_weight.sum(dim=(1)) * torch.where(
            torch.concat(
                ((task_types == 1).repeat(1, lora_num // 2), (task_types == 0).repeat(1, lora_num // 2)), dim=-1
            ), 1.0 + blc_alpha, 1.0 - blc_alpha
        )
    ).flatten()) * blc_weight


@pytest.mark.parametrize("batch, experts", [(3, 6), (1, 4), (5, 2)])
def test_lbc_equals_the_reference_code(batch, experts):
    route_weights = torch.softmax(torch.randn(batch, 7, experts), dim=-1)
    types = torch.randint(0, 2, (batch,))
    expected = reference_lbc(route_weights, types, experts, blc_alpha=0.1, blc_weight=1.0)
    assert_close(localized_balancing_loss(route_weights, types, delta=0.1, num_types=2), expected)


def test_lbc_groups_generalise_to_more_types():
    """Three types, six experts: group g (experts 2g, 2g+1) serves type 2 - g; a type no group serves gets 1 - delta
    everywhere."""
    route_weights = torch.softmax(torch.randn(4, 5, 6), dim=-1)
    types = torch.tensor([2, 1, 0, 7])
    importance = route_weights.sum(dim=1)
    coefficients = torch.full((4, 6), 0.8)
    coefficients[0, 0:2] = coefficients[1, 2:4] = coefficients[2, 4:6] = 1.2
    weighted = (importance * coefficients).flatten()
    expected = weighted.var() / (weighted.mean() ** 2 + 1e-10)
    assert_close(localized_balancing_loss(route_weights, types, delta=0.2, num_types=3), expected)


def test_loramoe_linear_equals_dense_routed_lora_written_out():
    model = peft_model(hf_moe.LoraMoeConfig(**LORAMOE))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, 64)
    route, lora_a, lora_b = (param["default"] for param in (layer.loramoe_router, layer.loramoe_A, layer.loramoe_B))
    route_weight = torch.softmax(F.linear(x, route), dim=-1)
    expected = F.linear(x, layer.base_layer.weight)
    for i in range(4):
        expected = expected + route_weight[:, :, i, None] * F.linear(F.linear(x, lora_a[i]), lora_b[i]) * (32 / 2)
    with torch.no_grad():
        assert_close(layer(x), expected)


def lbc_of_model(model, ids, types, delta, weight):
    """beta * sum over every LoRAMoE Linear of the reference LBC, from each Linear's input."""
    total = torch.tensor(0.0)
    inputs = []
    handles = [module.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0])))
               for module in model.modules() if isinstance(module, LoraMoeLinear)]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, lora_moe_type_ids=types)
    for handle in handles:
        handle.remove()
    for module, x in inputs:
        route_weight = torch.softmax(F.linear(x, module.loramoe_router["default"]), dim=-1)
        total = total + reference_lbc(route_weight, types, 4, delta, weight)
    assert len(inputs) == 2 * 3  # gate, up and down of both layers
    return out, total


def test_lbc_is_summed_over_the_linears_and_added_to_the_loss():
    model = peft_model(hf_moe.LoraMoeConfig(**LORAMOE, lbc_delta=0.3, lbc_weight=0.5))
    ids, types = token_ids(3, 6), torch.tensor([1, 0, 1])
    out, expected = lbc_of_model(model, ids, types, delta=0.3, weight=0.5)
    assert_close(out.aux_loss, expected)
    assert_close(out.aux_losses["lbc_loss"], expected / 0.5)
    assert_close(out.loss, causal_lm_loss(out.logits, ids) + expected)


def test_without_type_ids_there_is_no_lbc_and_wrong_ones_are_refused():
    model = peft_model(hf_moe.LoraMoeConfig(**LORAMOE))
    ids = token_ids(2, 6)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        assert not hasattr(out, "aux_losses")
        assert_close(out.loss, causal_lm_loss(out.logits, ids))
        with pytest.raises(ValueError, match="one type id per sample"):
            model(input_ids=ids, lora_moe_type_ids=torch.tensor([1, 0, 1]))


def test_type_ids_travel_from_a_dataset_column_through_trainer(tmp_path):
    tokens = token_ids(1, 8, seed=7)[0].tolist()
    rows = [{"input_ids": tokens, "attention_mask": [1] * 8, "labels": tokens, "task_type": kind} for kind in (1, 0)]
    model = peft_model(hf_moe.LoraMoeConfig(**LORAMOE))
    trainer = train_one_step(model, rows, tmp_path, batch_size=2, accumulation=1, remove_unused_columns=False,
                             data_collator=TypeIdsCollator(column="task_type"))
    assert trainer.state.log_history[0]["lora_moe/lbc_loss"] > 0
    with pytest.raises(ValueError, match="no `task_type` column"):
        TypeIdsCollator()([{"input_ids": tokens}])
