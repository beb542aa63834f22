from pathlib import Path
from typing import Annotated

import typer

from lmcli.commands.options import ChatTemplateOption, DType, DTypeOption, ModelNameOption, fail
from lmcli.errors import UserError
from lmcli.known_models import KNOWN_MODELS


def convert(
    src: Annotated[str, typer.Argument(
        help="A Hugging Face model folder, a .gguf file, a model id on the Hugging Face hub (org/name), "
             f"or a known model name ({', '.join(KNOWN_MODELS)}).", show_default=False)],
    dst_path: Annotated[Path, typer.Option("--dst-path", help="Where to write the workspace.")] = Path("workspace"),
    dtype: DTypeOption = DType.auto,
    model_name: ModelNameOption = None,
    chat_template: ChatTemplateOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing workspace at --dst-path.")] = False,
) -> None:
    """Convert a Hugging Face model folder or a GGUF file into a workspace the engine loads fast."""
    from lmcli.convert import convert_model

    try:
        ws, seconds = convert_model(src, dst_path, dtype=dtype.value, model_name=model_name,
                                    chat_template=chat_template, force=force)
    except UserError as e:
        raise fail("convert", str(e))
    c = ws.config
    print(f"Wrote workspace {ws.path} ({ws.model_name}: {c.architecture}, {c.num_layers} layers, "
          f"{ws.dtype}, {ws.weights_bytes() / 2**20:.0f} MiB) in {seconds:.1f} s")
