"""Triton KV store and paged attention on CUDA vs the torch reference (bigger shapes)."""

import math

import pytest
import torch

from distllm.ops import dispatch
from distllm.ops import triton_paged_attention as tpa
from distllm.ops.paged_attention import paged_attention_ref, store_kv_ref
from distllm.ops.triton_kv_store import store_kv

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _rel_err(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any() and not torch.isinf(out).any()
    err = (out.float() - ref.float()).abs().max().item()
    return err / max(ref.float().abs().max().item(), 1e-6)


def _make_batch(seqs, block_size, h, hkv, d, dtype, seed):
    """seqs: list of (cached_prefix_len, new_tokens); scattered block tables, random caches."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nblk = [math.ceil((c + n) / block_size) for c, n in seqs]
    num_blocks = sum(nblk) + 4
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(nblk) + 2
    block_tables = torch.full((len(seqs), max_blocks), int(perm[-1]), dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        block_tables[b, :n] = perm[i : i + n].to(torch.int32)
        i += n
    q_lens = torch.tensor([n for _, n in seqs])
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
    T = int(qsl[-1])
    torch.manual_seed(seed)
    q = torch.randn(T, h, d, device=DEV, dtype=dtype)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, device=DEV, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, device=DEV, dtype=dtype)
    return q, k_cache, v_cache, block_tables.to(DEV), seq_lens.to(DEV), qsl.to(DEV)


def _run_and_check(seqs, block_size, h, hkv, d, dtype, seed, causal=True, num_splits=None, tol=1e-2):
    q, kc, vc, bt, sl, qsl = _make_batch(seqs, block_size, h, hkv, d, dtype, seed)
    scale = d**-0.5
    out = tpa.paged_attention(
        q, kc, vc, bt, sl, qsl, scale, causal,
        max_query_len=max(n for _, n in seqs), max_seq_len=max(c + n for c, n in seqs), num_splits=num_splits,
    )
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, scale, causal)
    torch.cuda.synchronize()
    rel = _rel_err(out, ref)
    assert rel <= tol, rel
    return rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hkv,d", [(8, 8 * 16), (8, 64), (2, 128)])
def test_store_kv_gpu(dtype, hkv, d):
    torch.manual_seed(0)
    T, num_blocks, block_size = 700, 64, 16
    qkv = torch.randn(T, 4 * hkv, d, device=DEV, dtype=dtype)
    key, value = qkv[:, 2 * hkv : 3 * hkv], qkv[:, 3 * hkv :]
    slots = torch.randperm(num_blocks * block_size, device=DEV)[:T]
    slots[::7] = -1
    k0 = torch.randn(num_blocks, block_size, hkv, d, device=DEV, dtype=dtype)
    v0 = torch.randn_like(k0)
    kc, vc, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    store_kv(key, value, kc, vc, slots)
    store_kv_ref(key, value, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_batch64(dtype, d):
    g = torch.Generator().manual_seed(d)
    ctx = torch.randint(1, 4096, (64,), generator=g).tolist()
    ctx[0], ctx[1] = 4095, 0  # one at the longest context, one with nothing cached
    seqs = [(c, 1) for c in ctx]
    _run_and_check(seqs, 16, 32, 8, d, dtype, seed=1)


@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode_small_batch_split_kv(num_splits):
    seqs = [(4000, 1), (1500, 1), (33, 1)]
    _run_and_check(seqs, 16, 32, 8, 128, torch.bfloat16, seed=2, num_splits=num_splits)


def test_split_auto_choice():
    q = torch.empty(2, 32, 128, device=DEV, dtype=torch.bfloat16)
    assert tpa._choose_splits(q, 2 * 8, 1, 8192, None) > 1
    assert tpa._choose_splits(q, 64 * 8, 1, 8192, None) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_mixed_prefill_decode(dtype, d):
    g = torch.Generator().manual_seed(3)
    seqs = [(500, 1000), (0, 777), (1200, 1)] + [(int(c), 1) for c in torch.randint(1, 3000, (29,), generator=g)]
    seqs.insert(5, (2000, 64))  # a chunk in the middle of the decodes
    _run_and_check(seqs, 16, 32, 8, d, dtype, seed=4)


@pytest.mark.parametrize("num_splits", [None, 4])
def test_eight_warps_same_results(num_splits, monkeypatch):
    """DISTLLM_PAGED_ATTN_WARPS=8 (no register spills at head dim 128 on sm_90): prefill chunks
    and decodes as the reference computes them, split or not."""
    monkeypatch.setattr(tpa, "FORCED_WARPS", 8)
    seqs = [(500, 1000), (0, 777), (1200, 1), (2000, 64)] + [(c, 1) for c in (5, 300, 2900)]
    _run_and_check(seqs, 16, 32, 8, 128, torch.bfloat16, seed=6)
    _run_and_check([(c, 1) for c in (7, 640, 3000)], 16, 32, 8, 128, torch.bfloat16, seed=7, num_splits=num_splits)


@pytest.mark.parametrize(
    "h,hkv,d,block_size",
    [(8, 8, 256, 16), (32, 4, 96, 16), (12, 4, 80, 32), (16, 2, 128, 8), (16, 16, 32, 64)],
)
def test_other_shapes(h, hkv, d, block_size):
    seqs = [(300, 200), (0, 1), (1000, 1), (0, 129), (64, 17)]
    _run_and_check(seqs, block_size, h, hkv, d, torch.bfloat16, seed=5)


def test_non_causal_and_fp32():
    seqs = [(0, 300), (100, 50), (900, 1)]
    _run_and_check(seqs, 16, 8, 2, 64, torch.bfloat16, seed=6, causal=False)
    _run_and_check(seqs, 16, 8, 2, 64, torch.float32, seed=6, tol=1e-3)


def test_dispatch_on_cuda():
    seqs = [(100, 20), (50, 1)]
    q, kc, vc, bt, sl, qsl = _make_batch(seqs, 16, 8, 2, 64, torch.bfloat16, seed=7)
    assert dispatch.use_triton(q)
    out = dispatch.paged_attention(q, kc, vc, bt, sl, qsl, 0.125, max_query_len=20, max_seq_len=120)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.125)
    assert _rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("batch", [4, 48])
def test_decode_cuda_graph(batch):
    """Decode captured once (host ints fixed, no syncs), replayed with other context lengths."""
    bs, h, hkv, d, max_len = 16, 32, 8, 128, 2048
    seqs = [(100 + 7 * i, 1) for i in range(batch)]
    q, kc, vc, bt, sl, qsl = _make_batch([(max_len - 1, 1)] * batch, bs, h, hkv, d, torch.bfloat16, seed=8)
    sl.copy_(torch.tensor([c + 1 for c, _ in seqs], dtype=torch.int32))
    kwargs = dict(max_query_len=1, max_seq_len=max_len)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            tpa.paged_attention(q, kc, vc, bt, sl, qsl, d**-0.5, **kwargs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tpa.paged_attention(q, kc, vc, bt, sl, qsl, d**-0.5, **kwargs)
    for trial in range(3):
        lens = torch.randint(1, max_len + 1, (batch,))
        sl.copy_(lens.to(torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, d**-0.5)
        torch.cuda.synchronize()
        assert _rel_err(out, ref) <= 1e-2, trial


@pytest.mark.parametrize("B,V", [(1, 49152), (1, 128256), (7, 151936), (256, 32000), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_kernel_matches_torch(B, V, dtype):
    from distllm.ops.triton_argmax import argmax_last_dim

    g = torch.Generator(device="cuda").manual_seed(B + V)
    x = (torch.randn(B, V, device="cuda", generator=g) * 5).to(dtype)
    x[0, V // 3] = x[0, V // 2] = x[0].max() + 1  # a tie: the first index wins
    assert torch.equal(argmax_last_dim(x), x.argmax(dim=-1))


@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norms"])
@pytest.mark.parametrize("t,hq,hk,d", [(1, 32, 8, 128), (300, 16, 8, 128), (7, 9, 3, 64)])
def test_rotary_with_kv_store_matches_rotary_then_store(t, hq, hk, d, norm):
    from distllm.layers.rotary import RotaryEmbedding
    from distllm.ops import triton_rotary

    bf = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(t + d)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV, dtype=bf, generator=g)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d :].view(t, hk, d)
    w = dict(q_weight=torch.rand(d, device=DEV, dtype=bf, generator=g) + 0.5,
             k_weight=torch.rand(d, device=DEV, dtype=bf, generator=g) + 0.5, eps=1e-6) if norm else {}
    cache = RotaryEmbedding(d, 4096, 10000.0).to(DEV).cos_sin_cache
    pos = torch.randint(0, 4096, (t,), device=DEV, generator=g)
    nb, bs = 64, 16
    slots = torch.randperm(nb * bs, device=DEV, generator=g)[:t]
    slots[0] = -1
    kc, vc = torch.randn(nb, bs, hk, d, device=DEV, dtype=bf, generator=g), torch.randn(nb, bs, hk, d, device=DEV, dtype=bf, generator=g)
    want_k, want_v = kc.clone(), vc.clone()
    q_want, k_rot = triton_rotary.rotary_embedding(pos, q, k, cache, **w)
    store_kv(k_rot, v, want_k, want_v, slots)
    q_out, k_out = triton_rotary.rotary_embedding(pos, q, k, cache, kv_store=(v, kc, vc, slots), **w)
    assert k_out is None and torch.equal(q_out, q_want)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
