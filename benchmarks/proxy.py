"""What `lm serve proxy` costs (issue: `lm serve proxy`), in one run, side by side with a baseline.

cost: three api_servers on the fake engine (tests/serve/fake_engine.py: answers at once, so the router is what is
measured), the router pinned to CPU 0, the nodes and the load (wrk, non-streamed chat completions over keep-alive
connections) on the other CPUs. For each router: requests per second, and the router's own CPU time per request
(user + system, from /proc), the figure that does not depend on which side is the bottleneck. Routers: none (wrk
straight at one node: the ceiling), `lm serve proxy` (least_outstanding and round_robin), and `vllm-router` from
PyPI (round_robin) when --vllm-router names its executable, and `smg` (SGLang's router) when --smg does.

latency: one real api_server on a workspace, `lm bench serve` at it directly and through `lm serve proxy`,
alternating, one stream at a time: the proxy's added time to first token and per output token.

    python benchmarks/proxy.py cost [--vllm-router PATH] [--smg PATH] [--seconds 10] [--connections 32]
    python benchmarks/proxy.py latency ./workspace [--rounds 2] [--num-prompts 16]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "serve"))
from servers import LM, LmProxy, LmServer, free_port  # noqa: E402

FAKE_NODE = """
import sys, uvicorn
sys.path.insert(0, {tests!r})
from fake_engine import FakeEngine
from lmcli.engine.async_engine import AsyncEngine
from lmcli.serve.api_server import create_app
uvicorn.run(create_app(AsyncEngine(FakeEngine(answer="Hi."))), host="127.0.0.1", port={port}, log_level="warning",
            access_log=False)
"""
BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "Hello there, how are you?"}],
        "max_tokens": 8}


def wait_ok(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 in {timeout} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and every process under it (a launcher's router, its workers)."""
    stats = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    tree, total = {pid}, 0
    for _ in range(8):  # a few generations deep
        tree |= {p for p, (parent, _) in stats.items() if parent in tree}
    total = sum(stats[p][1] for p in tree if p in stats)
    return total / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: int, connections: int, cpus: str) -> tuple:
    """(requests per second, median latency in ms) of POST BODY to url."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(BODY))}\n'
                     'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["taskset", "-c", cpus, "wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s",
                          "--latency", "-s", script.name, url + "/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"{errors.group(1)} requests failed through {url}:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[p50.group(2)]
    return rate, float(p50.group(1)) * scale


def cost(args) -> None:
    if not shutil.which("wrk"):
        raise SystemExit("needs wrk (apt-get install wrk)")
    cpus = os.cpu_count()
    rest = f"1-{cpus - 1}" if cpus > 2 else "1"
    nodes = []
    for _ in range(3):
        port = free_port()
        code = FAKE_NODE.format(tests=str(ROOT / "tests" / "serve"), port=port)
        nodes.append((f"http://127.0.0.1:{port}", subprocess.Popen(
            ["taskset", "-c", rest, sys.executable, "-c", code], stderr=subprocess.DEVNULL)))
    routers = [("none (one node directly)", None),
               ("lm serve proxy, least_outstanding", ["lm", "least_outstanding"]),
               ("lm serve proxy, round_robin", ["lm", "round_robin"])]
    if args.vllm_router:
        routers.append(("vllm-router, round_robin", ["vllm-router", "round_robin"]))
    if args.smg:
        routers.append(("smg, round_robin", ["smg", "round_robin"]))
    try:
        for url, _ in nodes:
            wait_ok(url + "/health")
        print(f"{cpus} CPUs; the router on CPU 0, three fake-engine nodes and wrk ({args.connections} connections, "
              f"{args.seconds} s) on CPU {rest}")
        print(f"{'router':36} {'req/s':>8} {'p50 ms':>8} {'router CPU µs/req':>18}")
        for name, router in routers:
            if router is None:
                rate, p50 = wrk(nodes[0][0], args.seconds, args.connections, rest)
                print(f"{name:36} {rate:8.0f} {p50:8.2f} {'':>18}")
                continue
            port = free_port()
            urls = [u for u, _ in nodes]
            if router[0] == "lm":
                cmd = [str(LM), "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(port),
                       "--routing-strategy", router[1], *(x for u in urls for x in ("--node", u))]
            else:  # the Rust routers: the same flags
                launcher = [args.vllm_router] if router[0] == "vllm-router" else [args.smg, "launch"]
                cmd = [*launcher, "--host", "127.0.0.1", "--port", str(port), "--policy", router[1],
                       "--worker-urls", *urls, "--log-level", "error", "--prometheus-port", str(free_port())]
            proc = subprocess.Popen(["taskset", "-c", "0", *cmd], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_ok(url + "/health")
                wrk(url, 2, args.connections, rest)  # warm up
                before = cpu_seconds(proc.pid)
                start = time.monotonic()
                rate, p50 = wrk(url, args.seconds, args.connections, rest)
                used = cpu_seconds(proc.pid) - before
                count = rate * (time.monotonic() - start)
                print(f"{name:36} {rate:8.0f} {p50:8.2f} {used / count * 1e6:18.0f}")
            finally:
                proc.terminate()
                proc.wait(30)
    finally:
        for _, proc in nodes:
            proc.terminate()
            proc.wait(30)


def bench(url: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(LM), "bench", "serve", url, "--dataset", "random", "--random-input-len", "64",
                        "--random-output-len", "32", "--ignore-eos", "--num-prompts", str(args.num_prompts),
                        "--concurrency", "1", "--tokenizer", str(args.workspace), "--output", out.name],
                       check=True, stdout=subprocess.DEVNULL)
        summary = json.loads(Path(out.name).read_text())["summary"]
    if summary["failed"]:
        raise SystemExit(f"requests failed at {url}: {summary['errors']}")
    return {"ttft": summary["ttft"]["median"] * 1e3, "tpot": summary["tpot"]["median"] * 1e3,
            "itl": summary["itl"]["median"] * 1e3, "tok/s": summary["output_throughput"]}


def latency(args) -> None:
    with tempfile.TemporaryDirectory() as log:
        node = LmServer(args.workspace, "--dtype", "bfloat16", log_dir=log).wait_ready()
        proxy = LmProxy("--node", node.url, log_dir=log).wait_ready()
        try:
            runs = {"direct": [], "proxy": []}
            for _ in range(args.rounds):
                for name, url in (("direct", node.url), ("proxy", proxy.url)):
                    runs[name].append(bench(url, args))
            print(f"{os.cpu_count()} CPUs; one api_server; lm bench serve, one stream, {args.num_prompts} prompts of "
                  f"64 tokens, 32 out, {args.rounds} rounds alternating")
            print(f"{'':8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'ITL p50 ms':>11} {'out tok/s':>10}")
            for name, summaries in runs.items():
                keys = ("ttft", "tpot", "itl", "tok/s")
                values = [statistics.median(s[k] for s in summaries) for k in keys]
                print(f"{name:8} {values[0]:12.2f} {values[1]:12.2f} {values[2]:11.2f} {values[3]:10.1f}")
        finally:
            proxy.stop()
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--vllm-router", help="vllm-router's executable (pip install vllm-router)")
    c.add_argument("--smg", help="smg's executable (pip install smg)")
    c.add_argument("--seconds", type=int, default=10)
    c.add_argument("--connections", type=int, default=32)
    lat = sub.add_parser("latency")
    lat.add_argument("workspace")
    lat.add_argument("--rounds", type=int, default=2)
    lat.add_argument("--num-prompts", type=int, default=16)
    args = parser.parse_args()
    (cost if args.what == "cost" else latency)(args)


if __name__ == "__main__":
    main()
