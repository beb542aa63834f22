import torch
from torch import nn

from lmcli import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor = None):
        """rms_norm(x), or with a residual: (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's: the weight is stored less one (it scales by 1 + weight, from zeros), and the product is taken in
    float32 before the cast back (Llama's casts first)."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.gemma_rms_norm(x, self.weight, self.eps)
