"""PESC: adapter experts over the frozen FFN's output (`hf_moe.PescConfig`, peft type PESC): config, the block
against its formula, the start as the base model, the balancing loss, gradient accumulation, generate, save and
load in a fresh process, adapters, the recipe, and materialize's refusal."""

import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import generate_with_and_without_cache, run_fresh_python
from peft import PeftConfig, get_peft_model
from peft.utils import PeftType
from test_lora_moe import causal_lm_loss, tiny_llama, token_ids, train_one_step
from torch.testing import assert_close
from transformers import LlamaForCausalLM

import hf_moe
from hf_moe.data import tasks_path, tiny_llama_path
from hf_moe.finetune.lora_moe import PescFeedForward, PescLinear
from hf_moe.finetune.lora_moe.pesc import PESC_ACTIVATIONS

PESC = {"task_type": "CAUSAL_LM", "num_experts": 4, "top_k": 2, "adapter_dim": 8, "adapter_dropout": 0.0, "r": 4,
        "lora_dropout": 0.0}


@torch.no_grad()
def randomize_(model, std: float = 0.2):
    """Random values for every PESC tensor (the zero-initialised up-projections included)."""
    for name, param in model.named_parameters():
        if "pesc_" in name:
            param.copy_(std * torch.randn_like(param))
    return model


def pesc_model(base=None, seed: int = 0, randomize: bool = True, **overrides):
    model = get_peft_model(base if base is not None else tiny_llama(), hf_moe.PescConfig(**{**PESC, **overrides}))
    torch.manual_seed(seed)
    return (randomize_(model) if randomize else model).eval()


# ---------------------------------------------------------------------------------------------------------------
# Registration and config


def test_importing_hf_moe_registers_pesc_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = PeftType("PESC")
    assert peft_type is PeftType["PESC"] and peft_type in list(PeftType) and peft_type == "PESC"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PESC"] is hf_moe.PescConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == "pesc_" == PEFT_TYPE_TO_TUNER_MAPPING["PESC"].prefix
    assert hf_moe.PescConfig().peft_type is peft_type


def test_every_hyperparameter_is_saved_in_adapter_config_json(tmp_path):
    fields = {"num_experts": 6, "top_k": 3, "adapter_dim": 16, "adapter_act": "silu", "adapter_dropout": 0.2,
              "adapter_scaling": 0.25, "router_aux_loss_coef": 0.05, "r": 8, "lora_alpha": 32, "lora_dropout": 0.05,
              "router_init_std": 0.02, "use_rslora": True}
    config = hf_moe.PescConfig(task_type="CAUSAL_LM", target_modules=["mlp", "q_proj", "v_proj"], **fields)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PESC" and sorted(saved["target_modules"]) == ["mlp", "q_proj", "v_proj"]
    for name, value in fields.items():
        assert saved[name] == value, name
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is hf_moe.PescConfig and loaded.to_dict() == config.to_dict()


def test_defaults_follow_the_authors_training_script():
    config = hf_moe.PescConfig()
    assert (config.num_experts, config.top_k, config.adapter_dim, config.adapter_act) == (8, 2, 64, "gelu")
    assert (config.adapter_dropout, config.adapter_scaling, config.router_aux_loss_coef) == (0.1, 1.0, 0.01)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.router_init_std) == (64, 16, 0.1, None)


@pytest.mark.parametrize("options, message", [
    ({"num_experts": 0}, "`num_experts`=0 is invalid: must be a positive integer"),
    ({"top_k": 9}, "`top_k`=9 is invalid: must be an integer between 1 and num_experts=8"),
    ({"top_k": 0}, "`top_k`=0 is invalid"),
    ({"adapter_dim": 2.5}, "`adapter_dim`=2.5 is invalid: must be a positive integer"),
    ({"adapter_act": "tanh"}, f"`adapter_act`='tanh' is invalid: allowed: {list(PESC_ACTIVATIONS)}"),
    ({"adapter_dropout": 1.0}, "`adapter_dropout`=1.0 is invalid: must be in [0, 1)"),
    ({"adapter_scaling": 0}, "`adapter_scaling`=0 is invalid: must be a finite number > 0"),
    ({"adapter_scaling": float("inf")}, "`adapter_scaling`=inf is invalid"),
    ({"router_aux_loss_coef": -0.1}, "`router_aux_loss_coef`=-0.1 is invalid: must be >= 0"),
    ({"r": 0}, "`r`=0 is invalid"),
    ({"router_init_std": -1.0}, "`router_init_std`=-1.0 is invalid"),
])
def test_invalid_fields_raise_naming_the_field_and_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hf_moe.PescConfig(**options)


def test_blocks_get_experts_linears_get_lora_and_ffn_projections_are_refused():
    model = pesc_model(randomize=False)
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer.mlp, PescFeedForward) and isinstance(layer.self_attn.q_proj, PescLinear)
    assert layer.mlp.pesc_router["default"].shape == (4, 32)
    assert layer.mlp.pesc_adapter_A["default"].shape == (4, 8, 32)  # D_e [E, d, H]
    assert layer.mlp.pesc_adapter_B["default"].shape == (4, 32, 8)  # U_e [E, H, d]
    with pytest.raises(ValueError, match="names FFN projections"):
        get_peft_model(tiny_llama(), hf_moe.PescConfig(target_modules=["mlp", "down_proj"]))
    with pytest.raises(ValueError, match="does not look like"):
        get_peft_model(tiny_llama(), hf_moe.PescConfig(target_modules=["input_layernorm"]))


# ---------------------------------------------------------------------------------------------------------------
# The block and its start


def pesc_block_written_out(block: PescFeedForward, x: torch.Tensor, activation, adapter: str = "default"):
    """The paper's block one token and one chosen expert at a time, routed as the authors' code routes (top-k of
    the logits, then a softmax over those k): out_t = sum_{e in top-k} g_e (y_t + s U_e act(D_e y_t)), y = FFN(x)."""
    w, s, k = block.adapter_tensors(adapter), block.scaling[adapter], block.top_k[adapter]
    tokens = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(tokens)
    for t, token in enumerate(tokens):
        y = block.base_layer(token)
        top = (w["router"] @ token).topk(k)
        for g, e in zip(torch.softmax(top.values, dim=-1), top.indices):
            out[t] += g * (y + s * w["adapter_B"][e] @ activation(w["adapter_A"][e] @ y))
    return out.view(x.shape)


@pytest.mark.parametrize("activation, scaling, dim", [("gelu", 1.0, 8), ("silu", 0.25, 3), ("relu", 2.0, 5)])
def test_the_block_equals_the_formula_written_out(activation, scaling, dim):
    """Outputs and the gradients of x and of every PESC tensor; odd adapter widths give [*, 3] fp32 rows, whose
    strides torch's grouped matmul kernel refuses (the fallback takes them)."""
    model = pesc_model(adapter_act=activation, adapter_scaling=scaling, adapter_dim=dim)
    block = model.base_model.model.model.layers[1].mlp
    x = torch.randn(2, 5, 32, requires_grad=True)
    trained = [x, *(getattr(block, name)["default"] for name in block.adapter_layer_names)]
    output_grad = torch.randn(2, 5, 32)
    output = block(x)
    expected = pesc_block_written_out(block, x, {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[activation])
    assert_close(output, expected)
    gradients = torch.autograd.grad(output, trained, output_grad)
    for gradient, expected_gradient in zip(gradients, torch.autograd.grad(expected, trained, output_grad)):
        assert_close(gradient, expected_gradient, atol=1e-5, rtol=1e-4)


def test_the_attention_lora_is_w_x_plus_alpha_over_r_b_a_x():
    model = pesc_model(lora_alpha=8)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    expected = x @ layer.base_layer.weight.T + 2.0 * x @ layer.pesc_lora_A["default"].T @ layer.pesc_lora_B["default"].T
    with torch.no_grad():
        assert_close(layer(x), expected)


def test_the_shared_ffn_runs_once_per_token_whatever_k():
    model = pesc_model(top_k=3)
    ffn = model.base_model.model.model.layers[0].mlp.base_layer
    calls = {name: [] for name in ("gate_proj", "up_proj", "down_proj")}
    for name, rows in calls.items():
        getattr(ffn, name).register_forward_hook(lambda module, args, out, rows=rows: rows.append(args[0].shape[:-1]))
    with torch.no_grad():
        model(input_ids=token_ids(2, 6))
    assert calls == {name: [(2, 6)] for name in calls}


def test_adapter_dropout_acts_on_the_adapters_input_in_training_only():
    model = pesc_model(adapter_dropout=0.5, lora_dropout=0.3)
    block = model.base_model.model.model.layers[0].mlp
    assert block.lora_dropout["default"].p == 0.5  # the adapters' dropout, on y
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.3
    x = torch.randn(1, 64, 32)
    with torch.no_grad():
        evaluated = block(x)
        block.train()
        torch.manual_seed(0)
        first, second = block(x), block(x)
    assert not torch.allclose(first, evaluated) and not torch.allclose(first, second)
    with torch.no_grad():  # U_e = 0: no adapter output, so dropout changes nothing
        block.pesc_adapter_B["default"].zero_()
        assert_close(block(x), block.base_layer(x))


def test_a_fresh_adapter_starts_as_the_base_model_with_the_authors_init():
    """U_e = 0 (and the attention LoRA's B = 0) makes every expert y + 0: the logits are the base's, in evaluation
    and in training mode (dropout on a zero branch changes nothing). D_e and the router are kaiming-uniform(a=sqrt(5)),
    |w| <= 1 / sqrt(H), as the authors' `train_moe.py` initialises them."""
    base = tiny_llama()
    ids = token_ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = pesc_model(base=base, randomize=False, adapter_dropout=0.1, lora_dropout=0.1)
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert torch.equal(model.train()(input_ids=ids).logits, expected)
    block = model.base_model.model.model.layers[0].mlp
    assert not block.pesc_adapter_B["default"].any()
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.pesc_lora_B["default"].any()
    for tensor in (block.pesc_adapter_A["default"], block.pesc_router["default"]):
        assert tensor.abs().max() <= 1 / math.sqrt(32) and tensor.std() > 0.3 / math.sqrt(32)


# ---------------------------------------------------------------------------------------------------------------
# Aux loss


def test_loss_is_cross_entropy_plus_coefficient_times_the_switch_loss_of_all_layers():
    """E * sum_e f_e P_e over both layers' real tokens pooled, f_e = (chosen slots of e) / T, P_e = mean softmax,
    written out with loops over tokens and their chosen experts; the padded tokens are left out."""
    model = pesc_model(router_aux_loss_coef=0.5)
    ids = token_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    blocks = [model.base_model.model.model.layers[i].mlp for i in range(2)]
    inputs = []
    for block in blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    real = mask.reshape(-1).bool()
    counts, probability_sums, tokens = torch.zeros(4), torch.zeros(4), 0
    for x, block in zip(inputs, blocks):
        for t in range(x.shape[0]):
            if not real[t]:
                continue
            logits = block.pesc_router["default"] @ x[t]
            for e in logits.topk(2).indices:
                counts[e] += 1
            probability_sums += torch.softmax(logits, dim=-1)
            tokens += 1
    switch = 4 * torch.sum((counts / tokens) * (probability_sums / tokens))
    assert out.aux_losses.keys() == {"router_aux_loss"}
    assert_close(out.aux_losses["router_aux_loss"], switch)
    assert_close(out.aux_loss, 0.5 * switch)
    assert_close(out.loss, causal_lm_loss(out.logits, ids) + 0.5 * switch)  # labels: every position counts


def test_a_zero_coefficient_adds_no_aux_loss():
    model = pesc_model(router_aux_loss_coef=0.0)
    ids = token_ids()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert getattr(out, "aux_loss", None) is None and not getattr(out, "aux_losses", None)
    assert_close(out.loss, causal_lm_loss(out.logits, ids))


def test_gradient_accumulation_gives_the_same_aux_contribution(tmp_path):
    """One SGD step on 4 identical rows: batch 4 vs batch 1 with 4 accumulation steps (and activation
    checkpointing): each micro-batch's aux term is weighted by its share of the label tokens."""
    tokens = token_ids(1, 8, seed=7)[0].tolist()
    rows = [{"input_ids": tokens, "attention_mask": [1] * 8, "labels": tokens}] * 4

    def step(batch_size, accumulation, coef, **options):
        model = pesc_model(router_aux_loss_coef=coef)
        trainer = train_one_step(model, rows, tmp_path, batch_size, accumulation, **options)
        state = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
        return state, trainer.state.log_history[0]

    full, full_log = step(4, 1, coef=1.0)
    accumulated, accumulated_log = step(1, 4, coef=1.0, activation_checkpointing=True)
    without_aux, _ = step(4, 1, coef=0.0)
    router = "base_model.model.model.layers.0.mlp.pesc_router.default"
    assert (full[router] - without_aux[router]).abs().max() > 1e-3  # the aux term does move the router
    for name in full:
        assert_close(accumulated[name], full[name], rtol=1e-5, atol=1e-6)
    assert_close(accumulated_log["loss"], full_log["loss"], rtol=1e-5, atol=1e-6)
    assert_close(accumulated_log["lora_moe/aux_loss"], full_log["lora_moe/aux_loss"], rtol=1e-5, atol=1e-6)
    assert full_log["lora_moe/router_aux_loss"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Generate, adapters, parameter groups


def test_generate_with_the_cache_equals_generate_without():
    model, ids = pesc_model(), token_ids(2, 5)
    cached = generate_with_and_without_cache(model, 6, input_ids=ids)
    with torch.no_grad():  # the last step's scores are the full forward's last logits
        logits = model(input_ids=cached.sequences[:, :-1]).logits[:, -1]
    assert_close(cached.scores[-1], logits, rtol=1e-5, atol=1e-5)


def test_adapters_switch_one_per_block_and_unload_restores_the_base():
    base = tiny_llama()
    ids = token_ids()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = pesc_model(base=base)
    model.add_adapter("other", hf_moe.PescConfig(**{**PESC, "num_experts": 3, "top_k": 1}))
    torch.manual_seed(1)
    randomize_(model)
    with torch.no_grad():
        first = model(input_ids=ids).logits
        model.set_adapter("other")
        assert not torch.allclose(model(input_ids=ids).logits, first)
        assert model.base_model.model.model.layers[0].mlp.pesc_router["other"].shape == (3, 32)
        model.base_model.set_adapter(["default", "other"])
        with pytest.raises(ValueError, match="one adapter per FFN block"):
            model(input_ids=ids)
        model.set_adapter("default")
        model.delete_adapter("other")
        assert_close(model(input_ids=ids).logits, first)
    with pytest.raises(ValueError, match="cannot be merged.*nonlinearity"):
        model.merge_and_unload()
    unloaded = model.unload()
    assert not unloaded._forward_hooks and not unloaded._forward_pre_hooks
    with torch.no_grad():
        assert_close(unloaded(input_ids=ids).logits, expected)


def test_routers_adapters_and_attention_lora_fall_in_their_parameter_groups():
    from hf_moe.finetune.trainer import parameter_groups

    groups = {group: {name.split(".")[-2] for name, param in params if param.requires_grad}
              for group, params in parameter_groups(pesc_model(randomize=False)).items()}
    assert groups["router"] == {"pesc_router"} and groups["experts"] == {"pesc_adapter_A", "pesc_adapter_B"}
    assert groups["other"] == {"pesc_lora_A", "pesc_lora_B"}


# ---------------------------------------------------------------------------------------------------------------
# Save -> fresh process -> load


FRESH_PROCESS_CHECK = textwrap.dedent("""
    import sys, torch
    import hf_moe  # registers PESC with peft
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    folder = sys.argv[1]
    ids, expected = torch.load(f"{folder}/ids.pt"), torch.load(f"{folder}/logits.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{folder}/base"), f"{folder}/adapter")
    assert type(model.peft_config["default"]).__name__ == "PescConfig"
    assert model.peft_config["default"].adapter_act == "silu"
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, expected)
        auto = AutoPeftModelForCausalLM.from_pretrained(f"{folder}/adapter").eval()
        assert torch.equal(auto(input_ids=ids).logits, expected)
    plain = AutoModelForCausalLM.from_pretrained(f"{folder}/base")  # transformers' own adapter loading
    plain.load_adapter(f"{folder}/adapter")
    with torch.no_grad():
        assert torch.equal(plain.eval()(input_ids=ids).logits, expected)
    print("OK")
""")


def test_save_then_load_in_a_fresh_process_gives_identical_logits(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = pesc_model(base=LlamaForCausalLM.from_pretrained(tmp_path / "base"), adapter_act="silu")
    ids = token_ids(2, 7)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, tmp_path / "logits.pt")
    torch.save(ids, tmp_path / "ids.pt")
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(path.name for path in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"], files
    (tmp_path / "check.py").write_text(FRESH_PROCESS_CHECK)
    (tmp_path / "cwd").mkdir()
    result = run_fresh_python(sys.executable, [tmp_path / "check.py", tmp_path], cwd=tmp_path / "cwd",
                              modules_cache=tmp_path / "modules")
    assert result.stdout.strip().endswith("OK")


# ---------------------------------------------------------------------------------------------------------------
# Recipe and materialize


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`recipes/pesc.yaml` run for two steps on the shipped tiny Llama and eight examples of the shipped tasks."""
    from hf_moe.finetune.recipes import run_recipe

    root = tmp_path_factory.mktemp("pesc_recipe")
    rows = [json.loads(line) for line in (tasks_path() / "train.jsonl").read_text().splitlines()[:8]]
    (root / "train.jsonl").write_text("".join(json.dumps({"instruction": row["prompt"], "output": row["answer"]})
                                              + "\n" for row in rows))
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "pesc.yaml")
    return run_recipe(recipe, model=str(tiny_llama_path()), output_dir=str(root / "out"), **{
        "data.train_file": str(root / "train.jsonl"), "data.max_length": 24, "data.eval_split": 0.25,
        "data.prompt_template": "{prompt}", "training.max_steps": 2, "training.per_device_train_batch_size": 2,
        "training.save_strategy": "no", "training.logging_steps": 1, "training.warmup_steps": 0,
        "training.bf16": False, "training.use_cpu": True, "training.disable_tqdm": True,
        "training.dataloader_num_workers": 0, "peft.r": 8})


def test_the_recipe_trains_logs_the_aux_loss_and_saves_a_reloadable_adapter(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert trained.trainer.state.global_step == 2 and math.isfinite(trained.train_loss)
    logged = [entry for entry in trained.trainer.state.log_history if "lora_moe/router_aux_loss" in entry]
    assert len(logged) == 2 and all(entry["lora_moe/router_aux_loss"] > 0 for entry in logged)
    saved = json.loads(Path(trained.output_dir, "adapter_config.json").read_text())
    assert saved["peft_type"] == "PESC" and saved["num_experts"] == 8 and saved["adapter_dim"] == 64
    card = Path(trained.output_dir, "README.md").read_text()
    assert "PESC" in card and "top-2 of 8 adapter experts" in card
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path()), trained.output_dir)
    ids = torch.tensor([[4, 9, 12, 20, 21, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, trained.trainer.model.eval()(input_ids=ids).logits)


def test_materialize_refuses_a_pesc_adapter_and_says_why(trained, tmp_path, capsys):
    from hf_moe import cli
    from hf_moe.finetune.lora_moe.materialize import materialize

    with pytest.raises(ValueError, match="cannot be materialized.*nonlinearity.*only approximate"):
        materialize(tiny_llama_path(), trained.output_dir, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
    assert cli.main(["materialize", str(tiny_llama_path()), trained.output_dir, str(tmp_path / "moe")]) != 0
    assert "a PESC adapter cannot be materialized" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()
