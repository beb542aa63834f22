from pathlib import Path
from typing import Annotated

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
