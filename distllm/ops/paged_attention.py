"""Paged attention and KV store: the plain-torch reference.

This is the CPU implementation and the oracle the Triton kernels are tested against.

Layouts (shared with the Triton kernels):
  q:            [num_tokens, num_heads, head_dim]     all scheduled tokens of the batch, packed
  key/value:    [num_tokens, num_kv_heads, head_dim]
  k/v cache:    [num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping: [num_tokens] int64, block_id * block_size + offset; -1 = padding, not stored
  block_tables: [batch, max_blocks_per_seq] int32
  seq_lens:     [batch] int32, context length after this step (cached prefix + new tokens)
  query_start_loc: [batch + 1] int32, cumulative new-token counts (query b is
                   q[query_start_loc[b]:query_start_loc[b+1]]), its tokens are the last
                   q_len positions of the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    if bool((slot_mapping < 0).any()):
        valid = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    # [num_blocks * block_size, hkv, d] views of the caches, so a slot indexes one row.
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q [..., q_len, H, D], k/v [..., kv_len, Hkv, D] (the same leading dims, if any); the
    queries are the last q_len kv positions."""
    q_len, h, _ = q.shape[-3:]
    kv_len, hkv, _ = k.shape[-3:]
    if hkv != h:
        # GQA: each kv head serves h // hkv query heads.
        k = k.repeat_interleave(h // hkv, dim=-2)
        v = v.repeat_interleave(h // hkv, dim=-2)
    qt, kt, vt = q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)  # [..., H, len, D]
    mask = None
    if causal and q_len > 1:
        qpos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
        kpos = torch.arange(kv_len, device=q.device)[None, :]
        mask = kpos <= qpos  # [q_len, kv_len]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(-3, -2)  # [..., q_len, H, D]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
) -> torch.Tensor:
    block_size, hkv, d = k_cache.shape[1:]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, kv_len in enumerate(lens):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        nb = (kv_len + block_size - 1) // block_size
        blocks = block_tables[b, :nb].long()
        # [nb, block_size, hkv, d] -> [nb * block_size, hkv, d], cut to the context length
        k = k_cache[blocks].reshape(-1, hkv, d)[:kv_len]
        v = v_cache[blocks].reshape(-1, hkv, d)[:kv_len]
        out[s:e] = _attend(q[s:e], k, v, scale, causal).to(out.dtype)
    return out


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool,
    batch_equal_lengths: bool | None = None,
) -> torch.Tensor:
    """Attention within packed sequences, no cache (encoders, and prefills of fresh prompts).
    ``batch_equal_lengths`` (default: on CUDA tensors) runs consecutive sequences of one length
    as one batched call."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    if q.is_cuda if batch_equal_lengths is None else batch_equal_lengths:
        # On a GPU, consecutive sequences of one length share one batched call: the memory
        # profile's forward packs max_num_seqs such sequences, and one call per sequence and
        # layer took seconds of launches at every start (8B: 256 x 32 SDPA calls). The CPU,
        # the reference path, keeps one call per sequence.
        runs = _equal_length_runs(starts)
    else:
        runs = [(starts[b], starts[b + 1] - starts[b], 1) for b in range(len(starts) - 1)]
    for s, n, count in runs:
        if n == 0:
            continue
        e = s + n * count
        shape = (count, n) + q.shape[1:]  # [count * n, H, D] -> [count, n, H, D]
        got = _attend(q[s:e].view(shape), k[s:e].view((count, n) + k.shape[1:]),
                      v[s:e].view((count, n) + v.shape[1:]), scale, causal)
        out[s:e] = got.reshape(count * n, *q.shape[1:]).to(out.dtype)
    return out


def _equal_length_runs(starts: list[int]) -> list[tuple[int, int, int]]:
    """(start, length, count): maximal runs of consecutive sequences of the same length."""
    runs: list[tuple[int, int, int]] = []
    for b in range(len(starts) - 1):
        n = starts[b + 1] - starts[b]
        if runs and runs[-1][1] == n:
            s, _, c = runs[-1]
            runs[-1] = (s, n, c + 1)
        else:
            runs.append((starts[b], n, 1))
    return runs


def decode_mask(seq_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, 1, 1, L] bool: which cached positions each decoding sequence attends to."""
    m = torch.arange(max_len, device=seq_lens.device)[None, :] < seq_lens[:, None].to(torch.long)
    return m[:, None, None, :]


def paged_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence (q [B, H, D]): the whole batch in one masked SDPA call,
    which on CPU beats one call per sequence by the number of sequences."""
    b, h, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    g = h // hkv
    bt = block_tables.long()
    # [B, M, block_size, Hkv, D] -> [B, Hkv, M * block_size, D]
    k = k_cache[bt].reshape(b, -1, hkv, d).transpose(1, 2)
    v = v_cache[bt].reshape(b, -1, hkv, d).transpose(1, 2)
    if mask is None:
        mask = decode_mask(seq_lens, k.shape[2])
    qg = q.view(b, hkv, g, d)  # query head h uses kv head h // g
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, h, d)
