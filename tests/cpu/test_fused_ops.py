"""Triton RMSNorm / rotary / SiLU-and-mul under the Triton interpreter vs the torch references,
and the layers' dispatch (CPU output unchanged; DISTLLM_DISABLE_FUSED_OPS forces torch)."""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib

import pytest
import torch
import torch.nn.functional as F

import triton  # noqa: F401  (a missing or broken interpreter must fail these tests, not skip)
from triton.runtime.interpreter import InterpretedFunction

import distllm.ops.triton_activation as _tact
import distllm.ops.triton_norm as _tnorm
import distllm.ops.triton_rotary as _trot
from distllm.layers.activation import SiluAndMul
from distllm.layers.norm import RMSNorm
from distllm.layers.rotary import RotaryEmbedding
from distllm.ops import dispatch
from distllm.ops.fused_ref import fused_add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_and_mul_ref

_MODS = (_tnorm, _trot, _tact)


def _reload_if_compiled():
    # Kernels decorated before TRITON_INTERPRET was set (another module, or tests/gpu/conftest.py
    # switching them back) are compiled-mode: re-decorate them for the interpreter.
    for mod, kernel in ((_tnorm, "_rms_norm_kernel"), (_trot, "_rotary_kernel"), (_tact, "_silu_and_mul_kernel")):
        if not isinstance(getattr(mod, kernel), InterpretedFunction):
            importlib.reload(mod)


_reload_if_compiled()


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    os.environ["TRITON_INTERPRET"] = "1"
    _reload_if_compiled()
    yield
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _assert_close(out, ref, dtype, rounds_like_torch=True):
    """fp32: a few float32 ulps (only the order of the sum of squares / exp differs).
    fp16: one rounding step of the output per element, and most elements bit-identical, when
    the kernel rounds its intermediates where torch does (rounds_like_torch). Rotary rounds
    once where torch rounds each product (x*cos, rot*sin, then the sum), so an output that
    cancels may be off by one step of the products: allow a step of the row's largest value.
    bf16: the interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even), so
    each rounding in a kernel may be a step off, compounding in the residual sum: allow two
    steps of the largest value, no exact-match count (tests/gpu checks bf16 compiled)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    o, r = out.float(), ref.float()
    assert torch.isfinite(o).all()
    if dtype == torch.float32:
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
        return
    ulp = torch.finfo(dtype).eps  # relative size of one rounding step
    steps = 2 if dtype == torch.bfloat16 else 1
    floor = r.abs().max() if (dtype == torch.bfloat16 or not rounds_like_torch) else 0.0
    err = (o - r).abs()
    assert (err <= steps * ulp * (r.abs() + floor) + 1e-3).all(), err.max()
    if dtype == torch.float16 and rounds_like_torch:
        # Most elements must be bit-identical: a systematic bug would break far more.
        assert (o == r).float().mean() >= 0.95, (o == r).float().mean()


def _assert_sum_equal(out, ref, dtype):
    """x + residual is one rounding of the exact sum in both (truncation in the bf16 interpreter)."""
    if dtype == torch.bfloat16:
        _assert_close(out, ref, dtype)
    else:
        assert torch.equal(out, ref)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (3, 576), (5, 80), (2, 4, 96), (3, 5, 128), (7,)])
def test_rms_norm(shape, dtype):
    g = _gen(hash((shape, str(dtype))) % 2**31)
    x = _rand(shape, dtype, g, 2.0)
    w = _rand(shape[-1:], dtype, g) + 1.0
    out = _tnorm.rms_norm(x, w, 1e-6)
    _assert_close(out, rms_norm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (4, 576), (3, 80), (2, 3, 96)])
def test_fused_add_rms_norm(shape, dtype):
    g = _gen(7 + len(shape))
    x, res = _rand(shape, dtype, g, 3.0), _rand(shape, dtype, g)
    w = _rand(shape[-1:], dtype, g) + 1.0
    out, new_res = _tnorm.fused_add_rms_norm(x, res, w, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-5)
    _assert_sum_equal(new_res, ref_res, dtype)
    _assert_close(out, ref_out, dtype)


@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_chunked_path(residual):
    """Rows longer than one tile take the two-pass path; force it on a short row (576 = 4.5 x 128)."""
    g = _gen(3)
    x, res = _rand((3, 576), torch.float32, g), _rand((3, 576), torch.float32, g)
    w = _rand((576,), torch.float32, g)
    assert _tnorm._launch_config(576, 3, 128)[2] == 5  # really chunked
    if residual:
        out, new_res = _tnorm.fused_add_rms_norm(x, res, w, 1e-6, block_n=128)
        ref_out, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
        assert torch.equal(new_res, ref_res)
    else:
        out, ref_out = _tnorm.rms_norm(x, w, 1e-6, block_n=128), rms_norm_ref(x, w, 1e-6)
    _assert_close(out, ref_out, torch.float32)


def test_rms_norm_strided_heads():
    """Qwen3 q/k norm: [T, H, D] views of a fused qkv row (row stride != H * D)."""
    g = _gen(11)
    t, hq, hk, d = 5, 4, 2, 96
    qkv = _rand((t, (hq + 2 * hk) * d), torch.float32, g)
    q = qkv[:, : hq * d].reshape(t, hq, d)  # view, stride (row, d, 1)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(t, hk, d)
    assert q.stride(0) == (hq + 2 * hk) * d and not q.is_contiguous()
    w = _rand((d,), torch.float32, g)
    for x in (q, k):
        _assert_close(_tnorm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), torch.float32)


def test_rms_norm_packs_rows_and_masks_tail():
    """Several short rows per program with a row count that does not fill the last tile."""
    rows, block, chunks, _ = _tnorm._launch_config(80, 37, None)
    assert rows > 1 and chunks == 1 and 37 % rows != 0
    g = _gen(5)
    x = _rand((37, 80), torch.float32, g, 4.0)
    w = _rand((80,), torch.float32, g)
    _assert_close(_tnorm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), torch.float32)


def test_rms_norm_mixed_weight_dtype():
    """Output dtype follows torch promotion (fp32 weight on bf16 activations -> fp32)."""
    g = _gen(9)
    x = _rand((3, 64), torch.bfloat16, g)
    w = _rand((64,), torch.float32, g)
    out = _tnorm.rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    _assert_close(out, rms_norm_ref(x, w, 1e-6), torch.bfloat16)  # one bf16 rounding inside


# ----------------------------------------------------------------------------- rotary


def _cache(head_dim, max_pos=64, base=10000.0, scaling=None):
    return RotaryEmbedding(head_dim, max_pos, base, scaling).cos_sin_cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,hq,hk,d", [(5, 4, 2, 64), (3, 6, 2, 80), (4, 3, 1, 96), (1, 8, 8, 32)])
def test_rotary(t, hq, hk, d, dtype):
    g = _gen(t * 100 + d)
    cache = _cache(d, scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16})
    positions = torch.randperm(64, generator=g)[:t]  # not in order
    q, k = _rand((t, hq, d), dtype, g), _rand((t, hk, d), dtype, g)
    q0, k0 = q.clone(), k.clone()
    qo, ko = _trot.rotary_embedding(positions, q, k, cache)
    qr, kr = rotary_ref(positions, q, k, cache)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # out of place leaves the inputs alone
    _assert_close(qo, qr, dtype, rounds_like_torch=False)
    _assert_close(ko, kr, dtype, rounds_like_torch=False)


def test_rotary_inplace_on_qkv_views():
    """In place on strided views of a fused qkv buffer; v (after k) must be untouched."""
    g = _gen(21)
    t, hq, hk, d = 6, 4, 2, 64
    qkv = _rand((t, (hq + 2 * hk) * d), torch.float32, g)
    orig = qkv.clone()
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    positions = torch.tensor([9, 3, 0, 63, 17, 17], dtype=torch.int32)
    qr, kr = rotary_ref(positions, q.clone(), k.clone(), _cache(d))
    qo, ko = _trot.rotary_embedding(positions, q, k, _cache(d), inplace=True)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    _assert_close(q, qr, torch.float32)
    _assert_close(k, kr, torch.float32)
    assert torch.equal(qkv[:, (hq + hk) * d :], orig[:, (hq + hk) * d :])


def test_rotary_many_heads_split_over_programs():
    """More q heads than one program's tile: several head blocks for q, one for k."""
    d = 64
    bh = max(1, _trot.TILE_ELEMS // triton.next_power_of_2(d // 2))
    hq, hk = 2 * bh + 3, 3
    g = _gen(4)
    positions = torch.tensor([5, 1])
    q, k = _rand((2, hq, d), torch.float32, g), _rand((2, hk, d), torch.float32, g)
    qo, ko = _trot.rotary_embedding(positions, q, k, _cache(d))
    qr, kr = rotary_ref(positions, q, k, _cache(d))
    _assert_close(qo, qr, torch.float32)
    _assert_close(ko, kr, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,hq,hk,d", [(5, 4, 2, 64), (3, 6, 2, 80), (2, 3, 1, 96)])
def test_qk_norm_rotary(t, hq, hk, d, dtype):
    """Qwen3: per-head RMSNorm of q and k (own weights) fused into the rotary kernel, on strided
    qkv views; against rms_norm_ref then rotary_ref, and against the two Triton kernels chained."""
    g = _gen(t * 31 + d)
    qkv = _rand((t, (hq + 2 * hk) * d), dtype, g, 3.0)
    q = qkv[:, : hq * d].reshape(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(t, hk, d)
    qw, kw = _rand((d,), dtype, g) + 1, _rand((d,), dtype, g) + 1
    positions = torch.randperm(64, generator=g)[:t]
    cache = _cache(d)
    qo, ko = _trot.rotary_embedding(positions, q, k, cache, q_weight=qw, k_weight=kw, eps=1e-6)
    qr, kr = rotary_ref(positions, rms_norm_ref(q, qw, 1e-6), rms_norm_ref(k, kw, 1e-6), cache)
    _assert_close(qo, qr, dtype, rounds_like_torch=False)
    _assert_close(ko, kr, dtype, rounds_like_torch=False)
    # Same roundings as the unfused kernels: only the order of the sum of squares differs.
    qc, kc = _trot.rotary_embedding(positions, _tnorm.rms_norm(q, qw, 1e-6), _tnorm.rms_norm(k, kw, 1e-6), cache)
    if dtype == torch.float32:
        torch.testing.assert_close(qo, qc, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ko, kc, rtol=1e-5, atol=1e-6)
    else:
        assert (qo == qc).float().mean() >= 0.95 and (ko == kc).float().mean() >= 0.95


def test_qk_norm_rotary_uses_each_weight():
    """q and k heads must take their own weights (a swap would pass with equal weights)."""
    g = _gen(77)
    t, hq, hk, d = 3, 2, 2, 32
    q, k = _rand((t, hq, d), torch.float32, g), _rand((t, hk, d), torch.float32, g)
    qw, kw = torch.full((d,), 2.0), torch.full((d,), 0.5)
    positions = torch.tensor([0, 5, 9])
    qo, ko = _trot.rotary_embedding(positions, q, k, _cache(d), q_weight=qw, k_weight=kw, eps=1e-6)
    qr, kr = rotary_ref(positions, rms_norm_ref(q, qw, 1e-6), rms_norm_ref(k, kw, 1e-6), _cache(d))
    _assert_close(qo, qr, torch.float32)
    _assert_close(ko, kr, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norms"])
@pytest.mark.parametrize("t,hq,hk,d", [(5, 4, 2, 64), (3, 6, 2, 80), (4, 9, 3, 64)])
def test_rotary_with_kv_store(t, hq, hk, d, dtype, norm):
    """kv_store: the rotated keys and the values go into the paged cache at their slots (padded
    slots skipped, other slots untouched), exactly what rotary then store_kv would write; q as
    without the store; no k is returned."""
    from distllm.ops.paged_attention import store_kv_ref

    g = _gen(t * 7 + d + norm)
    qkv = _rand((t, (hq + 2 * hk) * d), dtype, g, 3.0)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d :].view(t, hk, d)
    w = dict(q_weight=_rand((d,), dtype, g) + 1, k_weight=_rand((d,), dtype, g) + 1, eps=1e-6) if norm else {}
    positions = torch.randperm(64, generator=g)[:t]
    block_size, num_blocks = 16, 6
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[1] = -1  # a padded row of a graph batch
    k_cache = _rand((num_blocks, block_size, hk, d), dtype, g)
    v_cache = _rand((num_blocks, block_size, hk, d), dtype, g)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    q_want, k_rot = _trot.rotary_embedding(positions, q, k, _cache(d), **w)
    store_kv_ref(k_rot, v, want_k, want_v, slots)
    q_out, k_out = _trot.rotary_embedding(positions, q, k, _cache(d), kv_store=(v, k_cache, v_cache, slots), **w)
    assert k_out is None
    assert torch.equal(q_out, q_want)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_attention_forward_rotary_fused_matches_unfused(monkeypatch):
    """The layer path: Attention.forward_rotary with the fused kernel (DISTLLM_FORCE_TRITON) gives
    the same output and cache as rotary, then store, then attention, each on its own."""
    from distllm.layers.attention import Attention, AttentionMetadata, forward_context

    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    g = _gen(5)
    t, hq, hk, d, bs = 3, 4, 2, 64, 16
    rope = RotaryEmbedding(d, 128, 10000.0)
    q, k, v = _rand((t, hq, d), torch.float32, g), _rand((t, hk, d), torch.float32, g), _rand((t, hk, d), torch.float32, g)
    positions = torch.tensor([0, 1, 2])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([16, 17, 18]), block_tables=torch.tensor([[1]], dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32), query_start_loc=torch.tensor([0, 3], dtype=torch.int32),
        max_query_len=3, max_seq_len=3, fresh_prefill_only=True,
    )
    attn = Attention(0, hq, hk, d, d**-0.5)
    outs, caches = [], []
    for fused in (True, False):
        kv = [(torch.zeros(4, bs, hk, d), torch.zeros(4, bs, hk, d))]
        with forward_context(meta, kv):
            if fused:
                out = attn.forward_rotary(positions, q, k, v, rope)
            else:
                qr, kr = rope(positions, q, k)
                out = attn(qr.reshape(t, -1), kr.reshape(t, -1), v.reshape(t, -1))
        outs.append(out)
        caches.append(kv[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0][0], caches[1][0], rtol=1e-6, atol=1e-6)
    assert torch.equal(caches[0][1], caches[1][1])


# ----------------------------------------------------------------------------- SiLU-and-mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 7), (5, 2 * 96), (3, 2 * 1500), (2, 3, 2 * 33)])
def test_silu_and_mul(shape, dtype):
    g = _gen(shape[-1])
    x = _rand(shape, dtype, g, 3.0)
    _assert_close(_tact.silu_and_mul(x), silu_and_mul_ref(x), dtype)


# ----------------------------------------------------------------------------- layers and dispatch


def _old_rms_norm(x, w, eps, residual=None):
    """The layer's torch code before this change, verbatim."""
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    out = w * x32.to(dtype)
    return out if residual is None else (out, x)


def _old_rotary(cache, head_dim, positions, q, k):
    cs = cache.index_select(0, positions)
    cos, sin = cs[:, None, :head_dim].to(q.dtype), cs[:, None, head_dim:].to(q.dtype)

    def apply(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    return apply(q), apply(k)


def _head_norms(dtype):
    qn, kn = RMSNorm(64, 1e-6, dtype), RMSNorm(64, 1e-6, dtype)
    qn.weight.data.copy_(torch.linspace(0.5, 1.5, 64).to(dtype))
    kn.weight.data.copy_(torch.linspace(1.5, 0.5, 64).to(dtype))
    return qn, kn


def _layers(dtype, seed=0):
    g = _gen(seed)
    norm = RMSNorm(96, 1e-6, dtype)
    norm.weight.data.copy_(_rand((96,), dtype, g) + 1)
    rope = RotaryEmbedding(64, 128, 500000.0, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32})
    x, res = _rand((5, 96), dtype, g), _rand((5, 96), dtype, g)
    q, k = _rand((5, 4, 64), dtype, g), _rand((5, 2, 64), dtype, g)
    pos = torch.tensor([4, 0, 100, 7, 7])
    gu = _rand((5, 2 * 50), dtype, g)
    return norm, rope, x, res, q, k, pos, gu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_on_cpu_are_unchanged(monkeypatch, dtype):
    """Default CPU path: bit-identical to the pre-change torch code."""
    monkeypatch.delenv("DISTLLM_FORCE_TRITON", raising=False)
    monkeypatch.delenv("DISTLLM_DISABLE_FUSED_OPS", raising=False)
    norm, rope, x, res, q, k, pos, gu = _layers(dtype)
    assert not dispatch.use_fused_ops(x)
    assert torch.equal(norm(x), _old_rms_norm(x, norm.weight, 1e-6))
    out, new_res = norm(x, res)
    ref_out, ref_res = _old_rms_norm(x, norm.weight, 1e-6, res)
    assert torch.equal(out, ref_out) and torch.equal(new_res, ref_res)
    qo, ko = rope(pos, q, k)
    qr, kr = _old_rotary(rope.cos_sin_cache, 64, pos, q, k)
    assert torch.equal(qo, qr) and torch.equal(ko, kr)
    d = gu.shape[-1] // 2
    assert torch.equal(SiluAndMul()(gu), F.silu(gu[:, :d]) * gu[:, d:])
    qn, kn = _head_norms(dtype)
    qo, ko = rope.forward_qk_norm(pos, q, k, qn, kn)
    qr, kr = _old_rotary(rope.cos_sin_cache, 64, pos, _old_rms_norm(q, qn.weight, 1e-6), _old_rms_norm(k, kn.weight, 1e-6))
    assert torch.equal(qo, qr) and torch.equal(ko, kr)


def _spy(monkeypatch, mod, name, calls):
    real = getattr(mod, name)

    def wrapped(*a, **kw):
        calls.append(name)
        return real(*a, **kw)

    monkeypatch.setattr(mod, name, wrapped)


@pytest.mark.parametrize("disable", [False, True])
def test_layers_switch(monkeypatch, disable):
    """DISTLLM_FORCE_TRITON routes the layers to the kernels (interpreted here);
    DISTLLM_DISABLE_FUSED_OPS=1 sends them back to torch even then."""
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    monkeypatch.setenv("DISTLLM_DISABLE_FUSED_OPS", "1" if disable else "0")
    calls: list[str] = []
    _spy(monkeypatch, _tnorm, "rms_norm", calls)
    _spy(monkeypatch, _tnorm, "fused_add_rms_norm", calls)
    _spy(monkeypatch, _trot, "rotary_embedding", calls)
    _spy(monkeypatch, _tact, "silu_and_mul", calls)
    norm, rope, x, res, q, k, pos, gu = _layers(torch.float32, seed=1)
    assert dispatch.use_fused_ops(x) is not disable
    out = norm(x)
    out2, new_res = norm(x, res)
    qo, ko = rope(pos, q, k)
    act = SiluAndMul()(gu)
    qn, kn = _head_norms(torch.float32)
    qno, kno = rope.forward_qk_norm(pos, q, k, qn, kn)
    expected = [] if disable else ["rms_norm", "fused_add_rms_norm", "rotary_embedding", "silu_and_mul", "rotary_embedding"]
    assert calls == expected
    qnr, knr = _old_rotary(rope.cos_sin_cache, 64, pos, _old_rms_norm(q, qn.weight, 1e-6), _old_rms_norm(k, kn.weight, 1e-6))
    _assert_close(qno, qnr, torch.float32)
    _assert_close(kno, knr, torch.float32)
    _assert_close(out, _old_rms_norm(x, norm.weight, 1e-6), torch.float32)
    ref_out, ref_res = _old_rms_norm(x, norm.weight, 1e-6, res)
    _assert_close(out2, ref_out, torch.float32)
    assert torch.equal(new_res, ref_res)
    qr, kr = _old_rotary(rope.cos_sin_cache, 64, pos, q, k)
    _assert_close(qo, qr, torch.float32)
    _assert_close(ko, kr, torch.float32)
    _assert_close(act, silu_and_mul_ref(gu), torch.float32)


def test_qk_norm_rotary_mixed_dtype_falls_back(monkeypatch):
    """fp32 norm weights on bf16 q/k promote to fp32 in torch: not fusable, so the layer runs the
    norms then the rotary (kernels here), and the result follows torch's promotion."""
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    monkeypatch.delenv("DISTLLM_DISABLE_FUSED_OPS", raising=False)
    _, rope, _, _, q, k, pos, _ = _layers(torch.bfloat16, seed=3)
    qn, kn = _head_norms(torch.float32)
    qo, ko = rope.forward_qk_norm(pos, q, k, qn, kn)
    assert qo.dtype == torch.float32 and ko.dtype == torch.float32
    qr, kr = _old_rotary(rope.cos_sin_cache, 64, pos, _old_rms_norm(q, qn.weight, 1e-6), _old_rms_norm(k, kn.weight, 1e-6))
    _assert_close(qo, qr, torch.bfloat16, rounds_like_torch=False)
    _assert_close(ko, kr, torch.bfloat16, rounds_like_torch=False)
