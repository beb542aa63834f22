from pathlib import Path
from enum import Enum
from typing import Annotated, Optional

import typer

from lmcli.commands.options import ChatTemplateOption, DType, DTypeOption, ModelNameOption, fail
from lmcli.errors import UserError
from lmcli.known_models import KNOWN_MODELS


class WorkspaceQuantization(str, Enum):
    int4 = "int4"


def convert(
    src: Annotated[str, typer.Argument(
        help="A Hugging Face model folder, a .gguf file, a model id on the Hugging Face hub (org/name), "
             f"or a known model name ({', '.join(KNOWN_MODELS)}).", show_default=False)],
    dst_path: Annotated[Path, typer.Option("--dst-path", help="Where to write the workspace.")] = Path("workspace"),
    dtype: DTypeOption = DType.auto,
    model_name: ModelNameOption = None,
    chat_template: ChatTemplateOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing workspace at --dst-path.")] = False,
    quantization: Annotated[Optional[WorkspaceQuantization], typer.Option(
        "--quantization", help="int4: store the linear layers' weights in 4-bit blocks of 32 with a float16 scale "
        "and minimum (GGUF's Q4_1): a GGUF's own Q4_0 and Q4_1 blocks are kept exactly as they are, other weights "
        "are quantized from float32; the rest in --dtype. The engine runs such a workspace in 4 bits on CPUs (as "
        "lm serve api_server --quantization int4 would) and dequantizes it on GPUs. Default: every weight in --dtype.",
        show_default=False)] = None,
) -> None:
    """Convert a Hugging Face model folder or a GGUF file into a workspace the engine loads fast."""
    from lmcli.convert import convert_model

    try:
        ws, seconds = convert_model(src, dst_path, dtype=dtype.value, model_name=model_name,
                                    chat_template=chat_template, force=force,
                                    quantization=quantization.value if quantization else None)
    except UserError as e:
        raise fail("convert", str(e))
    c = ws.config
    formats = ws.dtype + (f", linear layers {ws.quantization}" if ws.quantization else "")
    print(f"Wrote workspace {ws.path} ({ws.model_name}: {c.architecture}, {c.num_layers} layers, "
          f"{formats}, {ws.weights_bytes() / 2**20:.0f} MiB) in {seconds:.1f} s")
