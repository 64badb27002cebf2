"""Triton KV-store and paged-attention kernels under the Triton interpreter, vs the torch reference."""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib
import math

import pytest
import torch

import triton  # noqa: F401  (a missing or broken interpreter must fail these tests, not skip)
from triton.runtime.interpreter import InterpretedFunction

import distllm.ops.triton_kv_store as _tks
import distllm.ops.triton_paged_attention as _tpa

# If another test module imported the kernels before TRITON_INTERPRET was set, they were
# compiled for a GPU: re-decorate them for the interpreter.
if not isinstance(_tpa._paged_attn_kernel, InterpretedFunction):
    importlib.reload(_tks)
    importlib.reload(_tpa)

from distllm.ops import dispatch
from distllm.ops.paged_attention import paged_attention_ref, store_kv_ref


def store_kv(*args, **kwargs):
    return _tks.store_kv(*args, **kwargs)


def paged_attention(*args, **kwargs):
    return _tpa.paged_attention(*args, **kwargs)


TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 1e-2)}


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any()
    atol, rtol = TOL[dtype]
    err = (out.float() - ref.float()).abs().max().item()
    rel = err / max(ref.float().abs().max().item(), 1e-6)
    if dtype == torch.float32:
        assert err <= atol, err
    else:
        assert rel <= rtol, (err, rel)


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    """Another module (tests/gpu/conftest.py) may have switched the kernels to compiled mode."""
    os.environ["TRITON_INTERPRET"] = "1"
    if not isinstance(_tpa._paged_attn_kernel, InterpretedFunction):
        importlib.reload(_tks)
        importlib.reload(_tpa)
    yield
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


def _make_batch(seqs, block_size, h, hkv, d, dtype, gen, extra_blocks=3):
    """seqs: list of (cached_prefix_len, new_tokens). Random caches, scattered block tables."""
    nblk = [math.ceil((c + n) / block_size) for c, n in seqs]
    num_blocks = sum(nblk) + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(max(nblk), 1) + 1
    # Unused table entries point at a real (other) block: the kernel must not read them.
    block_tables = torch.full((len(seqs), max_blocks), int(perm[-1]), dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        block_tables[b, :n] = perm[i : i + n].to(torch.int32)
        i += n
    q_lens = [n for _, n in seqs]
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
    T = int(qsl[-1])
    q = torch.randn(T, h, d, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, block_tables, seq_lens, qsl


def _slots(seqs, block_tables, block_size):
    out = []
    for b, (c, n) in enumerate(seqs):
        for pos in range(c, c + n):
            out.append(int(block_tables[b, pos // block_size]) * block_size + pos % block_size)
    return torch.tensor(out, dtype=torch.int64)


def test_interpreter_is_active():
    for fn in (_tpa._paged_attn_kernel, _tpa._split_reduce_kernel, _tks._store_kv_kernel):
        assert isinstance(fn, InterpretedFunction), type(fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size,hkv,d", [(8, 2, 32), (16, 1, 64), (16, 2, 80)])
def test_store_kv(dtype, block_size, hkv, d):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    T, num_blocks = 11, 4
    # key/value as strided views of a fused qkv projection output
    qkv = torch.randn(T, 4 * hkv, d, generator=gen).to(dtype)
    key, value = qkv[:, 2 * hkv : 3 * hkv], qkv[:, 3 * hkv :]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[[1, 5, 10]] = -1
    k0 = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    v0 = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    kc, vc, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    store_kv(key, value, kc, vc, slots)
    store_kv_ref(key, value, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    # padded tokens wrote nothing: every row not named by a valid slot is unchanged
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(kc.view(-1, hkv, d)[untouched], k0.view(-1, hkv, d)[untouched])
    assert torch.equal(vc.view(-1, hkv, d)[untouched], v0.view(-1, hkv, d)[untouched])


# a decode, a fresh prefill, a prefill chunk on top of a cached prefix, another decode
MIXED = [(20, 1), (0, 13), (19, 7), (8, 1)]


@pytest.mark.parametrize(
    "dtype,block_size,h,hkv,d",
    [
        (torch.float32, 16, 4, 2, 64),
        (torch.float32, 8, 4, 1, 32),
        (torch.float16, 8, 4, 2, 32),
        (torch.bfloat16, 16, 4, 1, 64),
        (torch.float32, 8, 6, 2, 80),  # group of 3 (padded to 4), head dim 80 (padded to 128)
    ],
)
def test_paged_attention_mixed(dtype, block_size, h, hkv, d):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q, kc, vc, bt, sl, qsl = _make_batch(MIXED, block_size, h, hkv, d, dtype, gen)
    scale = d**-0.5
    out = paged_attention(q, kc, vc, bt, sl, qsl, scale, causal=True)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, scale, causal=True)
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_decode_only(dtype):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    seqs = [(37, 1), (0, 1), (15, 1), (70, 1), (16, 1)]
    q, kc, vc, bt, sl, qsl = _make_batch(seqs, 16, 4, 2, 64, dtype, gen)
    out = paged_attention(q, kc, vc, bt, sl, qsl, 0.125, max_query_len=1, max_seq_len=71)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.125)
    _check(out, ref, dtype)


@pytest.mark.parametrize("kvh_fast", [False, True])
@pytest.mark.parametrize("num_splits", [1, 2, 3])  # 3: past LONG_WALK_MAX_SPLITS
def test_paged_attention_one_token_grid(monkeypatch, kvh_fast, num_splits):
    """Decode batches take one program a sequence (no tile search): idle sequences with no new
    token among real ones, either grid order, with and without split-KV."""
    monkeypatch.setattr(_tpa, "KVH_FAST", kvh_fast)
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    seqs = [(37, 1), (0, 0), (15, 1), (70, 1), (0, 0), (16, 1)]
    q, kc, vc, bt, sl, qsl = _make_batch(seqs, 16, 4, 2, 64, torch.float32, gen)
    sl[1] = sl[4] = 0
    out = paged_attention(q, kc, vc, bt, sl, qsl, 0.125, max_query_len=1, max_seq_len=71, num_splits=num_splits)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.125)
    _check(out, ref, torch.float32)


@pytest.mark.parametrize("num_splits", [2, 3])
def test_paged_attention_split_kv(num_splits):
    """Flash-decoding path (forced): decodes and causal chunks with some empty splits."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    seqs = [(60, 1), (3, 1), (0, 9), (40, 5)]
    q, kc, vc, bt, sl, qsl = _make_batch(seqs, 8, 4, 2, 32, torch.float32, gen)
    out = paged_attention(q, kc, vc, bt, sl, qsl, 0.2, num_splits=num_splits)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.2)
    _check(out, ref, torch.float32)


def test_paged_attention_split_kv_most_splits_empty(monkeypatch):
    """16 splits over contexts of 3 to 60 keys (a CUDA graph's split count is made for the
    longest context): splits past a context write no acc, and the reduce must not read one,
    here NaN-filled garbage."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    seqs = [(60, 1), (3, 1), (0, 9), (40, 5)]
    q, kc, vc, bt, sl, qsl = _make_batch(seqs, 8, 4, 2, 32, torch.float32, gen)
    monkeypatch.setattr(torch, "empty", nan_empty)
    out = paged_attention(q, kc, vc, bt, sl, qsl, 0.2, num_splits=16)
    monkeypatch.undo()
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.2)
    assert not out.isnan().any()
    _check(out, ref, torch.float32)


def test_paged_attention_non_causal_and_empty_seq():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    # an idle (padding) sequence with no new tokens sits between real ones
    seqs = [(5, 6), (0, 0), (0, 10), (30, 1)]
    q, kc, vc, bt, sl, qsl = _make_batch(seqs, 8, 4, 2, 32, torch.float32, gen)
    sl[1] = 0
    out = paged_attention(q, kc, vc, bt, sl, qsl, 0.2, causal=False)
    ref = paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.2, causal=False)
    _check(out, ref, torch.float32)


def test_dispatch_store_then_attend(monkeypatch):
    """Write a prefill chunk's K/V through dispatch, then attend over prefix + chunk."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    seqs = [(12, 5), (9, 1)]
    bs, h, hkv, d = 8, 4, 2, 32
    q, kc, vc, bt, sl, qsl = _make_batch(seqs, bs, h, hkv, d, torch.float32, gen)
    T = q.shape[0]
    key = torch.randn(T + 2, hkv, d, generator=gen)  # 2 padding tokens at the end
    value = torch.randn(T + 2, hkv, d, generator=gen)
    slots = torch.cat([_slots(seqs, bt, bs), torch.tensor([-1, -1])])
    kr, vr = kc.clone(), vc.clone()
    store_kv_ref(key, value, kr, vr, slots)
    ref = paged_attention_ref(q, kr, vr, bt, sl, qsl, 0.3)

    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    assert dispatch.use_triton(q)
    dispatch.store_kv(key, value, kc, vc, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)
    out = dispatch.paged_attention(q, kc, vc, bt, sl, qsl, 0.3, max_query_len=5, max_seq_len=17)
    _check(out, ref, torch.float32)

    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "0")
    assert not dispatch.use_triton(q)
    out2 = dispatch.paged_attention(q, kc, vc, bt, sl, qsl, 0.3)
    _check(out2, ref, torch.float32)


def test_split_kv_rule(monkeypatch):
    """About four (tile, kv head, split) programs an SM, each split at least one KV-loop block
    (the best counts of bench_attention.py --split-sweep on an H200); prefill never splits."""
    import types

    monkeypatch.setattr(_tpa, "_sm_count", lambda index: 132)
    q = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0))

    def splits(batch: int, ctx: int, kv_heads: int = 8, max_query_len: int = 1) -> int:
        return _tpa._choose_splits(q, batch * kv_heads, max_query_len, ctx, None)

    assert splits(1, 256) == 4  # one 64-key block a split
    assert splits(1, 1024) == 16
    assert splits(1, 32768) == _tpa.MAX_SPLITS
    assert splits(4, 2048) == 16  # 528 // 32 programs, capped by the blocks
    assert splits(32, 4096) == 2
    assert splits(64, 4096) == 1 and splits(256, 1024) == 1
    assert splits(1, 4096, max_query_len=17) == 1
