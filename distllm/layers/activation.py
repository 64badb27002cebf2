"""SiLU-and-mul: the gated MLP's activation on the merged gate/up projection.

One Triton kernel on CUDA (distllm/ops/triton_activation.py), the torch reference otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from distllm.ops import dispatch


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., 2d] = [gate | up] -> [..., d]."""
        return dispatch.silu_and_mul(x)
