"""The fused decode attention compiled on CUDA (PDL on where the card has it) against the
three-kernel path it replaces (rotary + KV store, paged attention, split reduce), eager and
replayed in a CUDA graph."""

import pytest
import torch

from distllm.ops import triton_decode_attention as tda
from distllm.ops import triton_paged_attention as tpa
from distllm.ops import triton_rotary

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _cos_sin(d, max_pos=4096):
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat([f.cos(), f.cos(), f.sin(), f.sin()], dim=-1).to(DEV)


def _batch(lens, hq, hk, d, seed, block_size=16, pad_rows=0, num_blocks=None, width=None):
    g = torch.Generator().manual_seed(seed)
    lens = list(lens) + [1] * pad_rows
    b = len(lens)
    nblk = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = num_blocks or sum(nblk) + 4
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.full((b, width or max(nblk) + 2), int(perm[-1]), dtype=torch.int32)
    i = 0
    for r, n in enumerate(nblk):
        bt[r, :n] = perm[i : i + n].to(torch.int32)
        i += n
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    pos = seq_lens.long() - 1
    slots = torch.tensor([int(bt[r, p // block_size]) * block_size + p % block_size for r, p in enumerate(pos.tolist())])
    if pad_rows:
        slots[-pad_rows:] = -1
    qkv = (torch.randn(b, (hq + 2 * hk) * d, generator=g) * 2).to(torch.bfloat16).to(DEV)
    kc = torch.randn(num_blocks, block_size, hk, d, generator=g).to(torch.bfloat16).to(DEV)
    vc = torch.randn(num_blocks, block_size, hk, d, generator=g).to(torch.bfloat16).to(DEV)
    q = qkv[:, : hq * d].view(b, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(b, hk, d)
    v = qkv[:, (hq + hk) * d :].view(b, hk, d)
    return q, k, v, pos.to(DEV), slots.to(DEV), bt.to(DEV), seq_lens.to(DEV), kc, vc


def _unfused(q, k, v, pos, slots, bt, lens, kc, vc, scale, max_len, splits, w):
    q_rot, _ = triton_rotary.rotary_embedding(pos, q, k, _cos_sin(q.shape[-1]), kv_store=(v, kc, vc, slots), **w)
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=DEV)
    return tpa.paged_attention(q_rot, kc, vc, bt, lens, qsl, scale, max_query_len=1, max_seq_len=max_len,
                               num_splits=splits)


def _rel(out, ref):
    assert torch.isfinite(out.float()).all()
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norms"])
@pytest.mark.parametrize("hq,hk,d", [(32, 8, 128), (16, 4, 128), (9, 3, 64)])
@pytest.mark.parametrize("splits", [None, 1, 3, 8, 32])
def test_fused_decode_matches_three_kernels(hq, hk, d, splits, norm):
    _check_fused_decode(hq, hk, d, splits, norm)


@pytest.mark.parametrize("splits", [None, 1, 8])
def test_fused_decode_with_eight_warps(splits, monkeypatch):
    """DISTLLM_DECODE_ATTN_WARPS=8 (no register spills at head dim 128 on sm_90) computes the same."""
    monkeypatch.setattr(tda, "NUM_WARPS", 8)
    _check_fused_decode(32, 8, 128, splits, True)
    _check_fused_decode(32, 8, 128, splits, False)


def _check_fused_decode(hq, hk, d, splits, norm):
    lens = [1, 37, 64, 65, 128, 513, 2000]
    q, k, v, pos, slots, bt, seq_lens, kc, vc = _batch(lens, hq, hk, d, seed=hq + d + (splits or 0), pad_rows=2)
    w = {}
    if norm:
        w = dict(q_weight=torch.rand(d, device=DEV).to(torch.bfloat16) + 0.5,
                 k_weight=torch.rand(d, device=DEV).to(torch.bfloat16) + 0.5, eps=1e-6)
    scale = d**-0.5
    want_k, want_v = kc.clone(), vc.clone()
    want = _unfused(q, k, v, pos, slots, bt, seq_lens, want_k, want_v, scale, 2048, splits, w)
    out = tda.decode_attention(q, k, v, pos, _cos_sin(d), kc, vc, slots, bt, seq_lens, scale, 2048,
                               num_splits=splits, **w)
    torch.cuda.synchronize()
    real = slice(0, len(lens))
    assert _rel(out[real], want[real]) <= 1e-2
    torch.testing.assert_close(kc.float(), want_k.float(), rtol=1.6e-2, atol=1e-2)
    assert torch.equal(vc, want_v)
    assert int(tda._counter_buffer(q.device).abs().sum()) == 0


def test_fused_decode_in_cuda_graph_replays():
    """Captured once with a grid made for 2048 keys, replayed over changing contexts: each replay
    equals the eager three-kernel path, and the split counters stay consistent across replays."""
    hq, hk, d = 32, 8, 128
    fixed = dict(num_blocks=300, width=130)  # static shapes across replays
    q, k, v, pos, slots, bt, seq_lens, kc, vc = _batch([100, 700, 1500], hq, hk, d, seed=1, **fixed)
    static = [t.clone() for t in (q, k, v, pos, slots, bt, seq_lens)]
    sq, sk, sv, spos, sslots, sbt, slens = static
    cs = _cos_sin(d)
    kc_g = kc.clone()
    vc_g = vc.clone()
    tda.decode_attention(sq, sk, sv, spos, cs, kc_g, vc_g, sslots, sbt, slens, d**-0.5, 2048)  # warm-up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out_g = tda.decode_attention(sq, sk, sv, spos, cs, kc_g, vc_g, sslots, sbt, slens, d**-0.5, 2048)
    for step, lens in enumerate([[100, 700, 1500], [33, 2000, 64], [1, 1, 1200]]):
        q, k, v, pos, slots, bt, seq_lens, kc, vc = _batch(lens, hq, hk, d, seed=10 + step, **fixed)
        for dst, src in zip(static, (q, k, v, pos, slots, bt, seq_lens)):
            dst.copy_(src)
        kc_g.copy_(kc)
        vc_g.copy_(vc)
        g.replay()
        want = _unfused(q, k, v, pos, slots, bt, seq_lens, kc, vc, d**-0.5, 2048, None, {})
        torch.cuda.synchronize()
        assert _rel(out_g, want) <= 1e-2, step
        assert torch.equal(vc_g, vc)
    assert int(tda._counter_buffer(q.device).abs().sum()) == 0


@pytest.mark.parametrize("n,k", [(14336, 4096), (7168, 4096), (1536, 576), (3072, 1024)])
def test_gate_up_gemv_matches_cublas(n, k):
    """The gate/up GEMV with its SiLU epilogue against cuBLAS then the SiLU-and-mul kernel (bf16)."""
    from distllm.ops import dispatch, triton_gemv

    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(DEV)
    w = (torch.randn(2 * n, k, generator=g) / k**0.5).to(torch.bfloat16).to(DEV)
    fused = triton_gemv.gemv_gate_up(x, w)
    want = dispatch.silu_and_mul(torch.nn.functional.linear(x, w))
    torch.cuda.synchronize()
    assert _rel(fused, want) <= 1e-2
