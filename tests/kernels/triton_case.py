"""What the Triton kernel tests share: where they run, in which dtype and to what tolerance, and the ahead-of-time
compile of a kernel to sm_90 and sm_80 code.

A test file imports this before any lmcli.kernels.triton module: unless LMCLI_TEST_DEVICE names a cuda device, it
turns on the Triton interpreter, which @triton.jit reads when a kernel is defined. It is a plain module, not a
conftest (the GPU machine runs these files with `pytest --noconftest`); pytest puts the test file's folder on sys.path,
so `import triton_case` finds it."""

import inspect
import os
import subprocess
import sys

DEVICE = os.environ.get("LMCLI_TEST_DEVICE", "cpu")
if not DEVICE.startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is installed with lm on Linux x86-64 only")

DTYPE = torch.bfloat16 if DEVICE.startswith("cuda") else torch.float32  # the interpreter's bf16 dot is wrong
TOL = dict(atol=2e-2, rtol=2e-2) if DTYPE == torch.bfloat16 else dict(atol=2e-4, rtol=2e-4)

NO_CUDA_BACKEND = 77  # the exit status of compile_for_gpus's subprocess when it cannot compile for a GPU here


def require_cuda_backend(exit_status: int):
    """Exit with exit_status, naming what is missing, when Triton's CUDA backend or its ptxas for sm_90 or sm_80 is
    not installed. Runs in compile_for_gpus's subprocess (its source is sent there)."""
    import sys
    try:
        from triton.backends.nvidia import compiler as nvidia
        find = getattr(nvidia, "get_ptxas", None)
        for arch in (90, 80):
            find(arch) if find else nvidia._path_to_binary("ptxas")
    except (ImportError, RuntimeError) as e:
        print(f"no CUDA backend or ptxas for Triton here: {e}", file=sys.stderr)
        sys.exit(exit_status)


def compile_both(fn, signature: dict, constexprs: dict, **options) -> dict:
    """Compile the @triton.jit kernel fn with these argument types (the constexprs' names are added as "constexpr")
    for sm_90 and sm_80; options go to triton.compile (num_warps, num_stages). Returns {90: kernel, 80: kernel}.
    Runs in compile_for_gpus's subprocess (its source is sent there), where the snippet can call it."""
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    assert isinstance(fn, triton.runtime.JITFunction), type(fn)  # not the interpreter's
    key = "constexprs" if "constexprs" in inspect.signature(triton.compiler.ASTSource).parameters else "constants"
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, **{key: constexprs})
    return {arch: triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options) for arch in (90, 80)}


def compile_for_gpus(code: str, timeout: int = 600) -> str:
    """Run the Python source code in a subprocess without TRITON_INTERPRET, after compile_both is defined there (no
    GPU needed: triton.compile only). Skips when Triton's CUDA backend or ptxas is not installed; fails with the
    subprocess's output when the code fails. Returns what it printed."""
    prelude = inspect.getsource(require_cuda_backend) + "\n\n" + inspect.getsource(compile_both)
    program = f"{prelude}\n\nrequire_cuda_backend({NO_CUDA_BACKEND})\n{code}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode == NO_CUDA_BACKEND:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    if done.returncode != 0:
        pytest.fail(f"the compile exited with status {done.returncode}:\n{done.stdout}{done.stderr}")
    return done.stdout
