"""The greedy-sampling argmax kernel under the Triton interpreter against torch.argmax."""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib

import pytest
import torch

import triton  # noqa: F401  (a missing or broken interpreter must fail these tests, not skip)
from triton.runtime.interpreter import InterpretedFunction

import distllm.ops.triton_argmax as _targ
from distllm.ops import dispatch


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    os.environ["TRITON_INTERPRET"] = "1"
    if not isinstance(_targ._argmax_chunks_kernel, InterpretedFunction):
        importlib.reload(_targ)
    yield
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


@pytest.mark.parametrize("B,V", [(1, 1), (3, 7), (2, _targ.CHUNK), (4, _targ.CHUNK + 1), (2, 49152), (1, 151936)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch(B, V, dtype):
    g = torch.Generator().manual_seed(B * 1000 + V)
    x = (torch.randn(B, V, generator=g) * 4).to(dtype)
    assert torch.equal(_targ.argmax_last_dim(x), x.argmax(dim=-1))


def test_ties_go_to_the_first_index_across_chunks():
    V = 5 * _targ.CHUNK + 3
    x = torch.zeros(4, V)
    x[0, [7, _targ.CHUNK + 1, 3 * _targ.CHUNK]] = 2.0  # the same max in three chunks
    x[1, [V - 1, 2 * _targ.CHUNK + 5]] = 1.0
    x[2] = 3.0  # every element ties
    x[3, -1] = 0.5
    got = _targ.argmax_last_dim(x)
    assert got.tolist() == [7, 2 * _targ.CHUNK + 5, 0, V - 1]
    assert torch.equal(got, x.argmax(dim=-1))


def test_masked_rows_nan_and_strided_input():
    V = 3 * _targ.CHUNK
    x = torch.full((3, V), float("-inf"))
    x[1, 100] = -1e30
    x[2, :] = 0.0
    x[2, 2 * _targ.CHUNK + 9] = float("nan")  # torch treats NaN as the largest
    assert _targ.argmax_last_dim(x).tolist() == x.argmax(dim=-1).tolist() == [0, 100, 2 * _targ.CHUNK + 9]
    wide = torch.randn(5, 2 * V, generator=torch.Generator().manual_seed(1))
    rows = wide[:, ::2]  # strided rows
    assert torch.equal(_targ.argmax_last_dim(rows), rows.argmax(dim=-1))
    assert _targ.argmax_last_dim(torch.empty(0, 10)).shape == (0,)


def test_dispatch(monkeypatch):
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    called = []
    real = _targ.argmax_last_dim
    monkeypatch.setattr(_targ, "argmax_last_dim", lambda t: called.append(1) or real(t))
    assert torch.equal(dispatch.argmax(x), x.argmax(-1)) and not called  # CPU: torch
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    assert torch.equal(dispatch.argmax(x), x.argmax(-1)) and called == [1]
