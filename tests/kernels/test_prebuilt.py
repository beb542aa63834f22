"""The native kernels built ahead of time (lmcli/kernels/prebuilt.py), as the Docker image ships them: each variant
holds only the instructions its CPU features name, the choice never takes one this CPU lacks, and with no compiler
the prebuilt library of each level loads and computes what PyTorch does."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import without_compiler
from lmcli.kernels import native, prebuilt

# /proc/cpuinfo flags of real CPUs, cut to what matters here
HASWELL = set("sse4_1 sse4_2 ssse3 cx16 popcnt lahf_lm abm movbe xsave avx avx2 fma f16c bmi1 bmi2".split())
KNIGHTS_LANDING = HASWELL | {"avx512f", "avx512cd", "avx512er", "avx512pf"}  # AVX-512 without BW, DQ, VL
SKYLAKE_X = HASWELL | {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}
CASCADE_LAKE = SKYLAKE_X | {"avx512_vnni"}
ZEN4 = CASCADE_LAKE | {"avx512_bf16", "avx512ifma", "avx512vbmi"}
SAPPHIRE_RAPIDS = ZEN4 | {"amx_bf16", "amx_tile", "amx_int8", "avx512_fp16"}
ALL = {name for name, _, _, _ in prebuilt.VARIANTS}


@pytest.mark.parametrize("cpu,level,expected", [
    (SAPPHIRE_RAPIDS, "amx", "amx"), (SAPPHIRE_RAPIDS, "avx512", "avx512-bf16"), (ZEN4, "amx", None),
    (ZEN4, "avx512", "avx512-bf16"), (CASCADE_LAKE, "avx512", "avx512-vnni"), (SKYLAKE_X, "avx512", "avx512"),
    (KNIGHTS_LANDING, "avx512", None), (HASWELL, "avx512", None), (HASWELL, "avx2", "avx2"),
    (HASWELL - {"f16c"}, "avx2", None), (set(), "portable", "portable"), (set(), "avx2", None),
])
def test_the_choice_never_takes_a_variant_whose_features_the_cpu_lacks(cpu, level, expected):
    assert prebuilt.choose(level, cpu, ALL) == expected  # None: native.build compiles instead


def test_a_variant_missing_from_the_folder_is_passed_over():
    assert prebuilt.choose("avx512", ZEN4, ALL - {"avx512-bf16"}) == "avx512-vnni"
    assert prebuilt.choose("avx2", HASWELL, ALL - {"avx2"}) is None


# A mark of each feature in objdump's listing: ymm registers (AVX, in every variant that needs AVX2), zmm registers
# (AVX-512), the VNNI byte product, the AVX512-BF16 dot product, the AMX tile product.
MARKS = {"avx2": r"%ymm\d", "avx512f": r"%zmm\d", "avx512_vnni": r"\bvpdpbusd\b", "avx512_bf16": r"\bvdpbf16ps\b",
         "amx_bf16": r"\btdpbf16ps\b"}


@pytest.mark.parametrize("variant,need", [(name, need) for name, _, need, _ in prebuilt.VARIANTS])
def test_each_variant_holds_the_instructions_of_its_features_only(prebuilt_kernels, variant, need):
    if not shutil.which("objdump"):
        pytest.skip("no objdump (binutils) to disassemble the libraries")
    path = prebuilt_kernels / prebuilt.file_name(variant)
    if need and not native.x86():
        assert not path.exists()  # the x86 variants are built on x86 only
        return
    listing = subprocess.run(["objdump", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    for feature, mark in MARKS.items():
        assert bool(re.search(mark, listing)) == (feature in need), f"{variant}: {feature} ({mark})"


CHECK = """
import torch
import torch.nn.functional as F
from lmcli.kernels import native, reference

print(native.library()._name)
torch.manual_seed(0)
x, w = torch.randn(3, 576, dtype=torch.bfloat16), torch.randn(100, 576, dtype=torch.bfloat16)
torch.testing.assert_close(native.gemv_bf16(x, w), F.linear(x.float(), w.float()), rtol=1e-5, atol=1e-4)
residual, weight = torch.randn(3, 576, dtype=torch.bfloat16), torch.randn(576, dtype=torch.bfloat16)
out, total = native.add_rms_norm_bf16(x, residual, weight, 1e-5)
expected_out, expected_total = reference.add_rms_norm(x, residual, weight, 1e-5)
assert torch.equal(total, expected_total)
torch.testing.assert_close(out.float(), expected_out.float(), rtol=2 ** -6, atol=1e-6)  # one bfloat16 step
"""


def run_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("level", [name for name, _, _ in native.LEVELS])
def test_each_level_loads_its_prebuilt_library_without_a_compiler(prebuilt_kernels, tmp_path, level):
    if level not in native.available_levels():
        pytest.skip(f"the {level} kernels: this CPU lacks {', '.join(native.missing_features(level)) or 'x86'}")
    expected = prebuilt.choose(level, set(native._cpu_flags().split()), ALL)
    assert expected is not None, f"no prebuilt variant of {level} fits this CPU"
    done = run_check({**without_compiler(prebuilt_kernels, tmp_path), "LMCLI_CPU_ISA": level})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(prebuilt_kernels / prebuilt.file_name(expected))
    assert not any(tmp_path.iterdir())  # nothing compiled into the cache


def test_where_no_variant_fits_the_kernels_are_compiled_or_pytorch_runs(tmp_path):
    empty = tmp_path / "kernels"
    empty.mkdir()
    env = {**without_compiler(empty, tmp_path / "cache"), "LMCLI_CPU_ISA": "portable"}
    done = subprocess.run([sys.executable, "-c", "from lmcli.kernels import native; print(native.library())"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip() == "None", done.stderr  # no library: the PyTorch path runs
    done = run_check({**env, "PATH": os.environ["PATH"], "CC": os.environ.get("CC", "cc")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path / "cache" / "kernels" / "lmcli-portable-"))
