"""Engine configuration: frozen dataclasses, one per concern, composed into EngineConfig."""

from dataclasses import dataclass, field
from typing import Optional

from lmcli.errors import UserError
from lmcli.workspace import ModelConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "int4")
QUANT_POLICIES = (0, 8)


def describe_formats(dtype: str, quantization: Optional[str], quant_policy: int, from_workspace=False) -> str:
    """One line for the server's start-up log: the weights' and the KV cache's formats and the options behind
    them. dtype: the resolved compute dtype (e.g. bfloat16); from_workspace: the 4-bit blocks came in the
    workspace (lm convert --quantization int4)."""
    origin = "the workspace's, lm convert --quantization int4" if from_workspace else "--quantization int4"
    weights = {None: f"{dtype} (--dtype)",
               "int8": "int8 per output row, activations in 8 bits per block of 32, LM head int8 (--quantization int8)",
               "int4": "4-bit blocks of 32 with a float16 scale and minimum, activations in 8 bits per block, LM head "
                       f"int8 ({origin})"}[quantization]
    cache = "int8 with a float16 scale a row (--quant-policy 8)" if quant_policy == 8 else dtype
    return f"weights: {weights}; KV cache: {cache}"


def resolve_device(name: str, cpu_only: str = "") -> str:
    """auto: cuda where torch sees a GPU, else cpu (cpu also where cpu_only names an option given that runs on CPUs
    only); cpu, cuda or cuda:N as asked, if there."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if name != "cpu" and cpu_only:
        raise UserError(f"{cpu_only} runs on CPUs only (its kernels are CPU kernels); use --device cpu or auto")
    if name != "cpu" and not torch.cuda.is_available():
        raise UserError(f"device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    return name


def rank_device(device: str, rank: int) -> str:
    """A tensor-parallel rank's device: the CPU, or the rank-th GPU from the one asked for (cuda means cuda:0)."""
    if device == "cpu":
        return device
    return f"cuda:{(int(device[5:]) if device.startswith('cuda:') else 0) + rank}"


def weights_format(quantization: Optional[str], workspace_quantization: Optional[str], device: str) -> Optional[str]:
    """What the linear layers run in: --quantization, or the workspace's own 4-bit blocks (lm convert
    --quantization int4), which a GPU gets dequantized into the model's dtype."""
    if workspace_quantization == "int4":
        if quantization == "int8":
            raise UserError("the workspace holds 4-bit weights (lm convert --quantization int4); --quantization int8 "
                            "needs a workspace converted without --quantization")
        return "int4" if device == "cpu" else None
    return quantization


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 64  # tokens per KV block (cache_block_seq_len)
    cache_max_entry_count: float = 0.8  # fraction of free device memory (of available RAM on CPU) for KV blocks
    cpu_cache_cap_bytes: int = 4 << 30  # on CPU the pool never takes more than this
    num_blocks: Optional[int] = None  # a fixed pool size; overrides cache_max_entry_count (tests, tuning)
    enable_prefix_caching: bool = True
    quant_policy: int = 0  # 0: K/V in the model's dtype; 8: in signed bytes with a float16 scale a row (kernels/kv8.py)

    def __post_init__(self):
        if self.quant_policy not in QUANT_POLICIES:
            raise UserError(f"quant_policy must be 0 (K/V in the model's dtype) or 8 (8-bit K/V), not "
                            f"{self.quant_policy}" + ("; the 4-bit KV cache is not built" if self.quant_policy == 4
                                                       else ""))
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise UserError(f"cache_block_seq_len must be a power of two, not {self.block_size}")
        if not 0 < self.cache_max_entry_count <= 1:
            raise UserError(f"cache_max_entry_count must be in (0, 1], not {self.cache_max_entry_count}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise UserError(f"num_blocks must be positive, not {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 128  # sequences running at once
    max_prefill_token_num: int = 2048  # tokens one step may compute (prefill chunks plus decode tokens)

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise UserError(f"max_batch_size must be positive, not {self.max_batch_size}")
        if self.max_prefill_token_num < self.max_batch_size:
            raise UserError("max_prefill_token_num must be at least max_batch_size")


@dataclass(frozen=True)
class ParallelConfig:
    """tp ranks over nnodes machines (torchrun's names), tp // nnodes on each: node n holds ranks n*k .. n*k+k-1.
    Rank 0 (node 0) hosts the rendezvous at master_addr:master_port; one node needs no address (any free port)."""

    tp: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    def __post_init__(self):
        if self.tp < 1:
            raise UserError(f"tp must be positive, not {self.tp}")
        if self.nnodes < 1 or self.tp % self.nnodes:
            raise UserError(f"nnodes must divide tp (each node runs tp / nnodes ranks): tp={self.tp}, "
                            f"nnodes={self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"node_rank must be in 0..{self.nnodes - 1}, not {self.node_rank}")
        if self.nnodes > 1 and not 0 < self.master_port < 65536:
            raise UserError(f"more than one node needs master_port in 1..65535 (where node 0 listens for the others),"
                            f" not {self.master_port}")

    @property
    def local_ranks(self) -> int:
        """Ranks on each node."""
        return self.tp // self.nnodes


@dataclass(frozen=True)
class EngineConfig:
    workspace: str
    model: ModelConfig
    dtype: str = "auto"  # auto: the workspace's dtype (float16 becomes float32 on CPU)
    device: str = "cpu"
    session_len: Optional[int] = None  # most tokens one sequence or session may hold; default: the model's
    quantization: Optional[str] = None  # the linear layers in int8 (W8A8) or int4 (4-bit blocks), CPU; None: dtype
    eager: bool = False  # on GPUs, no CUDA graphs for decode steps (engine/graphs.py)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise UserError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.quantization and self.device != "cpu":
            raise UserError(f"{self.quantization} quantization runs on CPUs only (its kernels are CPU kernels)")
        if self.cache.quant_policy == 8 and self.device != "cpu":
            raise UserError("quant_policy 8 (the 8-bit KV cache) runs on CPUs only (its kernels are CPU kernels)")
        if self.session_len is not None and not 1 < self.session_len <= self.model.max_position_embeddings:
            raise UserError(f"session_len must be in 2..{self.model.max_position_embeddings}, not {self.session_len}")
        m, tp = self.model, self.parallel.tp
        # Ranks split the key/value heads (unevenly if need be, each with its query heads), or, with fewer
        # key/value heads than ranks, split the query heads evenly and replicate key/value heads.
        if m.num_kv_heads < tp and (m.num_heads % tp or tp % m.num_kv_heads):
            raise UserError(f"tp={tp} cannot split the model's {m.num_heads} heads / {m.num_kv_heads} kv heads")

    @property
    def max_session_len(self) -> int:
        return self.session_len or self.model.max_position_embeddings
