"""The README cannot rot: its Python blocks run in order in a fresh process (whose Hub is the local test server),
every `hf-moe` command line of its bash blocks parses with the real command, the files they name exist, and CI runs
the test command it prints."""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_server import HubServer

from hf_moe.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def command_lines(language: str = "bash") -> list[str]:
    """Each command of the bash blocks, comments removed, `a && b` split."""
    lines = []
    for block in fenced_blocks(language):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            lines += [part.strip() for part in line.split("&&") if part.strip()]
    return lines


def test_python_blocks_run_in_order_in_a_fresh_process(tmp_path):
    blocks = fenced_blocks("python")
    assert len(blocks) >= 8
    script = "\n".join(blocks) + textwrap.dedent("""
        import json
        print(json.dumps({"aux_loss": out.aux_loss is not None, "generated": list(generated.shape),
                          "mlp_layer_types": config.mlp_layer_types,
                          "max_rel_error": result.verification["max_rel_error"], "native": type(
                              AutoModelForCausalLM.from_pretrained(native)).__name__, "commit_url": info.commit_url}))
    """)
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    with HubServer(tmp_path / "hub") as hub:
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_test", HF_HOME=str(tmp_path / "hf_home"),
                   HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1",
                   PYTHONPATH=str(ROOT))
        completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=600, check=False)
        assert completed.returncode == 0, completed.stderr[-6000:]
        pushed = hub.store.files("your-name/tiny-llama-moe")
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results["aux_loss"] and results["generated"] == [1, 12]
    assert results["mlp_layer_types"] == ["dense", "dense", "sparse", "dense", "sparse"]
    assert results["max_rel_error"] <= 1e-5
    assert results["native"] == "MixtralForCausalLM"
    assert {"config.json", "model.safetensors", "modeling_hf_moe.py", "README.md"} <= set(pushed)


@pytest.mark.parametrize("line", [line for line in command_lines() if line.startswith("hf-moe ")])
def test_hf_moe_command_lines_parse(line):
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert callable(args.run)


def test_files_named_by_command_lines_exist():
    for line in command_lines():
        for word in shlex.split(line):
            if word.startswith(("recipes/", "docs/", "scripts/", "benchmarks/")):
                assert (ROOT / word).exists(), (line, word)


def test_ci_runs_the_readme_test_command():
    test_section = README.split("## Run the tests", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", test_section, re.DOTALL).group(1)
    assert command == "python -m pytest"
    assert "python3 -m pytest\n" in (ROOT / ".ci" / "run").read_text()


def test_reproducibility_promise_names_what_the_numbers_depend_on():
    """Numbers repeat with the same seed on the same kind of CPU and torch version only: the README says so, and
    gives the quickstart's time as a range."""
    text = " ".join(README.split())
    assert "the same seed gives the same numbers;" not in text and "the same seed gives the same numbers." not in text
    assert "same kind of CPU with the same torch version" in text
    assert re.search(r"about \d+ to \d+ minutes", text)
