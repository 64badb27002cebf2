"""The vocab-parallel embedding lookup kernel (ops/triton_embedding.py) under the Triton
interpreter against the torch path, and VocabParallelEmbedding's unsummed part (reduce=False)."""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib

import pytest
import torch

import triton  # noqa: F401  (a missing or broken interpreter must fail these tests, not skip)
from triton.runtime.interpreter import InterpretedFunction

import distllm.ops.triton_embedding as _temb
from distllm.layers.embedding import VocabParallelEmbedding
from distllm.ops import dispatch


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    os.environ["TRITON_INTERPRET"] = "1"
    if not isinstance(_temb._masked_lookup_kernel, InterpretedFunction):
        importlib.reload(_temb)
    yield
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


def _reference(ids, weight, start, end):
    out = torch.zeros(*ids.shape, weight.shape[1], dtype=weight.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in ids.shape]).view(-1, ids.dim()):
        tok = int(ids[tuple(idx)])
        if start <= tok < end:
            out[tuple(idx)] = weight[tok - start]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 96, 1500])
def test_kernel_matches_reference(dtype, d):
    g = torch.Generator().manual_seed(d)
    rows, start = 37, 40
    weight = torch.randn(rows, d, generator=g).to(dtype)
    # ids below, inside and above this rank's slice [40, 77), both ends included
    ids = torch.tensor([[0, 39, 40, 41], [76, 77, 1000, 55]])
    out = _temb.masked_embedding(ids, weight, start, start + rows)
    assert out.shape == (2, 4, d) and out.dtype == dtype
    assert torch.equal(out, _reference(ids, weight, start, start + rows))


def test_dispatch_paths_agree(monkeypatch):
    weight = torch.randn(10, 32)
    ids = torch.tensor([3, 9, 10, 25, 0])
    torch_path = dispatch.masked_embedding(ids, weight, 5, 15)  # CPU tensors: the torch path
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    calls = []
    real = _temb.masked_embedding
    monkeypatch.setattr(_temb, "masked_embedding", lambda *a: calls.append(1) or real(*a))
    kernel_path = dispatch.masked_embedding(ids, weight, 5, 15)
    assert calls == [1]
    assert torch.equal(kernel_path, torch_path)
    assert torch.equal(torch_path, _reference(ids, weight, 5, 15))


def test_empty_ids():
    assert _temb.masked_embedding(torch.zeros(0, dtype=torch.long), torch.randn(4, 8), 0, 4).shape == (0, 8)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_vocab_parallel_part_unsummed(monkeypatch, tp_rank):
    """reduce=False: this rank's rows, zeros for the other rank's ids, and no all-reduce."""
    import distllm.layers.embedding as emb_mod

    monkeypatch.setattr(emb_mod, "get_tp_size", lambda: 2)
    monkeypatch.setattr(emb_mod, "get_tp_rank", lambda: tp_rank)
    reduced = []
    monkeypatch.setattr(emb_mod, "tp_all_reduce", lambda x: reduced.append(1) or x)
    full = torch.randn(11, 16)
    emb = VocabParallelEmbedding(11, 16, torch.float32)  # 6 rows a rank, the last one padding
    emb.weight_loader(emb.weight, full)
    ids = torch.tensor([0, 5, 6, 10])
    part = emb(ids, reduce=False)
    assert not reduced
    mine = (ids >= emb.start) & (ids < emb.end)
    assert torch.equal(part[mine], full[ids[mine]]) and not part[~mine].any()
    emb(ids)
    assert reduced == [1]


def test_custom_lookup_is_masked(monkeypatch):
    """lookup= (GGUF rows kept quantized) takes the torch path with the caller's row lookup,
    masked the same way, even where the kernel would run."""
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    weight = torch.randn(10, 8)
    seen = []

    def lookup(local):
        seen.append(local.clone())
        return weight[local] * 2

    ids = torch.tensor([4, 5, 14, 15])
    out = dispatch.masked_embedding(ids, weight, 5, 15, lookup)
    assert torch.equal(seen[0], torch.tensor([0, 0, 9, 0]))  # other ranks' ids look up row 0 ...
    assert torch.equal(out, _reference(ids, weight * 2, 5, 15))  # ... and come out as zeros
