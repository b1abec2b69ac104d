"""Token-classification and question-answering heads of both families.

Independent reference: transformers' own Mixtral and Qwen2-MoE heads with the same weights (our Mixtral family holds
transformers' Mixtral, our DeepSeek family holds Qwen2-MoE, as `hf-moe import` converts them). The balancing losses
are added as in every other head of ours, weighted by the micro-batch's share of Trainer's item count.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_weights_
from torch.testing import assert_close
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForTokenClassification,
    MixtralConfig,
    MixtralForQuestionAnswering,
    MixtralForTokenClassification,
    Qwen2MoeConfig,
    Qwen2MoeForQuestionAnswering,
    Qwen2MoeForTokenClassification,
    Trainer,
    TrainingArguments,
)

from hf_moe.conversion.native import native_config_to_ours

ATOL = 1e-5
VOCAB = 96
NUM_LABELS = 5

NATIVE = {
    "mixtral": (
        lambda: MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, pad_token_id=0, num_labels=NUM_LABELS),
        {"token": MixtralForTokenClassification, "qa": MixtralForQuestionAnswering},
    ),
    "qwen2_moe": (
        lambda: Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                               shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, pad_token_id=0,
                               num_labels=NUM_LABELS),
        {"token": Qwen2MoeForTokenClassification, "qa": Qwen2MoeForQuestionAnswering},
    ),
}
AUTO = {"token": AutoModelForTokenClassification, "qa": AutoModelForQuestionAnswering}


def native_and_ours(fmt: str, head: str, seed: int = 0):
    """transformers' head with random weights, and ours (built through the Auto class) holding the same weights."""
    make_config, classes = NATIVE[fmt]
    native_config = make_config()
    torch.manual_seed(seed)
    native = randomize_weights_(classes[head](native_config)).eval()
    config = native_config_to_ours(native_config.to_dict())
    config.num_labels = NUM_LABELS
    ours = AUTO[head].from_config(config).eval()
    state = {name.replace(".shared_expert.", ".shared_experts."): tensor for name, tensor in native.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return native, ours


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding in one row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(params=list(NATIVE))
def fmt(request):
    return request.param


def test_our_heads_are_the_registered_family_classes(fmt):
    _, token = native_and_ours(fmt, "token")
    _, qa = native_and_ours(fmt, "qa")
    prefix = {"mixtral": "MixtralMoE", "qwen2_moe": "DeepSeekMoE"}[fmt]
    assert type(token).__name__ == f"{prefix}ForTokenClassification"
    assert type(qa).__name__ == f"{prefix}ForQuestionAnswering"


def test_token_classification_matches_transformers(fmt):
    native, ours = native_and_ours(fmt, "token")
    batch = inputs()
    labels = torch.randint(0, NUM_LABELS, batch["input_ids"].shape, generator=torch.Generator().manual_seed(2))
    labels[batch["attention_mask"] == 0] = -100
    with torch.no_grad():
        expected = native(**batch, labels=labels)
        got = ours(**batch, labels=labels)
    assert_close(got.logits, expected.logits, atol=ATOL, rtol=0)
    assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    # the loss written out: cross-entropy over the labelled tokens
    written = F.cross_entropy(got.logits.reshape(-1, NUM_LABELS), labels.reshape(-1), ignore_index=-100)
    assert_close(got.loss, written, atol=ATOL, rtol=0)


def test_question_answering_matches_transformers(fmt):
    native, ours = native_and_ours(fmt, "qa")
    batch = inputs()
    start, end = torch.tensor([3, 1, 4]), torch.tensor([5, 2, 30])  # 30: past the sequence, ignored
    with torch.no_grad():
        expected = native(**batch, start_positions=start, end_positions=end)
        got = ours(**batch, start_positions=start, end_positions=end)
    assert_close(got.start_logits, expected.start_logits, atol=ATOL, rtol=0)
    assert_close(got.end_logits, expected.end_logits, atol=ATOL, rtol=0)
    assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    length = batch["input_ids"].shape[1]
    written = (F.cross_entropy(got.start_logits, start.clamp(0, length), ignore_index=length)
               + F.cross_entropy(got.end_logits, end.clamp(0, length), ignore_index=length)) / 2
    assert_close(got.loss, written, atol=ATOL, rtol=0)


@pytest.mark.parametrize("head", ["token", "qa"])
def test_balancing_loss_is_added_with_the_router_outputs(fmt, head):
    _, ours = native_and_ours(fmt, head)
    batch = inputs()
    targets = ({"labels": torch.zeros_like(batch["input_ids"])} if head == "token"
               else {"start_positions": torch.tensor([3, 1, 4]), "end_positions": torch.tensor([5, 2, 6])})
    with torch.no_grad():
        plain = ours(**batch, **targets)
        with_router = ours(**batch, **targets, output_router_logits=True, output_router_stats=True)
    assert plain.aux_loss is None and plain.router_logits is None
    assert len(with_router.router_logits) == 2 and len(with_router.router_stats) == 2
    coefficient = ours.config.router_aux_loss_coef
    assert_close(with_router.loss, plain.loss + coefficient * with_router.aux_loss, atol=ATOL, rtol=0)


def test_token_classification_weights_the_balancing_loss_by_the_micro_batch_share():
    _, ours = native_and_ours("mixtral", "token")
    batch = inputs()
    labels = torch.randint(0, NUM_LABELS, batch["input_ids"].shape, generator=torch.Generator().manual_seed(3))
    labels[batch["attention_mask"] == 0] = -100
    counted = int(labels.ne(-100).sum())
    num_items = torch.tensor(3 * counted)  # this micro-batch holds a third of the optimizer step's items
    with torch.no_grad():
        out = ours(**batch, labels=labels, output_router_logits=True, num_items_in_batch=num_items)
    summed = F.cross_entropy(out.logits.reshape(-1, NUM_LABELS), labels.reshape(-1), reduction="sum")
    expected = summed / num_items + ours.config.router_aux_loss_coef * out.aux_loss / 3
    assert_close(out.loss, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("head", ["token", "qa"])
def test_save_and_load_through_the_auto_class(fmt, head, tmp_path):
    _, ours = native_and_ours(fmt, head)
    ours.save_pretrained(tmp_path)
    loaded = AUTO[head].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(ours)
    batch = inputs()
    with torch.no_grad():
        expected, got = ours(**batch), loaded(**batch)
    select = (lambda out: out.logits) if head == "token" else (lambda out: torch.stack([out.start_logits,
                                                                                       out.end_logits]))
    assert_close(select(got), select(expected), atol=1e-6, rtol=0)


def test_token_classification_trains_with_trainer(tmp_path):
    _, ours = native_and_ours("qwen2_moe", "token")
    ours.config.output_router_logits = True
    generator = torch.Generator().manual_seed(4)
    rows = [{"input_ids": torch.randint(1, VOCAB, (8,), generator=generator),
             "labels": torch.randint(0, NUM_LABELS, (8,), generator=generator)} for _ in range(4)]
    before = {name: p.detach().clone() for name, p in ours.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", seed=0)
    result = Trainer(model=ours.train(), args=args, train_dataset=rows).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [name for name, p in ours.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert any(".mlp.gate." in name for name in changed) and any(name.startswith("score.") for name in changed)
