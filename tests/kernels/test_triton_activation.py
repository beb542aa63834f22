"""The Triton silu_and_mul kernel against reference.silu_and_mul: under the Triton interpreter in float32 here, on
the GPU in bfloat16 with LMCLI_TEST_DEVICE=cuda."""

import re

import pytest
import torch

from triton_case import DEVICE, DTYPE, TOL, compile_for_gpus  # first: it sets the Triton interpreter up
from lmcli.kernels import reference
from lmcli.kernels.triton.activation import silu_and_mul


@pytest.mark.parametrize("intermediate", [1536, 8192])  # SmolLM2's, and one of 8 blocks
@pytest.mark.parametrize("tokens", [1, 64])
def test_silu_and_mul_matches_reference(tokens, intermediate):
    torch.manual_seed(tokens)
    x = (torch.randn(tokens, 2 * intermediate) * 4).to(DEVICE, DTYPE)
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), **TOL)


def test_silu_and_mul_reads_strided_rows():
    x = torch.randn(3, 2 * 1536 + 8).to(DEVICE, DTYPE)[:, :2 * 1536]
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), **TOL)


@pytest.mark.parametrize("x, needle", [
    (torch.zeros(2, 7), "x: expected a (tokens, 2 * intermediate) tensor with contiguous rows, got (2, 7)"),
    (torch.zeros(8), "x: expected a (tokens, 2 * intermediate) tensor"),
    (torch.zeros(2, 8, dtype=torch.int32), "x: expected bfloat16, float16 or float32, got torch.int32"),
])
def test_silu_and_mul_rejects_bad_arguments(x, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        silu_and_mul(x)


AOT = """
from lmcli.kernels.triton import activation
signature = {"x": "*bf16", "out": "*bf16", "intermediate": "i32", "x_stride": "i32", "out_stride": "i32"}
compile_both(activation.silu_and_mul_kernel, signature, {"BLOCK": activation.BLOCK}, num_warps=activation.NUM_WARPS)
"""


def test_silu_and_mul_compiles_for_hopper_and_ampere():
    compile_for_gpus(AOT)
