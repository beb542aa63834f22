"""The README's set-up commands stay true: CI runs exactly its test command."""

import re

from conftest import REPO


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("pip install")]


def test_ci_runs_the_readme_test_command():
    serve, test = readme_commands()[:2]
    assert "torch==2.13.0" in serve and "torch==2.13.0" in test
    assert "pytest" in test
    assert test in (REPO / ".ci" / "run").read_text().splitlines()


def test_readme_serve_command_uses_the_default_model():
    serve = readme_commands()[0]
    assert "lm convert smollm2" in serve
