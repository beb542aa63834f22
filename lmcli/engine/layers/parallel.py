"""This rank's place in the tensor-parallel group, and how dimensions are split between ranks."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TP:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's x along the last dimension; rank r holds sizes[r] columns."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        width = max(sizes)
        padded = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


def split(n: int, parts: int) -> list[int]:
    """n split into parts as evenly as possible, larger parts first: split(3, 2) == [2, 1]."""
    return [n // parts + (1 if r < n % parts else 0) for r in range(parts)]


def shard(n: int, parts: int, rank: int) -> tuple[int, int]:
    sizes = split(n, parts)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def head_shard(num_heads: int, num_kv_heads: int, tp: TP) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's (query head range, key/value head range). Ranks split the key/value heads, each taking the
    query heads that read them; with fewer key/value heads than ranks, query heads split evenly and each rank
    keeps the one key/value head its query heads read."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp.size:
        kv = shard(num_kv_heads, tp.size, tp.rank)
        return (kv[0] * group, kv[1] * group), kv
    q = shard(num_heads, tp.size, tp.rank)
    return q, (q[0] // group, q[0] // group + 1)
