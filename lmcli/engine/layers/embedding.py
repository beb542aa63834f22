"""The embedding and the LM head, split by vocabulary rows across tensor-parallel ranks."""

import torch
import torch.nn.functional as F
from torch import nn

from lmcli import kernels
from lmcli.kernels import int8

from lmcli.engine.layers.parallel import TP, shard, split


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TP):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.start, self.end = shard(vocab_size, tp.size, tp.rank)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, hidden), requires_grad=False)
        self.weight.weight_loader = self.load
        self.head = None  # the LM head's weight in int8 (quantize_head), beside the table for lookups

    def quantize_head(self) -> bool:
        """The logits from an int8 copy of the weight from now on (the lookups keep the table as it is). int8
        whatever the layers' format: SmolLM2's perplexity rose 5.5% with a 4-bit LM head, 0.4% with int8."""
        self.head = int8.pack(self.weight)
        return self.head is not None

    def load(self, param: nn.Parameter, full: torch.Tensor) -> None:
        param.data = full[self.start:self.end].contiguous()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        out = F.embedding(torch.where(mine, ids - self.start, 0), self.weight) * mine[:, None]
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Used as the LM head: float32 logits over the full vocabulary, on every rank."""
        if self.head is not None:
            local = kernels.quantized_linear(hidden.float(), self.head)
        else:
            local = kernels.linear(hidden, self.weight, out_dtype=torch.float32)
        return self.tp.all_gather_last(local, split(self.vocab_size, self.tp.size))
