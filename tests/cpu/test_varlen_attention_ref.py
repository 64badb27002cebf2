"""varlen_attention_ref: consecutive sequences of one length as one batched call (the GPU's way)
equal one call per sequence (the CPU reference's way)."""

import pytest
import torch

from distllm.ops.paged_attention import _equal_length_runs, varlen_attention_ref


def test_equal_length_runs():
    assert _equal_length_runs([0, 5, 10, 15, 22, 29, 32, 37]) == [(0, 5, 3), (15, 7, 2), (29, 3, 1), (32, 5, 1)]
    assert _equal_length_runs([0, 0, 4, 4]) == [(0, 0, 1), (0, 4, 1), (4, 0, 1)]
    assert _equal_length_runs([0]) == []


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,hkv", [(8, 2), (4, 4)])
def test_batched_equals_per_sequence(causal, h, hkv):
    g = torch.Generator().manual_seed(3)
    lens = [5, 5, 5, 7, 7, 0, 3, 5, 1, 1]
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t, d = sum(lens), 16
    q, k, v = (torch.randn(t, n, d, generator=g, dtype=torch.float64) for n in (h, hkv, hkv))
    one_by_one = varlen_attention_ref(q, k, v, qsl, 0.25, causal, batch_equal_lengths=False)
    batched = varlen_attention_ref(q, k, v, qsl, 0.25, causal, batch_equal_lengths=True)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-12, atol=1e-12)
    # and the first sequence alone is plain causal SDPA over its own tokens
    qt, kt, vt = q[:5].transpose(0, 1), k[:5].repeat_interleave(h // hkv, 1).transpose(0, 1), \
        v[:5].repeat_interleave(h // hkv, 1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=0.25).transpose(0, 1)
    torch.testing.assert_close(batched[:5], want, rtol=1e-12, atol=1e-12)
