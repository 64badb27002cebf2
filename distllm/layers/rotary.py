"""Rotary position embedding (neox / HF "rotate_half" layout), with Llama-3 and linear scaling.

On CUDA, q and k are rotated by one Triton kernel (distllm/ops/triton_rotary.py) that reads
cos/sin straight from the cache, and Qwen3's per-head q/k RMSNorm runs inside that same kernel
(`forward_qk_norm`); in a step with a KV cache that kernel also writes the rotated keys and the
values into it (`rotate_and_store`). On CPU, or with DISTLLM_DISABLE_FUSED_OPS=1, the torch
reference (distllm/ops/fused_ref.py) runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distllm.ops import dispatch
from distllm.ops.fused_ref import apply_rotary_ref, rotary_cos_sin

if TYPE_CHECKING:
    from distllm.layers.norm import RMSNorm


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are stretched by factor, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def compute_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    raise NotImplementedError(f"rope_scaling type {kind!r} is not supported yet (supported: default, llama3, linear).")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = compute_inv_freq(head_dim, base, scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        # [max_position, head_dim]: cos of both halves, then sin of both halves.
        cache = torch.cat([freqs.cos(), freqs.cos(), freqs.sin(), freqs.sin()], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        # One instance serves every layer; all layers of a step pass the same positions tensor.
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D], positions [T] -> rotated (new tensors; q and k are untouched)."""
        if dispatch.use_fused_ops(q):
            from distllm.ops import triton_rotary

            return triton_rotary.rotary_embedding(positions, q, k, self.cos_sin_cache)
        last = self._last
        if last is not None and last[0] is positions and not (positions.is_cuda and torch.cuda.is_current_stream_capturing()):
            cos, sin = last[1], last[2]
        else:
            cos, sin = rotary_cos_sin(self.cos_sin_cache, positions, q.dtype)  # [T, 1, D] each
            self._last = (positions, cos, sin)
        return apply_rotary_ref(q, cos, sin), apply_rotary_ref(k, cos, sin)

    def forward_qk_norm(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: "RMSNorm", k_norm: "RMSNorm"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rotary(q_norm(q), k_norm(k)) (Qwen3), the norms fused into the rotary kernel on CUDA."""
        fusable = (
            dispatch.use_fused_ops(q)
            and q_norm.eps == k_norm.eps
            and q_norm.weight.dtype == q.dtype
            and k_norm.weight.dtype == k.dtype
        )
        if fusable:
            from distllm.ops import triton_rotary

            return triton_rotary.rotary_embedding(
                positions, q, k, self.cos_sin_cache, q_weight=q_norm.weight, k_weight=k_norm.weight, eps=q_norm.eps
            )
        return self(positions, q_norm(q), k_norm(k))

    def store_kernel_args(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        k_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        q_norm: "RMSNorm | None" = None,
        k_norm: "RMSNorm | None" = None,
    ) -> dict | None:
        """The norm arguments ({} without q/k norms) of a kernel that rotates q and k and writes k
        into the cache (rotate_and_store, the fused decode attention); None where such a kernel
        does not apply (CPU, fused ops off, mismatched dtypes)."""
        if not dispatch.use_fused_ops(q) or slot_mapping.shape[0] != q.shape[0] or k_cache.dtype != k.dtype:
            return None
        if q_norm is None:
            return {}
        if not (q_norm.eps == k_norm.eps and q_norm.weight.dtype == q.dtype and k_norm.weight.dtype == k.dtype):
            return None
        return dict(q_weight=q_norm.weight, k_weight=k_norm.weight, eps=q_norm.eps)

    def rotate_and_store(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        q_norm: "RMSNorm | None" = None,
        k_norm: "RMSNorm | None" = None,
    ) -> torch.Tensor | None:
        """On CUDA: rotary q (and Qwen3's q/k norms), with the rotated keys and the values written
        into the paged KV cache by the same kernel; returns the rotated q [T, H, D]. None where
        that kernel does not apply (CPU, fused ops off, mismatched dtypes): the caller rotates
        and stores in separate steps."""
        norm = self.store_kernel_args(q, k, k_cache, slot_mapping, q_norm, k_norm)
        if norm is None:
            return None
        from distllm.ops import triton_rotary

        q_rot, _ = triton_rotary.rotary_embedding(
            positions, q, k, self.cos_sin_cache, kv_store=(v, k_cache, v_cache, slot_mapping), **norm
        )
        return q_rot
