"""RMSNorm with an optional fused residual add (computed in float32, as HF does).

On CUDA both forms run as one Triton kernel (distllm/ops/triton_norm.py); on CPU, or with
DISTLLM_DISABLE_FUSED_OPS=1, the torch reference (distllm/ops/fused_ref.py) runs.
"""

from __future__ import annotations

import torch
from torch import nn

from distllm.layers.linear import default_weight_loader, set_weight_loader
from distllm.ops import dispatch


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [..., N] -> normed; with residual -> (normed(x + residual), x + residual)."""
        if residual is None:
            return dispatch.rms_norm(x, self.weight, self.eps)
        return dispatch.fused_add_rms_norm(x, residual, self.weight, self.eps)
