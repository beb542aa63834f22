"""--quantization int8 and int4: the linear layers in 8-bit weights or 4-bit blocks (the LM head in 8 bits for
both), and --quant-policy 8, on the real model (over HTTP: tests/serve/test_e2e_options.py)."""

import pytest
import torch

from lmcli.engine.config import EngineConfig
from lmcli.engine.engine import Engine
from lmcli.engine.layers.linear import FusedColumnLinear, RowParallelLinear
from lmcli.engine.pipeline import pipeline
from lmcli.errors import UserError
from lmcli.kernels import int4, int8
from lmcli.workspace import Workspace

QUESTIONS = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name three primary colors."}]]


def test_int8_engine_packs_every_projection_and_still_answers(smollm2_workspace):
    pipe = pipeline(smollm2_workspace, dtype="bfloat16", quantization="int8", num_blocks=64)
    try:
        linears = [m for m in pipe.engine.runner.model.modules() if isinstance(m, (FusedColumnLinear,
                                                                                    RowParallelLinear))]
        assert len(linears) == 4 * 30  # qkv, o, gate_up, down in each of SmolLM2's 30 layers
        assert all(isinstance(m.packed, int8.Int8Weight) and m.weight is None for m in linears)
        assert isinstance(pipe.engine.runner.model.lm_head.head, int8.Int8Weight)  # the logits from int8 too
        france, colors = pipe(QUESTIONS, max_new_tokens=24, temperature=0)
    finally:
        pipe.engine.close()
    assert "Paris" in france.text
    # capitalised with VNNI, lower case on AVX2 (fbgemm's 7-bit activations there): the same answer
    assert "red" in colors.text.lower() and "blue" in colors.text.lower()


def test_int4_engine_packs_every_projection_and_still_answers(smollm2_workspace):
    """4-bit blocks change the logits a little more than int8 (the first token of "What is the capital of France?"
    is a near tie between "The" and "L'" even in bfloat16), so the check is a question with a wide margin."""
    pipe = pipeline(smollm2_workspace, dtype="bfloat16", quantization="int4", num_blocks=64)
    try:
        linears = [m for m in pipe.engine.runner.model.modules() if isinstance(m, (FusedColumnLinear,
                                                                                    RowParallelLinear))]
        assert len(linears) == 4 * 30
        assert all(isinstance(m.packed, int4.Int4Weight) and m.weight is None for m in linears)
        assert isinstance(pipe.engine.runner.model.lm_head.head, int8.Int8Weight)  # 4-bit would cost 5% perplexity
        colors = pipe(QUESTIONS[1], max_new_tokens=24, temperature=0)
    finally:
        pipe.engine.close()
    assert "red" in colors.text.lower() and "blue" in colors.text.lower()


def test_int4_leaves_a_layer_it_cannot_hold_in_its_dtype():
    layer = FusedColumnLinear(40, [16, 16], [(0, 16), (0, 16)], bias=True)  # 40 in features: not blocks of 32
    layer.weight.data, layer.bias.data = torch.randn(32, 40), torch.randn(32)
    assert not layer.quantize("int4") and layer.weight is not None and layer.packed is None
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias)


def test_quantization_is_refused_where_it_cannot_run(smollm2_workspace):
    config = Workspace.load(smollm2_workspace).config
    with pytest.raises(UserError, match="quantization must be one of int8, int4"):
        EngineConfig(workspace=str(smollm2_workspace), model=config, quantization="int2")
    with pytest.raises(UserError, match="CPUs only"):
        EngineConfig(workspace=str(smollm2_workspace), model=config, quantization="int4", device="cuda")
    with pytest.raises(UserError, match="CPUs only"):
        EngineConfig(workspace=str(smollm2_workspace), model=config, quantization="int8", device="cuda")
    with pytest.raises(UserError, match="quantization must be"):
        Engine(smollm2_workspace, quantization="fp8")


def test_the_8bit_kv_cache_holds_more_tokens_and_still_answers(smollm2_workspace):
    """--quant-policy 8: every layer's K and V in int8 with float16 scales, 1.94x the tokens of bfloat16 in the
    same bytes (head_dim 64: 66 bytes a row against 128); answers to a question with a wide margin."""
    from lmcli.kernels.kv8 import Int8Cache

    plain = pipeline(smollm2_workspace, dtype="bfloat16", num_blocks=4)
    try:
        plain_bytes = plain.engine.runner.block_bytes()
    finally:
        plain.engine.close()
    pipe = pipeline(smollm2_workspace, dtype="bfloat16", quant_policy=8, num_blocks=64)
    try:
        runner = pipe.engine.runner
        assert plain_bytes / runner.block_bytes() >= 1.9
        layers = runner.model.model.layers
        assert all(isinstance(x.self_attn.k_cache, Int8Cache) and isinstance(x.self_attn.v_cache, Int8Cache)
                   for x in layers)
        assert runner.kv_cache.dtype == torch.int8 and runner.kv_scale.dtype == torch.float16
        colors = pipe(QUESTIONS[1], max_new_tokens=24, temperature=0)
        assert runner.kv_scale.abs().sum() > 0  # the answer went through the 8-bit cache
    finally:
        pipe.engine.close()
    assert "red" in colors.text.lower() and "blue" in colors.text.lower()


def test_quant_policy_other_than_0_and_8_is_refused(smollm2_workspace):
    with pytest.raises(UserError, match="quant_policy must be 0 .* or 8 .*, not 4; the 4-bit KV cache is not built"):
        Engine(smollm2_workspace, quant_policy=4)


def test_the_start_up_line_names_the_formats_and_their_options():
    from lmcli.engine.config import describe_formats

    assert describe_formats("bfloat16", None, 0) == "weights: bfloat16 (--dtype); KV cache: bfloat16"
    line = describe_formats("float32", "int4", 8)
    assert line.startswith("weights: 4-bit blocks of 32") and "(--quantization int4)" in line
    assert line.endswith("KV cache: int8 with a float16 scale a row (--quant-policy 8)")
    assert "(--quantization int8)" in describe_formats("bfloat16", "int8", 0)


@pytest.fixture(scope="module")
def qwen3_workspace(smollm2_workspace, tmp_path_factory):
    """A small random Qwen3 (norms over each head's query and key), converted by lm convert."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from conftest import run_lm

    path = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path / "hf")
    AutoTokenizer.from_pretrained(Workspace.load(smollm2_workspace).tokenizer_path).save_pretrained(path / "hf")
    assert run_lm("convert", path / "hf", "--dst-path", path / "ws").returncode == 0
    return path / "ws"


@pytest.fixture(scope="module")
def qwen2_workspace(smollm2_workspace, tmp_path_factory):
    """A small random Qwen2 (a bias on the query, key and value projections), converted by lm convert."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from conftest import run_lm

    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 1)  # initialized to zero: a bias left out would change nothing
    model.save_pretrained(path / "hf")
    AutoTokenizer.from_pretrained(Workspace.load(smollm2_workspace).tokenizer_path).save_pretrained(path / "hf")
    assert run_lm("convert", path / "hf", "--dst-path", path / "ws").returncode == 0
    return path / "ws"


@pytest.mark.parametrize("model,quantization,quant_policy", [("smollm2", "int8", 0), ("smollm2", "int4", 0),
                                                             ("smollm2", "int4", 8), ("qwen3", "int4", 0),
                                                             ("qwen2", "int4", 0), ("qwen2", "int8", 8)])
def test_decode_steps_in_one_native_call_change_nothing(model, quantization, quant_policy, monkeypatch, request):
    """A batch of decodes on 4-bit or 8-bit weights runs every layer in one native call (kernels.decode_layers),
    else each layer in one (kernels.decode_layer): the same tokens and logprobs as op by op, for sequences of
    different lengths decoding together (one of them joining while the others decode, so prefill steps take the
    op-by-op path); with the bfloat16 and the 8-bit KV cache; Qwen3's norms over each head's query and key; Qwen2's
    bias of the qkv product."""
    workspace = request.getfixturevalue(f"{model}_workspace")
    layers = Workspace.load(workspace).config.num_layers
    from lmcli import kernels
    from lmcli.engine.sampling_params import SamplingParams
    from lmcli.kernels import native

    calls = {"decode_layers_blocks": [], "decode_layer_blocks": []}

    def counted(name):
        call = getattr(native, name)

        def count(*args, **kwargs):
            out = call(*args, **kwargs)
            calls[name].append(out is not None)
            return out
        return count

    def generate() -> dict:
        for v in calls.values():
            v.clear()
        engine = Engine(workspace, dtype="bfloat16", quantization=quantization, quant_policy=quant_policy,
                        num_blocks=64)
        try:
            prompts = [list(range(100, 160)), [1, 2, 3, 4, 5, 6, 7, 8] * 3, [9, 10, 11]]
            params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
            engine.add_request("0", prompts[0], params)
            engine.step()
            for i, prompt in enumerate(prompts[1:], 1):
                engine.add_request(str(i), prompt, params)
            out = {}
            while engine.has_work:
                for o in engine.step():
                    out.setdefault(o.request_id, []).append((list(o.token_ids), repr(o.logprobs)))
            return out
        finally:
            engine.close()

    for name in calls:
        monkeypatch.setattr(native, name, counted(name))
    together = generate()  # every decode-only step in one call, none declined
    assert len(calls["decode_layers_blocks"]) > 20 and all(calls["decode_layers_blocks"])
    assert not calls["decode_layer_blocks"]
    monkeypatch.setattr(kernels, "decode_layers", lambda *args, **kwargs: None)
    assert generate() == together  # a layer a call
    assert len(calls["decode_layer_blocks"]) > layers * 20 and all(calls["decode_layer_blocks"])
    monkeypatch.setattr(kernels, "decode_layer", lambda *args, **kwargs: None)
    assert generate() == together  # op by op


def test_layers_without_native_weights_keep_the_python_path(smollm2_workspace):
    """bfloat16 weights have no native decode layer: the model marks the one-call path unusable once and keeps
    stepping layer by layer."""
    from lmcli.engine.sampling_params import SamplingParams

    engine = Engine(smollm2_workspace, dtype="bfloat16", num_blocks=16)
    engine.add_request("0", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    while engine.has_work:
        engine.step()
    assert engine.runner.model.model.table is False
