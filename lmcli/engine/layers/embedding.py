"""The embedding and the LM head, split by vocabulary rows across tensor-parallel ranks."""

import torch
import torch.nn.functional as F
from torch import nn

from lmcli import kernels

from lmcli.engine.layers.parallel import TP, shard, split


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TP):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.start, self.end = shard(vocab_size, tp.size, tp.rank)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, hidden), requires_grad=False)
        self.weight.weight_loader = self.load

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
        local = kernels.linear(hidden, self.weight, out_dtype=torch.float32)
        return self.tp.all_gather_last(local, split(self.vocab_size, self.tp.size))
