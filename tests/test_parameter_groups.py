"""Fine-tuning knobs: the router / experts / other parameter groups, freezing them, and their own learning rates
(`MoETrainer`), for full fine-tuning of our MoE models and for the PEFT methods, alone and through a recipe's
`parameter_groups` section."""

import os

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from test_lora_moe import randomize_adapters_, tiny_llama, token_ids
from test_recipes import RECIPES, TINY_TRAINING, run_shipped, tiny  # noqa: F401 (the `tiny` fixture)
from transformers import AutoModelForCausalLM, TrainingArguments

import hf_moe
from hf_moe import MixtralMoEConfig, MixtralMoEForCausalLM
from hf_moe.finetune.recipes import apply_parameter_groups, load_recipe, run_recipe, validate_recipe
from hf_moe.finetune.trainer import MoETrainer, freeze_parameter_groups, parameter_groups

SIZES = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0}


def tiny_moe(seed: int = 0) -> MixtralMoEForCausalLM:
    torch.manual_seed(seed)
    return MixtralMoEForCausalLM(MixtralMoEConfig(num_local_experts=4, num_experts_per_tok=2, **SIZES))


def models() -> dict:
    """A tiny hf-moe model (full fine-tuning), plain LoRA on its experts and attention, and MixLoRA and MOELoRA on a
    tiny Llama, with every adapter tensor random (a zero LoRA B gets no gradient for its A)."""
    lora = get_peft_model(tiny_moe(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["gate"],
                                                 target_parameters=["mlp.experts.gate_up_proj"]))
    mixlora = get_peft_model(tiny_llama(), hf_moe.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0))
    moelora = get_peft_model(tiny_llama(), hf_moe.MoeLoraConfig(num_tasks=2, r=4, num_experts=2, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return {"full": tiny_moe(), "lora": lora, "mixlora": randomize_adapters_(mixlora),
            "moelora": randomize_adapters_(moelora, std=0.1)}


def trainable_names(model, group: str) -> set[str]:
    return {name for name, param in parameter_groups(model)[group] if param.requires_grad}


def test_each_parameter_belongs_to_its_group():
    built = models()
    full, lora, mixlora, moelora = (built[name] for name in ("full", "lora", "mixlora", "moelora"))
    assert trainable_names(full, "router") == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert trainable_names(full, "experts") == {f"model.layers.{i}.mlp.experts.{name}" for i in range(2)
                                                for name in ("gate_up_proj", "down_proj")}
    assert "model.layers.0.self_attn.q_proj.weight" in trainable_names(full, "other")
    assert all(".mlp.gate.modules_to_save." in name for name in trainable_names(lora, "router"))
    assert trainable_names(lora, "experts") and all(".mlp.experts.lora_" in name
                                                    for name in trainable_names(lora, "experts"))
    assert all("q_proj.lora_" in name for name in trainable_names(lora, "other"))
    assert all("mixlora_router" in name for name in trainable_names(mixlora, "router"))
    assert all(name.split(".")[-2].startswith(("mixlora_gate_", "mixlora_up_", "mixlora_down_"))
               for name in trainable_names(mixlora, "experts"))
    assert trainable_names(mixlora, "other") and all("self_attn" in name for name in trainable_names(mixlora, "other"))
    assert all(name.split(".")[-2] in ("moelora_task_embedding", "moelora_gate")
               for name in trainable_names(moelora, "router"))
    assert not trainable_names(moelora, "other")
    every = {name for name, _ in full.named_parameters()}
    assert set().union(*({name for name, _ in params} for params in parameter_groups(full).values())) == every


def sgd_step(model, group_learning_rates=None, batch: int = 2, **inputs) -> MoETrainer:
    """One plain SGD step (lr 0.5, constant, no decay or clipping) on a few random rows."""
    ids = token_ids(batch, 6, seed=3)
    rows = [{"input_ids": row, "attention_mask": [1] * 6, "labels": row, **inputs} for row in ids.tolist()]
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=batch, optim="sgd", learning_rate=0.5,
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, max_steps=1,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0)
    trainer = MoETrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         group_learning_rates=group_learning_rates)
    trainer.train()
    return trainer


@pytest.mark.parametrize("frozen", [["router"], ["experts"], ["other"], ["router", "experts"]],
                         ids=lambda frozen: "+".join(frozen))
@pytest.mark.parametrize("method", ["full", "lora", "mixlora"])
def test_freezing_keeps_exactly_the_frozen_groups_bit_identical(method, frozen):
    model = models()[method]
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    groups = {group: {name for name, _ in params} & trainable for group, params in parameter_groups(model).items()}
    counts = freeze_parameter_groups(model, frozen)
    assert counts == {group: len(groups[group]) for group in frozen}
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    sgd_step(model.train())
    after = dict(model.named_parameters())
    for group, names in groups.items():
        for name in names:
            if group in frozen:
                assert torch.equal(after[name], before[name]), name
            else:
                assert not torch.equal(after[name], before[name]), name
    for name in set(before) - trainable:  # what was frozen before stays so
        assert torch.equal(after[name], before[name]), name


def test_each_group_gets_its_learning_rate_in_the_optimizer_and_the_schedule():
    model = models()["mixlora"]
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, weight_decay=0.1, warmup_steps=2,
                             lr_scheduler_type="linear", use_cpu=True, report_to=[])
    trainer = MoETrainer(model=model, args=args, group_learning_rates={"router": 4e-3, "experts": 2e-3})
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    rates = {"router": 4e-3, "experts": 2e-3, "other": 1e-3}
    names = {id(param): name for name, param in model.named_parameters()}
    seen = set()
    for param_group in trainer.optimizer.param_groups:
        group = param_group.get("parameter_group", "other")
        assert param_group["initial_lr"] == rates[group]
        assert {names[id(param)] for param in param_group["params"]} <= trainable_names(model, group)
        seen.update(names[id(param)] for param in param_group["params"])
    assert seen == {name for name, param in model.named_parameters() if param.requires_grad}
    initial = sorted(group["initial_lr"] for group in trainer.optimizer.param_groups)
    assert sorted(trainer.lr_scheduler.base_lrs) == initial
    decayed = set(trainer.get_decay_parameter_names(model))
    for param_group in trainer.optimizer.param_groups:  # weight decay as Trainer chose it for each parameter
        for param in param_group["params"]:
            assert param_group["weight_decay"] == (0.1 if names[id(param)] in decayed else 0.0)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()  # warmup step 1 of 2: every rate is half its own
    for rate, initial in zip(trainer.lr_scheduler.get_last_lr(), trainer.lr_scheduler.base_lrs):
        assert rate == pytest.approx(initial / 2)


def test_a_groups_learning_rate_scales_its_update():
    """SGD from the same start: the experts' step with 10x their learning rate is 10x the step at the base rate, and
    every other parameter takes the same step."""
    def step(rates):
        model = models()["mixlora"]
        before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
        sgd_step(model.train(), group_learning_rates=rates)
        return {name: param.detach() - before[name] for name, param in model.named_parameters() if name in before}

    base, faster = step(None), step({"experts": 5.0})
    experts = trainable_names(models()["mixlora"], "experts")
    for name, delta in base.items():
        torch.testing.assert_close(faster[name], delta * 10 if name in experts else delta, rtol=1e-4, atol=1e-6)


def test_unknown_group_learning_rates_are_refused():
    with pytest.raises(ValueError, match=r"unknown groups \['routers'\]"):
        MoETrainer(model=tiny_moe(), args=TrainingArguments(output_dir="unused", use_cpu=True, report_to=[]),
                   group_learning_rates={"routers": 1e-4})


INVALID = [
    ({"freeze": ["routers"]}, "`parameter_groups.freeze`=['routers']", "distinct groups from ['router', 'experts'"),
    ({"freeze": ["router", "router"]}, "`parameter_groups.freeze`", "distinct groups"),
    ({"freeze": 3, "learning_rates": {"router": 1e-4}}, "`parameter_groups.freeze`=3", "a list of distinct groups"),
    ({"freeze": ["router", "experts", "other"]}, "`parameter_groups.freeze`", "leaves nothing to train"),
    ({"learning_rates": {"expert": 1e-4}}, "`parameter_groups.learning_rates.expert`", "allowed groups"),
    ({"learning_rates": {"router": -1.0}}, "`parameter_groups.learning_rates.router`=-1.0", "> 0"),
    ({"learning_rates": {"router": "1e-4"}}, "`parameter_groups.learning_rates.router`='1e-4'", "write 1.0e-4"),
    ({"learning_rates": [1e-4]}, "`parameter_groups.learning_rates`", "a mapping of groups"),
    ({"freeze": ["router"], "learning_rates": {"router": 1e-4}}, "`parameter_groups.learning_rates.router`",
     "the group is frozen"),
    ({"lr": 1e-4}, "`parameter_groups.lr`", "allowed fields: ['freeze', 'learning_rates']"),
]


@pytest.mark.parametrize("section, field, allowed", INVALID, ids=[case[1] for case in INVALID])
def test_an_invalid_parameter_groups_section_is_refused(section, field, allowed, tiny, tmp_path):  # noqa: F811
    recipe = load_recipe(os.path.join(RECIPES, "mixlora.yaml"), model=tiny["llama"], output_dir=str(tmp_path / "out"),
                         parameter_groups=section, **{"data.train_file": tiny["data"]})
    with pytest.raises(ValueError) as error:
        validate_recipe(recipe)
    assert field in str(error.value) and allowed in str(error.value), str(error.value)


def test_a_single_group_may_be_written_without_a_list(tiny, tmp_path):  # noqa: F811
    recipe = validate_recipe(load_recipe(os.path.join(RECIPES, "mixlora.yaml"), model=tiny["llama"],
                                         output_dir=str(tmp_path / "out"), parameter_groups={"freeze": "router"},
                                         **{"data.train_file": tiny["data"]}))
    assert recipe["parameter_groups"]["freeze"] == ["router"]


@pytest.mark.parametrize("method, section, field, message", [
    ("full", {"freeze": ["router"]}, "`parameter_groups.freeze`", "no trainable parameter in ['router']"),
    ("full", {"learning_rates": {"experts": 1e-4}}, "`parameter_groups.learning_rates.experts`",
     "no trainable parameter in the group 'experts'"),
    ("loramoe", {"freeze": ["router", "experts"]}, "`parameter_groups.freeze`", "leaves no parameter to train"),
])
def test_a_group_this_model_lacks_is_an_error_naming_the_field(method, section, field, message):
    model = tiny_llama()  # dense: no router or experts of its own
    if method != "full":
        model = get_peft_model(model, hf_moe.LoraMoeConfig())
    with pytest.raises(ValueError) as error:
        apply_parameter_groups(model, section, method)
    assert field in str(error.value) and message in str(error.value), str(error.value)


def test_a_recipe_freezes_the_moe_layers_of_a_full_fine_tune(tiny, tmp_path):  # noqa: F811
    """The shipped moe_finetune.yaml (routers and experts frozen): they are saved as they were loaded, the rest moved,
    and nothing is written when a group the model lacks is named."""
    result = run_shipped("moe_finetune.yaml", tiny, tmp_path, base="moe")
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny["moe"]).named_parameters())
    trained = dict(AutoModelForCausalLM.from_pretrained(result.output_dir).named_parameters())
    for name, param in trained.items():
        moe_layer = ".mlp.gate." in name or ".mlp.experts." in name
        assert torch.equal(param, initial[name]) == moe_layer, name

    out = tmp_path / "dense"
    with pytest.raises(ValueError, match=r"`parameter_groups.freeze`=\['router', 'experts'\] is invalid"):
        run_recipe(os.path.join(RECIPES, "moe_finetune.yaml"), model=tiny["llama"], output_dir=str(out),
                   **{"data.train_file": tiny["data"], **TINY_TRAINING})
    assert not out.exists()


def test_a_peft_recipe_trains_each_group_at_its_learning_rate(tiny, tmp_path):  # noqa: F811
    result = run_shipped("mixlora.yaml", tiny, tmp_path,
                         parameter_groups={"learning_rates": {"router": 1.0e-3, "experts": 5.0e-4}})
    optimizer = result.trainer.optimizer
    rates = {group.get("parameter_group", "other"): group["initial_lr"] for group in optimizer.param_groups}
    assert rates == {"router": 1.0e-3, "experts": 5.0e-4, "other": 2.0e-4}  # other: the recipe's learning_rate
