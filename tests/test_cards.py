"""Model cards and their pictures: `hf_moe.cards` and `hf-moe card`.

The expert-load numbers are checked against counts computed here from the routers' own outputs; every card's YAML
is parsed by huggingface_hub's ModelCard and validated by the test Hub's metadata rules (tests/hub_server.py).
"""

import json
import os
import re
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from conftest import FAMILIES, PAD_TOKEN_ID, random_input_ids
from hub_server import card_metadata_errors
from huggingface_hub import ModelCard
from PIL import Image
from setuptools import find_packages
from test_lora_moe import MIXLORA, peft_model, tiny_llama, token_ids
from test_lora_moe_materialize import save_base_and_adapter
from test_recipes import run_shipped, tiny  # noqa: F401  (a fixture)
from torch.testing import assert_close
from transformers import LlamaForCausalLM

import hf_moe
from hf_moe.cards import (
    adapter_table,
    card_kind,
    card_text,
    expert_load,
    expert_load_heatmap,
    loss_curves,
    loss_plot,
    render_card,
    templates_folder,
    write_card,
)
from hf_moe.cli import main
from hf_moe.conversion import upcycle
from hf_moe.conversion.native import export_native, import_native
from hf_moe.finetune.lora_moe.layer import MixLoraFeedForward
from hf_moe.finetune.lora_moe.materialize import materialize

ROOT = Path(__file__).resolve().parents[1]


def read_card(folder: Path) -> ModelCard:
    """The folder's card, parsed by huggingface_hub, after checking its YAML against the Hub's rules."""
    text = (folder / "README.md").read_text()
    assert card_metadata_errors(text) == []
    return ModelCard(text)


def padded_batches():
    """Two batches, the second with left padding (masked tokens must not be counted)."""
    second = random_input_ids(2, 7, seed=2)
    mask = torch.ones_like(second)
    mask[0, :3] = 0
    second = second.masked_fill(mask == 0, PAD_TOKEN_ID)
    return [random_input_ids(3, 5), {"input_ids": second, "attention_mask": mask, "labels": second}]


def reference_shares(model, batches) -> list[list[float]]:
    """Per sparse layer, the share of each expert among the top-k choices of softmax(router logits), counted on
    unpadded tokens, from the logits the model returns with output_router_logits=True."""
    k, totals = model.config.num_experts_per_tok, None
    for batch in batches:
        ids, mask = (batch, torch.ones_like(batch)) if isinstance(batch, torch.Tensor) else (
            batch["input_ids"], batch["attention_mask"])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, output_router_logits=True).router_logits
        keep = mask.reshape(-1).bool()
        counts = torch.stack([torch.bincount(torch.softmax(layer.float(), -1)[keep].topk(k).indices.reshape(-1),
                                             minlength=layer.shape[-1]) for layer in logits]).float()
        totals = counts if totals is None else totals + counts
    return (totals / totals.sum(-1, keepdim=True)).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def test_expert_load_counts_every_routed_unpadded_token(family, tmp_path):
    model = family.causal_lm(seed=3)
    path = expert_load_heatmap(model, padded_batches(), tmp_path / "load.png", "two test batches")
    load = json.loads(path.with_suffix(".json").read_text())
    assert_close(torch.tensor(load["share"]), torch.tensor(reference_shares(model, padded_batches())), rtol=0,
                 atol=1e-6)
    sparse = [i for i, kind in enumerate(model.config.mlp_layer_types) if kind == "sparse"]
    assert load["rows"] == [f"layer {i}" for i in sparse]  # DeepSeek-style: the dense first layer has no row
    assert load["tokens"] == 3 * 5 + 2 * 7 - 3 and load["description"] == "two test batches"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 150


def test_expert_load_of_a_mixlora_adapter_follows_its_routers(tmp_path):
    model = peft_model(hf_moe.MixLoraConfig(**MIXLORA))
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, MixLoraFeedForward):
            module.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args[0]))
    ids = token_ids(2, 6)
    load = expert_load(model, [ids])
    expected = []
    for name, hidden in inputs.items():  # the router's top-2 of softmax(W x), computed here
        block = model.get_submodule(name)
        logits = hidden.reshape(-1, hidden.shape[-1]) @ block.mixlora_router["default"].T
        counts = torch.bincount(logits.softmax(-1).topk(2).indices.reshape(-1), minlength=4).float()
        expected.append((counts / counts.sum()).tolist())
    assert load["rows"] == ["layer 0 mlp", "layer 1 mlp"]
    assert_close(torch.tensor(load["share"]), torch.tensor(expected), rtol=0, atol=1e-6)


def test_a_model_without_routers_has_no_expert_load():
    with pytest.raises(ValueError, match="no router"):
        expert_load(tiny_llama(), [token_ids()])


def test_loss_plot_draws_train_and_eval_loss(tmp_path):
    history = [{"loss": 3.0, "step": 1}, {"loss": 2.5, "step": 2}, {"eval_loss": 2.7, "step": 2},
               {"train_loss": 2.75, "step": 2}]
    assert loss_curves(history) == {"train": [(1, 3.0), (2, 2.5)], "eval": [(2, 2.7)]}
    with Image.open(loss_plot(history, tmp_path / "loss.png")) as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="no `loss`"):
        loss_plot([{"train_loss": 2.75, "step": 2}], tmp_path / "none.png")


# ---------------------------------------------------------------------------------------------------------------
# Cards of conversions


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory) -> Path:
    """A tiny Llama (MIT-licensed by its card) upcycled to 4 experts, top-2."""
    root = tmp_path_factory.mktemp("upcycled")
    llama = tiny_llama(num_layers=2, seed=4)
    llama.save_pretrained(root / "dense")
    (root / "dense" / "README.md").write_text("---\nlicense: mit\n---\n# A dense model\n")
    return upcycle(root / "dense", root / "moe", arch="mixtral", num_experts=4, top_k=2, seed=5, verbose=False).out


def test_upcycled_card_records_source_design_verification_and_load(upcycled):
    card = read_card(upcycled)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "mit"  # copied from the source's card
    assert {"moe", "hf-moe", "sparse-upcycling", "hf_moe_mixtral", "custom_code"} <= set(card.data.tags)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()  # a local source
    report = json.loads((upcycled / "verification.json").read_text())
    config = json.loads((upcycled / "config.json").read_text())
    model = hf_moe.MixtralMoEForCausalLM.from_pretrained(upcycled)
    for text in ("| routed experts per MoE layer | 4, each of width 64 |", "| experts per token (top-k) | 2 |",
                 f"{model.num_parameters():,} total", "--num-experts 4 --top-k 2 --seed 5", "seed: 5",
                 f"{report['max_rel_error']:.3g}", "exact mode", "![Share of routed tokens", "router_aux_loss_coef",
                 'trust_remote_code=True, revision="COMMIT_SHA"', "computes exactly what the dense model computes"):
        assert text in card.text, text
    assert config["num_local_experts"] == 4 and (upcycled / "expert_load.png").is_file()
    assert "verification prompts" in json.loads((upcycled / "expert_load.json").read_text())["description"]


def test_active_parameters_count_k_of_e_experts(upcycled):
    model = hf_moe.MixtralMoEForCausalLM.from_pretrained(upcycled)
    expert = sum(p.numel() for p in model.model.layers[0].mlp.experts.parameters()) // 4
    active = model.num_parameters() - 2 * (4 - 2) * expert  # 2 sparse layers run 2 of their 4 experts
    assert f"{active:,} active per token" in read_card(upcycled).text


def test_rerendering_a_card_reproduces_it(upcycled, tmp_path, capsys):
    before = (upcycled / "README.md").read_text()
    assert card_kind(upcycled) == "upcycled" and render_card(upcycled).read_text() == before
    assert main(["card", str(upcycled)]) == 0
    assert f"wrote {upcycled / 'README.md'}" in capsys.readouterr().out
    assert (upcycled / "README.md").read_text() == before


def test_export_and_import_cards_describe_the_native_round_trip(upcycled, tmp_path):
    exported = export_native(upcycled, tmp_path / "mixtral", "mixtral")
    card = read_card(exported)
    assert card.data.license == "mit"  # the source's card is not copied, but its license is
    assert {"moe", "hf-moe", "mixtral"} <= set(card.data.tags) and "custom_code" not in card.data.tags
    assert "hf-moe export moe OUT --format mixtral" in card.text and "exact" not in card.data.tags
    assert "within the tolerance" in card.text and "vLLM" in card.text and "trust_remote_code" not in card.text
    assert card_kind(exported) == "native" and (exported / "expert_load.png").is_file()
    imported = import_native(exported, tmp_path / "ours", verify=False)
    card = read_card(imported)
    assert "`mixtral` checkpoint" in card.text and "Not run: check it with `hf-moe verify" in card.text
    assert "hf-moe import mixtral OUT --max-shard-size 5GB --no-verify" in card.text
    assert "hf_moe_mixtral" in card.data.tags and not (imported / "expert_load.png").exists()


def test_materialized_checkpoint_gets_a_finetuned_card_with_its_adapters_record(tmp_path):
    save_base_and_adapter(tmp_path, tiny_llama(num_layers=2), hf_moe.MixLoraConfig(**MIXLORA))
    (tmp_path / "adapter" / "all_results.json").write_text(json.dumps({"eval_loss": 1.5, "train_loss": 1.75}))
    out = materialize(tmp_path / "base", tmp_path / "adapter", tmp_path / "moe")
    card = read_card(out)
    assert card_kind(out) == "finetuned" and (out / "all_results.json").is_file()
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()  # local base
    assert "hf-moe materialize base adapter OUT --dtype float32" in card.text  # local paths by their names
    assert "| eval_loss | 1.5 |" in card.text and "| eval perplexity (exp of eval_loss) | 4.482 |" in card.text
    assert "| perplexity |" not in card.text  # one name per definition: quickstart's is "answer perplexity"
    assert "merging the MixLoRA adapter" in card.text and "hf_moe_mixtral" in card.data.tags


# ---------------------------------------------------------------------------------------------------------------
# Cards of adapters and fine-tunes


def test_adapter_card_keeps_pefts_metadata_and_adds_ours(tmp_path):
    # a base loaded from the Hub cache: PEFT names it by its path, the card by its repository id and revision
    base = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / ("ab12" * 10)
    tiny_llama(num_layers=2).save_pretrained(base)
    model = peft_model(hf_moe.MixLoraConfig(**MIXLORA), base=LlamaForCausalLM.from_pretrained(base))
    model.save_pretrained(tmp_path / "adapter")
    peft_card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert peft_card.data.library_name == "peft" and f"base_model:adapter:{base}" in peft_card.data.tags
    card = read_card(write_card(tmp_path / "adapter", "adapter").parent)
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-llama"
    assert card.data.base_model_relation == "adapter" and card.data.pipeline_tag == "text-generation"
    assert {"moe", "hf-moe", "mixlora", "transformers"} <= set(card.data.tags)
    assert not any(tag.startswith("base_model:") for tag in card.data.tags)  # PEFT's tag names a local path
    assert f"(revision `{'ab12' * 10}`)" in card.text
    trainable = sum(p.numel() for name, p in model.named_parameters() if "mixlora_" in name)
    assert f"| adapter parameters | {trainable:,} total" in card.text
    assert 'PeftModel.from_pretrained(base, "REPO_ID")' in card.text and "hf-moe materialize" in card.text


def test_local_base_paths_stay_out_of_the_metadata(tmp_path):
    save_base_and_adapter(tmp_path, tiny_llama(num_layers=2), hf_moe.MixLoraConfig(**MIXLORA))
    card = read_card(write_card(tmp_path / "adapter", "adapter").parent)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert not any(tag.startswith("base_model:") for tag in card.data.tags)
    assert "`base`" in card.text and str(tmp_path) not in card.text  # named in the text by its base name
    assert 'from_pretrained("base")' in card.text


def test_a_mixlora_fine_tune_and_its_materialized_model_get_their_cards(tiny, tmp_path):  # noqa: F811
    result = run_shipped("mixlora.yaml", tiny, tmp_path)
    out = Path(result.output_dir)
    card = read_card(out)
    assert card_kind(out) == "adapter" and card.data.library_name == "peft"
    assert {"moe", "hf-moe", "mixlora"} <= set(card.data.tags)
    assert f"| eval_loss | {result.eval_loss:.4g} |" in card.text and "![Training and evaluation loss](loss.png)" in card.text
    assert "The run, as in `recipe.yaml`:" in card.text and "hf-moe finetune recipe.yaml" in card.text
    load = json.loads((out / "expert_load.json").read_text())
    assert load["rows"] == ["layer 0 mlp", "layer 1 mlp"] and load["description"] == "the eval split"
    assert (out / "loss.png").is_file() and (out / "trainer_state.json").is_file()
    assert render_card(out).read_text() == (out / "README.md").read_text() == card.content

    moe = materialize(tiny["llama"], out, tmp_path / "moe")
    card = read_card(moe)
    assert card_kind(moe) == "finetuned" and "| eval_loss |" in card.text and "![Share of routed" in card.text
    assert (moe / "recipe.yaml").read_text() == (out / "recipe.yaml").read_text()


@pytest.mark.parametrize(("peft_type", "method"), [("MIXTURE_OF_LORAS", "Mixture-of-LoRAs"),
                                                  ("EXPERT_GATE", "Expert Gate")])
def test_adapter_table_of_a_per_sequence_method_counts_one_expert_per_token(peft_type, method, tmp_path):
    """One LoRA expert per task, one chosen per sequence: of the stacked A [3, r, in] / B [3, out, r] a token runs one
    expert's third; the router [3, in] runs whole."""
    from safetensors.torch import save_file

    prefix = peft_type.lower() + "_"
    save_file({f"layers.0.q_proj.{prefix}A": torch.zeros(3, 2, 8), f"layers.0.q_proj.{prefix}B": torch.zeros(3, 8, 2),
               f"layers.0.q_proj.{prefix}router": torch.zeros(3, 8)}, tmp_path / "adapter_model.safetensors")
    table = adapter_table(tmp_path, {"peft_type": peft_type, "num_tasks": 3, "r": 2, "target_modules": ["q_proj"]})
    assert (table["method"], table["experts"], table["top_k"]) == (method, 3, 1)
    assert table["experts_text"].startswith("one of 3 LoRA experts (one per task)")
    assert (table["total"], table["active"]) == (2 * 48 + 24, 2 * 16 + 24)


def test_a_plain_saved_model_gets_a_model_card(tmp_path):
    FAMILIES["mixtral"].causal_lm(seed=1).save_pretrained(tmp_path / "saved")
    assert card_kind(tmp_path / "saved") == "model"
    card = read_card(render_card(tmp_path / "saved").parent)
    assert card.data.library_name == "transformers" and {"hf-moe", "moe", "custom_code"} <= set(card.data.tags)
    for text in ("# saved", "| routed experts per MoE layer |", "active per token", "## How to load",
                 'AutoModelForCausalLM.from_pretrained("REPO_ID")'):
        assert text in card.text, text
    text = card_text(tmp_path / "saved", "model", repo_id="org/saved")
    assert 'from_pretrained("org/saved")' in text and "REPO_ID" not in text
    with pytest.raises(ValueError, match="cannot tell what"):
        card_kind(tmp_path)  # no config.json


def test_given_facts_describe_a_plain_saved_model(tmp_path):
    FAMILIES["deepseek"].causal_lm(seed=1).save_pretrained(tmp_path / "model")
    write_card(tmp_path / "model", "finetuned", base_model="org/dense", license="apache-2.0",
               datasets=["org/instructions", "./local.jsonl"], command="python train.py --steps 10",
               training={"learning_rate": 1e-3, "max_steps": 10}, metrics={"eval_loss": 2.0}, seed=3,
               description="Trained for the test.")
    card = read_card(tmp_path / "model")
    assert card.data.base_model == "org/dense" and card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["org/instructions"]
    assert "shared experts | 1, fused into one FFN of width" in card.text and "gated by sigmoid" in card.text
    for text in ("python train.py --steps 10", "learning_rate: 0.001", "| eval_loss | 2 |", "Seed: 3.",
                 "Trained for the test.", "| layers | 3 (2 MoE, 1 dense)"):
        assert text in card.text, text


def test_invalid_kind_or_fact_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`kind`='merged' is invalid: allowed values are upcycled, native"):
        write_card(tmp_path, "merged")
    with pytest.raises(ValueError, match=r"unknown card fact\(s\) \['licence'\]"):
        write_card(tmp_path, "finetuned", licence="mit")
    assert main(["card", str(tmp_path)]) == 2


def absolute_paths(text: str) -> list[str]:
    """Absolute local paths in a card's text: rooted at os.sep after a space, quote, backtick or line start."""
    return re.findall(rf"(?:^|[\s`'\"(=])({re.escape(os.sep)}[\w.-]+{re.escape(os.sep)}[^\s`'\")]*)", text,
                      flags=re.MULTILINE)


def test_no_card_kind_shows_a_local_path(upcycled, tmp_path):
    """Cards are published with the weights: local folders and files appear by their base names."""
    save_base_and_adapter(tmp_path, tiny_llama(num_layers=2), hf_moe.MixLoraConfig(**MIXLORA))
    (tmp_path / "adapter" / "recipe.yaml").write_text(yaml.safe_dump({
        "model": str(tmp_path / "base"), "method": "mixlora", "output_dir": str(tmp_path / "adapter"),
        "data": {"train_file": str(tmp_path / "train.jsonl")}, "training": {"seed": 1}}))
    exported = export_native(upcycled, tmp_path / "mixtral", "mixtral")
    FAMILIES["deepseek"].causal_lm(seed=1).save_pretrained(tmp_path / "saved")
    folders = {"upcycled": upcycled, "native (export)": exported,
               "native (import)": import_native(exported, tmp_path / "ours", verify=False),
               "finetuned (materialize)": materialize(tmp_path / "base", tmp_path / "adapter", tmp_path / "moe"),
               "adapter": tmp_path / "adapter", "model": tmp_path / "saved"}
    kinds = set()
    for name, folder in folders.items():
        kinds.add(card_kind(folder))
        text = card_text(folder, card_kind(folder))
        for local in (str(tmp_path), str(upcycled.parent), "/tmp"):
            assert local not in text, (name, local)
        assert absolute_paths(text) == [], name
    assert kinds == set(yaml.safe_load((ROOT / "model_cards" / "metadata.yaml").read_text()))
    assert "model: base" in card_text(tmp_path / "adapter", "adapter")  # the recipe, its paths by their names


# ---------------------------------------------------------------------------------------------------------------
# Packaging


def test_templates_ship_with_the_package():
    """Wheels map model_cards/ to hf_moe.model_cards, so every package under hf_moe/ must be listed explicitly."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {f"hf_moe.{name}" for name in find_packages(ROOT / "hf_moe")} | {"hf_moe"}
    assert set(setuptools["packages"]) == packages | {"hf_moe.model_cards"}, "list new packages in pyproject.toml"
    assert setuptools["package-dir"]["hf_moe.model_cards"] == "model_cards"
    shipped = {path.name for path in (ROOT / "model_cards").iterdir()}
    assert {"upcycled.md", "native.md", "finetuned.md", "adapter.md", "model.md", "metadata.yaml"} <= shipped
    assert templates_folder() == ROOT / "model_cards"
    assert set(yaml.safe_load((ROOT / "model_cards" / "metadata.yaml").read_text())) == {
        "upcycled", "native", "finetuned", "adapter", "model"}
