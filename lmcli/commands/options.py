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
    int4 = "int4"


QuantizationOption = Annotated[Optional[Quantization], typer.Option(
    "--quantization", help="The linear layers' weights, quantized at load (CPU only); activations in 8 bits per "
    "block of 32, the LM head in int8. int8: per output row: the fastest for many sequences at once. int4: blocks "
    "of 32 with a float16 scale and minimum (GGUF's Q4_1): as fast for one or a few streams, a fifth of bfloat16's "
    "bytes. Both slightly less accurate than --dtype (SmolLM2's perplexity +0.4% and +0.7%). Default: the weights "
    "in --dtype.", show_default=False)]
QuantPolicyOption = Annotated[int, typer.Option(
    "--quant-policy", help="The KV cache (LMDeploy's name). 0: keys and values in --dtype; 8: in signed bytes with "
    "a float16 scale per token and head: 1.94x the tokens in the same memory (head_dim 64 against bfloat16), "
    "slightly less accurate. The 4-bit cache (4) is not built.")]
ModelNameOption = Annotated[Optional[str], typer.Option(
    "--model-name", help="The model's name, as /v1/models lists it. Default: the source's folder or file name.")]
ChatTemplateOption = Annotated[Optional[str], typer.Option(
    "--chat-template", help="A Jinja chat template, or a file holding one, used instead of the model's own.")]


def fail(command: str, message: str, code: int = 1) -> typer.Exit:
    """Print one line on stderr; return the Exit to raise."""
    import sys

    print(f"lm {command}: error: " + " ".join(str(message).split()), file=sys.stderr)
    return typer.Exit(code)


ApiKeysOption = Annotated[Optional[list[str]], typer.Option(
    "--api-keys", help="Accepted API keys (Bearer tokens) for /v1/ paths; repeat the option or separate keys with "
    "commas. Default: no key needed.", show_default=False)]
AllowOriginsOption = Annotated[Optional[list[str]], typer.Option(
    help="CORS: origins allowed to call the API from a browser (repeat; * for any). Default: no CORS.",
    show_default=False)]
AllowCredentialsOption = Annotated[bool, typer.Option(help="CORS: allow cookies and auth headers.")]
AllowMethodsOption = Annotated[Optional[list[str]], typer.Option(help="CORS: allowed methods (repeat). Default: *.",
                                                                 show_default=False)]
AllowHeadersOption = Annotated[Optional[list[str]], typer.Option(help="CORS: allowed headers (repeat). Default: *.",
                                                                 show_default=False)]


def split_keys(values) -> tuple:
    """--api-keys a,b --api-keys c: ('a', 'b', 'c')."""
    return tuple(k for value in values or () for k in value.split(",") if k)
