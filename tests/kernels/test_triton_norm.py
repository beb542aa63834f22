"""The Triton RMS norm kernels against reference.rms_norm and reference.add_rms_norm: under the Triton interpreter
in float32 here, on the GPU in bfloat16 with LMCLI_TEST_DEVICE=cuda."""

import re

import pytest
import torch

from triton_case import DEVICE, DTYPE, TOL, compile_for_gpus  # first: it sets the Triton interpreter up
from lmcli.kernels import reference
from lmcli.kernels.triton.norm import add_rms_norm, rms_norm

EPS = 1e-5


def inputs(rows: int, hidden: int):
    torch.manual_seed(hidden + rows)
    x = (torch.randn(rows, hidden) * 3).to(DEVICE, DTYPE)
    weight = (1 + torch.randn(hidden) / 4).to(DEVICE, DTYPE)
    return x, weight


@pytest.mark.parametrize("hidden", [576, 2048, 4096])  # SmolLM2's 576 is no power of two
@pytest.mark.parametrize("rows", [1, 64])
def test_rms_norm_matches_reference(rows, hidden):
    x, weight = inputs(rows, hidden)
    torch.testing.assert_close(rms_norm(x, weight, EPS), reference.rms_norm(x, weight, EPS), **TOL)


@pytest.mark.parametrize("hidden", [576, 2048, 4096])
@pytest.mark.parametrize("rows", [1, 64])
def test_add_rms_norm_matches_reference(rows, hidden):
    x, weight = inputs(rows, hidden)
    residual = torch.randn_like(x)
    x_before = x.clone()
    want, want_sum = reference.add_rms_norm(x, residual, weight, EPS)
    normed, total = add_rms_norm(x, residual, weight, EPS)
    assert total is residual and torch.equal(total, want_sum) and torch.equal(x, x_before)  # the sum in place
    torch.testing.assert_close(normed, want, **TOL)


def test_rms_norm_reads_strided_rows():
    x, weight = inputs(4, 1152)
    x = x[:, :576]  # rows 1152 apart
    torch.testing.assert_close(rms_norm(x, weight[:576], EPS), reference.rms_norm(x, weight[:576], EPS), **TOL)


@pytest.mark.parametrize("x, weight, needle", [
    (torch.zeros(2, 20000), torch.zeros(20000), "x: expected a hidden size (dim 1) from 1 to 16384"),
    (torch.zeros(2, 8), torch.zeros(8, dtype=torch.float16), "weight: expected a contiguous (8,) torch.float32"),
    (torch.zeros(2, 8), torch.zeros(9), "weight: expected a contiguous (8,)"),
    (torch.zeros(2, 8, 2)[..., 0], torch.zeros(8), "x: expected a (rows, hidden) tensor with contiguous rows"),
])
def test_rms_norm_rejects_bad_arguments(x, weight, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        rms_norm(x, weight, EPS)
    with pytest.raises(ValueError, match=re.escape(needle)):
        add_rms_norm(x, torch.zeros(x.shape), weight, EPS)


def test_add_rms_norm_rejects_a_residual_of_another_shape():
    with pytest.raises(ValueError, match=re.escape("residual: expected (2, 8) torch.float32")):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 9), torch.zeros(8), EPS)


AOT = """
from lmcli.kernels.triton import norm
signature = {"x": "*bf16", "residual": "*bf16", "weight": "*bf16", "out": "*bf16", "hidden": "i32", "eps": "fp32",
             "x_stride": "i32", "residual_stride": "i32", "out_stride": "i32"}
for add, block in ((False, 1024), (True, 4096), (True, 16384)):
    compile_both(norm.rms_norm_kernel, signature, {"ADD": add, "BLOCK": block}, num_warps=norm.num_warps(block))
"""


def test_rms_norm_compiles_for_hopper_and_ampere():
    compile_for_gpus(AOT)
