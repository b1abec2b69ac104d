"""Saved checkpoints load with `trust_remote_code=True` in a Python process that cannot import hf_moe.

The parent saves both families and computes reference outputs; a fresh child process (another cwd, its own
HF_MODULES_CACHE) loads each folder through the Auto classes from the copied modeling files alone.
"""

import json
import os
import subprocess
import sys
import textwrap
import venv

import pytest
import torch
from conftest import FAMILIES, random_input_ids, run_fresh_python
from torch.testing import assert_close

NEW_TOKENS = 6

CHILD_SCRIPT = textwrap.dedent(
    '''
    import sys
    if "--block-hf-moe" in sys.argv:
        sys.modules["hf_moe"] = None  # before anything else imports it: `import hf_moe` now raises ImportError

    import json
    from pathlib import Path

    import torch
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    work = Path(sys.argv[1])
    try:
        import hf_moe  # noqa: F401
        hf_moe_importable = True
    except ImportError:
        hf_moe_importable = False

    inputs = torch.load(work / "inputs.pt", weights_only=True)
    report = {"hf_moe_importable": hf_moe_importable, "python": sys.executable, "families": {}}
    tensors = {}
    families = json.loads((work / "families.json").read_text())
    # first, before any trusted load could register the remote classes in this process
    for family in families:
        entry = report["families"][family] = {}
        try:
            AutoModelForCausalLM.from_pretrained(work / family / "causal_lm")  # no trust_remote_code; stdin closed
            entry["untrusted_error"] = None
        except ValueError as error:
            entry["untrusted_error"] = str(error)
    for family in families:
        causal_dir, classifier_dir = work / family / "causal_lm", work / family / "sequence_classification"
        entry = report["families"][family]
        with torch.no_grad():
            causal = AutoModelForCausalLM.from_pretrained(causal_dir, trust_remote_code=True).eval()
            tensors[f"{family}.logits"] = causal(inputs["input_ids"]).logits
            tensors[f"{family}.generated"] = causal.generate(
                inputs["prompt"], do_sample=False, max_new_tokens=%(new_tokens)d, min_new_tokens=%(new_tokens)d,
                pad_token_id=0,
            )
            base = AutoModel.from_pretrained(causal_dir, trust_remote_code=True).eval()
            tensors[f"{family}.last_hidden_state"] = base(inputs["input_ids"]).last_hidden_state
            classifier = AutoModelForSequenceClassification.from_pretrained(classifier_dir, trust_remote_code=True)
            tensors[f"{family}.classifier_logits"] = classifier.eval()(inputs["input_ids"]).logits
            # the classification head on the CausalLM folder: a fresh score, the saved backbone
            head_on_lm = AutoModelForSequenceClassification.from_pretrained(causal_dir, trust_remote_code=True)
            tensors[f"{family}.head_on_lm_hidden"] = head_on_lm.model(inputs["input_ids"]).last_hidden_state
            # token classification and question answering: fresh heads on the saved backbone
            for name, auto_class in (("token", AutoModelForTokenClassification),
                                     ("qa", AutoModelForQuestionAnswering)):
                head = auto_class.from_pretrained(causal_dir, trust_remote_code=True).eval()
                tensors[f"{family}.{name}_hidden"] = head.model(inputs["input_ids"]).last_hidden_state
                entry[f"{name}_class"] = type(head).__name__
        entry["modules"] = {
            "causal_lm": type(causal).__module__, "base_model": type(base).__module__,
            "sequence_classification": type(classifier).__module__,
        }
        entry["experts_implementation"] = causal.config._experts_implementation
        entry["class_names"] = [type(causal).__name__, type(base).__name__, type(classifier).__name__]
    torch.save(tensors, work / "child_outputs.pt")
    (work / "child_report.json").write_text(json.dumps(report))
    '''
) % {"new_tokens": NEW_TOKENS}


def _save_checkpoints(work):
    """Save a CausalLM and a SequenceClassification model of each family; return the parent's references."""
    inputs = {"input_ids": random_input_ids(2, 7), "prompt": random_input_ids(2, 4, seed=3)}
    torch.save(inputs, work / "inputs.pt")
    (work / "families.json").write_text(json.dumps(list(FAMILIES)))
    expected = {}
    for name, family in FAMILIES.items():
        causal = family.causal_lm(seed=1)
        classifier = family.sequence_classifier(seed=2, num_labels=3)
        causal.save_pretrained(work / name / "causal_lm")
        classifier.save_pretrained(work / name / "sequence_classification")
        with torch.no_grad():
            expected[f"{name}.logits"] = causal(inputs["input_ids"]).logits
            expected[f"{name}.last_hidden_state"] = causal.model(inputs["input_ids"]).last_hidden_state
            expected[f"{name}.classifier_logits"] = classifier(inputs["input_ids"]).logits
        expected[f"{name}.generated"] = causal.generate(
            inputs["prompt"], do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0
        )
    return expected


def _run_child(python, work, tmp_path_factory, *flags):
    script = work / "child.py"
    script.write_text(CHILD_SCRIPT)
    run_fresh_python(python, [script, work, *flags], cwd=tmp_path_factory.mktemp("child_cwd"),
                     modules_cache=tmp_path_factory.mktemp("hf_modules_cache"))
    report = json.loads((work / "child_report.json").read_text())
    outputs = torch.load(work / "child_outputs.pt", weights_only=True)
    return report, outputs


@pytest.fixture(scope="module")
def remote_load(tmp_path_factory):
    work = tmp_path_factory.mktemp("remote_code")
    expected = _save_checkpoints(work)
    report, outputs = _run_child(sys.executable, work, tmp_path_factory, "--block-hf-moe")
    return expected, report, outputs


@pytest.fixture(params=list(FAMILIES))
def family_name(request):
    return request.param


def test_child_process_cannot_import_hf_moe(remote_load):
    _, report, _ = remote_load
    assert report["hf_moe_importable"] is False


def test_remote_classes_come_from_transformers_modules(remote_load, family_name):
    _, report, _ = remote_load
    entry = report["families"][family_name]
    for head, module in entry["modules"].items():
        assert module.startswith("transformers_modules."), (head, module)
        assert module.endswith(".modeling_hf_moe"), (head, module)
    prefix = {"mixtral": "MixtralMoE", "deepseek": "DeepSeekMoE"}[family_name]
    assert entry["class_names"] == [f"{prefix}ForCausalLM", f"{prefix}Model", f"{prefix}ForSequenceClassification"]


def test_remote_model_keeps_the_default_auto_experts_kernel(remote_load, family_name):
    """transformers enables kernel switching only when the loaded modeling file holds `@use_experts_implementation`;
    the remote copy then defaults to "auto", as the installed package does."""
    _, report, _ = remote_load
    assert report["families"][family_name]["experts_implementation"] == "auto"


def test_remote_causal_lm_logits_match_parent(remote_load, family_name):
    expected, _, outputs = remote_load
    key = f"{family_name}.logits"
    assert_close(outputs[key], expected[key], atol=1e-6, rtol=0)


def test_remote_base_model_hidden_states_match_parent(remote_load, family_name):
    expected, _, outputs = remote_load
    key = f"{family_name}.last_hidden_state"
    assert_close(outputs[key], expected[key], atol=1e-6, rtol=0)


def test_remote_sequence_classification_logits_match_parent(remote_load, family_name):
    expected, _, outputs = remote_load
    key = f"{family_name}.classifier_logits"
    assert_close(outputs[key], expected[key], atol=1e-6, rtol=0)


def test_remote_classification_head_on_causal_lm_folder_reuses_the_saved_backbone(remote_load, family_name):
    expected, _, outputs = remote_load
    assert_close(outputs[f"{family_name}.head_on_lm_hidden"], expected[f"{family_name}.last_hidden_state"],
                 atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["token", "qa"])
def test_remote_token_classification_and_question_answering_heads_load(remote_load, family_name, head):
    expected, report, outputs = remote_load
    suffix = {"token": "ForTokenClassification", "qa": "ForQuestionAnswering"}[head]
    assert report["families"][family_name][f"{head}_class"].endswith(suffix)
    assert_close(outputs[f"{family_name}.{head}_hidden"], expected[f"{family_name}.last_hidden_state"],
                 atol=1e-6, rtol=0)


def test_remote_greedy_generation_matches_parent(remote_load, family_name):
    expected, _, outputs = remote_load
    key = f"{family_name}.generated"
    assert torch.equal(outputs[key], expected[key])


def test_loading_without_trust_remote_code_raises_the_remote_code_error(remote_load, family_name):
    _, report, _ = remote_load
    error = report["families"][family_name]["untrusted_error"]
    assert error is not None, "loaded custom code without trust_remote_code=True"
    assert "contains custom code which must be executed" in error
    assert "trust_remote_code=True" in error


def _venv_without_hf_moe(path):
    """A throwaway venv that sees this interpreter's packages but not the editable hf_moe install.

    `python -m venv --system-site-packages` cannot be used: the system site-packages directory is added with
    `site.addsitedir`, which executes its `.pth` files, including `__editable__.hf_moe-*.pth` that installs the
    import hook for the editable checkout, so hf_moe stays importable there. Instead the venv gets a `.pth` file that
    lists the system site-packages directory as a plain path entry: its packages (torch, transformers, ...) are
    importable, but the `.pth` files inside it, and so the editable hf_moe finder, never run.
    """
    venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True).create(path)
    python = path / "bin" / "python"
    venv_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    system_site = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "torch"))]
    assert system_site, "cannot locate the site-packages directory holding torch"
    with open(os.path.join(venv_site, "system_packages_without_pth.pth"), "w") as f:
        f.write("\n".join(system_site) + "\n")
    return python


@pytest.mark.slow
def test_remote_code_loads_in_a_throwaway_venv_without_hf_moe(tmp_path_factory):
    python = _venv_without_hf_moe(tmp_path_factory.mktemp("venv"))
    work = tmp_path_factory.mktemp("remote_code_venv")
    expected = _save_checkpoints(work)
    report, outputs = _run_child(str(python), work, tmp_path_factory)  # no sys.modules block: really absent

    assert report["python"].startswith(str(python.parent))
    assert report["hf_moe_importable"] is False
    for name in FAMILIES:
        entry = report["families"][name]
        assert all(module.startswith("transformers_modules.") for module in entry["modules"].values())
        for key in ("logits", "last_hidden_state", "classifier_logits"):
            assert_close(outputs[f"{name}.{key}"], expected[f"{name}.{key}"], atol=1e-6, rtol=0)
        assert torch.equal(outputs[f"{name}.generated"], expected[f"{name}.generated"])
        assert "contains custom code which must be executed" in entry["untrusted_error"]
