"""The repository's Dockerfile read as Docker reads it (comment lines dropped, continued lines joined): enough to
run its entry point and health check outside a container."""

import json
import re
import shlex

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list:
    """(INSTRUCTION, its arguments) in file order."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    logical = re.sub(r"\\\n\s*", "", "\n".join(lines)).splitlines()
    return [tuple(line.split(None, 1)) for line in logical if line.strip()]


def arguments(name: str) -> list:
    """The arguments of the one `name` instruction."""
    found = [rest for instruction, rest in instructions() if instruction == name]
    assert len(found) == 1, f"{len(found)} {name} instructions in {DOCKERFILE}"
    return found[0]


def exec_form(name: str) -> list:
    """ENTRYPOINT or CMD: the command, written as a JSON array (exec form)."""
    return json.loads(arguments(name))


def healthcheck() -> list:
    """HEALTHCHECK's command (exec form), its --options left out."""
    return json.loads(arguments("HEALTHCHECK").partition("CMD ")[2])


def env() -> dict:
    """Every ENV instruction's variables (KEY=value form)."""
    pairs = [pair for instruction, rest in instructions() if instruction == "ENV" for pair in shlex.split(rest)]
    return dict(pair.split("=", 1) for pair in pairs)
