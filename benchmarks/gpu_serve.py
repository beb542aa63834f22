"""`lm serve api_server` on a GPU, tried as a user would (issue: the GPU path), in one run on a machine lent one.

Starts the real server with `--device auto` (the GPU, bfloat16, CUDA graphs) on a workspace and:
- sends what clients send: a chat completion, plain and streamed; a completion with logprobs; n=2 with a seed; a
  JSON schema (structured output); LMDeploy's /v1/chat/interactive; a bad request (400, and the server keeps
  serving);
- sends the same greedy requests to the server on the GPU in float32 and on the CPU in float32: the same text;
- runs `lm bench serve` against the GPU server, one stream and 64 at once: output tok/s.
Prints a line per check (ok / FAILED) and the figures; exits 1 if a check failed.

    python benchmarks/gpu_serve.py --make .gpu/ws    # here: a tiny random Llama with SmolLM2's tokenizer (16 MB)
    python benchmarks/gpu_serve.py .gpu/ws --dry-run # here: the same checks with every server on the CPU
    python benchmarks/gpu_serve.py .gpu/ws           # there

There (Python 3.12 with torch, triton, transformers, typer, httpx, aiohttp, uvloop), the server's other packages
travel as wheels in .whl (ignored by git; fetched here with `pip download --no-deps --only-binary=:all:
--python-version 3.12 --platform manylinux_2_17_x86_64 ... -d .whl` for starlette, uvicorn, pydantic,
pydantic_core, annotated-types, typing-inspection, httptools, llguidance, gguf, prompt_toolkit, wcwidth,
swagger_ui_bundle), and the command installs them with lmcli itself:

    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . &&
    PYTHONPATH=/tmp/site python3 benchmarks/gpu_serve.py .gpu/ws
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

FAILED = []
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"ok: {name}" if ok else f"FAILED: {name}{' (' + detail + ')' if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def make(dst: str) -> None:
    """A tiny random Llama (2 layers, hidden 128) with SmolLM2's tokenizer and chat template, as a workspace."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmcli.known_models import fetch

    gguf = fetch("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
                             bos_token_id=1, eos_token_id=2, max_position_embeddings=2048)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        subprocess.run([sys.executable, "-m", "lmcli", "convert", tmp, "--dst-path", dst, "--force"], check=True)


class Server:
    def __init__(self, workspace: str, *args: str, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "lmcli", "serve", "api_server", workspace,
                                      "--server-port", str(port), "--log-level", "info", *args],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.monotonic() + 900  # a GPU server captures its CUDA graphs first
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
        self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def post(self, path: str, body: dict) -> httpx.Response:
        model = {} if path == "/v1/chat/interactive" else {"model": self.model}  # LMDeploy's has no model field
        return httpx.post(self.url + path, json={**model, **body}, timeout=300)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def greedy(server: Server) -> list:
    return [server.post("/v1/completions", {"prompt": p, "max_tokens": 24, "temperature": 0,
                                            "ignore_eos": True}).json()["choices"][0]["text"] for p in PROMPTS]


def requests(server: Server) -> None:
    chat = [{"role": "user", "content": "Name three colours."}]
    r = server.post("/v1/chat/completions", {"messages": chat, "max_tokens": 16})
    check("chat completion", r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant",
          f"{r.status_code} {r.text[:120]}")
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=300,
                      json={"model": server.model, "messages": chat, "max_tokens": 16, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    check("streamed chat completion", len(lines) > 2 and lines[-1] == "data: [DONE]", f"{len(lines)} events")
    r = server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 8, "logprobs": 2, "temperature": 0})
    lp = r.json()["choices"][0].get("logprobs") or {} if r.status_code == 200 else {}
    check("completion with logprobs", len(lp.get("top_logprobs") or []) == 8, r.text[:120])
    body = {"messages": chat, "max_tokens": 12, "n": 2, "seed": 7, "temperature": 1.0}
    first, again = server.post("/v1/chat/completions", body), server.post("/v1/chat/completions", body)
    check("n=2 with a seed, twice the same", first.status_code == 200 and len(first.json()["choices"]) == 2
          and [c["message"] for c in first.json()["choices"]] == [c["message"] for c in again.json()["choices"]])
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = server.post("/v1/chat/completions", {"messages": chat, "max_tokens": 40, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    try:
        parsed = json.loads(r.json()["choices"][0]["message"]["content"])
        ok = isinstance(parsed, dict) and isinstance(parsed.get("n"), int)
    except (ValueError, KeyError, TypeError):
        ok = r.json().get("choices", [{}])[0].get("finish_reason") == "length"  # cut off mid-object: honest
    check("structured output (JSON schema)", r.status_code == 200 and ok, r.text[:160])
    r = server.post("/v1/chat/interactive", {"prompt": "Hi", "session_id": 5, "request_output_len": 8,
                                             "stream": False})
    check("/v1/chat/interactive", r.status_code == 200 and "text" in r.json(), r.text[:120])
    r = server.post("/v1/chat/completions", {"messages": chat, "temperature": -1})
    check("a bad request is a 400 naming the field", r.status_code == 400 and "temperature" in r.text, r.text[:120])
    r = server.post("/v1/chat/completions", {"messages": chat, "max_tokens": 4})
    check("still serving after it", r.status_code == 200)


def bench(server: Server, workspace: str, concurrency: int, prompts: int) -> str:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "lmcli", "bench", "serve", server.url, "--model", server.model,
                        "--tokenizer", workspace, "--dataset", "random", "--random-input-len", "64",
                        "--random-output-len", "128", "--ignore-eos", "--num-prompts", str(prompts),
                        "--concurrency", str(concurrency), "--output", out.name],
                       check=True, stdout=subprocess.DEVNULL)
        s = json.load(open(out.name))["summary"]
    return (f"{concurrency} at once, 64 in / 128 out, {prompts} prompts: {s['output_throughput']:.1f} output tok/s, "
            f"TTFT median {s['ttft']['median'] * 1e3:.0f} ms, TPOT median {s['tpot']['median'] * 1e3:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", nargs="?")
    ap.add_argument("--make", metavar="DIR", help="build the tiny random workspace into DIR and stop")
    ap.add_argument("--dry-run", action="store_true", help="every server on the CPU")
    args = ap.parse_args()
    if args.make:
        return make(args.make)
    gpu = ["--device", "cpu"] if args.dry_run else ["--device", "auto"]
    logs = Path(tempfile.mkdtemp(prefix="gpu-serve-"))
    try:
        import torch
        print(f"# {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; torch {torch.__version__}")
        server = Server(args.workspace, *gpu, log=logs / "default.log")
        print("start-up:", *[line for line in server.log.read_text().splitlines()
                             if "Triton" in line or "CPU kernels" in line])
        requests(server)
        for concurrency, prompts in ((1, 8), (64, 256)):
            print(bench(server, args.workspace, concurrency, prompts), flush=True)
        server.stop()
        reference = Server(args.workspace, "--device", "cpu", "--dtype", "float32", log=logs / "cpu.log")
        expected = greedy(reference)
        reference.stop()
        server = Server(args.workspace, *gpu, "--dtype", "float32", log=logs / "f32.log")
        got = greedy(server)
        server.stop()
        same = sum(a == b for a, b in zip(got, expected))
        check("greedy text in float32 equals the CPU's", got == expected, f"{same} of {len(PROMPTS)} the same")
    except Exception as e:  # the logs say why
        check(f"the run ({type(e).__name__}: {e})", False)
        for log in logs.glob("*.log"):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    print(f"{len(FAILED)} failed" if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
