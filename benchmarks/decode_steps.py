"""Decode output tok/s of an Engine at batch 1 and 8 (prompts of --prompt-len tokens, default 64; 40 decode steps
timed after 5, eos ignored), the engine's code from this checkout or from another one (--src DIR: a `git worktree`
of the commit to compare), so that two commits can be measured in alternating rounds on the same machine.

    python benchmarks/decode_steps.py WORKSPACE [--src /tmp/before] [--batches 1,8] [--prompt-len 600]
        [--quant-policy 8]
"""

import argparse
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace")
    ap.add_argument("--src", default=None, help="a checkout whose lmcli to import instead of the installed one")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--quant-policy", type=int, default=0, help="8: the 8-bit KV cache")
    args = ap.parse_args()
    if args.src:  # ahead of an editable install's finder
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, args.src)
    import lmcli
    from lmcli.engine.engine import Engine
    from lmcli.engine.sampling_params import SamplingParams

    engine = Engine(args.workspace, dtype=args.dtype, num_blocks=256, quant_policy=args.quant_policy)
    results = []
    for n in map(int, args.batches.split(",")):
        for i in range(n):
            engine.add_request(f"{n}-{i}", list(range(100 + i, 100 + i + args.prompt_len)),
                               SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
        while engine.scheduler.waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
            engine.step()  # the prefills
        for _ in range(5):
            engine.step()
        steps, start = 40, time.perf_counter()
        for _ in range(steps):
            engine.step()
        step = (time.perf_counter() - start) / steps
        results.append(f"batch {n}: {step * 1e3:.2f} ms a step, {n / step:.1f} tok/s")
        while engine.has_work:
            engine.step()
    engine.close()
    print(lmcli.__file__.rsplit("/lmcli/", 1)[0], "|", " | ".join(results))


if __name__ == "__main__":
    main()
