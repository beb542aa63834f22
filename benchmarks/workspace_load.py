"""Loading a model's weights: our workspace against transformers reading the GGUF it came from, in one run.

    python benchmarks/workspace_load.py [WORKSPACE]

WORKSPACE defaults to a fresh conversion of the default model (SmolLM2-135M-Instruct, float32).
"""

import sys
import tempfile
import time
from pathlib import Path

import torch


def main():
    from lmcli.convert import convert_model
    from lmcli.known_models import DEFAULT_MODEL, fetch
    from lmcli.workspace import Workspace

    gguf = fetch(DEFAULT_MODEL)
    tmp = tempfile.TemporaryDirectory()
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    else:
        path = Path(tmp.name) / "ws"
        _, seconds = convert_model(str(gguf), path, dtype="float32")
        print(f"lm convert {gguf.name}: {seconds:.1f} s")

    start = time.perf_counter()
    ws = Workspace.load(path)
    weights = dict(ws.weights())
    tokenizer = ws.tokenizer()
    ours = time.perf_counter() - start

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                         quantization_config=GgufConfig(dequantize=True))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    theirs = time.perf_counter() - start
    print(f"workspace weights + tokenizer ({len(weights)} tensors): {ours:.2f} s")
    print(f"transformers from the GGUF (model + tokenizer):   {theirs:.2f} s  ({theirs / ours:.0f}x slower)")
    del tokenizer


if __name__ == "__main__":
    main()
