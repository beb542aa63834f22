"""The decode products at every kernel level this CPU can run, beside torch on the same weights, in one run.

The 120 projections of one SmolLM2-135M decode step (30 layers: qkv 960x576, o 576x576, gate+up 3072x576,
down 576x1536), each weight read from memory once a pass as in a real step (the set is larger than the caches).
Prints ms for one pass at 1 and 8 rows: torch bfloat16 (F.linear), torch float32 on float32 copies of the
weights, and our bfloat16 GEMV at each level; at 16 and 64 rows (batched decodes, prefill chunks):
torch bfloat16, torch float32 on float32 copies, torch float32 on each weight widened for the product (what runs
without native bfloat16 products and without the native kernel), and the native float32 x bfloat16 GEMM at each
level that has one; at every row count, the 8-bit and 4-bit kernels (kernels/int8.py, kernels/int4.py) at each
level (kernels.quantized_linear: the byte products, or from kernels.WIDEN_MIN_ROWS rows torch's GEMM on the weight
widened natively; the widening alone is timed too), and torch's int8 GEMM (fbgemm, activations per row: what
--quantization int8 ran before).

    python benchmarks/kernel_levels.py [--repeat 5] [--rows 1 8 16 64]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from lmcli import kernels
from lmcli.kernels import int4, int8, native

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def _fbgemm_pack(w: torch.Tensor):
    """torch's int8 linear weight: per output channel, packed for fbgemm."""
    import warnings

    wf = w.float()
    scale = (wf.abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(n, k, dtype=torch.bfloat16) for n, k in SHAPES]
    floats = [w.float() for w in weights]
    packed = [int8.pack(w) for w in weights]
    nibbles = [int4.quantize(w) for w in weights]
    fbgemm = [_fbgemm_pack(w) for w in weights]
    model = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
    print(f"CPU: {model}; levels here: {', '.join(native.available_levels())}; "
          f"torch threads: {torch.get_num_threads()}")
    print(f"{'rows':>4} {'what':<28} {'ms a pass':>10}")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (576, 1536)}
        xf = {k: x.float() for k, x in xs.items()}
        rows_out = [("torch bfloat16", lambda: [F.linear(xs[w.shape[1]], w) for w in weights]),
                    ("torch float32", lambda: [F.linear(xf[w.shape[1]], w) for w in floats])]
        rows_out.append(("torch int8 (fbgemm)", lambda: [torch.ops.quantized.linear_dynamic(xf[w.shape[1]], p)
                                                         for w, p in zip(weights, fbgemm)]))
        if rows > 8:
            rows_out.append(("torch float32, weight widened", lambda: [F.linear(xf[w.shape[1]], w.float())
                                                                       for w in weights]))
        for level in native.available_levels():
            lib = native.build(level)
            if lib is None:
                continue
            original = native.library, native.level
            native.library, native.level = (lambda lib=lib: lib), (lambda level=level: level)
            try:
                rows_out.append((f"{level} int8 weights", best_ms(lambda: [kernels.quantized_linear(xs[p.shape[1]], p)
                                                                          for p in packed], args.repeat)))
                rows_out.append((f"{level} int4 weights", best_ms(lambda: [kernels.quantized_linear(xs[q.shape[1]], q)
                                                                          for q in nibbles], args.repeat)))
                if rows >= kernels.WIDEN_MIN_ROWS:  # the widening alone (no x): what those rows pay for it
                    work = torch.bfloat16 if native.bf16_products() else torch.float32
                    rows_out.append((f"{level} int4 widening only", best_ms(
                        lambda: [native.dequantize_blocks(4, q.codes, q.scales, *q.shape, work) for q in nibbles],
                        args.repeat)))
                if rows <= 8:
                    rows_out.append((f"{level} bfloat16 GEMV",
                                     best_ms(lambda: [native.gemv_bf16(xs[w.shape[1]], w) for w in weights],
                                             args.repeat)))
                elif native.gemm_f32_bf16(xf[576], weights[0]) is not None:
                    rows_out.append((f"{level} float32 x bfloat16 GEMM",
                                     best_ms(lambda: [native.gemm_f32_bf16(xf[w.shape[1]], w) for w in weights],
                                             args.repeat)))
            finally:
                native.library, native.level = original
        for what, fn in rows_out:
            ms = fn if isinstance(fn, float) else best_ms(fn, args.repeat)
            print(f"{rows:>4} {what:<28} {ms:>10.2f}")


if __name__ == "__main__":
    main()
