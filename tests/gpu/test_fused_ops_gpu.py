"""Triton RMSNorm / rotary / SiLU-and-mul compiled on CUDA vs the torch references (bf16, real
shapes), their use inside CUDA graphs, and the layers' dispatch on CUDA tensors."""

import pytest
import torch

from distllm.layers.activation import SiluAndMul
from distllm.layers.norm import RMSNorm
from distllm.layers.rotary import RotaryEmbedding
from distllm.ops import dispatch
from distllm.ops import triton_activation as tact
from distllm.ops import triton_norm as tnorm
from distllm.ops import triton_rotary as trot
from distllm.ops.fused_ref import fused_add_rms_norm_ref, rms_norm_ref, rotary_ref, silu_and_mul_ref

pytestmark = pytest.mark.gpu

DEV = "cuda"
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def _rel_err(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    return err / max(ref.float().abs().max().item(), 1e-6)


def _bit_fraction(out, ref):
    return (out == ref).float().mean().item()


@pytest.mark.parametrize("t", [1, 7, 512])
@pytest.mark.parametrize("hidden", [4096, 576, 8192])
def test_rms_norm_bf16(t, hidden):
    torch.manual_seed(t + hidden)
    x = torch.randn(t, hidden, device=DEV, dtype=torch.bfloat16) * 3
    res = torch.randn(t, hidden, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(hidden, device=DEV, dtype=torch.bfloat16) * 0.2 + 1
    out = tnorm.rms_norm(x, w, 1e-5)
    ref = rms_norm_ref(x, w, 1e-5)
    assert _rel_err(out, ref) <= 1e-2
    assert _bit_fraction(out, ref) >= 0.95  # same roundings as torch; only the sum order differs
    out, new_res = tnorm.fused_add_rms_norm(x, res, w, 1e-5)
    ref, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-5)
    assert torch.equal(new_res, ref_res)
    assert _rel_err(out, ref) <= 1e-2
    assert _bit_fraction(out, ref) >= 0.95


def test_rms_norm_fp32_tight_and_chunked():
    torch.manual_seed(0)
    x = torch.randn(9, 20000, device=DEV)  # > MAX_SINGLE_BLOCK: the two-pass path
    res = torch.randn_like(x)
    w = torch.randn(20000, device=DEV)
    assert tnorm._launch_config(20000, 9, None)[2] > 1
    torch.testing.assert_close(tnorm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    out, new_res = tnorm.fused_add_rms_norm(x, res, w, 1e-6)
    ref, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(new_res, ref_res)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 7, 512])
@pytest.mark.parametrize("d", [64, 128])
def test_qk_head_norm_bf16(t, d):
    """Qwen3's q/k norm on [T, H, D] strided views of the fused qkv output."""
    torch.manual_seed(d + t)
    hq, hk = 32, 8
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV, dtype=torch.bfloat16)
    q = qkv[:, : hq * d].reshape(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(t, hk, d)
    w = torch.randn(d, device=DEV, dtype=torch.bfloat16) * 0.2 + 1
    for x in (q, k):
        out, ref = tnorm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
        assert _rel_err(out, ref) <= 1e-2 and _bit_fraction(out, ref) >= 0.95


@pytest.mark.parametrize("t", [1, 7, 512])
@pytest.mark.parametrize("d", [64, 128])
def test_rotary_bf16(t, d):
    torch.manual_seed(t * d)
    hq, hk = 32, 8
    rope = RotaryEmbedding(d, 131072, 500000.0, LLAMA3_SCALING).to(DEV)
    positions = torch.randint(0, 131072, (t,), device=DEV)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV, dtype=torch.bfloat16)
    q = qkv[:, : hq * d].reshape(t, hq, d)  # strided views, as the model passes them
    k = qkv[:, hq * d : (hq + hk) * d].reshape(t, hk, d)
    qr, kr = rotary_ref(positions, q, k, rope.cos_sin_cache)
    qo, ko = trot.rotary_embedding(positions, q, k, rope.cos_sin_cache)
    assert _rel_err(qo, qr) <= 1e-2 and _rel_err(ko, kr) <= 1e-2
    q2, k2 = trot.rotary_embedding(positions, q, k, rope.cos_sin_cache, inplace=True)
    assert q2.data_ptr() == q.data_ptr() and torch.equal(q2, qo) and torch.equal(k2, ko)


@pytest.mark.parametrize("t", [1, 7, 512])
@pytest.mark.parametrize("d", [64, 128])
def test_qk_norm_rotary_bf16(t, d):
    """Qwen3's q/k norms fused into the rotary kernel vs the torch chain and the unfused kernels."""
    torch.manual_seed(t + 3 * d)
    hq, hk = 32, 8
    cache = RotaryEmbedding(d, 40960, 1000000.0).to(DEV).cos_sin_cache
    positions = torch.randint(0, 40960, (t,), device=DEV)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV, dtype=torch.bfloat16) * 2
    q = qkv[:, : hq * d].reshape(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(t, hk, d)
    qw = torch.randn(d, device=DEV, dtype=torch.bfloat16) * 0.2 + 1
    kw = torch.randn(d, device=DEV, dtype=torch.bfloat16) * 0.2 + 1
    qo, ko = trot.rotary_embedding(positions, q, k, cache, q_weight=qw, k_weight=kw, eps=1e-6)
    qr, kr = rotary_ref(positions, rms_norm_ref(q, qw, 1e-6), rms_norm_ref(k, kw, 1e-6), cache)
    assert _rel_err(qo, qr) <= 1e-2 and _rel_err(ko, kr) <= 1e-2
    qc, kc = trot.rotary_embedding(positions, tnorm.rms_norm(q, qw, 1e-6), tnorm.rms_norm(k, kw, 1e-6), cache)
    assert _bit_fraction(qo, qc) >= 0.95 and _bit_fraction(ko, kc) >= 0.95


@pytest.mark.parametrize("t", [1, 7, 512])
@pytest.mark.parametrize("d", [14336, 3072, 1537])
def test_silu_and_mul_bf16(t, d):
    torch.manual_seed(t + d)
    x = torch.randn(t, 2 * d, device=DEV, dtype=torch.bfloat16) * 3
    out, ref = tact.silu_and_mul(x), silu_and_mul_ref(x)
    assert _rel_err(out, ref) <= 1e-2
    assert _bit_fraction(out, ref) >= 0.95


def test_layers_dispatch_on_cuda(monkeypatch):
    """On CUDA the layers take the kernels; DISTLLM_DISABLE_FUSED_OPS=1 sends them to torch."""
    monkeypatch.delenv("DISTLLM_FORCE_TORCH", raising=False)
    torch.manual_seed(1)
    norm = RMSNorm(4096, 1e-5, torch.bfloat16).to(DEV)
    norm.weight.data.normal_(1.0, 0.1)
    rope = RotaryEmbedding(128, 4096, 500000.0, LLAMA3_SCALING).to(DEV)
    x = torch.randn(7, 4096, device=DEV, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    q = torch.randn(7, 32, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(7, 8, 128, device=DEV, dtype=torch.bfloat16)
    pos = torch.randint(0, 4096, (7,), device=DEV)
    gu = torch.randn(7, 2 * 14336, device=DEV, dtype=torch.bfloat16)

    def run_all():
        return [norm(x), *norm(x, res), *rope(pos, q, k), SiluAndMul()(gu)]

    monkeypatch.setenv("DISTLLM_DISABLE_FUSED_OPS", "0")
    assert dispatch.use_fused_ops(x)
    fused = run_all()
    monkeypatch.setenv("DISTLLM_DISABLE_FUSED_OPS", "1")
    assert not dispatch.use_fused_ops(x)
    ref = run_all()
    for o, r in zip(fused, ref):
        assert _rel_err(o, r) <= 1e-2


def test_cuda_graph_capture_and_replay():
    """The ops capture into a CUDA graph and, replayed on new inputs, match the references."""
    torch.manual_seed(2)
    t, hidden, hq, hk, d, inter = 8, 4096, 32, 8, 128, 14336
    bf = torch.bfloat16
    norm_w = torch.randn(hidden, device=DEV, dtype=bf) * 0.1 + 1
    qn_w = torch.randn(d, device=DEV, dtype=bf) * 0.1 + 1
    cache = RotaryEmbedding(d, 4096, 500000.0, LLAMA3_SCALING).to(DEV).cos_sin_cache
    x = torch.randn(t, hidden, device=DEV, dtype=bf)
    res = torch.randn_like(x)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV, dtype=bf)
    pos = torch.randint(0, 4096, (t,), device=DEV)
    gu = torch.randn(t, 2 * inter, device=DEV, dtype=bf)

    def step():
        a = tnorm.rms_norm(x, norm_w, 1e-5)
        b, r = tnorm.fused_add_rms_norm(x, res, norm_w, 1e-5)
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
        q = tnorm.rms_norm(q, qn_w, 1e-6)
        qo, ko = trot.rotary_embedding(pos, q, k, cache)
        qn, kn = trot.rotary_embedding(pos, qkv[:, : hq * d].view(t, hq, d), k, cache, q_weight=qn_w, k_weight=qn_w)
        return a, b, r, qo, ko, tact.silu_and_mul(gu), qn, kn

    def reference():
        a = rms_norm_ref(x, norm_w, 1e-5)
        b, r = fused_add_rms_norm_ref(x, res, norm_w, 1e-5)
        q = rms_norm_ref(qkv[:, : hq * d].view(t, hq, d), qn_w, 1e-6)
        k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
        qo, ko = rotary_ref(pos, q, k, cache)
        qn, kn = rotary_ref(pos, q, rms_norm_ref(k, qn_w, 1e-6), cache)
        return a, b, r, qo, ko, silu_and_mul_ref(gu), qn, kn

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):  # new data in the captured input buffers, then replay
        for buf in (x, res, qkv, gu):
            buf.normal_()
        pos.random_(0, 4096)
        graph.replay()
        torch.cuda.synchronize()
        for o, r in zip(outs, reference()):
            assert _rel_err(o, r) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_embedding_gpu(dtype):
    """The vocab-parallel lookup kernel against the torch path (exact: a copy or zeros)."""
    from distllm.ops import triton_embedding

    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(64128, 4096, device="cuda", generator=g).to(dtype)
    start, end = 64128, 128256
    ids = torch.tensor([[0, 64127, 64128, 70000], [128255, 5, 100000, 64129]], device="cuda")
    out = triton_embedding.masked_embedding(ids, weight, start, end)
    mask = (ids >= start) & (ids < end)
    want = torch.nn.functional.embedding(torch.where(mask, ids - start, 0), weight) * mask.unsqueeze(-1).to(dtype)
    assert torch.equal(out, want)
