"""The README cannot rot: its Python blocks run, and CI runs the test command it prints."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_python_blocks_run_in_order():
    namespace: dict = {}
    blocks = fenced_blocks("python")
    assert len(blocks) >= 4
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["out"].aux_loss is not None
    assert namespace["generated"].shape == (1, 12)
    assert namespace["config"].mlp_layer_types == ["dense", "dense", "sparse", "dense", "sparse"]


def test_ci_runs_the_readme_test_command():
    test_section = README.split("## Run the tests", 1)[1]
    command = fenced_blocks("bash") and re.search(r"```bash\n(.*?)\n```", test_section, re.DOTALL).group(1)
    assert command == "python -m pytest"
    assert "python3 -m pytest\n" in (ROOT / ".ci" / "run").read_text()
