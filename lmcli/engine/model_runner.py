"""Loads the model's shard for this rank, owns its KV cache, and runs one scheduled batch: tensors in,
sampled tokens out."""

import math
import mmap
import os

import torch

from lmcli.engine.batch import build_batch, plan
from lmcli.engine.config import EngineConfig, weights_format
from lmcli.engine.graphs import DecodeGraphs
from lmcli.engine.layers.linear import QuantizableLinear
from lmcli.engine.layers.parallel import TP
from lmcli.engine.memory import advise_huge_pages, pack_parameters, populate
from lmcli.engine.models import model_class
from lmcli.errors import UserError
from lmcli.kernels import backend
from lmcli.kernels.int4 import Int4Blocks
from lmcli.kernels.kv8 import Int8Cache
from lmcli.workspace import Workspace


def resolve_dtype(config: EngineConfig, workspace_dtype: str) -> torch.dtype:
    name = workspace_dtype if config.dtype == "auto" else config.dtype
    if name == "float16" and config.device == "cpu":
        name = "float32"  # half precision matmuls are slow or missing on CPUs
    if config.dtype == "auto" and name == "float32" and config.device != "cpu" and torch.cuda.is_bf16_supported():
        name = "bfloat16"  # GPUs multiply bfloat16 at many times their float32 rate
    return getattr(torch, name)


def available_memory() -> int:
    """Bytes of RAM the system could give us now."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ModelRunner:
    def __init__(self, config: EngineConfig, workspace: Workspace, tp: TP = TP(), loaded=None):
        """loaded: called once the weights are in, before the first collective (tensor parallelism: until every
        rank has loaded)."""
        self.config, self.tp = config, tp
        self.device = torch.device(config.device)
        if self.device.type == "cuda":  # Triton launches and graph captures go to the thread's current device
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config, workspace.dtype)
        self.block_size = config.cache.block_size
        self.backend = backend.choose(self.device, config.model.head_dim, self.block_size)
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = model_class(config.model.architecture)(config.model, tp, config.max_session_len,
                                                                    self.dtype)
        finally:
            torch.set_default_dtype(torch.float32)
        self._load(workspace)
        if loaded is not None:
            loaded()
        self._kv_memory = []  # the KV cache's mmaps on CPU (_zeros)
        self._kv_pools = []  # their tensors, (2, layers, blocks, ...)
        self._warm_blocks = 0  # blocks [0, this) of them are faulted in (warm_cache)
        self.num_blocks = self._allocate_cache()
        self.graphs = None  # decode steps from CUDA graphs: on GPUs, one rank, unless eager
        if self.device.type == "cuda" and not config.eager and tp.size == 1 and self.backend.name == "triton":
            self.graphs = DecodeGraphs(self, config.scheduler.max_batch_size)
            with torch.inference_mode():
                self.graphs.capture_all()

    def _load(self, workspace: Workspace) -> None:
        quantization = weights_format(self.config.quantization, workspace.quantization, self.device.type)
        params = dict(self.model.named_parameters())
        loaded = set()
        for name, tensor in workspace.weights():
            if name not in params:
                raise UserError(f"workspace {workspace.path}: unexpected tensor {name}; convert the model again")
            param = params[name]
            if not isinstance(tensor, Int4Blocks):
                tensor = tensor.to(self.dtype)
            elif quantization != "int4":  # a GPU: the blocks in the model's dtype
                tensor = tensor.dequantize().to(self.dtype)
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor)
            else:
                param.data = tensor.contiguous()
            param.data = param.data.to(self.device)
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise UserError(f"workspace {workspace.path} lacks {', '.join(sorted(missing)[:3])}")
        if quantization:
            for module in self.model.modules():
                if isinstance(module, QuantizableLinear):
                    module.quantize(quantization)
            self.model.lm_head.quantize_head()
        if self.device.type == "cpu":
            pack_parameters(self.model)

    def block_bytes(self) -> int:
        """Bytes of one page of the KV pool, a block of tokens for one KV group's layers (ModelConfig.kv_groups; most
        models have one group of all layers): K and V rows in the model's dtype, or with --quant-policy 8 in signed
        bytes plus a float16 scale each."""
        m = self.config.model
        kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        row = m.head_dim + 2 if self.config.cache.quant_policy == 8 else m.head_dim * self.dtype.itemsize
        return 2 * len(m.kv_groups()[0][1]) * kv_heads * self.block_size * row

    def _allocate_cache(self) -> int:
        m, cache = self.config.model, self.config.cache
        attn = self.model.model.layers[0].self_attn
        shape = (attn.num_kv_heads, self.block_size, m.head_dim)
        block_bytes = self.block_bytes()
        if cache.num_blocks is not None:
            num_blocks = cache.num_blocks
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * cache.cache_max_entry_count) // block_bytes
        else:
            budget = min(available_memory() * cache.cache_max_entry_count, cache.cpu_cache_cap_bytes)
            num_blocks = int(budget) // block_bytes
        if self.tp.size > 1:  # every rank must agree on the pool size
            import torch.distributed as dist

            t = torch.tensor([num_blocks])
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            num_blocks = int(t)
        if num_blocks < 1:
            raise UserError("no memory is left for the KV cache; raise cache_max_entry_count or free memory")
        groups = m.kv_groups()
        size = (2, len(groups[0][1]), num_blocks, *shape)  # layer j of every group in [:, j]
        if cache.quant_policy == 8:
            self.kv_cache = self._zeros(size, torch.int8)
            self.kv_scale = self._zeros(size[:-1], torch.float16)
            caches = [(Int8Cache(self.kv_cache[0, j], self.kv_scale[0, j]),
                       Int8Cache(self.kv_cache[1, j], self.kv_scale[1, j])) for j in range(size[1])]
        else:
            self.kv_cache = self._zeros(size, self.dtype)
            caches = [(self.kv_cache[0, j], self.kv_cache[1, j]) for j in range(size[1])]
        layers = self.model.model.layers
        for g, (_, members) in enumerate(groups):
            for j, i in enumerate(members):
                attn = layers[i].self_attn
                attn.k_cache, attn.v_cache = caches[j]
                attn.group = g
        return num_blocks

    def _zeros(self, size: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Unwritten slots must hold finite numbers: attention weighs padding by 0, and 0 * NaN is NaN. On CPU the
        cache is an anonymous mmap of its own: zero pages the OS fills as they are first touched, whatever the
        process freed before (torch.empty could hand back reused memory; zeroing 4 GiB takes 8 s here)."""
        if self.device.type != "cpu":
            return torch.zeros(size, dtype=dtype, device=self.device)
        memory = mmap.mmap(-1, math.prod(size) * dtype.itemsize, flags=mmap.MAP_PRIVATE)  # anonymous
        self._kv_memory.append(memory)  # kept: the tensors live in it
        t = torch.frombuffer(memory, dtype=dtype).view(size)
        advise_huge_pages(t)
        self._kv_pools.append(t)
        return t

    def warm_cache(self, nbytes: int) -> bool:
        """Fault in the next blocks of the CPU KV pool, about nbytes, ahead of use (memory.populate; contents stay),
        in the order the block manager first hands them out; True once all of it is in. For idle time between
        steps: a step that writes a fresh page pays its fault (SmolLM2's 23 KB a token at 0.4 GB/s on a Firecracker
        VM: 60 ms of a 1,000-token prefill)."""
        if not self._kv_pools:
            return True
        start = self._warm_blocks
        end = min(self.num_blocks, start + max(1, nbytes // self.block_bytes()))
        for pool in self._kv_pools:
            for layer in pool.flatten(0, 1):  # K and V of each layer
                populate(layer[start:end])
        self._warm_blocks = end
        return end == self.num_blocks

    def run(self, scheduled: list):
        """Compute one step: (the sequences to sample, their logits (rows, vocab) in float32)."""
        sampled, logits = self.execute(plan(scheduled))
        return [scheduled[i][0] for i in sampled], logits

    @torch.inference_mode()
    def execute(self, items: list[tuple]):
        if self.graphs is not None and self.graphs.fits(items):
            return list(range(len(items))), self.graphs.run(items)
        batch, sampled = build_batch(items, self.block_size, self.device)
        return sampled, self.forward(batch)

    def forward(self, batch) -> torch.Tensor:
        """The logits of the batch's sampled tokens, through this runner's attention backend."""
        batch.backend = self.backend
        self.backend.prepare(batch)
        return self.model(batch.input_ids, batch.positions, batch)
