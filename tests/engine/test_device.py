"""Where the engine runs and what it reads: the device and backend choices, and the step batch's tables."""

import pytest
import torch

from lmcli import kernels
from lmcli.engine.batch import build_batch
from lmcli.engine.config import CacheConfig, EngineConfig, ParallelConfig, rank_device, resolve_device
from lmcli.errors import UserError
from lmcli.kernels import backend
from lmcli.workspace import ModelConfig

SMALL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4,
                    max_position_embeddings=512, tie_word_embeddings=True)


def test_auto_picks_the_cpu_here_and_for_cpu_only_options():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto", "--quantization") == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
    with pytest.raises(UserError, match="cuda:N"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="--quant-policy 8 runs on CPUs only"):
        resolve_device("cuda", "--quant-policy 8")
    with pytest.raises(UserError, match="8-bit KV cache"):
        EngineConfig(workspace="w", model=SMALL, device="cuda", cache=CacheConfig(quant_policy=8))


def test_tensor_parallel_on_gpus_takes_a_gpu_a_rank_or_says_it_cannot(monkeypatch):
    from lmcli.engine import distributed

    assert [rank_device("cuda", r) for r in (0, 1)] == ["cuda:0", "cuda:1"]
    assert rank_device("cuda:2", 1) == "cuda:3" and rank_device("cpu", 3) == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.check_gpus("cuda", ParallelConfig(tp=2))
    distributed.check_gpus("cpu", ParallelConfig(tp=4))
    with pytest.raises(UserError, match=r"--tp 2 on cuda:1 needs a GPU a rank \(cuda:1 to cuda:2\); torch sees 2"):
        distributed.check_gpus("cuda:1", ParallelConfig(tp=2))
    distributed.check_gpus("cuda", ParallelConfig(tp=4, nnodes=2, master_port=29500))  # 2 on this node
    with pytest.raises(UserError, match=r"--tp 4 \(2 on each of 2 nodes\) on cuda:1 needs a GPU a rank"):
        distributed.check_gpus("cuda:1", ParallelConfig(tp=4, nnodes=2, master_port=29500))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = EngineConfig(workspace="w", model=SMALL, device="cuda", parallel=ParallelConfig(tp=2))
    with pytest.raises(UserError, match="torch sees 1"):  # before any worker starts
        distributed.DistributedRunner(config, None)


def test_the_triton_backend_only_for_shapes_its_kernels_take(monkeypatch):
    assert isinstance(backend.choose(torch.device("cpu"), 64, 64), backend.NativeBackend)
    monkeypatch.setenv(kernels.SETTING, "triton")
    assert isinstance(backend.choose(torch.device("cpu"), 64, 64), backend.TritonBackend)
    assert isinstance(backend.choose(torch.device("cpu"), 80, 64), backend.NativeBackend)  # head_dim 80: PyTorch
    assert isinstance(backend.choose(torch.device("cpu"), 64, 8), backend.NativeBackend)  # blocks under 16 tokens


def test_decode_tables_are_as_wide_as_the_decodes_need():
    """A long chunk beside short decodes: the decodes' table keeps its own width (the PyTorch decode reads every
    column), rows contiguous; the whole step's table is as wide as the chunk's."""
    items = [([1], 5, [3], True), ([1], 70, [4, 9], True), ([1] * 20, 8028, list(range(10, 136)), True)]
    batch, sampled = build_batch(items, 64)
    assert batch.block_tables.shape == (3, 126)
    assert batch.decode_block_tables.tolist() == [[3, 0], [4, 9]]
    assert batch.decode_lens.tolist() == [6, 71] and batch.cu_seqlens_q.tolist() == [0, 1, 2, 22]
    assert batch.prefills[0][:3] == (2, 20, 8048) and batch.prefills[0][3].tolist() == list(range(10, 136))
    assert sampled == [0, 1, 2] and batch.max_seqlen_q == 20
