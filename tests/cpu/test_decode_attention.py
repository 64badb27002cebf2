"""The fused decode attention (rotary + KV store + paged attention + split reduce in one kernel)
under the Triton interpreter, against the torch references run one after the other."""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib

import pytest
import torch

import triton  # noqa: F401  (a missing or broken interpreter must fail these tests, not skip)
from triton.runtime.interpreter import InterpretedFunction

import distllm.ops.triton_decode_attention as _tda
import distllm.ops.triton_paged_attention as _tpa
import distllm.ops.triton_rotary as _trot
from distllm.ops.fused_ref import rms_norm_ref, rotary_ref
from distllm.ops.paged_attention import paged_attention_ref, store_kv_ref


def _reload_if_compiled():
    for mod, kernel in ((_tpa, "_paged_attn_kernel"), (_trot, "_rotary_kernel"), (_tda, "_decode_attn_kernel")):
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


def _cos_sin(d, max_pos=512):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat([f.cos(), f.cos(), f.sin(), f.sin()], dim=-1)


def _decode_batch(seq_lens, hq, hk, d, dtype, gen, block_size=16, pad_rows=0):
    """A decode batch over random caches with scattered block tables. The qkv rows are one
    [B, (hq + 2 hk) d] tensor (q, k, v are its views, as in the model). The last ``pad_rows``
    rows are CUDA-graph padding: context 1, slot -1."""
    lens = list(seq_lens) + [1] * pad_rows
    b = len(lens)
    nblk = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(nblk) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((b, max(nblk) + 1), int(perm[-1]), dtype=torch.int32)
    i = 0
    for r, n in enumerate(nblk):
        block_tables[r, :n] = perm[i : i + n].to(torch.int32)
        i += n
    seq_lens_t = torch.tensor(lens, dtype=torch.int32)
    positions = seq_lens_t.long() - 1
    slots = torch.tensor([int(block_tables[r, p // block_size]) * block_size + p % block_size
                          for r, p in enumerate(positions.tolist())])
    if pad_rows:
        slots[-pad_rows:] = -1
    qkv = (torch.randn(b, (hq + 2 * hk) * d, generator=gen) * 2).to(dtype)
    q = qkv[:, : hq * d].view(b, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(b, hk, d)
    v = qkv[:, (hq + hk) * d :].view(b, hk, d)
    k_cache = torch.randn(num_blocks, block_size, hk, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hk, d, generator=gen).to(dtype)
    return q, k, v, positions, slots, block_tables, seq_lens_t, k_cache, v_cache


def _reference(q, k, v, positions, slots, block_tables, seq_lens, k_cache, v_cache, scale, norm):
    """Rotary (after the q/k norms), store, attention: the unfused path with torch references."""
    d = q.shape[-1]
    if norm:
        q, k = rms_norm_ref(q, norm["q_weight"], norm["eps"]), rms_norm_ref(k, norm["k_weight"], norm["eps"])
    qr, kr = rotary_ref(positions, q, k, _cos_sin(d))
    store_kv_ref(kr, v, k_cache, v_cache, slots)
    qsl = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    return paged_attention_ref(qr, k_cache, v_cache, block_tables, seq_lens, qsl, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norms"])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 64), (6, 2, 32)])
def test_decode_attention_matches_unfused(hq, hk, d, num_splits, norm, dtype):
    """Contexts of 1 to 3 KV blocks (64 keys each) under 1-5 splits, so some splits are empty and
    some sequences end mid-block; a padded row; the caches, the output and the counters."""
    g = torch.Generator().manual_seed(hq * 100 + d + num_splits + 7 * norm)
    q, k, v, pos, slots, bt, lens, kc, vc = _decode_batch([1, 17, 70, 130], hq, hk, d, dtype, g, pad_rows=1)
    w = dict(q_weight=(torch.randn(d, generator=g) + 1).to(dtype), k_weight=(torch.randn(d, generator=g) + 1).to(dtype),
             eps=1e-6) if norm else {}
    scale = d**-0.5
    want_k, want_v = kc.clone(), vc.clone()
    want = _reference(q, k, v, pos, slots, bt, lens, want_k, want_v, scale, w)
    out = _tda.decode_attention(q, k, v, pos, _cos_sin(d), kc, vc, slots, bt, lens, scale, 130,
                                num_splits=num_splits, **w)
    real = slice(0, 4)  # the padded row attends to its own new key only: not the reference's
    if dtype == torch.float32:
        torch.testing.assert_close(out[real], want[real], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kc, want_k, rtol=1e-5, atol=1e-5)
    else:
        # bf16: the interpreter truncates fp32 -> bf16 where the references round, in q, k and
        # the probabilities: error relative to the largest output (tests/gpu checks compiled bf16).
        o, r = out[real].float(), want[real].float()
        assert (o - r).abs().max() <= 3e-2 * r.abs().max(), ((o - r).abs().max(), r.abs().max())
        torch.testing.assert_close(kc.float(), want_k.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(vc, want_v)
    if num_splits > 1:
        assert int(_tda._counter_buffer(q.device).abs().sum()) == 0, "counters must be left at zero"


def test_decode_attention_long_split_walks_several_blocks():
    """One split covering several KV blocks (the loop after the peeled first block)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, pos, slots, bt, lens, kc, vc = _decode_batch([200, 5], 4, 1, 32, torch.float32, g)
    want_k, want_v = kc.clone(), vc.clone()
    want = _reference(q, k, v, pos, slots, bt, lens, want_k, want_v, 32**-0.5, {})
    for splits in (1, 2):
        kc2, vc2 = kc.clone(), vc.clone()
        out = _tda.decode_attention(q, k, v, pos, _cos_sin(32), kc2, vc2, slots, bt, lens, 32**-0.5, 256,
                                    num_splits=splits)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kc2, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_batch, takes_fused", [(3, True), (2, False)])
def test_attention_layer_decode_fused_matches_unfused(monkeypatch, max_batch, takes_fused):
    """Attention.forward_rotary on a decode batch (DISTLLM_FORCE_TRITON) of at most MAX_BATCH
    sequences takes the fused kernel, a larger one the unfused path (rotary + store, then
    attention), and both give the same output and caches."""
    from distllm.layers.attention import Attention, AttentionMetadata, forward_context
    from distllm.layers.rotary import RotaryEmbedding

    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    g = torch.Generator().manual_seed(11)
    hq, hk, d = 4, 2, 64
    q, k, v, pos, slots, bt, lens, kc, vc = _decode_batch([9, 40, 66], hq, hk, d, torch.float32, g)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=bt, seq_lens=lens,
                             query_start_loc=torch.arange(4, dtype=torch.int32), max_query_len=1, max_seq_len=66)
    rope = RotaryEmbedding(d, 512, 10000.0)
    attn = Attention(0, hq, hk, d, d**-0.5)
    calls = []
    monkeypatch.setattr(_tda, "MAX_BATCH", max_batch)
    monkeypatch.setattr(_tda, "decode_attention", lambda *a, **kw: calls.append(1) or _real(*a, **kw))
    outs, caches = [], []
    for fused in (True, False):
        monkeypatch.setattr(_tda, "ENABLED", fused)
        kv = [(kc.clone(), vc.clone())]
        with forward_context(meta, kv):
            outs.append(attn.forward_rotary(pos, q, k, v, rope))
        caches.append(kv[0])
    assert calls == ([1] if takes_fused else []), "the fused kernel: once, only when enabled and within MAX_BATCH"
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[0][0], caches[1][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(caches[0][1], caches[1][1])


_real = _tda.decode_attention
