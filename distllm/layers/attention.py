"""Attention over the paged KV cache.

The model runner sets one `AttentionMetadata` and the per-layer KV caches for each forward pass
(`forward_context`), so model files just call `self.attn(q, k, v)` and know nothing of paging.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from distllm.ops import dispatch
from distllm.ops.paged_attention import decode_mask, paged_decode_ref, varlen_attention_ref

if TYPE_CHECKING:
    from distllm.layers.norm import RMSNorm
    from distllm.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    query_start_loc: torch.Tensor  # [B + 1] int32
    max_query_len: int
    max_seq_len: int
    # Every sequence starts from position 0 this step: attention needs only the new K/V.
    fresh_prefill_only: bool = False
    causal: bool = True
    # Per-step tensors derived once and shared by every layer (e.g. the CPU decode mask).
    derived: dict | None = None


@dataclass
class _ForwardContext:
    meta: AttentionMetadata | None = None
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None


_CTX = _ForwardContext()


@contextlib.contextmanager
def forward_context(
    meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None
) -> Iterator[None]:
    prev = (_CTX.meta, _CTX.kv_caches)
    _CTX.meta, _CTX.kv_caches = meta, kv_caches
    try:
        yield
    finally:
        _CTX.meta, _CTX.kv_caches = prev


def get_attention_metadata() -> AttentionMetadata:
    if _CTX.meta is None:
        raise RuntimeError("attention called outside a forward_context (the model runner sets one per step)")
    return _CTX.meta


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward_rotary(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: "RotaryEmbedding",
        q_norm: "RMSNorm | None" = None,
        k_norm: "RMSNorm | None" = None,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] before the rotary (and Qwen3's q/k norms) -> [T, H*D].
        On CUDA with a KV cache one kernel rotates q and k and writes k and v into the cache."""
        t = q.shape[0]
        caches = _CTX.kv_caches
        if caches is not None:
            k_cache, v_cache = caches[self.layer_idx]
            meta = get_attention_metadata()
            out = self._fused_decode(positions, q, k, v, rotary, q_norm, k_norm, k_cache, v_cache, meta)
            if out is not None:
                return out.reshape(t, self.num_heads * self.head_dim)
            q_rot = rotary.rotate_and_store(positions, q, k, v, k_cache, v_cache, meta.slot_mapping, q_norm, k_norm)
            if q_rot is not None:
                return self._attend(q_rot, None, None, stored=True)
        if q_norm is not None:
            q, k = rotary.forward_qk_norm(positions, q, k, q_norm, k_norm)
        else:
            q, k = rotary(positions, q, k)
        return self(q.reshape(t, -1), k.reshape(t, -1), v)

    def _fused_decode(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rotary: "RotaryEmbedding",
        q_norm: "RMSNorm | None",
        k_norm: "RMSNorm | None",
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        """A decode batch (one new token per sequence) on CUDA: rotary, KV store and attention
        in one kernel (ops/triton_decode_attention) -> [T, H, D]; None where it does not apply."""
        if not (meta.max_query_len == 1 and meta.causal and q.shape[0] == meta.seq_lens.shape[0]):
            return None
        norm = rotary.store_kernel_args(q, k, k_cache, meta.slot_mapping, q_norm, k_norm)
        if norm is None or v.dtype != v_cache.dtype:
            return None
        from distllm.ops import triton_decode_attention

        if not triton_decode_attention.ENABLED or q.shape[0] > triton_decode_attention.MAX_BATCH:
            return None
        return triton_decode_attention.decode_attention(
            q, k, v, positions, rotary.cos_sin_cache, k_cache, v_cache, meta.slot_mapping, meta.block_tables,
            meta.seq_lens, self.scale, meta.max_seq_len, **norm,
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        return self._attend(q, k, v, stored=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, stored: bool) -> torch.Tensor:
        """q [T, H, D]; k/v [T, Hkv, D], or None when `stored` (already in the cache, where the
        Triton paged attention reads them) -> [T, H*D]."""
        meta = get_attention_metadata()
        t = q.shape[0]
        caches = _CTX.kv_caches
        if caches is not None:
            k_cache, v_cache = caches[self.layer_idx]
            if not stored:
                dispatch.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            assert not stored, "stored keys need a KV cache"
        # Keys already stored (rotate_and_store) are read by the Triton paged attention kernel.
        assert not stored or dispatch.use_triton(q), "stored keys need the paged attention kernel"
        if not stored and (caches is None or (meta.fresh_prefill_only and not q.is_cuda)):
            out = varlen_attention_ref(q, k, v, meta.query_start_loc, self.scale, meta.causal)
        elif not stored and meta.max_query_len == 1 and not dispatch.use_triton(q):
            if meta.derived is None:
                meta.derived = {}
            mask = meta.derived.get("decode_mask")
            if mask is None:
                max_len = meta.block_tables.shape[1] * k_cache.shape[1]
                mask = meta.derived["decode_mask"] = decode_mask(meta.seq_lens, max_len)
            out = paged_decode_ref(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale, mask)
        else:
            out = dispatch.paged_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                meta.query_start_loc,
                self.scale,
                causal=meta.causal,
                max_query_len=meta.max_query_len,
                max_seq_len=meta.max_seq_len,
            )
        return out.reshape(t, self.num_heads * self.head_dim)
