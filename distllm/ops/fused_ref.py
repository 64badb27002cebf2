"""Plain-torch references for the fused elementwise ops (RMSNorm, rotary, SiLU-and-mul).

These are the exact computations the layers ran before the Triton kernels existed (and still
run on CPU): HF semantics, so a model's CPU output is unchanged. The Triton versions in
triton_norm.py / triton_rotary.py / triton_activation.py are tested against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize over the last dim in float32, cast back to x's dtype, then scale (HF LlamaRMSNorm)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is taken in the input dtype."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def rotary_cos_sin(
    cos_sin_cache: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, 1, D] in `dtype` from the [max_pos, 2D] cache (cos|cos|sin|sin per row)."""
    head_dim = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions)  # [T, 2D]
    return cs[:, None, :head_dim].to(dtype), cs[:, None, head_dim:].to(dtype)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox / HF rotate_half: x * cos + rotate_half(x) * sin, x [T, H, D], cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary_cos_sin(cos_sin_cache, positions, q.dtype)
    return apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2  # x = [gate | up]
    return F.silu(x[..., :d]) * x[..., d:]
