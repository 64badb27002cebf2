"""Triton rotary embedding (neox / HF rotate_half layout) on q and k in one launch.

    rotary_embedding(positions, q, k, cos_sin_cache, inplace=False,
                     q_weight=None, k_weight=None, eps=1e-6) -> (q_rot, k_rot)

  positions:     [T] int (any integer dtype)
  q:             [T, Hq, D], k: [T, Hk, D] (last dim contiguous; other strides free, e.g.
                 views of the fused qkv output); Hq != Hk (GQA) is fine
  cos_sin_cache: [max_position, 2D] float32, each row cos|cos|sin|sin of the D/2 frequencies
                 (the layout `RotaryEmbedding` builds)

Semantics follow `fused_ref.rotary_ref`: cos/sin are rounded to q's dtype first (as HF and the
torch path do), then out[:D/2] = x1*cos - x2*sin and out[D/2:] = x2*cos + x1*sin, evaluated in
float32 and rounded once (torch rounds each product too, so bf16 results can differ by one
rounding step).

With q_weight / k_weight (Qwen3), each head is first RMS-normalized over D with its weight,
exactly as `fused_ref.rms_norm_ref` would (float32 statistics, rounded to the input dtype
before and after the weight multiply), and then rotated: the q/k norms and the rotary become
one launch instead of three.

Grid: (T, head blocks of q, then head blocks of k). Each program loads its token's cos/sin once
and rotates a [BLOCK_H, D/2] pair of half-tiles. With inplace=True the results overwrite q and
k (no allocation); otherwise fresh contiguous tensors are returned. CUDA-graph safe.

With kv_store=(v, k_cache, v_cache, slot_mapping), the rotated keys go straight into the paged
KV cache at their slots, with the values beside them, as `triton_kv_store.store_kv` would write
them (padded slots, -1, are skipped), and no k tensor is returned: the attention reads keys from
the cache anyway, so a decode layer saves the store kernel's launch and a round trip of k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl

TILE_ELEMS = 1024  # half-head elements per program (BLOCK_H * BLOCK_HALF)


@triton.jit
def _rotate_block(
    src_ptr, dst_ptr, stride_sh, stride_dh, h0, n_heads, cos, sin, w_ptr, eps,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr,
):
    """(Normalize and) rotate heads [h0, h0 + BLOCK_H) of one token; src/dst point at its row."""
    h = h0 + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    d = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = (h < n_heads) & (d < HALF)
    src = src_ptr + h * stride_sh + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        # RMSNorm over the whole head (both halves), rounded where the torch reference rounds.
        in_ty = src_ptr.dtype.element_ty
        rstd = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd[:, None]).to(in_ty).to(tl.float32) * w1).to(in_ty).to(tl.float32)
        x2 = ((x2 * rstd[:, None]).to(in_ty).to(tl.float32) * w2).to(in_ty).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    dst = dst_ptr + h * stride_dh + d
    ty = dst_ptr.dtype.element_ty
    tl.store(dst, o1.to(ty), mask=mask)
    tl.store(dst + HALF, o2.to(ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    cache_ptr,
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    qw_ptr,
    kw_ptr,
    eps,
    stride_cache,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    CACHE_BLOCK: tl.constexpr,
    STORE_KV: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)  # see ops/pdl.py
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < HALF
    # Row layout cos|cos|sin|sin: the first half's cos at [0, HALF), its sin at [2*HALF, 3*HALF).
    row = cache_ptr + pos * stride_cache
    ty = q_ptr.dtype.element_ty
    cos = tl.load(row + d, mask=dmask, other=0.0).to(ty).to(tl.float32)  # rounded like the torch path
    sin = tl.load(row + 2 * HALF + d, mask=dmask, other=0.0).to(ty).to(tl.float32)

    q_blocks = (HQ + BLOCK_H - 1) // BLOCK_H
    if hb < q_blocks:
        _rotate_block(
            q_ptr + t * stride_qt, qo_ptr + t * stride_qot, stride_qh, stride_qoh, hb * BLOCK_H, HQ,
            cos, sin, qw_ptr, eps, HALF, BLOCK_H, BLOCK_HALF, HAS_NORM,
        )
    elif STORE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            h0 = (hb - q_blocks) * BLOCK_H
            kc_row = kc_ptr + (slot // CACHE_BLOCK) * stride_kcb + (slot % CACHE_BLOCK) * stride_kcs
            _rotate_block(
                k_ptr + t * stride_kt, kc_row, stride_kh, stride_kch, h0, HK,
                cos, sin, kw_ptr, eps, HALF, BLOCK_H, BLOCK_HALF, HAS_NORM,
            )
            # The same heads' values, unchanged, into the value cache.
            h = h0 + tl.arange(0, BLOCK_H)[:, None]
            vmask = (h < HK) & dmask
            v_src = v_ptr + t * stride_vt + h * stride_vh + d
            vc_dst = vc_ptr + (slot // CACHE_BLOCK) * stride_vcb + (slot % CACHE_BLOCK) * stride_vcs + h * stride_vch + d
            vty = vc_ptr.dtype.element_ty
            tl.store(vc_dst, tl.load(v_src, mask=vmask).to(vty), mask=vmask)
            tl.store(vc_dst + HALF, tl.load(v_src + HALF, mask=vmask).to(vty), mask=vmask)
    else:
        _rotate_block(
            k_ptr + t * stride_kt, ko_ptr + t * stride_kot, stride_kh, stride_koh, (hb - q_blocks) * BLOCK_H, HK,
            cos, sin, kw_ptr, eps, HALF, BLOCK_H, BLOCK_HALF, HAS_NORM,
        )


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    inplace: bool = False,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    kv_store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    t, hq, d = q.shape
    hk = k.shape[1]
    assert k.shape == (t, hk, d) and positions.shape == (t,), (q.shape, k.shape, positions.shape)
    assert q.dtype == k.dtype and d % 2 == 0, (q.dtype, k.dtype, d)
    assert cos_sin_cache.shape[-1] == 2 * d and cos_sin_cache.stride(-1) == 1, (cos_sin_cache.shape, d)
    has_norm = q_weight is not None
    if has_norm:
        assert k_weight is not None and q_weight.shape == (d,) and k_weight.shape == (d,), (q_weight, k_weight)
        # The norm's output dtype is promote(weight, x) in torch; the kernel writes x's dtype.
        assert q_weight.dtype == q.dtype and k_weight.dtype == k.dtype, (q_weight.dtype, k_weight.dtype, q.dtype)
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    # Without kv_store the store arguments are placeholders the kernel never reads.
    store = dict(v_ptr=q, kc_ptr=q, vc_ptr=q, slot_ptr=positions, stride_vt=0, stride_vh=0, stride_kcb=0,
                 stride_kcs=0, stride_kch=0, stride_vcb=0, stride_vcs=0, stride_vch=0, CACHE_BLOCK=16, STORE_KV=False)
    if kv_store is not None:
        v, k_cache, v_cache, slots = kv_store
        _, cache_block, hkv_c, d_c = k_cache.shape
        assert (hkv_c, d_c) == (hk, d) and v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape, k.shape)
        assert v.shape == k.shape and slots.shape == (t,), (v.shape, k.shape, slots.shape)
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and v.stride(-1) == 1
        assert not inplace, "kv_store writes k into the cache: nothing to rotate in place"
        store = dict(
            v_ptr=v, kc_ptr=k_cache, vc_ptr=v_cache, slot_ptr=slots, stride_vt=v.stride(0), stride_vh=v.stride(1),
            stride_kcb=k_cache.stride(0), stride_kcs=k_cache.stride(1), stride_kch=k_cache.stride(2),
            stride_vcb=v_cache.stride(0), stride_vcs=v_cache.stride(1), stride_vch=v_cache.stride(2),
            CACHE_BLOCK=cache_block, STORE_KV=True,
        )
    if inplace:
        assert q.stride(-1) == 1 and k.stride(-1) == 1, "in-place rotary needs a contiguous head dim"
        q_out, k_out = q, k
    else:
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = None if kv_store is not None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(TILE_ELEMS // block_half, triton.next_power_of_2(max(hq, hk))))
    grid = (t, triton.cdiv(hq, block_h) + triton.cdiv(hk, block_h))
    num_warps = max(1, min(8, block_h * block_half // 256))
    launch(_rotary_kernel, grid,
        positions,
        cos_sin_cache,
        q,
        k,
        q_out,
        q_out if k_out is None else k_out,  # unused with kv_store
        q_weight if has_norm else q,
        k_weight if has_norm else k,
        eps,
        cos_sin_cache.stride(0),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        0 if k_out is None else k_out.stride(0),
        0 if k_out is None else k_out.stride(1),
        HQ=hq,
        HK=hk,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        HAS_NORM=has_norm,
        num_warps=num_warps,
        **store,
        **launch_options(use_pdl(q)),
    )
    return q_out, k_out
