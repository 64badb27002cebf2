"""Pick the Triton kernels on CUDA tensors and the plain-torch reference otherwise.

`DISTLLM_FORCE_TRITON=1` forces the Triton path on CPU tensors too (for tests under
TRITON_INTERPRET=1); `DISTLLM_FORCE_TORCH=1` forces the reference everywhere (debugging).
`DISTLLM_DISABLE_FUSED_OPS=1` sends only the fused elementwise ops (RMSNorm, rotary,
SiLU-and-mul) to their torch references, to compare or debug them alone.
The environment is read at call time (a CUDA graph keeps what was chosen at capture).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from distllm.ops.fused_ref import fused_add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_and_mul_ref
from distllm.ops.paged_attention import paged_attention_ref, store_kv_ref


def _env_on(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(t: torch.Tensor) -> bool:
    if _env_on("DISTLLM_FORCE_TORCH"):
        return False
    return t.is_cuda or _env_on("DISTLLM_FORCE_TRITON")


def use_fused_ops(t: torch.Tensor) -> bool:
    """Triton RMSNorm / rotary / SiLU-and-mul for t? (the torch references otherwise)."""
    return not _env_on("DISTLLM_DISABLE_FUSED_OPS") and use_triton(t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_fused_ops(x):
        from distllm.ops import triton_norm

        return triton_norm.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    # The kernel rounds the sum to x's dtype; mixed dtypes / broadcasting keep torch's promotion rules.
    if use_fused_ops(x) and residual.dtype == x.dtype and residual.shape == x.shape:
        from distllm.ops import triton_norm

        return triton_norm.fused_add_rms_norm(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def masked_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int, end: int,
                     lookup: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """weight[ids - start] where start <= ids < end, zero rows elsewhere (a vocab-parallel rank's
    part of an embedding lookup). ``lookup``: rows for local ids in place of weight[ids] (GGUF
    rows kept quantized), on the torch path."""
    if lookup is None and use_fused_ops(weight) and weight.dim() == 2:
        from distllm.ops import triton_embedding

        return triton_embedding.masked_embedding(ids, weight, start, end)
    mask = (ids >= start) & (ids < end)
    local = torch.where(mask, ids - start, torch.zeros_like(ids))
    rows = lookup(local) if lookup is not None else torch.nn.functional.embedding(local, weight)
    return rows * mask.unsqueeze(-1).to(rows.dtype)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] -> rotated copies (neox layout)."""
    if use_fused_ops(q):
        from distllm.ops import triton_rotary

        return triton_rotary.rotary_embedding(positions, q, k, cos_sin_cache)
    return rotary_ref(positions, q, k, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2d] = [gate | up] -> silu(gate) * up [..., d]."""
    if use_fused_ops(x):
        from distllm.ops import triton_activation

        return triton_activation.silu_and_mul(x)
    return silu_and_mul_ref(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): the Triton GEMV for decode-sized x and small weights, cuBLAS otherwise."""
    if use_triton(x):
        from distllm.ops import triton_gemv

        if triton_gemv.applies(x, weight, bias):
            return triton_gemv.gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(x) @ weight.T (+ bias) for x = [gate | up]: one gated GEMV for decode rows
    where it applies (triton_gemv.GATED), else the activation and then the linear."""
    if use_triton(x):
        from distllm.ops import triton_gemv

        if triton_gemv.applies(x, weight, bias, gated=True):
            return triton_gemv.gemv(x, weight, bias, gated=True)
    return linear(silu_and_mul(x), weight, bias)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """silu_and_mul(x @ weight.T) for a gated MLP's stacked [gate; up] weight, in one GEMV launch
    for decode rows on CUDA (triton_gemv.gemv_gate_up); None where that kernel does not apply."""
    if use_triton(x) and not _env_on("DISTLLM_DISABLE_FUSED_OPS"):
        from distllm.ops import triton_gemv

        if triton_gemv.gate_up_applies(x, weight, bias):
            return triton_gemv.gemv_gate_up(x, weight)
    return None


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> int64 [B], the first index of each row's maximum (torch.argmax(x, -1))."""
    if use_triton(x) and x.dim() == 2:
        from distllm.ops.triton_argmax import argmax_last_dim

        return argmax_last_dim(x)
    return x.argmax(dim=-1)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if use_triton(k_cache):
        from distllm.ops.triton_kv_store import store_kv as _store_kv

        _store_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """out [T, H, D]. Pass max_query_len / max_seq_len (host ints) to avoid device syncs."""
    if use_triton(q):
        from distllm.ops.triton_paged_attention import paged_attention as _paged_attention

        return _paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, causal,
            max_query_len=max_query_len, max_seq_len=max_seq_len,
        )
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, causal)


def restrict_logits_(
    x: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]
) -> torch.Tensor:
    """min-p, top-k and top-p on float32 logits x [B, V], in place (others set to -inf).

    The csrc kernel (one launch, no sort) where it is built for x's device
    (ops/csrc_ext.py), the torch path otherwise; both keep the same tokens
    (ops/sampling_ref.py says which)."""
    from distllm.ops import csrc_ext
    from distllm.ops.sampling_ref import host_column, restrict_logits_ref_

    B, V = x.shape
    needed = any(0 < k < V for k in top_k) or any(p < 1.0 for p in top_p) or any(m > 0.0 for m in min_p)
    if not needed:
        return x
    ext = None if _env_on("DISTLLM_FORCE_TORCH") or x.dtype != torch.float32 else csrc_ext.ops_for(x.device)
    if ext is None:
        return restrict_logits_ref_(x, top_k, top_p, min_p)
    # One [3, B] float32 tensor (top_k is exact in float32 below 2^24): one host-to-device copy.
    ext.restrict_logits_(x, host_column([*top_k, *top_p, *min_p], torch.float32, x.device).view(3, B))
    return x
