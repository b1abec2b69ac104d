"""transformers.Trainer: real optimisation steps with the router load-balancing loss, gradient accumulation and
gradient checkpointing.

The accumulation tests compare one SGD step on the batch [A; A] (batch size 2, no accumulation) with one SGD step on
A then A (batch size 1, 2 accumulation steps). With A duplicated, the aux loss of each micro-batch equals the aux loss
of the full batch, so the two runs agree only if the aux term is weighted by each micro-batch's share of the items
(Trainer sums micro-batch losses when the model consumes `num_items_in_batch`).
"""

import math

import pytest
import torch
from conftest import FAMILIES, random_input_ids, randomize_weights_
from datasets import Dataset
from torch.testing import assert_close
from transformers import Trainer, TrainingArguments

import hf_moe
from hf_moe import MixtralMoEForCausalLM

SEQ_LEN = 8


def causal_lm_rows(copies: int = 2) -> list[dict]:
    """`copies` identical rows A (every position a label)."""
    tokens = random_input_ids(1, SEQ_LEN, seed=7)[0].tolist()
    return [{"input_ids": tokens, "attention_mask": [1] * SEQ_LEN, "labels": tokens}] * copies


def classification_rows(copies: int = 2) -> list[dict]:
    tokens = random_input_ids(1, SEQ_LEN, seed=7)[0].tolist()
    return [{"input_ids": tokens, "attention_mask": [1] * SEQ_LEN, "labels": 1}] * copies


def train_one_step(model, rows, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=1, **overrides):
    """One plain SGD step (lr 0.1, no warmup, decay or clipping), examples in order, on CPU."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=1,
        train_sampling_strategy="sequential",
        seed=0,
        data_seed=0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **overrides,
    )
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()


def causal_lm_with_aux_loss(family, model_class=None, router_aux_loss_coef=1.0, seed=0):
    torch.manual_seed(seed)
    config = family.make_config(output_router_logits=True, router_aux_loss_coef=router_aux_loss_coef)
    return randomize_weights_((model_class or family.causal_lm_class)(config))


def router_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}


def parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_parameters(actual: dict, expected: dict, atol: float = 1e-6):
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert_close(actual[name], value, atol=atol, rtol=0, msg=name)


def max_router_difference(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a if n.endswith("mlp.gate.weight"))


def test_trainer_step_with_aux_loss_is_finite_and_updates_router_weights(family, tmp_path):
    model = causal_lm_with_aux_loss(family)
    before = router_weights(model)
    assert before, "no router found"
    result = train_one_step(model, causal_lm_rows(), tmp_path)
    assert math.isfinite(result.training_loss)
    after = router_weights(model)
    for name in before:
        assert (after[name] - before[name]).abs().max() > 1e-6, f"{name} did not change"


def test_aux_loss_coefficient_changes_the_router_update(family, tmp_path):
    """The aux term really reaches the router gradient through Trainer (not only the LM loss)."""
    with_aux = causal_lm_with_aux_loss(family, router_aux_loss_coef=1.0)
    without_aux = causal_lm_with_aux_loss(family, router_aux_loss_coef=0.0)
    assert_same_parameters(parameters(with_aux), parameters(without_aux), atol=0)
    train_one_step(with_aux, causal_lm_rows(), tmp_path / "with")
    train_one_step(without_aux, causal_lm_rows(), tmp_path / "without")
    assert max_router_difference(parameters(with_aux), parameters(without_aux)) > 1e-4


def test_gradient_accumulation_matches_the_full_batch_with_aux_loss(family, tmp_path):
    full_batch = causal_lm_with_aux_loss(family)
    accumulated = causal_lm_with_aux_loss(family)
    train_one_step(full_batch, causal_lm_rows(), tmp_path / "full", per_device_train_batch_size=2)
    train_one_step(accumulated, causal_lm_rows(), tmp_path / "accumulated", per_device_train_batch_size=1,
                   gradient_accumulation_steps=2)
    assert_same_parameters(parameters(accumulated), parameters(full_batch))


class UnscaledAuxMixtralMoEForCausalLM(MixtralMoEForCausalLM):
    """Behaves as if the full aux loss were added to every micro-batch, ignoring the micro-batch's share of
    `num_items_in_batch` (what transformers' own MoE models do). Built on the public outputs only: it adds back the
    part of `router_aux_loss_coef * aux_loss` that the share removed. The name keeps the `ForCausalLM` suffix so
    Trainer treats it as a causal LM."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, labels=labels, **kwargs)
        num_items_in_batch = kwargs.get("num_items_in_batch")
        if labels is not None and num_items_in_batch is not None and out.aux_loss is not None:
            share = labels[..., 1:].ne(-100).sum() / num_items_in_batch
            out.loss = out.loss + (1 - share) * self.config.router_aux_loss_coef * out.aux_loss
        return out


def test_accumulation_check_catches_an_aux_loss_multiplied_by_the_accumulation_steps(tmp_path):
    """The accumulation test above is a real guard: without the share, accumulating 2 micro-batches trains with
    twice the aux coefficient, which moves the routers measurably."""
    family = FAMILIES["mixtral"]
    full_batch = causal_lm_with_aux_loss(family, router_aux_loss_coef=1.0)
    full_batch_double_coef = causal_lm_with_aux_loss(family, router_aux_loss_coef=2.0)
    unscaled = causal_lm_with_aux_loss(family, model_class=UnscaledAuxMixtralMoEForCausalLM)
    train_one_step(full_batch, causal_lm_rows(), tmp_path / "full")
    train_one_step(full_batch_double_coef, causal_lm_rows(), tmp_path / "double")
    train_one_step(unscaled, causal_lm_rows(), tmp_path / "unscaled", per_device_train_batch_size=1,
                   gradient_accumulation_steps=2)
    assert max_router_difference(parameters(unscaled), parameters(full_batch)) > 1e-4
    assert_same_parameters(parameters(unscaled), parameters(full_batch_double_coef))


def test_trainer_step_with_gradient_checkpointing_matches_plain_step(family, tmp_path):
    plain = causal_lm_with_aux_loss(family)
    checkpointed = causal_lm_with_aux_loss(family)
    layer_calls = []
    for layer in checkpointed.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    train_one_step(plain, causal_lm_rows(), tmp_path / "plain")
    result = train_one_step(checkpointed, causal_lm_rows(), tmp_path / "checkpointed", activation_checkpointing=True)
    assert math.isfinite(result.training_loss)
    assert len(layer_calls) == 2 * checkpointed.config.num_hidden_layers  # forward + recomputation in backward
    assert_same_parameters(parameters(checkpointed), parameters(plain))


def test_sequence_classification_gradient_accumulation_matches_the_full_batch(tmp_path):
    family = FAMILIES["mixtral"]
    full_batch = family.sequence_classifier(num_labels=3).train()
    accumulated = family.sequence_classifier(num_labels=3).train()
    train_one_step(full_batch, classification_rows(), tmp_path / "full", per_device_train_batch_size=2)
    train_one_step(accumulated, classification_rows(), tmp_path / "accumulated", per_device_train_batch_size=1,
                   gradient_accumulation_steps=2)
    assert_same_parameters(parameters(accumulated), parameters(full_batch))


def test_router_callback_logs_each_balancing_loss_as_its_own_scalar(family, tmp_path):
    """lr 0 keeps the weights, so each step's logged value is the mean over its 2 micro-batches of the loss the
    initial model computes; the z-loss is also written out from the router logits (ST-MoE: mean of logsumexp^2)."""
    torch.manual_seed(0)
    config = family.make_config(output_router_logits=True, router_aux_loss_coef=0.02, router_z_loss_coef=0.001,
                                router_importance_loss_coef=0.1)
    model = randomize_weights_(family.causal_lm_class(config))
    rows = [{"input_ids": ids, "attention_mask": [1] * SEQ_LEN, "labels": ids}
            for ids in random_input_ids(4, SEQ_LEN, seed=3).tolist()]
    model.train()
    with torch.no_grad():
        outputs = [model(**{key: torch.tensor([value]) for key, value in row.items()}) for row in rows]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2,
        optim="sgd", learning_rate=0.0, logging_steps=1, train_sampling_strategy="sequential", report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    hf_moe.add_router_callback(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    for step, entry in zip((1, 2), logs):
        micro_batches = outputs[2 * (step - 1): 2 * step]
        for name in ("router_aux_loss", "router_z_loss", "router_importance_loss"):
            expected = sum(float(output.router_losses[f"{name}_coef"]) for output in micro_batches) / 2
            assert entry[f"moe/{name}"] == pytest.approx(expected, rel=1e-5), (step, name)
        written_out = sum(
            float(torch.stack([torch.logsumexp(logits, dim=-1).square().mean() for logits in output.router_logits]).mean())
            for output in micro_batches) / 2
        assert entry["moe/router_z_loss"] == pytest.approx(written_out, rel=1e-5)
        weighted = (0.02 * entry["moe/router_aux_loss"] + 0.001 * entry["moe/router_z_loss"]
                    + 0.1 * entry["moe/router_importance_loss"])
        assert entry["moe/weighted_aux_loss"] == pytest.approx(weighted, rel=1e-5)
        assert "router/entropy" in entry
