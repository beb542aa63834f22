"""What tensor parallelism across machines costs, in one run: `lm bench serve` at one api_server with --tp 1 (the
baseline), --tp 2 on one node, and --tp 2 over two nodes (--nnodes 2: node 1 a second `lm` process reached over
TCP, here on loopback), alternating rounds. Prints TTFT, TPOT and output tokens/s for each.

    python benchmarks/tp_nodes.py ./workspace [--rounds 2] [--num-prompts 16] [--concurrency 4]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "serve"))
from servers import LM, LmServer, free_port  # noqa: E402

from machine import cpu_name  # noqa: E402

SETUPS = {"tp 1": [], "tp 2, one node": ["--tp", "2"], "tp 2, two nodes": ["--tp", "2", "--nnodes", "2"]}


def bench(url: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(LM), "bench", "serve", url, "--dataset", "random", "--random-input-len", "128",
                        "--random-output-len", "64", "--ignore-eos", "--num-prompts", str(args.num_prompts),
                        "--concurrency", str(args.concurrency), "--tokenizer", str(args.workspace),
                        "--output", out.name], check=True, stdout=subprocess.DEVNULL)
        summary = json.loads(Path(out.name).read_text())["summary"]
    if summary["failed"]:
        raise SystemExit(f"requests failed at {url}: {summary['errors']}")
    return {"ttft": summary["ttft"]["median"] * 1e3, "tpot": summary["tpot"]["median"] * 1e3,
            "tok/s": summary["output_throughput"]}


def run(setup: list, args, log: str) -> dict:
    node = None
    if "--nnodes" in setup:
        port = free_port()
        setup = [*setup, "--master-port", str(port)]
        node = subprocess.Popen([str(LM), "serve", "api_server", str(args.workspace), *setup, "--node-rank", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = LmServer(args.workspace, "--dtype", "bfloat16", *setup, log_dir=log)
    try:
        server.wait_ready()
        return bench(server.url, args)
    finally:
        server.stop()
        if node is not None:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    runs = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory() as log:
        for _ in range(args.rounds):
            for name, setup in SETUPS.items():
                runs[name].append(run(setup, args, log))
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; lm bench serve, {args.num_prompts} "
          f"prompts of 128 tokens, 64 out, {args.concurrency} at a time; median of {args.rounds} alternating rounds")
    print(f"{'':16} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'out tok/s':>10}")
    for name, summaries in runs.items():
        values = [statistics.median(s[k] for s in summaries) for k in ("ttft", "tpot", "tok/s")]
        print(f"{name:16} {values[0]:12.1f} {values[1]:12.1f} {values[2]:10.1f}")


if __name__ == "__main__":
    main()
