"""What giving back the KV blocks a sliding window has left buys (BlockManager.slide), in one run: the same long
requests through the engine with the same KV memory, here and in a baseline checkout that holds every layer's
blocks until a sequence ends (e.g. `git worktree add /tmp/base <commit before>`), alternating rounds. Prints, for
each: the most KV memory held at once, the most sequences running at once, preemptions, and output tokens/s.

    python benchmarks/sliding_blocks.py ./gemma-ws --baseline /tmp/base [--rounds 3] [--seqs 8] [--prompt 1536]
        [--output 128] [--kv-mib 48]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from machine import cpu_name


def child(args) -> None:
    """One run in this process, with the engine from sys.path[0]; prints a JSON line."""
    import torch

    from lmcli.engine.engine import Engine
    from lmcli.engine.sampling_params import SamplingParams
    from lmcli.workspace import Workspace

    m = Workspace.load(args.workspace).config
    layers = len(m.kv_groups()[0][1]) if hasattr(m, "kv_groups") else m.num_layers  # a page's layers
    page = 2 * layers * m.num_kv_heads * 64 * m.head_dim * 2  # bfloat16, blocks of 64 tokens
    engine = Engine(args.workspace, dtype="bfloat16", num_blocks=(args.kv_mib << 20) // page, max_batch_size=16)
    bm, params = engine.block_manager, SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for i in range(args.seqs):
        engine.add_request(str(i), torch.randint(3, m.vocab_size, (args.prompt,), generator=g).tolist(), params)
    held = running = out = 0
    start = time.perf_counter()
    while engine.has_work:
        out += sum(len(o.token_ids) for o in engine.step())
        held = max(held, bm.num_blocks - bm.num_free)
        running = max(running, len(engine.scheduler.running))
    elapsed = time.perf_counter() - start
    print(json.dumps({"held_mib": held * page / 2 ** 20, "running": running, "out": out,
                      "preemptions": engine.scheduler.num_preemptions, "tok/s": out / elapsed}))


def run(src: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    cmd = [sys.executable, __file__, args.workspace, "--child", "--seqs", str(args.seqs), "--prompt",
           str(args.prompt), "--output", str(args.output), "--kv-mib", str(args.kv_mib)]
    done = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace")
    parser.add_argument("--baseline", help="a checkout of lm to compare with")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1536)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--kv-mib", type=int, default=48)
    args = parser.parse_args()
    if args.child:
        return child(args)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setups = {"frees slid blocks": here, **({"baseline": args.baseline} if args.baseline else {})}
    runs = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, src in setups.items():
            runs[name].append(run(src, args))
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {args.seqs} requests of {args.prompt} tokens, {args.output} out "
          f"(greedy, ignore_eos), all queued at once; {args.kv_mib} MiB of KV cache; median of {args.rounds} "
          "alternating rounds")
    print(f"{'':18} {'KV held MiB':>12} {'most running':>13} {'preemptions':>12} {'out tok/s':>10}")
    for name, results in runs.items():
        values = [statistics.median(r[k] for r in results) for k in ("held_mib", "running", "preemptions", "tok/s")]
        print(f"{name:18} {values[0]:12.1f} {values[1]:13.0f} {values[2]:12.0f} {values[3]:10.1f}")


if __name__ == "__main__":
    main()
