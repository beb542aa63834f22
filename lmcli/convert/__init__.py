"""`lm convert`: a Hugging Face folder, a GGUF file or a hub id in, a workspace out."""

import os
import shutil
import time
from pathlib import Path
from typing import Optional

from lmcli import __version__
from lmcli.errors import UserError
from lmcli.workspace import MANIFEST, QUANTIZATIONS, Workspace, layer_tensors, outer_tensors, write

# Hugging Face names of the weights that quantization int4 stores in 4-bit blocks
LINEAR_SOURCE_NAMES = tuple(f"{x}_proj.weight" for x in ("q", "k", "v", "o", "gate", "up", "down"))


def convert_model(src: str, dst: Path, *, dtype: str = "auto", model_name: Optional[str] = None,
                  chat_template: Optional[str] = None, force: bool = False,
                  quantization: Optional[str] = None) -> tuple[Workspace, float]:
    """Convert src into a workspace at dst; returns it and the seconds it took. quantization "int4": the linear
    layers' weights in 4-bit blocks of 32 (a GGUF's own Q4_0/Q4_1 blocks as they are, any other weight quantized
    from float32), the rest in dtype."""
    if quantization not in (None, *QUANTIZATIONS):
        raise UserError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    start = time.perf_counter()
    dst = Path(dst)
    _check_destination(dst, force)
    template = read_chat_template(chat_template) if chat_template else None

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from lmcli.convert.source import generation_defaults, open_source
    from lmcli.kernels import int4

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        step = progress.add_task(f"Reading {src}", total=None)
        source = open_source(src)
        progress.update(step, description=f"Reading the tokenizer of {source.path.name}")
        tokenizer = source.load_tokenizer()
        if template is not None:
            tokenizer.chat_template = template
        progress.update(step, total=1, completed=1, description=f"Read {source.path.name}")
        target = source.native_dtype if dtype == "auto" else dtype
        config, torch_dtype = source.config, getattr(torch, target)
        layers = progress.add_task(f"Converting to {target}, layers", total=config.num_layers)

        def linear_weight(name: str):
            """A linear layer's weight in 4-bit blocks where the shape allows, else the float tensor."""
            blocks = source.blocks(name)
            if blocks is not None:
                return blocks
            weight = source.tensor(name)
            blocks = int4.quantize_blocks(weight)
            return weight if blocks is None else blocks

        def hf(name: str):
            if quantization and name.endswith(LINEAR_SOURCE_NAMES):
                return linear_weight(name)
            return source.tensor(name)

        def cast(group: dict) -> dict:
            return {k: v if isinstance(v, int4.Int4Blocks) else v.to(torch_dtype) for k, v in group.items()}

        def tensors():
            yield cast(outer_tensors(config, source.tensor))
            for i in range(config.num_layers):
                yield cast(layer_tensors(config, i, hf))
                progress.advance(layers)

        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            write(tmp, model_name=model_name or source.model_name, config=config, dtype=target,
                  generation=generation_defaults(source.generation_config, tokenizer), source=source.info,
                  tensors=tensors(), save_tokenizer=tokenizer.save_pretrained, created_by=f"lmcli {__version__}",
                  quantization=quantization)
            if dst.exists():
                shutil.rmtree(dst)
            tmp.rename(dst)
        except OSError as e:
            raise UserError(f"cannot write the workspace to {dst}: {e.strerror or e}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Workspace.load(dst), time.perf_counter() - start


def _check_destination(dst: Path, force: bool) -> None:
    if not dst.exists():
        return
    if not dst.is_dir():
        raise UserError(f"{dst} exists and is not a folder")
    if not any(dst.iterdir()):
        return
    if not force:
        raise UserError(f"{dst} already exists; pass --force to replace it")
    if not (dst / MANIFEST).is_file():
        raise UserError(f"{dst} is not an lm workspace (no {MANIFEST}); refusing to replace it even with --force")


def read_chat_template(value: str) -> str:
    import jinja2

    path = Path(value).expanduser()
    if "{" not in value and len(value) < 4096:
        if not path.is_file():
            raise UserError(f"--chat-template {value}: no such file, and not a Jinja template")
        value = path.read_text()
    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"--chat-template is not a valid Jinja template: line {e.lineno}: {e.message}")
    return value
