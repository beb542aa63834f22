"""Linear layers, split across tensor-parallel ranks. Each parameter has a weight_loader that takes this rank's
part of the full (workspace) tensor, so model files read like single-device code."""

import torch
from torch import nn

from lmcli import kernels
from lmcli.kernels import int4, int8

from lmcli.engine.layers.parallel import TP, shard


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class QuantizableLinear(nn.Module):
    """A weight that --quantization may replace by int8 (kernels/int8.py) or 4-bit blocks (kernels/int4.py), or that
    a workspace holds in 4-bit blocks already (lm convert --quantization int4): the loaders take this rank's rows and
    columns of either."""

    weight: nn.Parameter
    packed = None

    def set_weight(self, param: nn.Parameter, part) -> None:
        """part: this rank's share, a tensor or int4.Int4Blocks."""
        if isinstance(part, int4.Int4Blocks):
            self.packed, self.weight = part.weight(), None
        else:
            param.data = part.contiguous()

    def quantize(self, kind: str) -> bool:
        """From now on the products run in kind; the weight in the model's dtype is dropped. False (and nothing
        changes) where the format cannot hold this weight (4-bit blocks need in features divisible by 32) or where
        the weight came packed."""
        if self.packed is not None:
            return False
        packed = int8.pack(self.weight) if kind == "int8" else int4.quantize(self.weight)
        if packed is None:
            return False
        self.packed, self.weight = packed, None
        return True

    def product(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        if self.packed is not None:
            return kernels.quantized_linear(x, self.packed, bias)
        return kernels.linear(x, self.weight, bias)


class RowParallelLinear(QuantizableLinear):
    """y = x W^T with W's input columns split across ranks; one all-reduce sums the partial products."""

    def __init__(self, in_features: int, out_features: int, tp: TP, in_shards: list[tuple[int, int]]):
        super().__init__()
        # in_shards: this rank's column ranges of the full input, in order (e.g. its heads)
        self.tp, self.in_shards = tp, in_shards
        self.weight = _param(out_features, sum(e - s for s, e in in_shards))
        self.weight.weight_loader = self.load

    def load(self, param: nn.Parameter, full) -> None:
        if isinstance(full, int4.Int4Blocks):
            part = full.cols(self.in_shards)
            if part is not None:
                return self.set_weight(param, part)
            full = full.dequantize().to(param.dtype)  # a shard that cuts a block: this layer in the model's dtype
        self.set_weight(param, torch.cat([full[:, s:e] for s, e in self.in_shards], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.product(x))


class FusedColumnLinear(QuantizableLinear):
    """Several column-parallel projections fused in one weight (qkv, or gate and up). The workspace stores them
    stacked: part i holds rows [offsets[i], offsets[i+1]); this rank keeps its row range of each part."""

    def __init__(self, in_features: int, part_sizes: list[int], rank_ranges: list[tuple[int, int]], bias: bool):
        super().__init__()
        self.part_sizes, self.rank_ranges = part_sizes, rank_ranges
        out = sum(e - s for s, e in rank_ranges)
        self.weight = _param(out, in_features)
        self.weight.weight_loader = self.load
        self.bias = _param(out) if bias else None
        if bias:
            self.bias.weight_loader = self.load

    def load(self, param: nn.Parameter, full) -> None:
        starts = [sum(self.part_sizes[:i]) for i in range(len(self.part_sizes))]
        ranges = [(o + s, o + e) for o, (s, e) in zip(starts, self.rank_ranges)]
        if isinstance(full, int4.Int4Blocks):
            return self.set_weight(param, full.rows(ranges))
        self.set_weight(param, torch.cat([full[s:e] for s, e in ranges], dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)


def gate_up(hidden: int, intermediate: int, tp: TP) -> FusedColumnLinear:
    s, e = shard(intermediate, tp.size, tp.rank)
    return FusedColumnLinear(hidden, [intermediate, intermediate], [(s, e), (s, e)], bias=False)
