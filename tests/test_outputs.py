"""No command loses a user's files: output folders that overlap a source, foreign content under --overwrite,
leftovers of killed writes, SIGTERM. Every command that writes a folder is exercised through `hf-moe`'s `main`."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_moe.cli import main
from hf_moe.outputs import (
    LEGACY_TEMPORARY_AGE_S,
    OWNER_FILE,
    OutputPathError,
    atomic_output_dir,
    check_output_dir,
    read_owner_record,
    remove_stale_siblings,
)

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
UPCYCLE_FLAGS = ["--num-experts", "4", "--no-verify"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def siblings(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.glob(f".{out.name}.*"))


@pytest.fixture()
def models(tmp_path):
    """models/llama (a dense source), models/notes.txt (a user's file) and models/moe (an upcycled MoE)."""
    root = tmp_path / "models"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SIZES)).save_pretrained(root / "llama")
    (root / "notes.txt").write_text("my notes\n")
    assert main(["upcycle", str(root / "llama"), str(root / "moe"), *UPCYCLE_FLAGS]) == 0
    return root


# ---------------------------------------------------------------------------------------------------------------
# An output that overlaps a source is refused, with or without --overwrite, before anything is written
# ---------------------------------------------------------------------------------------------------------------


def overlapping_commands(root: Path) -> list[tuple[str, list[str]]]:
    """(what OUT is, argv) for every writing command whose OUT is the source, contains it, or lies inside it."""
    llama, moe = root / "llama", root / "moe"
    commands = []
    for where, out in (("the source", llama), ("the source's parent", root), ("inside the source", llama / "x")):
        commands.append((where, ["upcycle", str(llama), str(out), *UPCYCLE_FLAGS]))
    for where, out in (("the source", moe), ("the source's parent", root), ("inside the source", moe / "x")):
        commands.append((where, ["export", str(moe), str(out), "--format", "mixtral"]))
        commands.append((where, ["import", str(moe), str(out)]))  # refused for the path before the format
        commands.append((where, ["materialize", str(llama), str(moe), str(out)]))
    return commands


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_overlapping_a_source_is_refused_and_nothing_changes(models, overwrite, capsys):
    before = snapshot(models)
    for where, argv in overlapping_commands(models):
        argv = argv + (["--overwrite"] if overwrite else [])
        assert main(argv) == 2, (where, argv)
        error = capsys.readouterr().err
        assert error.startswith(f"hf-moe {argv[0]}: error: ") and error.count("\n") == 1, error
        if where != "the source's parent" or overwrite:  # without --overwrite an existing OUT may be named first
            assert "source" in error, error
        assert snapshot(models) == before, (where, argv)
        assert not list(models.parent.glob(".models.*")) and not list(models.glob(".*.tmp-*"))


def test_finetune_output_overlapping_its_model_or_data_is_refused(models, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    recipe = tmp_path / "recipe.yaml"
    for out in (models / "llama", models, models / "llama" / "run", tmp_path):
        recipe.write_text(f"model: {models / 'llama'}\nmethod: lora\ndata: {{train_file: {data}, text_field: text}}\n"
                          f"output_dir: {out}\n")
        before = snapshot(tmp_path)
        assert main(["finetune", str(recipe), "--overwrite"]) == 2
        assert "source" in capsys.readouterr().err
        assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# --overwrite replaces only an earlier output of hf-moe, or an empty folder
# ---------------------------------------------------------------------------------------------------------------


def test_overwrite_replaces_an_earlier_output_and_records_its_files(models):
    out = models / "moe"
    record = read_owner_record(out)
    assert record["command"] == "upcycle" and "model.safetensors" in record["files"]
    assert set(record["files"]) == {name for name in os.listdir(out) if name != OWNER_FILE}
    assert main(["upcycle", str(models / "llama"), str(out), *UPCYCLE_FLAGS, "--num-experts", "2", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    assert (models / "notes.txt").read_text() == "my notes\n" and (models / "llama" / "config.json").is_file()


@pytest.mark.parametrize("content", ["foreign file", "earlier output plus a foreign file", "no record"])
def test_overwrite_refuses_a_folder_holding_anything_else(models, content, capsys):
    out = models / "moe"
    if content == "foreign file":
        shutil.rmtree(out)
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif content == "earlier output plus a foreign file":
        (out / "thesis.tex").write_text("years of work")
    else:
        (out / OWNER_FILE).unlink()
    before = snapshot(models)
    for argv in (["upcycle", str(models / "llama"), str(out), *UPCYCLE_FLAGS, "--overwrite"],
                 ["export", str(models / "moe"), str(out), "--format", "mixtral", "--overwrite"],
                 ["materialize", str(models / "llama"), str(models / "moe"), str(out), "--overwrite"]):
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert "did not write" in error or "is the source" in error, error
        assert snapshot(models) == before


def test_overwrite_replaces_an_empty_folder_and_refuses_a_file(models, capsys):
    (models / "empty").mkdir()
    assert main(["upcycle", str(models / "llama"), str(models / "empty"), *UPCYCLE_FLAGS, "--overwrite"]) == 0
    assert main(["upcycle", str(models / "llama"), str(models / "notes.txt"), *UPCYCLE_FLAGS, "--overwrite"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert (models / "notes.txt").read_text() == "my notes\n"


def test_check_output_dir_resolves_symbolic_links(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "src")
    with pytest.raises(OutputPathError, match="is the source"):
        check_output_dir(tmp_path / "link", overwrite=True, sources=[tmp_path / "src"])
    with pytest.raises(OutputPathError, match="contains the source"):
        check_output_dir(tmp_path, overwrite=True, sources=[tmp_path / "link"])
    check_output_dir(tmp_path / "other", sources=[tmp_path / "src", None, "some-org/some-hub-id"])


# ---------------------------------------------------------------------------------------------------------------
# card and finetune write into folders they may not own
# ---------------------------------------------------------------------------------------------------------------


def test_card_keeps_a_readme_hf_moe_did_not_write(models, capsys):
    out = models / "moe"
    assert main(["card", str(out)]) == 0  # our own card: re-rendered
    (out / "README.md").write_text("# My own notes on this model\n")
    assert main(["card", str(out)]) == 2
    assert "was not written by hf-moe" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "# My own notes on this model\n"
    assert main(["card", str(out), "--overwrite"]) == 0
    assert "hf-moe" in (out / "README.md").read_text()


def test_finetune_refuses_a_non_empty_output_before_loading(models, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"an earlier adapter")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {models / 'llama'}\nmethod: lora\ndata: {{train_file: {data}, text_field: text}}\n"
                      f"output_dir: {out}\n")
    assert main(["finetune", str(recipe)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["finetune", str(recipe), "--overwrite"]) == 2  # not written by hf-moe
    assert "adapter_model.safetensors" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == b"an earlier adapter"


# ---------------------------------------------------------------------------------------------------------------
# Leftovers of killed writes, and SIGTERM
# ---------------------------------------------------------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporary_folders_of_the_same_target_are_removed(tmp_path):
    out = tmp_path / "out"
    dead, alive = dead_pid(), os.getppid()
    for name in (f".out.tmp-{dead}-0123abcd", f".out.old-{dead}-4567abcd", ".out.tmp-89abcdef",
                 f".out.tmp-{alive}-0123abcd", f".other.tmp-{dead}-0123abcd", ".out.tmp-fedcba98"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors.partial").write_bytes(b"x" * 100)
    old = time.time() - LEGACY_TEMPORARY_AGE_S - 10
    os.utime(tmp_path / ".out.tmp-89abcdef", (old, old))  # an earlier version's, an hour old
    (tmp_path / "out").mkdir()
    remove_stale_siblings(out)
    assert set(siblings(out)) == {".out.tmp-fedcba98", f".out.tmp-{alive}-0123abcd"}  # recent or running: kept
    assert (tmp_path / f".other.tmp-{dead}-0123abcd").is_dir()  # another target's


def test_a_replacement_killed_halfway_is_rolled_back(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{dead_pid()}-0123abcd"  # OUT was moved aside, then the process was killed
    old.mkdir()
    (old / "config.json").write_text("{}")
    with atomic_output_dir(out, "test") as folder:
        assert not out.exists() or (out / "config.json").is_file()
        (folder / "new.txt").write_text("new")
    assert siblings(out) == []


SIGKILL_SCRIPT = """
import sys
from hf_moe.outputs import atomic_output_dir
with atomic_output_dir(sys.argv[1], "test") as folder:
    (folder / "partial").write_text("half")
    print("writing", flush=True)
    sys.stdin.read()
"""


def test_a_sigkilled_write_leaves_nothing_after_the_next_run(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SIGKILL_SCRIPT, str(out)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    assert len(siblings(out)) == 1
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and len(siblings(out)) == 1  # what SIGKILL leaves
    with atomic_output_dir(out, "test") as folder:
        (folder / "complete").write_text("done")
    assert sorted(os.listdir(out)) == [OWNER_FILE, "complete"] and siblings(out) == []


@pytest.mark.parametrize("command", ["export", "import", "upcycle"])
def test_sigterm_during_any_conversion_leaves_nothing(models, command, monkeypatch, capsys):
    native = importlib.import_module("hf_moe.conversion.native")
    upcycle = importlib.import_module("hf_moe.conversion.upcycle")
    assert main(["export", str(models / "moe"), str(models / "native"), "--format", "mixtral"]) == 0

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler

    monkeypatch.setattr(native, "_stream", terminated)
    monkeypatch.setattr(upcycle, "stream", terminated)
    out = models / "out"
    argv = {"export": ["export", str(models / "moe"), str(out), "--format", "mixtral"],
            "import": ["import", str(models / "native"), str(out)],
            "upcycle": ["upcycle", str(models / "llama"), str(out), *UPCYCLE_FLAGS]}[command]
    capsys.readouterr()
    assert main(argv) == 130
    assert capsys.readouterr().err.endswith(f"hf-moe {command}: interrupted; nothing was written\n")
    assert not out.exists() and siblings(out) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_while_the_command_starts_prints_no_traceback():
    executable = Path(sys.executable).parent / "hf-moe"
    if not executable.is_file():
        pytest.skip("the hf-moe console script is not installed next to this Python")
    process = subprocess.Popen([str(executable), "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(0.3)  # the libraries are still loading
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=60)
    assert "Traceback" not in error
    assert error in ("", "hf-moe: interrupted\n") or "interrupted" in error
