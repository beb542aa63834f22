import os

# Without a GPU the Triton kernels run under Triton's interpreter, which must be chosen before triton is first
# imported (transformers' model classes import it); LMCLI_TEST_DEVICE=cuda runs their tests on a GPU instead.
if not os.environ.get("LMCLI_TEST_DEVICE", "").startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lmcli.bench.hf import hf_model as hf_model_from_workspace, unfused_weights as unfuse  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
LM = Path(sys.executable).parent / "lm"  # the console script pip installed beside this Python


def run_lm(*args, env=None, cwd=None, timeout=300, input=None) -> subprocess.CompletedProcess:
    """Run the real `lm` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(LM), *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout, input=input)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert done.returncode != 0, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF, fetched once per machine into the user's cache."""
    from lmcli.known_models import DEFAULT_MODEL, fetch

    return fetch(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_workspace(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 converted by the real `lm convert` command, once per test session."""
    dst = tmp_path_factory.mktemp("ws") / "smollm2"
    done = run_lm("convert", smollm2_gguf, "--dst-path", dst, "--model-name", "SmolLM2-135M-Instruct")
    assert done.returncode == 0, done.stderr
    return dst


@pytest.fixture(scope="session")
def smollm2_int4_workspace(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 with its GGUF's own 4-bit blocks kept (lm convert --quantization int4), once per test session."""
    dst = tmp_path_factory.mktemp("ws") / "int4"
    done = run_lm("convert", smollm2_gguf, "--dst-path", dst, "--quantization", "int4", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert "linear layers int4" in done.stdout
    return dst


@pytest.fixture(scope="session")
def prebuilt_kernels(tmp_path_factory) -> Path:
    """The native kernels built ahead of time, as the Dockerfile builds them (`python -m lmcli.kernels.prebuilt
    DIR`, with this machine's compiler), once per test session."""
    folder = tmp_path_factory.mktemp("kernels")
    done = subprocess.run([sys.executable, "-m", "lmcli.kernels.prebuilt", str(folder)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return folder


def without_compiler(kernels: Path, cache: Path) -> dict:
    """An environment like the Docker image's: LMCLI_KERNELS_DIR=kernels, no C compiler to be found (CC names none,
    PATH holds only this Python's scripts) and an empty cache, so that only a prebuilt library can load."""
    return {**os.environ, "LMCLI_KERNELS_DIR": str(kernels), "CC": "/nonexistent", "LMCLI_CACHE": str(cache),
            "PATH": str(Path(sys.executable).parent)}


LMDEPLOY_WHEEL = "lmdeploy==0.9.2.post1"  # LMDeploy's own client and request models, as its users have them


@pytest.fixture(scope="session")
def lmdeploy_sources() -> Path:
    """serve/openai/api_client.py and protocol.py from LMDeploy's wheel on PyPI, fetched once per machine with pip
    (no dependencies; the 100 MB wheel is deleted once the two files are out)."""
    import zipfile

    cache = Path.home() / ".cache" / "lmcli" / "lmdeploy"
    names = ("api_client.py", "protocol.py")
    if not all((cache / n).exists() for n in names):
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                               LMDEPLOY_WHEEL], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        wheel = next(cache.glob("lmdeploy-*.whl"))
        for n in names:
            (cache / n).write_bytes(zipfile.ZipFile(wheel).read(f"lmdeploy/serve/openai/{n}"))
        wheel.unlink()
    return cache


@pytest.fixture(scope="session")
def lmdeploy_api_client(lmdeploy_sources):
    """LMDeploy's APIClient module (only api_client.py is loaded, with lmdeploy.utils.get_logger standing in for
    the package)."""
    import importlib.util
    import logging
    import types

    package = sys.modules.setdefault("lmdeploy", types.ModuleType("lmdeploy"))
    utils = sys.modules.setdefault("lmdeploy.utils", types.ModuleType("lmdeploy.utils"))
    utils.get_logger = logging.getLogger
    package.utils = utils
    spec = importlib.util.spec_from_file_location("lmdeploy_api_client", lmdeploy_sources / "api_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
