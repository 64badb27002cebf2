"""Pick the Triton kernels on CUDA tensors and the plain-torch reference otherwise.

`DISTLLM_FORCE_TRITON=1` forces the Triton path on CPU tensors too (for tests under
TRITON_INTERPRET=1); `DISTLLM_FORCE_TORCH=1` forces the reference everywhere (debugging).
The environment is read at call time.
"""

from __future__ import annotations

import os

import torch

from distllm.ops.paged_attention import paged_attention_ref, store_kv_ref


def _env_on(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(t: torch.Tensor) -> bool:
    if _env_on("DISTLLM_FORCE_TORCH"):
        return False
    return t.is_cuda or _env_on("DISTLLM_FORCE_TRITON")


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
