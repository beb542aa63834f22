"""The GPU path's figures, in one run on a machine with an NVIDIA GPU (issue 14): copy bandwidth, each Triton
kernel's time against it and against torch, and the engine's decode step and throughput on random weights of a
Llama-3.2-1B and a Llama-3.1-8B shape (speed does not depend on the values), with and without a CUDA graph.

    python benchmarks/gpu.py [--models 1b,8b] [--steps 64]

Prints a table per part; needs only torch and triton beside lmcli's engine (no server packages). --dry-run tries
the script on a CPU under Triton's interpreter, in float32 on tiny shapes (its figures mean nothing)."""

import argparse
import os
import sys
import time
import traceback

if "--dry-run" in sys.argv:
    os.environ.update(TRITON_INTERPRET="1", LMCLI_KERNELS="triton")

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from lmcli.engine.batch import build_batch
from lmcli.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from lmcli.engine.layers.parallel import TP
from lmcli.engine.model_runner import ModelRunner
from lmcli.engine.models import model_class
from lmcli.engine.sampler import sample
from lmcli.engine.sampling_params import SamplingParams
from lmcli.engine.sequence import Sequence
from lmcli.kernels import reference
from lmcli.kernels.triton import activation, decode_attention, extend_attention, norm, rotary_store
from lmcli.workspace import ModelConfig

SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
               num_kv_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
}
DEV, BF16 = "cuda", torch.bfloat16
if "--dry-run" in sys.argv:
    DEV, BF16 = "cpu", torch.float32
    SHAPES = {"1b": dict(SHAPES["1b"], vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=32)}


DECODES = ((1, 128), (1, 1024), (64, 256), (256, 256), (256, 512)) if DEV == "cuda" else ((1, 20), (4, 40))
OFFLINE = (256, 128, 16) if DEV == "cuda" else (8, 16, 4)  # prompts, prompt tokens, prompts per prefill step
DECODE_ATTENTION = ((1, 4096), (1, 32768), (64, 1024), (256, 512), (256, 2048)) if DEV == "cuda" else ((2, 100),)
EXTEND_ATTENTION = ((8, 1024, 0), (4, 512, 3584), (1, 4096, 0)) if DEV == "cuda" else ((2, 64, 0), (1, 64, 64))
ROWS = (1, 256, 4096) if DEV == "cuda" else (1, 65)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def ms(fn) -> float:
    if DEV == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return do_bench(fn, warmup=25, rep=100)


def copy_bandwidth() -> float:
    """Bytes read and written per second by a device-to-device copy of 2 GiB."""
    a = torch.empty(1 << 30 if DEV == "cuda" else 1 << 20, dtype=BF16, device=DEV)
    b = torch.empty_like(a)
    t = ms(lambda: b.copy_(a))
    return 2 * a.numel() * 2 / (t / 1e3)


def paged(seqs, ctx, kv_heads, d, block_size=64):
    blocks = -(-ctx // block_size)
    k_cache = torch.randn(seqs * blocks + 1, kv_heads, block_size, d, dtype=BF16, device=DEV)
    v_cache = torch.randn_like(k_cache)
    tables = (torch.randperm(seqs * blocks, device=DEV) + 1).view(seqs, blocks)
    return k_cache, v_cache, tables


def attention_kernels(bw: float) -> None:
    print("\n## attention (bfloat16, 32 heads, 8 kv heads, block 64)")
    print("| kernel | shape | ms | GB/s (K/V read) | of copy bw | torch SDPA ms (contiguous K/V) |")
    print("|---|---|---|---|---|---|")
    for d in (64, 128):
        for seqs, ctx in DECODE_ATTENTION:
            k_cache, v_cache, tables = paged(seqs, ctx, 8, d)
            q = torch.randn(seqs, 32, d, dtype=BF16, device=DEV)
            lens = torch.full((seqs,), ctx, dtype=torch.long, device=DEV)
            t = ms(lambda: decode_attention.decode_attention(q, k_cache, v_cache, tables, lens, d ** -0.5))
            kv = k_cache[tables.flatten()].view(seqs, -1, 8, 64, d).permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :ctx]
            vv = v_cache[tables.flatten()].view(seqs, -1, 8, 64, d).permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :ctx]
            kv, vv = kv.contiguous(), vv.contiguous()
            ts = ms(lambda: F.scaled_dot_product_attention(q[:, :, None], kv, vv, enable_gqa=True))
            nbytes = 2 * seqs * ctx * 8 * d * 2
            print(f"| decode | d={d} seqs={seqs} ctx={ctx} | {t:.3f} | {nbytes / t / 1e6:.0f} | "
                  f"{nbytes / t / 1e6 / (bw / 1e9) * 100:.0f}% | {ts:.3f} |")
            del k_cache, v_cache, kv, vv
        for seqs, new, cached in EXTEND_ATTENTION:
            ctx = new + cached
            k_cache, v_cache, tables = paged(seqs, ctx, 8, d)
            q = torch.randn(seqs * new, 32, d, dtype=BF16, device=DEV)
            cu = torch.arange(0, seqs * new + 1, new, device=DEV)
            lens = torch.full((seqs,), ctx, dtype=torch.long, device=DEV)
            t = ms(lambda: extend_attention.extend_attention(q, k_cache, v_cache, tables, cu, lens, new, d ** -0.5))
            flops = 4 * seqs * 32 * d * (new * cached + new * (new + 1) / 2)
            qs = q.view(seqs, new, 32, d).transpose(1, 2)
            ks = torch.randn(seqs, 8, ctx, d, dtype=BF16, device=DEV)
            mask = torch.arange(ctx, device=DEV) <= torch.arange(cached, ctx, device=DEV)[:, None]
            causal = dict(is_causal=True) if not cached else dict(attn_mask=mask)
            ts = ms(lambda: F.scaled_dot_product_attention(qs, ks, ks, enable_gqa=True, **causal))
            print(f"| extend | d={d} seqs={seqs} new={new} cached={cached} | {t:.3f} | "
                  f"{flops / t / 1e9:.0f} TFLOP/s | | {ts:.3f} ({flops / ts / 1e9:.0f} TFLOP/s) |")
            del k_cache, v_cache, ks


def small_kernels(bw: float) -> None:
    print("\n## elementwise kernels (bfloat16, Llama-3.1-8B widths)")
    print("| kernel | rows | ms | GB/s | of copy bw | torch reference ms |")
    print("|---|---|---|---|---|---|")
    for rows in ROWS:
        x = torch.randn(rows, 4096, dtype=BF16, device=DEV)
        r = torch.randn_like(x)
        w = torch.randn(4096, dtype=BF16, device=DEV)
        gu = torch.randn(rows, 2 * 14336, dtype=BF16, device=DEV)
        qkv = torch.randn(rows, 48, 128, dtype=BF16, device=DEV)
        cos, sin = torch.randn(rows, 128, dtype=BF16, device=DEV), torch.randn(rows, 128, dtype=BF16, device=DEV)
        kc = torch.zeros(rows // 64 + 1, 8, 64, 128, dtype=BF16, device=DEV)
        vc = torch.zeros_like(kc)
        slots = torch.arange(rows, device=DEV)
        cases = [
            ("rms_norm", lambda: norm.rms_norm(x, w, 1e-5), lambda: reference.rms_norm(x, w, 1e-5), 2 * x.nbytes),
            ("add_rms_norm", lambda: norm.add_rms_norm(x, r, w, 1e-5), lambda: reference.add_rms_norm(x, r, w, 1e-5),
             4 * x.nbytes),
            ("silu_and_mul", lambda: activation.silu_and_mul(gu), lambda: reference.silu_and_mul(gu),
             gu.nbytes * 3 // 2),
            ("rotary_store", lambda: rotary_store.rotary_store(qkv, 32, 8, cos, sin, kc, vc, slots),
             lambda: reference.store_kv(reference.rotary(qkv[:, 32:40], cos, sin), qkv[:, 40:], kc, vc, slots, 64),
             qkv.nbytes + qkv[:, :40].nbytes + 2 * rows * 8 * 128 * 2),
        ]
        for name, fn, ref, nbytes in cases:
            t, tr = ms(fn), ms(ref)
            print(f"| {name} | {rows} | {t:.4f} | {nbytes / t / 1e6:.0f} | {nbytes / t / 1e6 / (bw / 1e9) * 100:.0f}% "
                  f"| {tr:.4f} |")


class RandomWorkspace:
    """What ModelRunner reads from a workspace, with random weights made on the GPU."""

    def __init__(self, config: ModelConfig):
        self.path, self.dtype, self.quantization, self.config = "random", "bfloat16", None, config
        with torch.device("meta"):
            model = model_class(config.architecture)(config, TP(), 64, BF16)
        self.shapes = {name: p.shape for name, p in model.named_parameters()}

    def weights(self):
        for name, shape in self.shapes.items():
            yield name, torch.randn(shape, dtype=BF16, device=DEV) * 0.02


def runner_for(shape: str, num_blocks: int) -> ModelRunner:
    m = ModelConfig(architecture="LlamaForCausalLM", rms_norm_eps=1e-5, rope_theta=500000.0,
                    max_position_embeddings=8192, **SHAPES[shape])
    config = EngineConfig(workspace="random", model=m, dtype="bfloat16", device=DEV,
                          cache=CacheConfig(num_blocks=num_blocks),
                          scheduler=SchedulerConfig(max_batch_size=256, max_prefill_token_num=4096))
    return ModelRunner(config, RandomWorkspace(m))


def weight_bytes(runner: ModelRunner) -> int:
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())


def decode_items(seqs: int, ctx: int, block_size: int):
    per = -(-(ctx + 1) // block_size)
    return [([7], ctx, list(range(i * per, (i + 1) * per)), True) for i in range(seqs)]


@torch.inference_mode()
def engine(shape: str, bw: float, steps: int) -> None:
    runner = runner_for(shape, num_blocks=256 * 9 + 64)
    wb = weight_bytes(runner)
    print(f"\n## engine, Llama {shape} shape (random bfloat16 weights: {wb / 1e9:.2f} GB)")
    print("| seqs | context | eager forward ms | runner step ms (graph, sampled on the GPU, ids to the host) "
          "| graph replay ms | output tok/s (runner step) | weights read at (replay) |")
    print("|---|---|---|---|---|---|---|")
    for seqs, ctx in DECODES:
        items = decode_items(seqs, ctx, runner.block_size)
        batch, _ = build_batch(items, runner.block_size, runner.device)
        eager = ms(lambda: runner.forward(batch).argmax(-1))
        greedy = [Sequence([7], SamplingParams(temperature=0)) for _ in range(seqs)]
        step = ms(lambda: sample(runner.execute(items)[1], greedy, [[]] * seqs))
        replay = float("nan")
        if runner.graphs is not None:
            replay = ms(runner.graphs.steps[min(b for b in runner.graphs.steps if b >= seqs)][1].replay)
        print(f"| {seqs} | {ctx} | {eager:.3f} | {step:.3f} | {replay:.3f} | {seqs / step * 1e3:.0f} "
              f"| {wb / replay / 1e9:.2f} TB/s |")
    # offline: prompts of random tokens prefilled a few at a time, then decode steps
    (seqs, prompt, group), block_size = OFFLINE, runner.block_size
    per = -(-(prompt + steps) // block_size)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, runner.config.model.vocab_size, (seqs, prompt), generator=g).tolist()
    runner.execute([(prompts[0], 0, list(range(per)), True)])  # compiles the prefill kernels outside the timing
    sync()
    start = time.perf_counter()
    for i in range(0, seqs, group):
        runner.execute([(prompts[j], 0, list(range(j * per, (j + 1) * per)), True) for j in range(i, i + group)])
    sync()
    prefill = time.perf_counter() - start
    greedy = [Sequence([7], SamplingParams(temperature=0)) for _ in range(seqs)]
    timings = {}
    for name in ("eager", "runner"):
        start = time.perf_counter()
        for s in range(steps):
            items = [([7], prompt + s, list(range(j * per, (j + 1) * per)), True) for j in range(seqs)]
            if name == "eager":
                runner.forward(build_batch(items, block_size, runner.device)[0]).argmax(-1).tolist()
            else:
                sample(runner.execute(items)[1], greedy, [[]] * seqs)
        sync()
        timings[name] = time.perf_counter() - start
    print(f"\noffline: {seqs} prompts x {prompt} tokens prefilled in {prefill:.2f} s ({seqs * prompt / prefill:.0f} "
          f"tok/s); {steps} decode steps of {seqs}: eager {seqs * steps / timings['eager']:.0f} output tok/s, the "
          f"runner's step (CUDA graph, sampler on the GPU) {seqs * steps / timings['runner']:.0f} output tok/s\n")
    del runner
    if DEV == "cuda":
        torch.cuda.empty_cache()


QUESTIONS = ["Hi!", "What is the capital of France?", "Write a haiku about the sea.", "Count to ten. " * 12,
             "Explain recursion to a child. " * 30, "List three red fruits."]


def run_engine(workspace: str, **options) -> tuple:
    """The Engine (scheduler, sampler, detokenizer) on the questions, joining three at a time mid-flight: greedy,
    20 tokens each, plus one seeded sampled request; returns (their token ids, seconds to build the engine). Its
    speed is not reported: a small run's time is Triton's first compilation of each kernel variant."""
    from lmcli.engine.engine import Engine

    built = time.perf_counter()
    engine = Engine(workspace, cache_block_seq_len=16, max_prefill_token_num=96, max_batch_size=8, **options)
    built = time.perf_counter() - built
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False) for q in QUESTIONS]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=20, ignore_eos=True)
    jobs = [(str(i), ids, greedy) for i, ids in enumerate(prompts)] + [("seeded", prompts[2], seeded)]
    outputs = {name: [] for name, _, _ in jobs}
    while jobs or engine.has_work:
        for name, ids, params in jobs[:3]:
            engine.add_request(name, ids, params)
        jobs = jobs[3:]
        for _ in range(3):
            for o in engine.step():
                outputs[o.request_id] += o.token_ids
    engine.close()
    return outputs, built


def end_to_end(workspace: str) -> None:
    """The whole engine on a real workspace: on the CPU in float32 (the reference), on the GPU in float32 with and
    without CUDA graphs, and in bfloat16 (the GPU's default); how many of each request's tokens match the CPU's."""
    print(f"\n## the whole engine on {workspace} (greedy requests joining mid-flight, one seeded sampled request)")
    reference, _ = run_engine(workspace, device="cpu", dtype="float32")
    print("| run | requests equal to the CPU's | tokens equal to the CPU's | engine start s |")
    print("|---|---|---|---|")
    runs = [("cuda float32, CUDA graphs", dict(device=DEV, dtype="float32")),
            ("cuda float32, --eager", dict(device=DEV, dtype="float32", eager=True)),
            ("cuda bfloat16 (auto), CUDA graphs", dict(device=DEV))]
    for name, options in runs:
        got, built = run_engine(workspace, **options)
        same = sum(got[k] == reference[k] for k in reference)
        tokens = sum(a == b for k in reference for a, b in zip(got[k], reference[k]))
        total = sum(len(v) for v in reference.values())
        print(f"| {name} | {same}/{len(reference)} | {tokens}/{total} | {built:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1b,8b" if DEV == "cuda" else "1b")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--workspace", help="also run the whole engine on this workspace (a small one: it runs on the "
                                        "CPU too, as the reference)")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU, Triton's interpreter (dry run)"
    print(f"# {name}, torch {torch.__version__}, triton {__import__('triton').__version__}")
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e12:.2f} TB/s")
    parts = [] if args.skip_kernels else [(small_kernels, bw), (attention_kernels, bw)]
    parts += [(engine, shape, bw, args.steps if DEV == "cuda" else 2) for shape in args.models.split(",") if shape]
    if args.workspace:
        parts.append((end_to_end, args.workspace))
    for fn, *part_args in parts:
        try:  # one part's failure still leaves the others' figures
            fn(*part_args)
        except Exception:
            traceback.print_exc()


if __name__ == "__main__":
    main()
