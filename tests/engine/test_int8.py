"""--quantization int8: the linear layers through torch's fbgemm int8 kernels, on the real model (over HTTP:
tests/serve/test_e2e_options.py)."""

import pytest

from lmcli.engine.config import EngineConfig
from lmcli.engine.engine import Engine
from lmcli.engine.layers.linear import FusedColumnLinear, RowParallelLinear
from lmcli.engine.pipeline import pipeline
from lmcli.errors import UserError
from lmcli.workspace import Workspace

QUESTIONS = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name three primary colors."}]]


def test_int8_engine_packs_every_projection_and_still_answers(smollm2_workspace):
    pipe = pipeline(smollm2_workspace, dtype="bfloat16", quantization="int8", num_blocks=64)
    try:
        linears = [m for m in pipe.engine.runner.model.modules() if isinstance(m, (FusedColumnLinear,
                                                                                    RowParallelLinear))]
        assert len(linears) == 4 * 30  # qkv, o, gate_up, down in each of SmolLM2's 30 layers
        assert all(m.int8 is not None and m.weight is None for m in linears)
        france, colors = pipe(QUESTIONS, max_new_tokens=24, temperature=0)
    finally:
        pipe.engine.close()
    assert "Paris" in france.text
    # capitalised with VNNI, lower case on AVX2 (fbgemm's 7-bit activations there): the same answer
    assert "red" in colors.text.lower() and "blue" in colors.text.lower()


def test_int8_is_refused_where_it_cannot_run(smollm2_workspace):
    config = Workspace.load(smollm2_workspace).config
    with pytest.raises(UserError, match="quantization must be one of int8"):
        EngineConfig(workspace=str(smollm2_workspace), model=config, quantization="int4")
    with pytest.raises(UserError, match="CPUs only"):
        EngineConfig(workspace=str(smollm2_workspace), model=config, quantization="int8", device="cuda")
    with pytest.raises(UserError, match="quantization must be"):
        Engine(smollm2_workspace, quantization="fp8")
