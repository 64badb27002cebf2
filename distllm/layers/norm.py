"""RMSNorm with an optional fused residual add (computed in float32, as HF does).

On CUDA both forms run as one Triton kernel (distllm/ops/triton_norm.py); on CPU, or with
DISTLLM_DISABLE_FUSED_OPS=1, the torch reference (distllm/ops/fused_ref.py) runs. Under tensor
parallelism `forward_all_reduce` also sums a row-parallel layer's partial output over the ranks
first, in the same kernel when the custom all-reduce takes it.
"""

from __future__ import annotations

import torch
from torch import nn

from distllm.distributed.parallel_state import tp_all_reduce_add_rms_norm
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

    def forward_all_reduce(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: a row-parallel layer's partial output (not yet summed over TP ranks) ->
        (normed(all_reduce(x) + residual), all_reduce(x) + residual); one kernel with the
        custom all-reduce. residual None: (normed(all_reduce(x)), all_reduce(x))."""
        return tp_all_reduce_add_rms_norm(x, residual, self.weight, self.eps)
