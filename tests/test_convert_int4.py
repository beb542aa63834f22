"""`lm convert --quantization int4`: the linear layers' weights in 4-bit blocks in the workspace, a GGUF's own
Q4_0/Q4_1 blocks kept exactly, and the engine running them (tests/engine/test_quantization.py: at serve time)."""

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmcli.bench.hf import unfused_weights
from lmcli.engine.config import weights_format
from lmcli.engine.layers.linear import FusedColumnLinear, RowParallelLinear
from lmcli.engine.layers.parallel import TP
from lmcli.engine.pipeline import pipeline
from lmcli.errors import UserError
from lmcli.kernels import int4, int8
from lmcli.workspace import Workspace
from conftest import run_lm
from test_convert_hf import SMALL, make_folder

LINEAR = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight")


@pytest.fixture
def int4_workspace(smollm2_int4_workspace):
    return smollm2_int4_workspace


def test_the_ggufs_blocks_are_kept_exactly(int4_workspace, smollm2_workspace):
    """SmolLM2's GGUF has Q4_1 linear layers: the workspace holds the same codes, scales and minimums (its float32
    conversion is their exact dequantization), in a third of the bytes of bfloat16."""
    ws, f32 = Workspace.load(int4_workspace), Workspace.load(smollm2_workspace)
    assert ws.quantization == "int4" and ws.dtype == "bfloat16"
    assert json.loads((int4_workspace / "lm_workspace.json").read_text())["quantization"] == "int4"
    floats = dict(f32.weights())
    blocks = {name: t for name, t in ws.weights() if isinstance(t, int4.Int4Blocks)}
    assert len(blocks) == 4 * 30 and all(name.endswith(LINEAR) for name in blocks)
    for name, b in blocks.items():
        assert b.q.dtype == torch.uint8 and int(b.q.max()) <= 15 and b.d.dtype == b.mn.dtype == torch.float16
        assert torch.equal(b.dequantize(), floats[name]), name
    # the q and k rows are in Hugging Face's order (llama.cpp interleaves the rotary halves), as in float32
    assert unfused_weights(ws).keys() == unfused_weights(f32).keys()
    assert ws.weights_bytes() < 0.5 * 2 * 134.5e6  # bfloat16 would be 2 bytes for each of 134.5M weights


def test_the_engine_runs_the_kept_blocks(int4_workspace, smollm2_workspace):
    pipe = pipeline(int4_workspace, num_blocks=64)
    try:
        model = pipe.engine.runner.model
        linears = [m for m in model.modules() if isinstance(m, (FusedColumnLinear, RowParallelLinear))]
        assert len(linears) == 4 * 30 and all(isinstance(m.packed, int4.Int4Weight) for m in linears)
        assert isinstance(model.lm_head.head, int8.Int8Weight)  # as with --quantization int4 at serve time
        floats = dict(Workspace.load(smollm2_workspace).weights())
        qkv = model.model.layers[0].self_attn.qkv_proj.packed.dequantize()
        assert torch.equal(qkv, floats["model.layers.0.self_attn.qkv_proj.weight"])
        colors = pipe([{"role": "user", "content": "Name three primary colors."}], max_new_tokens=24, temperature=0)
    finally:
        pipe.engine.close()
    assert "red" in colors.text.lower() and "blue" in colors.text.lower()


def test_int8_on_a_4bit_workspace_is_refused(int4_workspace):
    with pytest.raises(UserError, match="holds 4-bit weights"):
        pipeline(int4_workspace, quantization="int8", num_blocks=8)
    assert weights_format("int4", "int4", "cpu") == weights_format(None, "int4", "cpu") == "int4"
    assert weights_format(None, "int4", "cuda") is None  # dequantized into the model's dtype on GPUs
    assert weights_format("int8", None, "cpu") == "int8" and weights_format(None, None, "cpu") is None


def test_a_folder_is_quantized_from_float32_and_odd_shapes_stay_float(tmp_path, smollm2_workspace):
    """Hugging Face weights go through the same quantizer as --quantization int4 at serve time; an intermediate
    size that is not a multiple of 32 leaves down_proj in --dtype (its in features), the rest in blocks."""
    tokenizer = Workspace.load(smollm2_workspace).tokenizer_path
    model = make_folder(tmp_path / "llama", LlamaForCausalLM, LlamaConfig(**{**SMALL, "intermediate_size": 80}),
                        tokenizer)
    done = run_lm("convert", tmp_path / "llama", "--dst-path", tmp_path / "ws", "--quantization", "int4")
    assert done.returncode == 0, done.stderr
    weights = dict(Workspace.load(tmp_path / "ws").weights())
    theirs = model.state_dict()
    for i in range(SMALL["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = weights[p + "self_attn.qkv_proj.weight"]
        want = int4.quantize_blocks(torch.cat([theirs[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        assert torch.equal(qkv.q, want.q) and torch.equal(qkv.d, want.d) and torch.equal(qkv.mn, want.mn)
        assert isinstance(weights[p + "mlp.gate_up_proj.weight"], int4.Int4Blocks)
        down = weights[p + "mlp.down_proj.weight"]
        assert isinstance(down, torch.Tensor) and torch.equal(down, theirs[p + "mlp.down_proj.weight"])
    assert isinstance(weights["model.embed_tokens.weight"], torch.Tensor)


def test_q4_0_blocks_are_read_as_they_are():
    """Q4_0's w = d * (q - 8) is kept as d * q + mn with mn = -8 d: the same values as gguf's own dequantizer."""
    w = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    for kind in ("Q4_0", "Q4_1"):
        t = getattr(gguf.GGMLQuantizationType, kind)
        raw = gguf.quants.quantize(w, t)
        blocks = int4.from_gguf(raw, kind, (6, 64))
        assert torch.equal(blocks.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, t)))
    assert int4.from_gguf(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), "Q8_0", (6, 64)) is None


def test_a_tensor_parallel_shard_takes_whole_blocks_or_falls_back():
    """Row-parallel layers cut the input columns: at multiples of 32 the shard is the blocks' columns; a cut inside
    a block loads that layer in the model's dtype instead."""
    w = torch.randn(16, 128)
    blocks = int4.quantize_blocks(w)
    layer = RowParallelLinear(128, 16, TP(), [(64, 128)])
    layer.load(layer.weight, blocks)
    assert layer.weight is None and torch.equal(layer.packed.dequantize(), blocks.dequantize()[:, 64:])
    layer = RowParallelLinear(128, 16, TP(), [(48, 128)])
    layer.load(layer.weight, blocks)
    assert layer.packed is None and torch.equal(layer.weight, blocks.dequantize()[:, 48:])
    fused = FusedColumnLinear(128, [8, 8], [(0, 4), (0, 4)], bias=False)
    fused.load(fused.weight, blocks)
    assert torch.equal(fused.packed.dequantize(), blocks.dequantize()[[0, 1, 2, 3, 8, 9, 10, 11]])


def test_an_unknown_quantization_is_a_usage_error(smollm2_gguf, tmp_path):
    done = run_lm("convert", smollm2_gguf, "--dst-path", tmp_path / "ws", "--quantization", "int8")
    assert done.returncode == 2 and "int8" in done.stderr and not (tmp_path / "ws").exists()
