"""Saved checkpoints load with `trust_remote_code=True` under the older transformers their copied code supports, and
refuse, at import and naming both versions, a transformers older than that.

The slow tests build a throwaway venv per transformers version from the package registry (torch pinned to this
interpreter's version; kept under the system temp folder, keyed by version, so that a rerun reuses it), save both
families here, and compare what the venv computes from the copied modeling files alone with what this process
computes: logits, greedy generation with and without a cache, and the gradients of a training step.
"""

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, random_input_ids, run_fresh_python
from torch.testing import assert_close

from hf_moe.modeling.transformers_compat import MIN_TRANSFORMERS_VERSION, check_transformers_version

NEW_TOKENS = 6
ATOL = 1e-5
VENV_CACHE = Path(tempfile.gettempdir()) / "hf_moe_test_venvs"
# the oldest supported minor version, and the last one before transformers 5.24 renamed `past_key_values` to `cache`
SUPPORTED = [MIN_TRANSFORMERS_VERSION, "5.23"]
_MAJOR, _MINOR = MIN_TRANSFORMERS_VERSION.split(".")
TOO_OLD = f"{_MAJOR}.{int(_MINOR) - 1}"  # the minor version before the minimum
# (family, config overrides): the sliding window (3 < prompt + new tokens) takes the other mask function
MODELS = {
    "mixtral": ("mixtral", {}),
    "deepseek": ("deepseek", {}),
    "mixtral_sliding_window": ("mixtral", {"sliding_window": 3}),
}

CHILD_SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    work = Path(sys.argv[1])
    inputs = torch.load(work / "inputs.pt", weights_only=True)
    report = {"transformers": transformers.__version__}
    try:
        import hf_moe  # noqa: F401
        report["hf_moe_importable"] = True
    except ImportError:
        report["hf_moe_importable"] = False
    tensors = {}
    try:
        for name in json.loads((work / "models.json").read_text()):
            model = AutoModelForCausalLM.from_pretrained(work / name, trust_remote_code=True).eval()
            report[name] = type(model).__module__
            greedy = dict(do_sample=False, max_new_tokens=%(new_tokens)d, min_new_tokens=%(new_tokens)d, pad_token_id=0)
            with torch.no_grad():
                tensors[f"{name}.logits"] = model(inputs["input_ids"]).logits
            tensors[f"{name}.generated"] = model.generate(inputs["prompt"], **greedy)
            tensors[f"{name}.generated_without_cache"] = model.generate(inputs["prompt"], use_cache=False, **greedy)
            model.train()
            loss = model(inputs["input_ids"], labels=inputs["input_ids"], output_router_logits=True).loss
            loss.backward()
            tensors[f"{name}.loss"] = loss.detach()
            tensors.update({f"{name}.grad.{key}": p.grad for key, p in model.named_parameters() if p.grad is not None})
        classifier = AutoModelForSequenceClassification.from_pretrained(work / "classifier", trust_remote_code=True)
        with torch.no_grad():
            tensors["classifier.logits"] = classifier.eval()(inputs["input_ids"]).logits
    except ImportError as error:
        report["import_error"] = str(error)
    torch.save(tensors, work / "child_outputs.pt")
    (work / "child_report.json").write_text(json.dumps(report))
    """
) % {"new_tokens": NEW_TOKENS}


def test_check_transformers_version_refuses_older_versions_naming_both():
    for installed in ("4.57.6", "5.0.0", f"{TOO_OLD}.1", f"{TOO_OLD}.0.dev0"):
        with pytest.raises(ImportError) as error:
            check_transformers_version(installed)
        assert f"this model needs transformers >= {MIN_TRANSFORMERS_VERSION}, you have {installed}" in str(error.value)


def test_check_transformers_version_accepts_the_minimum_and_newer():
    for installed in (f"{MIN_TRANSFORMERS_VERSION}.0", f"{MIN_TRANSFORMERS_VERSION}.1", "5.23.0", "5.25.0",
                      "5.26.0.dev0", "6.0.0"):
        check_transformers_version(installed)


def _old_transformers_python(minor: str) -> Path:
    """The python of a venv with transformers `minor`.* and this interpreter's torch (never an unpinned torch: that
    would pull GPU wheels), built once per version under VENV_CACHE."""
    venv = VENV_CACHE / f"transformers-{minor}"
    python = venv / "bin" / "python"
    if (venv / "ready").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    torch_version = torch.__version__.split("+")[0]
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"torch=={torch_version}",
         f"transformers=={minor}.*", "safetensors"],
        capture_output=True, text=True, timeout=1200, check=False,
    )
    assert install.returncode == 0, f"pip install of transformers=={minor}.* failed:\n{install.stderr[-5000:]}"
    (venv / "ready").write_text(minor)
    return python


def _save_models(work: Path) -> dict:
    """Save the models of MODELS and a classifier; return this process's outputs for the same inputs."""
    inputs = {"input_ids": random_input_ids(2, 7), "prompt": random_input_ids(2, 4, seed=3)}
    torch.save(inputs, work / "inputs.pt")
    (work / "models.json").write_text(json.dumps(list(MODELS)))
    greedy = {"do_sample": False, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "pad_token_id": 0}
    expected = {}
    for name, (family, overrides) in MODELS.items():
        model = FAMILIES[family].causal_lm(seed=1, **overrides)
        model.save_pretrained(work / name)
        with torch.no_grad():
            expected[f"{name}.logits"] = model(inputs["input_ids"]).logits
        expected[f"{name}.generated"] = model.generate(inputs["prompt"], **greedy)
        model.train()
        loss = model(inputs["input_ids"], labels=inputs["input_ids"], output_router_logits=True).loss
        loss.backward()
        expected[f"{name}.loss"] = loss.detach()
        expected.update({f"{name}.grad.{key}": p.grad for key, p in model.named_parameters() if p.grad is not None})
    classifier = FAMILIES["deepseek"].sequence_classifier(seed=2, num_labels=3)
    classifier.save_pretrained(work / "classifier")
    with torch.no_grad():
        expected["classifier.logits"] = classifier(inputs["input_ids"]).logits
    return expected


def _run_child(python: Path, work: Path, tmp_path_factory):
    script = work / "child.py"
    script.write_text(CHILD_SCRIPT)
    result = run_fresh_python(python, [script, work], cwd=tmp_path_factory.mktemp("child_cwd"),
                              modules_cache=tmp_path_factory.mktemp("hf_modules_cache"), timeout=600)
    report = json.loads((work / "child_report.json").read_text())
    return report, torch.load(work / "child_outputs.pt", weights_only=True), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("minor", SUPPORTED)
def test_saved_models_match_under_older_supported_transformers(minor, tmp_path_factory):
    python = _old_transformers_python(minor)
    work = tmp_path_factory.mktemp(f"saved_for_{minor}")
    expected = _save_models(work)
    report, outputs, stderr = _run_child(python, work, tmp_path_factory)

    assert report["transformers"].startswith(f"{minor}."), report
    assert report["hf_moe_importable"] is False
    assert "import_error" not in report, report["import_error"]
    assert "[ERROR]" not in stderr, stderr  # transformers' auto_docstring finds every forward argument documented
    for name in MODELS:
        assert report[name].startswith("transformers_modules."), report[name]
        assert_close(outputs[f"{name}.logits"], expected[f"{name}.logits"], atol=ATOL, rtol=0)
        assert torch.equal(outputs[f"{name}.generated"], expected[f"{name}.generated"]), name
        assert torch.equal(outputs[f"{name}.generated_without_cache"], expected[f"{name}.generated"]), name
        assert_close(outputs[f"{name}.loss"], expected[f"{name}.loss"], atol=ATOL, rtol=0)
        grads = sorted(key for key in expected if key.startswith(f"{name}.grad."))
        assert sorted(key for key in outputs if key.startswith(f"{name}.grad.")) == grads
        for key in grads:
            assert_close(outputs[key], expected[key], atol=ATOL, rtol=0, msg=key)
    assert_close(outputs["classifier.logits"], expected["classifier.logits"], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_saved_models_refuse_older_transformers_at_import(tmp_path_factory):
    python = _old_transformers_python(TOO_OLD)
    work = tmp_path_factory.mktemp(f"saved_for_{TOO_OLD}")
    _save_models(work)
    report, outputs, _ = _run_child(python, work, tmp_path_factory)

    assert report["transformers"].startswith(f"{TOO_OLD}."), report
    assert f"this model needs transformers >= {MIN_TRANSFORMERS_VERSION}, you have {report['transformers']}" in (
        report["import_error"]
    )
    assert not outputs
