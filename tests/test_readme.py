"""The README's commands stay true: CI runs its test command, every `hybridlm ...` example parses
with the real command-line parser, and the Python example's imports exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hybridlm.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    """Every command of the bash blocks: lines split at `&&`, comments dropped."""
    commands = []
    for block in _code_blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def _hybridlm_argv() -> list[list[str]]:
    argvs = []
    for command in _commands():
        words = shlex.split(command)
        if words[0] == "hybridlm":
            argvs.append(words[1:])
        elif words[0] == "torchrun":
            argvs.append(words[words.index("hybridlm") + 1 :])
    return argvs


def test_ci_runs_the_readme_test_command():
    """CI's last command is the README's install + test steps (pip made quiet, nothing else changed)."""
    steps = [part.strip() for part in _code_blocks("bash")[1].strip().split("&&")]
    assert steps[0].startswith("python3 -m venv") and steps[-2:] == ['pip install -e ".[dev]"', "python -m pytest -q"]
    ci_last = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_last == 'python -m pip install -q -e ".[dev]" && python -m pytest -q'


def test_readme_has_main_and_test_commands():
    main, tests = _code_blocks("bash")[:2]
    assert main.strip().endswith("hybridlm train")
    assert tests.strip().endswith("python -m pytest -q")


@pytest.mark.parametrize("argv", _hybridlm_argv(), ids=lambda argv: " ".join(argv)[:60])
def test_readme_hybridlm_examples_parse(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse reports the problem on stderr
        pytest.fail(f"README example `hybridlm {' '.join(argv)}` does not parse (exit {exit_.code})")
    assert callable(getattr(args, "func", None)), argv


def test_every_command_is_in_the_readme_table():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    for name in subcommands:
        assert f"`hybridlm {name}" in README, f"command {name!r} missing from the README's table"


def test_readme_python_example_imports():
    block = _code_blocks("python")[0]
    imports = "\n".join(line for line in block.splitlines() if line.startswith(("import ", "from ")))
    exec(compile(imports, "README.md", "exec"), {})
