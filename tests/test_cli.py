"""The `hf-moe` command itself: what it prints with no command, --version and every command's --help, and what
starting it costs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_moe
from hf_moe.cli import build_parser, main

ROOT = Path(hf_moe.__file__).resolve().parents[1]
COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


def option_helps(text: str) -> list[str]:
    """The help text of each option in a --help output (an option's lines joined)."""
    options, current = [], None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            options.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line.strip())
        else:
            current = None
    return [" ".join(lines) for lines in options]


def test_no_command_lists_the_commands(capsys):
    assert main([]) == 2
    error = capsys.readouterr().err
    assert all(command in error for command in COMMANDS)
    assert "hf-moe COMMAND --help" in error and "the following arguments are required" not in error


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hf-moe {hf_moe.__version__}"


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_each_default_once_in_one_style(command, capsys):
    assert main(["--help"] if command is None else [command, "--help"]) == 0
    output = capsys.readouterr().out
    text = re.sub(r"\s+", " ", output)
    for option in option_helps(output):
        assert option.count("(default:") <= 1, option
    for wrong in ("(default: False)", "(default: True)", "(default: None)", "turn off: "):
        assert wrong not in text, wrong


@pytest.mark.parametrize("command", COMMANDS)
def test_no_option_states_its_default_twice(command):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    for option in option_helps(parser.format_help()):
        assert option.count("(default:") <= 1, option


def test_quickstart_help_says_what_the_numbers_depend_on(capsys):
    assert main(["quickstart", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "same kind of CPU with the same torch version" in text


def test_help_in_a_fresh_process_imports_no_heavy_library():
    """`hf-moe --help` and `import hf_moe` need neither peft, datasets nor matplotlib (seconds of imports); peft's
    methods are still registered as soon as peft is imported."""
    script = ("import sys, contextlib, io\n"
              "from hf_moe.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    main(['--help']); main(['upcycle', '--help'])\n"
              "print(sorted(m for m in ('matplotlib', 'datasets', 'peft') if m in sys.modules))\n"
              "from peft import PeftConfig\n"
              "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
              "print(PEFT_TYPE_TO_CONFIG_MAPPING['MIXLORA'].__name__)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=True)
    assert result.stdout.split() == ["[]", "MixLoraConfig"]
