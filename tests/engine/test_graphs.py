"""Decode steps through engine/graphs.py's padded buckets give the logits of the plain step, write nothing for the
padding rows, and survive a bucket's reuse by other sequences. Without a GPU there is no graph to capture: the
same padded inputs run eagerly, on the Triton backend under Triton's interpreter (the backend graphs run on); with
LMCLI_TEST_DEVICE=cuda (the GPU machine) the graphs are captured and replayed."""

import os
from dataclasses import replace

DEVICE = os.environ.get("LMCLI_TEST_DEVICE", "cpu")
if not DEVICE.startswith("cuda"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen before triton is imported (as conftest does)

import pytest  # noqa: E402
import torch  # noqa: E402

from lmcli import kernels  # noqa: E402
from lmcli.engine.batch import build_batch  # noqa: E402
from lmcli.engine.config import CacheConfig, EngineConfig  # noqa: E402
from lmcli.engine.graphs import DecodeGraphs, buckets  # noqa: E402
from lmcli.engine.layers.parallel import TP  # noqa: E402
from lmcli.engine.model_runner import ModelRunner  # noqa: E402
from lmcli.engine.models import model_class  # noqa: E402
from lmcli.workspace import ModelConfig  # noqa: E402

pytest.importorskip("triton", reason="Triton is installed with lm on Linux x86-64 only")

TOL = 1e-3 if DEVICE.startswith("cuda") else 1e-4  # a GPU's float32 products round through TF32
TINY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=512, tie_word_embeddings=True)


# Gemma 3's layout: two KV groups of two layers, full attention (1, 3) and a 16-token window (0, 2)
GEMMA = replace(TINY, architecture="Gemma3ForCausalLM", num_layers=4, qk_norm=True, sliding_window=16,
                hidden_act="gelu_pytorch_tanh", layer_types=("sliding_attention", "full_attention") * 2)


class RandomWeights:
    """A workspace of random float32 weights for a model config."""
    path, dtype, quantization = "random", "float32", None

    def __init__(self, config: ModelConfig):
        self.config = config

    def weights(self):
        torch.manual_seed(0)
        model = model_class(self.config.architecture)(self.config, TP(), 64, torch.float32)
        for name, p in model.named_parameters():
            yield name, torch.randn(p.shape) * 0.3


def make_runner(model: ModelConfig) -> ModelRunner:
    config = EngineConfig(workspace="random", model=model, dtype="float32", device=DEVICE,
                          cache=CacheConfig(block_size=16, num_blocks=32))
    return ModelRunner(config, RandomWeights(model))


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setenv(kernels.SETTING, "triton")
    return make_runner(TINY)


def test_buckets_end_at_the_batch_limit(runner):
    assert buckets(1) == [1]
    assert buckets(20) == [1, 2, 4, 8, 16, 20]
    assert buckets(128)[-3:] == [64, 96, 128]
    graphs = DecodeGraphs(runner, 6, capture=DEVICE.startswith("cuda"))
    with torch.inference_mode():
        graphs.capture_all()  # as the runner does at start on a GPU
    assert list(graphs.steps) == [6, 4, 2, 1]


@torch.inference_mode()
def test_padded_decode_steps_match_the_plain_step(runner):
    tables = {0: [3, 7], 1: [10, 1, 12], 2: [20, 21]}
    prompts = {0: list(range(5, 25)), 1: list(range(40, 75)), 2: [9] * 17}
    runner.execute([(ids, 0, tables[i], True) for i, ids in prompts.items()])
    graphs = DecodeGraphs(runner, 8, capture=DEVICE.startswith("cuda"))
    step = [([11], len(prompts[i]), tables[i], True) for i in (0, 1, 2)]
    assert graphs.fits(step) and not graphs.fits(step + [([1, 2], 0, [30], True)])
    assert not graphs.fits([([1], 4, [30], False)])  # a one-token chunk of a prompt: nothing to sample

    before = runner.kv_cache.clone()
    expected = runner.forward(build_batch(step, runner.block_size, runner.device)[0])
    plain_cache = runner.kv_cache.clone()
    runner.kv_cache.copy_(before)
    got = graphs.run(step)  # bucket 4: one padding row
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)
    # the padding row stored nothing: the same slots changed as in the plain step, to the same values (up to the
    # GEMM's rounding at 4 rows instead of 3)
    assert torch.equal(runner.kv_cache != before, plain_cache != before)
    torch.testing.assert_close(runner.kv_cache, plain_cache, atol=TOL, rtol=TOL)

    # the bucket again, now for other contexts (one sequence one token further): stale rows must not leak in
    graphs.run(step[:1])
    later = [([12], len(prompts[i]) + 1, tables[i], True) for i in (2, 1)]
    expected = runner.forward(build_batch(later, runner.block_size, runner.device)[0])
    torch.testing.assert_close(graphs.run(later), expected, atol=TOL, rtol=TOL)
    assert sorted(graphs.steps) == [1, 2, 4]


@torch.inference_mode()
def test_padded_decode_steps_read_each_kv_groups_tables(monkeypatch):
    """Gemma 3's layout: the sliding group's tables differ from the full group's, and point at the null page (0)
    below the window, as the block manager leaves them."""
    monkeypatch.setenv(kernels.SETTING, "triton")
    runner = make_runner(GEMMA)
    assert [w for w, _ in GEMMA.kv_groups()] == [None, 16] and runner.kv_cache.shape[1] == 2
    tables = {0: [3, 7], 1: [10, 1, 12], 2: [20, 21]}
    windows = {0: [4, 8], 1: [13, 14, 15], 2: [24, 25]}  # the sliding group's pages while the prompts are computed
    prompts = {0: list(range(5, 25)), 1: list(range(40, 75)), 2: [9] * 17}
    runner.execute([(ids, 0, tables[i], True, [windows[i]]) for i, ids in prompts.items()])
    windows[1][0] = 0  # tokens 0..15 of prompt 1 are out of its window from token 36 on: freed
    step = [([11], len(prompts[i]), tables[i], True, [windows[i]]) for i in (0, 1, 2)]
    graphs = DecodeGraphs(runner, 8, capture=DEVICE.startswith("cuda"))
    assert graphs.fits(step)
    before = runner.kv_cache.clone()
    expected = runner.forward(build_batch(step, runner.block_size, runner.device)[0])
    plain_cache = runner.kv_cache.clone()
    runner.kv_cache.copy_(before)
    torch.testing.assert_close(graphs.run(step), expected, atol=TOL, rtol=TOL)
    assert torch.equal(runner.kv_cache != before, plain_cache != before)
    later = [([12], len(prompts[i]) + 1, tables[i], True, [windows[i]]) for i in (2, 1)]
    expected = runner.forward(build_batch(later, runner.block_size, runner.device)[0])
    torch.testing.assert_close(graphs.run(later), expected, atol=TOL, rtol=TOL)
