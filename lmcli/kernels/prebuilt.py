"""The native CPU kernels built ahead of time, for a machine without a C compiler (the Docker image):
`python -m lmcli.kernels.prebuilt DIR` builds the same sources as native.py once per variant below, each for a fixed
instruction set (never -march=native), into DIR. With LMCLI_KERNELS_DIR=DIR, native.build(level) loads the best
variant of that level whose CPU features this CPU has; where none fits, it compiles as it does without the variable."""

import argparse
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from lmcli.kernels import native

# What -march=x86-64-v4 lets the compiler use, as /proc/cpuinfo names it (abm is LZCNT): x86-64-v2, v3, then v4.
X86_64_V4 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma",
             "abm", "movbe", "xsave", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
V4 = ["-march=x86-64-v4"]
JIT = {name: (need, flags) for name, need, flags in native.LEVELS}  # avx2 and portable need no -march=native
# (variant, the level it serves, the CPU features its flags let the compiler use, the flags), best first within a
# level. The C code picks its bodies by the flags' macros (__AVX512BF16__, __AVX512VNNI__, __AMX_TILE__ ...), so a
# variant runs only instructions its features name. amx names its extensions rather than -march=sapphirerapids, which
# would let the compiler use AVX512-FP16, VBMI and the rest too.
VARIANTS = (
    ("amx", "amx", (*X86_64_V4, "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"),
     [*V4, "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16", "-mtune=sapphirerapids"]),
    ("avx512-bf16", "avx512", (*X86_64_V4, "avx512_bf16", "avx512_vnni"), [*V4, "-mavx512bf16", "-mavx512vnni"]),
    ("avx512-vnni", "avx512", (*X86_64_V4, "avx512_vnni"), [*V4, "-mavx512vnni"]),
    ("avx512", "avx512", X86_64_V4, V4),
    ("avx2", "avx2", *JIT["avx2"]),
    ("portable", "portable", *JIT["portable"]),
)


def flags(variant: str) -> list:
    return [*native.FLAGS, *next(f for name, _, _, f in VARIANTS if name == variant)]


def file_name(variant: str) -> str:
    """Named after the sources and flags it was built from, and the machine type: a folder built from other
    sources is never loaded."""
    return f"lmcli-{variant}-{native.key(flags(variant), platform.machine())}.so"


def choose(level: str, cpu_flags: set, built: set) -> Optional[str]:
    """The best variant of level among built whose features are all in cpu_flags, or None."""
    return next((name for name, serves, need, _ in VARIANTS
                 if serves == level and name in built and set(need) <= cpu_flags), None)


def find(level: str) -> Optional[Path]:
    """The library in LMCLI_KERNELS_DIR that native.build(level) loads, or None (unset, or none fits this CPU)."""
    folder = os.environ.get("LMCLI_KERNELS_DIR")
    if not folder:
        return None
    paths = {name: Path(folder) / file_name(name) for name, _, _, _ in VARIANTS}
    name = choose(level, set(native._cpu_flags().split()), {n for n, path in paths.items() if path.exists()})
    return paths[name] if name else None


def build(folder: Path) -> list:
    """Every variant this machine's compiler ($CC, else cc) targets (the x86 ones on x86 only), built into folder;
    their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [name for name, _, need, _ in VARIANTS if not need or native.x86()]
    cc = os.environ.get("CC", "cc")
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda name: native.compile_and_link(cc, flags(name), folder / file_name(name)), names))
    return [folder / file_name(name) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m lmcli.kernels.prebuilt", description=__doc__)
    parser.add_argument("folder", type=Path, help="where the libraries go (LMCLI_KERNELS_DIR at run time)")
    try:
        for path in build(parser.parse_args().folder):
            print(path)
    except subprocess.CalledProcessError as e:
        sys.exit(f"{' '.join(e.cmd)} failed:\n{e.stderr.decode(errors='replace')}")
    except OSError as e:  # no compiler, or the folder cannot be written
        sys.exit(str(e))


if __name__ == "__main__":
    main()
