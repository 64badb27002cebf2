"""Triton kernel: write new keys/values into the paged KV cache.

Same signature and semantics as `paged_attention.store_kv_ref`:
  key/value:    [num_tokens, num_kv_heads, head_dim] (any strides; e.g. views of a fused qkv)
  k/v cache:    [num_blocks, block_size, num_kv_heads, head_dim] (last dim contiguous)
  slot_mapping: [num_tokens] int, block_id * block_size + offset; -1 = padding, not stored

One program per token writes all of its kv heads (a [Hkv, D] tile); padded slots return
early. Runs under TRITON_INTERPRET=1 for CPU tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from distllm.ops.launch import launch


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE

    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    tok64 = tok.to(tl.int64)

    k = tl.load(key_ptr + tok64 * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(value_ptr + tok64 * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d * stride_kcd
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d * stride_vcd
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, block_size, hkv, d = k_cache.shape
    assert key.shape[0] >= num_tokens and key.shape[1:] == (hkv, d), (key.shape, k_cache.shape)
    assert value.shape[0] >= num_tokens and value.shape[1:] == (hkv, d), (value.shape, v_cache.shape)
    assert v_cache.shape == k_cache.shape
    block_h = triton.next_power_of_2(hkv)
    block_d = triton.next_power_of_2(d)
    num_warps = 1 if block_h * block_d <= 1024 else (2 if block_h * block_d <= 4096 else 4)
    launch(_store_kv_kernel, (num_tokens,),
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        *key.stride(),
        *value.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        NUM_KV_HEADS=hkv,
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
