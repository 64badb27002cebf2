"""SiLU-and-mul: the gated MLP's activation on the merged gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2  # x = [gate | up]
        return F.silu(x[..., :d]) * x[..., d:]
