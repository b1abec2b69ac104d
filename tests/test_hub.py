"""Publishing on the Hub: `hf_moe.hub.push` and `hf-moe push`, against the test Hub of tests/hub_server.py.

huggingface_hub reads HF_ENDPOINT when it is imported, so every Hub client here runs in a fresh Python process with
HF_ENDPOINT pointing at the test server (loopback only), its own empty HF_HOME and module cache. The server runs in
this process, so the tests read its store directly: which commits exist, what each changed, which blobs are stored.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import REVOKED_TOKEN, HubServer, card_metadata_errors
from huggingface_hub import ModelCard
from test_lora_moe import tiny_llama
from transformers import AutoModelForCausalLM

import hf_moe
from hf_moe.conversion import upcycle
from hf_moe.hub import check_folder
from hf_moe.outputs import OWNER_FILE

ROOT = Path(hf_moe.__file__).resolve().parents[1]
IDS = [[5, 17, 42, 7, 99, 3, 11], [1, 2, 3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory) -> Path:
    """A tiny Llama (MIT-licensed by its card) upcycled to 4 experts, top-2, with tokenizer-free prompts."""
    root = tmp_path_factory.mktemp("upcycled")
    tiny_llama(num_layers=2, seed=6).save_pretrained(root / "dense")
    (root / "dense" / "README.md").write_text("---\nlicense: mit\n---\n# A dense model\n")
    return upcycle(root / "dense", root / "moe", arch="mixtral", num_experts=4, top_k=2, seed=1, verbose=False).out


def run_client(hub: HubServer, tmp_path: Path, script: str, with_hf_moe: bool = True) -> dict:
    """Run `script` in a fresh Python process talking to the test Hub; it prints one JSON line last, returned here.

    Without hf_moe, the process starts outside the repository and cannot import hf_moe (test_remote_code.py does the
    same), as on a machine where it is not installed."""
    work = Path(tmp_path)
    home = work / f"client-{len(list(work.glob('client-*')))}"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_test", HF_HOME=str(home / "hf_home"),
               HF_MODULES_CACHE=str(home / "modules"), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1",
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    prelude = "import sys\n" + ("" if with_hf_moe else "sys.modules['hf_moe'] = None  # `import hf_moe` fails\n")
    if with_hf_moe:
        env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], cwd=home, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def local_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                 experts_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def stored_files(hub: HubServer, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    return {path: hub.store.read(entry) for path, entry in hub.store.files(repo_id, revision).items()}


def test_upcycled_model_loads_from_the_hub_without_hf_moe(hub, upcycled, tmp_path):
    pushed = run_client(hub, tmp_path, f"""
        import json, contextlib, io
        from hf_moe.cli import main
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            code = main(["push", {str(upcycled)!r}, "tiny-upcycled"])
        print(json.dumps({{"code": code, "output": output.getvalue()}}))
    """)
    assert pushed["code"] == 0 and f"pushed {upcycled} to {hub.url}/testuser/tiny-upcycled" in pushed["output"]
    files = stored_files(hub, "testuser/tiny-upcycled")
    local = {path.name: path.read_bytes() for path in upcycled.iterdir() if path.name != OWNER_FILE}
    assert files == {**local, ".gitattributes": files[".gitattributes"]}  # every file but our record, byte for byte

    loaded = run_client(hub, tmp_path, f"""
        import json, torch
        from huggingface_hub import ModelCard
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("testuser/tiny-upcycled", trust_remote_code=True,
                                                     attn_implementation="eager", experts_implementation="eager")
        with torch.no_grad():
            logits = model.eval()(torch.tensor({IDS})).logits
        card = ModelCard.load("testuser/tiny-upcycled")
        print(json.dumps({{"logits": logits.tolist(), "module": type(model).__module__, "card": card.content}}))
    """, with_hf_moe=False)
    assert loaded["module"].startswith("transformers_modules.testuser.tiny_hyphen_upcycled.")
    assert torch.equal(torch.tensor(loaded["logits"]), local_logits(upcycled))
    card = ModelCard(loaded["card"])
    assert card_metadata_errors(loaded["card"]) == [] and card.data.license == "mit"
    assert {"moe", "hf-moe", "custom_code"} <= set(card.data.tags) and card.data.library_name == "transformers"


def test_mixlora_adapter_keeps_pefts_card_and_loads_with_peft(hub, tmp_path):
    # the base goes to the Hub first, so that PEFT names it by its repository id, as for any Hub base
    tiny_llama(num_layers=2, seed=2).save_pretrained(tmp_path / "base")
    made = run_client(hub, tmp_path, f"""
        import json, torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM
        import hf_moe
        from hf_moe.cards import write_card
        from hf_moe.hub import push
        push({str(tmp_path / "base")!r}, "tiny-llama")
        base = AutoModelForCausalLM.from_pretrained("testuser/tiny-llama")
        torch.manual_seed(0)
        model = get_peft_model(base, hf_moe.MixLoraConfig(num_experts=4, top_k=2, r=4, init_lora_weights=False))
        model.save_pretrained("adapter")  # PEFT's card
        write_card("adapter", "adapter")
        info = push("adapter", "tiny-mixlora")
        with torch.no_grad():
            logits = model.eval()(torch.tensor({IDS})).logits
        print(json.dumps({{"logits": logits.tolist(), "url": info.commit_url}}))
    """)
    assert made["url"].startswith(f"{hub.url}/testuser/tiny-mixlora/commit/")
    loaded = run_client(hub, tmp_path, f"""
        import json, torch
        from huggingface_hub import ModelCard
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        import hf_moe
        base = AutoModelForCausalLM.from_pretrained("testuser/tiny-llama")
        model = PeftModel.from_pretrained(base, "testuser/tiny-mixlora").eval()
        with torch.no_grad():
            logits = model(torch.tensor({IDS})).logits
        card = ModelCard.load("testuser/tiny-mixlora")
        print(json.dumps({{"logits": logits.tolist(), "card": card.content, "type": model.peft_type}}))
    """)
    assert loaded["type"] == "MIXLORA" and torch.equal(torch.tensor(loaded["logits"]), torch.tensor(made["logits"]))
    card = ModelCard(loaded["card"])
    assert card_metadata_errors(loaded["card"]) == []
    assert card.data.library_name == "peft" and card.data.base_model == "testuser/tiny-llama"  # PEFT's
    assert card.data.base_model_relation == "adapter" and card.data.pipeline_tag == "text-generation"
    assert {"base_model:adapter:testuser/tiny-llama", "transformers", "moe", "hf-moe", "mixlora"} <= set(
        card.data.tags)
    assert "top-2 of 4 LoRA experts per FFN block" in card.text
    assert set(stored_files(hub, "testuser/tiny-mixlora")) == {".gitattributes", "README.md", "adapter_config.json",
                                                              "adapter_model.safetensors"}


def test_pushes_update_only_what_changed_on_branches_and_pull_requests(hub, upcycled, tmp_path):
    folder = shutil.copytree(upcycled, tmp_path / "moe")
    (folder / "training_args.bin").write_bytes(b"a pickle")  # never uploaded
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"intermediate")
    results = run_client(hub, tmp_path, f"""
        import json
        from hf_moe.cards import write_card
        from hf_moe.hub import push, pushed_url
        folder, repo, urls = {str(folder)!r}, "testuser/tiny-updates", []
        urls.append(pushed_url(push(folder, repo)))
        urls.append(pushed_url(push(folder, repo)))  # nothing changed: no commit
        write_card(folder, "upcycled", description="Second version of the card.")
        urls.append(pushed_url(push(folder, repo)))
        write_card(folder, "upcycled", description="A change proposed on a branch.")
        urls.append(pushed_url(push(folder, repo, revision="dev"), "dev"))
        write_card(folder, "upcycled", description="A change proposed for review.")
        urls.append(pushed_url(push(folder, repo, create_pr=True)))
        print(json.dumps({{"urls": urls}}))
    """)
    repo = "testuser/tiny-updates"
    main = hub.store.history(repo)
    assert len(main) == 3  # create, first push, card update: the unchanged push made no commit
    assert main[0]["changed"] == ["README.md"]
    assert set(main[1]["changed"]) == {path.name for path in upcycled.iterdir() if path.name != OWNER_FILE}
    unchanged = {path: entry for path, entry in main[1]["files"].items() if path != "README.md"}
    assert {path: main[0]["files"][path] for path in unchanged} == unchanged  # the same stored files
    assert "training_args.bin" not in main[0]["files"] and not any(p.startswith("checkpoint-") for p in main[0]["files"])
    readme = {ref: hub.store.read(hub.store.files(repo, ref)["README.md"]).decode()
              for ref in ("main", "dev", "refs/pr/1")}
    assert "Second version" in readme["main"] and "on a branch" in readme["dev"] and "for review" in readme["refs/pr/1"]
    assert hub.store.history(repo, "dev")[0]["changed"] == ["README.md"]
    assert hub.store.history(repo, "refs/pr/1")[1]["sha"] == main[0]["sha"]  # the PR builds on main
    assert results["urls"][0] == results["urls"][2] == f"{hub.url}/{repo}"
    assert results["urls"][3] == f"{hub.url}/{repo}/tree/dev"
    assert results["urls"][4] == f"{hub.url}/{repo}/discussions/1"


def test_transformers_push_to_hub_uploads_what_hf_moe_push_uploads(hub, tmp_path):
    """A folder from save_pretrained has no card: push uploads a rendered one and leaves the folder as it is."""
    result = run_client(hub, tmp_path, """
        import json, os, torch
        import hf_moe
        from hf_moe.hub import push
        torch.manual_seed(0)
        config = hf_moe.MixtralMoEConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
        model = hf_moe.MixtralMoEForCausalLM(config)
        model.save_pretrained("saved")
        before = sorted(os.listdir("saved"))
        push("saved", "via-hf-moe")
        model.push_to_hub("via-transformers")
        print(json.dumps({"unchanged": sorted(os.listdir("saved")) == before, "cwd": os.getcwd(),
                          "parameters": model.num_parameters()}))
    """)
    ours, theirs = stored_files(hub, "testuser/via-hf-moe"), stored_files(hub, "testuser/via-transformers")
    assert result["unchanged"]  # no README.md written into the user's folder
    card, generic = ours.pop("README.md").decode(), theirs.pop("README.md").decode()
    assert card_metadata_errors(card) == [] and card_metadata_errors(generic) == []
    assert ours.keys() == theirs.keys() >= {"config.json", "model.safetensors", "modeling_hf_moe.py", "routing.py"}
    assert ours == theirs  # the same bytes: weights, config with auto_map, modeling files
    parsed = ModelCard(card)
    assert parsed.data.library_name == "transformers" and {"hf-moe", "moe", "hf_moe_mixtral"} <= set(parsed.data.tags)
    for text in ("| routed experts per MoE layer | 4, each of width 64 |", f"{result['parameters']:,} total",
                 'AutoModelForCausalLM.from_pretrained("testuser/via-hf-moe")',
                 'from_pretrained("testuser/via-hf-moe", trust_remote_code=True'):
        assert text in card, text
    assert result["cwd"] not in card and "/tmp" not in card


def test_invalid_card_metadata_is_refused_before_any_commit(hub, upcycled, tmp_path):
    folder = shutil.copytree(upcycled, tmp_path / "moe")
    text = (folder / "README.md").read_text()
    (folder / "README.md").write_text(text.replace("license: mit", "license: not-a-license"))
    refused = run_client(hub, tmp_path, f"""
        import contextlib, io, json
        from hf_moe.cli import main
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            code = main(["push", {str(folder)!r}, "tiny-refused", "--private"])
        print(json.dumps({{"code": code, "errors": errors.getvalue()}}))
    """)
    assert refused["code"] == 2 and "Invalid metadata in README.md" in refused["errors"]
    assert "not-a-license" in refused["errors"]
    assert len(hub.store.history("testuser/tiny-refused")) == 1  # only the repository's initial commit
    assert hub.store.repo("testuser/tiny-refused")["private"] is True


def test_only_publishable_folders_are_pushed(upcycled, tmp_path):
    assert check_folder(upcycled) == "model"
    with pytest.raises(ValueError, match="neither config.json"):
        check_folder(tmp_path)
    pickled = shutil.copytree(upcycled, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"weights only in non-safetensors files \(pytorch_model.bin\)"):
        check_folder(pickled)
    no_code = shutil.copytree(upcycled, tmp_path / "no_code", ignore=shutil.ignore_patterns("routing.py"))
    with pytest.raises(ValueError, match="lacks the modeling files routing.py"):
        check_folder(no_code)
    config = json.loads((no_code / "config.json").read_text())
    del config["auto_map"]["AutoModelForSequenceClassification"]
    (no_code / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`auto_map` lacks AutoModelForSequenceClassification"):
        check_folder(no_code)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        check_folder(adapter)


def test_folder_saved_before_the_newer_heads_is_published_with_a_warning(upcycled, tmp_path, caplog):
    older = shutil.copytree(upcycled, tmp_path / "older")
    config = json.loads((older / "config.json").read_text())
    for name in ("AutoModelForTokenClassification", "AutoModelForQuestionAnswering"):
        del config["auto_map"][name]
    (older / "config.json").write_text(json.dumps(config))
    # its modeling files predate transformers_compat.py: the folder needs only the files its own code imports
    (older / "transformers_compat.py").unlink()
    for name in ("configuration_hf_moe.py", "modeling_hf_moe.py"):
        code = (older / name).read_text()
        (older / name).write_text("\n".join(line for line in code.splitlines() if ".transformers_compat" not in line))
    with caplog.at_level(logging.WARNING, logger="hf_moe.hub"):
        assert check_folder(older) == "model"
    assert "AutoModelForTokenClassification, AutoModelForQuestionAnswering" in caplog.text
    (older / "routing.py").unlink()  # still imported by modeling_hf_moe.py
    with pytest.raises(ValueError, match="lacks the modeling files routing.py"):
        check_folder(older)


def test_push_help_names_every_option(capsys):
    from hf_moe.cli import main

    assert main(["push", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("PATH", "REPO_ID", "--private", "--revision", "--create-pr"))


@pytest.mark.parametrize("case", ["no token", "revoked token", "unreachable Hub"])
def test_push_without_login_or_network_says_what_to_do_in_one_line(hub, upcycled, tmp_path, case):
    """Checked before anything is created or uploaded: one line naming the Hub and the remedy, exit code 1."""
    endpoint = "http://127.0.0.1:9" if case == "unreachable Hub" else hub.url  # port 9: nothing listens
    token = {"no token": None, "revoked token": REVOKED_TOKEN, "unreachable Hub": "hf_test"}[case]
    result = run_client(hub, tmp_path, f"""
        import contextlib, io, json, os
        os.environ.pop("HF_TOKEN")
        os.environ["HF_ENDPOINT"] = {endpoint!r}
        if {token!r} is not None:
            os.environ["HF_TOKEN"] = {token!r}
        from hf_moe.cli import main
        error = io.StringIO()
        with contextlib.redirect_stderr(error):
            code = main(["push", {str(upcycled)!r}, "testuser/never-created"])
        print(json.dumps({{"code": code, "error": error.getvalue()}}))
    """)
    expected = {"no token": f"not logged in to the Hub at {endpoint}: run `hf auth login` or set HF_TOKEN",
                "revoked token": f"the Hub at {endpoint} refused the token (401 Unauthorized): log in again",
                "unreachable Hub": f"cannot reach the Hub at {endpoint} ("}[case]
    assert result["code"] == 1
    assert result["error"].startswith(f"hf-moe push: error: {expected}"), result["error"]
    assert result["error"].count("\n") == 1 and "Traceback" not in result["error"]
    assert not (hub.store.root / "repos" / "testuser" / "never-created").exists()
