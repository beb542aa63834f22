"""The ops the model runs, behind one small interface. Today every op is the PyTorch reference (the CPU path
and the test oracle); a Triton kernel for an op is picked here, once, when it exists and the device has one."""

from lmcli.kernels.reference import (  # noqa: F401
    add_rms_norm,
    paged_attention,
    rms_norm,
    rotary,
    silu_and_mul,
    store_kv,
)
