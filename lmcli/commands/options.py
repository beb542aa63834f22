"""Options shared by several commands, declared once."""

from enum import Enum
from typing import Annotated, Optional

import typer


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DTypeOption = Annotated[DType, typer.Option(
    "--dtype", help="Weight dtype. auto: the model's own dtype (a quantized GGUF dequantizes exactly to float32).")]


class Quantization(str, Enum):
    int8 = "int8"


QuantizationOption = Annotated[Optional[Quantization], typer.Option(
    "--quantization", help="int8: the linear layers in int8 (weights per channel, activations per token; CPU "
    "only): faster decoding than bfloat16 (about 1.3x at 64 sequences, 2x at 8), slightly less accurate. Default: "
    "the weights in --dtype.", show_default=False)]
ModelNameOption = Annotated[Optional[str], typer.Option(
    "--model-name", help="The model's name, as /v1/models lists it. Default: the source's folder or file name.")]
ChatTemplateOption = Annotated[Optional[str], typer.Option(
    "--chat-template", help="A Jinja chat template, or a file holding one, used instead of the model's own.")]


def fail(command: str, message: str, code: int = 1) -> typer.Exit:
    """Print one line on stderr; return the Exit to raise."""
    import sys

    print(f"lm {command}: error: " + " ".join(str(message).split()), file=sys.stderr)
    return typer.Exit(code)
