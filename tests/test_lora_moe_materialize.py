"""`materialize`: a MixLoRA adapter plus its base -> a standalone hf-moe MoE checkpoint with the same logits."""

import json

import pytest
import torch
from peft import PeftModel
from test_lora_moe import MIXLORA, peft_model, tiny_llama, token_ids
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hf_moe
from hf_moe.finetune.lora_moe.materialize import materialize


def save_base_and_adapter(tmp_path, base, config):
    base.save_pretrained(tmp_path / "base")
    model = peft_model(config, base=type(base).from_pretrained(tmp_path / "base"))
    model.save_pretrained(tmp_path / "adapter")
    return model


def adapter_logits(tmp_path, ids, attention_mask=None):
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        return model(input_ids=ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("attention_lora", [True, False])
def test_materialized_checkpoint_has_the_adapter_models_logits(tmp_path, attention_lora):
    targets = ["mlp", "q_proj", "k_proj", "v_proj", "o_proj"] if attention_lora else ["mlp"]
    save_base_and_adapter(tmp_path, tiny_llama(num_layers=2),
                          hf_moe.MixLoraConfig(**MIXLORA, target_modules=targets))
    out = materialize(tmp_path / "base", tmp_path / "adapter", tmp_path / "moe")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hf_moe_mixtral" and config["num_local_experts"] == 4
    assert config["num_experts_per_tok"] == 2 and config["norm_topk_prob"] is True
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(moe) is hf_moe.MixtralMoEForCausalLM
    assert not any("mixlora" in name or "lora" in name for name, _ in moe.named_parameters())
    ids = token_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = adapter_logits(tmp_path, ids, mask)
        assert_close(moe(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-5)


def test_qwen2_bases_and_partial_adapters_become_deepseek_style_checkpoints(tmp_path):
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    save_base_and_adapter(tmp_path, base, hf_moe.MixLoraConfig(**MIXLORA, layers_to_transform=[1],
                                                               layers_pattern="layers"))
    out = materialize(tmp_path / "base", tmp_path / "adapter", tmp_path / "moe")
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(moe) is hf_moe.DeepSeekMoEForCausalLM
    assert moe.config.mlp_layer_types == ["dense", "sparse"] and moe.config.qkv_bias
    ids = token_ids(2, 7)
    with torch.no_grad():
        assert_close(moe(input_ids=ids).logits, adapter_logits(tmp_path, ids), rtol=0, atol=1e-5)


def test_only_mixlora_adapters_can_be_materialized(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = peft_model(hf_moe.MolaConfig(task_type="CAUSAL_LM"), base=LlamaForCausalLM.from_pretrained(
        tmp_path / "base"))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="allowed: MIXLORA"):
        materialize(tmp_path / "base", tmp_path / "adapter", tmp_path / "moe")
    assert not (tmp_path / "moe").exists()
