"""The decode GEMV kernel under the Triton interpreter against torch's matmul, and its dispatch rules."""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib

import pytest
import torch

import triton  # noqa: F401  (a missing or broken interpreter must fail these tests, not skip)
from triton.runtime.interpreter import InterpretedFunction

import distllm.ops.triton_activation as _act
import distllm.ops.triton_gemv as _tg
from distllm.ops import dispatch


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    os.environ["TRITON_INTERPRET"] = "1"
    if not isinstance(_tg._gemv_kernel, InterpretedFunction):
        importlib.reload(_act)  # the gated GEMV calls its silu_mul helper
        importlib.reload(_tg)
    yield
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


def _inputs(m, n, k, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


def _ref(x, w, b=None):
    y = x.float() @ w.float().T
    return y if b is None else y + b.float()


# fp16 inputs: the interpreter truncates bf16 arithmetic, so bf16 would test the interpreter.
@pytest.mark.parametrize("m,n,k", [(1, 5, 40), (2, 33, 100), (1, 64, 576), (2, 17, 1536), (1, 130, 257)])
@pytest.mark.parametrize("config", [None, (4, 64, 2), (16, 256, 4), (8, 32, 4, 2, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_matmul(m, n, k, config, bias):
    x, w, b = _inputs(m, n, k, seed=m * 7 + n + k)
    y = _tg.gemv(x, w, b if bias else None, config=config)
    assert y.shape == (m, n) and y.dtype == x.dtype
    torch.testing.assert_close(y.float(), _ref(x, w, b if bias else None), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_rows_of_x_share_a_program(m):
    """BLOCK_M rows of x per program (a large weight read once at M=2): every row, and the
    ragged last tile of rows, still right."""
    x, w, b = _inputs(m, 19, 70, seed=m)
    for block_m in (1, 2, 4):
        y = _tg.gemv(x, w, b, config=(4, 32, 4, None, block_m))
        torch.testing.assert_close(y.float(), _ref(x, w, b), rtol=2e-3, atol=2e-3)


def test_strided_rows_of_x_and_w():
    x, w, _ = _inputs(2, 24, 64, seed=3)
    xw = torch.zeros(2, 80, dtype=x.dtype)
    xw[:, :64] = x
    ww = torch.zeros(24, 96, dtype=w.dtype)
    ww[:, :64] = w
    y = _tg.gemv(xw[:, :64], ww[:, :64], config=(8, 32, 2))
    torch.testing.assert_close(y.float(), _ref(x, w), rtol=2e-3, atol=2e-3)


def test_shape_mismatch_is_a_clear_error():
    x, w, _ = _inputs(1, 8, 32, seed=1)
    with pytest.raises(ValueError, match="K=32"):
        _tg.gemv(x, w[:, :16])


def test_on_by_default_with_oneshot_tiles():
    assert "DISTLLM_GEMV" in os.environ or _tg.ENABLED
    assert "DISTLLM_GEMV_TILES" in os.environ or _tg.TILES == "oneshot"


def test_applies_only_to_decode_rows_small_half_weights(monkeypatch):
    monkeypatch.setattr(_tg, "ENABLED", True)
    x, w, b = _inputs(1, 8, 32, seed=2)
    assert _tg.applies(x, w, b) and _tg.applies(x, w, None)
    assert not _tg.applies(x.float(), w.float(), None)  # fp32: cuBLAS
    assert not _tg.applies(x, w.bfloat16(), None)  # mixed dtypes
    assert not _tg.applies(torch.zeros(_tg.MAX_M + 1, 32, dtype=x.dtype), w, None)  # prefill / big batch
    assert not _tg.applies(torch.zeros(0, 32, dtype=x.dtype), w, None)
    assert not _tg.applies(x[:, ::2], w[:, ::2], None)  # not unit-stride along K
    monkeypatch.setattr(_tg, "MAX_WEIGHT_ELEMENTS", 8 * 32 - 1)
    assert _tg.applies(x, w, None)  # a large weight with few rows: at M = 1 only
    assert not _tg.applies(torch.zeros(2, 32, dtype=x.dtype), w, None)
    monkeypatch.setattr(_tg, "MAX_LARGE_N", 7)
    assert not _tg.applies(x, w, None)  # large weights with many rows stay on cuBLAS
    monkeypatch.setattr(_tg, "MAX_WEIGHT_ELEMENTS", 8 * 32)
    assert _tg.applies(x, w, None) and _tg.applies(torch.zeros(2, 32, dtype=x.dtype), w, None)
    monkeypatch.setattr(_tg, "ENABLED", False)
    assert not _tg.applies(x, w, None)


def test_config_follows_weight_size(monkeypatch):
    monkeypatch.setattr(_tg, "TILES", "table")
    sizes = [limit for limit, _ in _tg.CONFIGS]
    assert sizes == sorted(sizes)
    assert _tg.gemv_config(1, 1) == _tg.CONFIGS[0][1]
    assert _tg.gemv_config(1024, _tg.MAX_WEIGHT_ELEMENTS // 1024) == next(
        cfg for limit, cfg in _tg.CONFIGS if _tg.MAX_WEIGHT_ELEMENTS <= limit)


@pytest.mark.parametrize("n", [3, 19, 70])
def test_large_weights_stream_k_in_pipelined_steps(monkeypatch, n):
    """Above MAX_WEIGHT_ELEMENTS (shrunk here) a weight with more than LARGE_ONESHOT_MAX_N rows
    gets streaming tiles: BLOCK_K-wide steps, num_stages; the result is unchanged."""
    monkeypatch.setattr(_tg, "MAX_WEIGHT_ELEMENTS", 64)
    monkeypatch.setattr(_tg, "LARGE_ONESHOT_MAX_N", 8)
    monkeypatch.setattr(_tg, "LARGE_BLOCK_K", 128)
    x, w, b = _inputs(1, n, 300, seed=n)
    cfg = _tg.gemv_config(n, 300)
    if n > 8:
        assert cfg == (8, 128, 4, _tg.LARGE_STAGES)
    else:
        assert len(cfg) == 3  # one-shot tiles: more programs for few rows
    torch.testing.assert_close(_tg.gemv(x, w, b).float(), _ref(x, w, b), rtol=2e-3, atol=2e-3)


def test_large_tiles_use_the_measured_rule():
    assert _tg.gemv_config(4096, 4096) == (8, 1024, 4, 4)
    assert _tg.gemv_config(7168, 4096) == (4, 1024, 4, 4)
    assert len(_tg.gemv_config(1536, 4096)) == 3  # one-shot


@pytest.mark.parametrize("k,block_k", [(40, 64), (576, 1024), (1536, 2048), (14336, 2048)])
def test_oneshot_tiles_cover_k_in_one_step(monkeypatch, k, block_k):
    monkeypatch.setattr(_tg, "TILES", "oneshot")
    bn, bk, warps = _tg.gemv_config(960, k)
    assert bk == block_k and bn * bk <= _tg.ONESHOT_TILE_ELEMENTS and bn >= 1
    if k <= 2048:
        x, w, _ = _inputs(1, 9, k, seed=k)
        torch.testing.assert_close(_tg.gemv(x, w).float(), _ref(x, w), rtol=2e-3, atol=2e-3)


def test_dispatch_linear_routes(monkeypatch):
    monkeypatch.setattr(_tg, "ENABLED", True)
    x, w, b = _inputs(1, 12, 48, seed=4)
    calls = []
    real = _tg.gemv
    monkeypatch.setattr(_tg, "gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    y = dispatch.linear(x, w, b)
    assert calls == [1]
    torch.testing.assert_close(y.float(), _ref(x, w, b), rtol=2e-3, atol=2e-3)
    dispatch.linear(torch.zeros(_tg.MAX_M + 1, 48, dtype=x.dtype), w)  # prefill rows: torch
    assert calls == [1]
    monkeypatch.delenv("DISTLLM_FORCE_TRITON")
    dispatch.linear(x, w, b)  # CPU tensors: torch
    assert calls == [1]


@pytest.mark.parametrize("m,n,d", [(1, 9, 40), (2, 33, 100), (1, 19, 300)])
@pytest.mark.parametrize("config", [None, (4, 64, 2), (8, 32, 4, 2, 2)])
def test_gated_equals_silu_and_mul_then_gemv(m, n, d, config):
    """x = [gate | up]: the gated kernel rounds silu(gate) * up exactly as the SiLU-and-mul
    kernel does, so its output is bit-identical to the two launches."""
    g = torch.Generator().manual_seed(m + n + d)
    x = (torch.randn(m, 2 * d, generator=g) * 2).to(torch.float16)
    w = (torch.randn(n, d, generator=g) / d**0.5).to(torch.float16)
    b = torch.randn(n, generator=g).to(torch.float16)
    two = _tg.gemv(_act.silu_and_mul(x), w, b, config=config)
    one = _tg.gemv(x, w, b, config=config, gated=True)
    assert torch.equal(one, two)
    ref = _ref(torch.nn.functional.silu(x[:, :d].float()) * x[:, d:].float(), w, b)
    torch.testing.assert_close(one.float(), ref, rtol=1e-2, atol=1e-2)


def test_gated_applies_only_when_on_and_shapes_match(monkeypatch):
    monkeypatch.setattr(_tg, "ENABLED", True)
    x, w, _ = _inputs(1, 8, 32, seed=5)
    gu = torch.cat([x, x], dim=1)  # [1, 64]
    monkeypatch.setattr(_tg, "GATED", False)
    assert not _tg.applies(gu, w, None, gated=True)
    monkeypatch.setattr(_tg, "GATED", True)
    assert _tg.applies(gu, w, None, gated=True)
    assert not _tg.applies(x, w, None, gated=True)  # not [gate | up] for this weight
    assert not _tg.applies(gu, w, None)  # ungated: K does not match
    with pytest.raises(ValueError, match="odd width"):
        _tg.gemv(gu[:, :63], w, gated=True)


def test_dispatch_gated_linear_routes(monkeypatch):
    monkeypatch.setattr(_tg, "ENABLED", True)
    monkeypatch.setattr(_tg, "GATED", True)
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    g = torch.Generator().manual_seed(3)
    gu = torch.randn(1, 96, generator=g).to(torch.float16)
    w = (torch.randn(24, 48, generator=g) / 7).to(torch.float16)
    calls = []
    real = _tg.gemv
    monkeypatch.setattr(_tg, "gemv", lambda *a, **kw: calls.append(kw.get("gated")) or real(*a, **kw))
    y = dispatch.silu_and_mul_linear(gu, w)
    assert calls == [True]
    monkeypatch.setattr(_tg, "GATED", False)
    y2 = dispatch.silu_and_mul_linear(gu, w)  # the two launches
    assert calls == [True, None] and torch.equal(y, y2)
    monkeypatch.delenv("DISTLLM_FORCE_TRITON")
    ref = dispatch.silu_and_mul_linear(gu.float(), w.float())  # CPU: torch
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)



@pytest.mark.parametrize("n,k", [(9, 40), (33, 100), (19, 300), (64, 576)])
@pytest.mark.parametrize("config", [None, (4, 64, 2), (8, 32, 4, 2)])
def test_gate_up_equals_gemv_then_silu_and_mul(n, k, config):
    """weight = [gate; up]: the epilogue rounds gate and up to x's dtype, then silu_mul, as the
    unfused path (GEMV of both halves, then the SiLU-and-mul kernel) does: bit-identical."""
    g = torch.Generator().manual_seed(n + k)
    x = (torch.randn(1, k, generator=g) * 2).to(torch.float16)
    w = (torch.randn(2 * n, k, generator=g) / k**0.5).to(torch.float16)
    fused = _tg.gemv_gate_up(x, w, config=config)
    two = _act.silu_and_mul(_tg.gemv(x, w, config=config))
    assert fused.shape == (1, n) and torch.equal(fused, two)
    gu = _ref(x, w)
    torch.testing.assert_close(fused.float(), torch.nn.functional.silu(gu[:, :n]) * gu[:, n:], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="gate; up"):
        _tg.gemv_gate_up(x, w[:-1])


def test_gate_up_layer_routes(monkeypatch):
    """MergedColumnParallelLinear.forward_silu_and_mul: the fused GEMV for one fp16/bf16 row on a
    Triton device, None for prefill rows, CPU tensors, a bias, or with it turned off."""
    from distllm.layers.linear import MergedColumnParallelLinear

    monkeypatch.setattr(_tg, "ENABLED", True)
    monkeypatch.setattr(_tg, "GATE_UP", True)
    lin = MergedColumnParallelLinear(48, [20, 20], dtype=torch.float16)
    lin.weight.data.copy_((torch.randn(40, 48, generator=torch.Generator().manual_seed(1)) / 7).half())
    x = torch.randn(1, 48, generator=torch.Generator().manual_seed(2)).half()
    assert lin.forward_silu_and_mul(x) is None  # CPU tensors: the caller's path
    monkeypatch.setenv("DISTLLM_FORCE_TRITON", "1")
    y = lin.forward_silu_and_mul(x)
    assert torch.equal(y, _act.silu_and_mul(lin(x)))
    assert lin.forward_silu_and_mul(torch.cat([x, x])) is None  # two rows: not decode at batch 1
    monkeypatch.setattr(_tg, "GATE_UP", False)
    assert lin.forward_silu_and_mul(x) is None


def test_gate_up_takes_gates_of_every_size(monkeypatch):
    """Llama-8B's gate/up at TP=1, 2 and 4 (14336, 7168 and 3584 outputs at K 4096) and SmolLM2's
    small one (1536 x 576) all take the kernel at M = 1; two rows don't."""
    monkeypatch.setattr(_tg, "ENABLED", True)
    monkeypatch.setattr(_tg, "GATE_UP", True)
    x = torch.empty(1, 4096, dtype=torch.bfloat16)
    for n in (14336, 7168, 4097, 4096, 3584):
        assert _tg.gate_up_applies(x, torch.empty(2 * n, 4096, dtype=torch.bfloat16), None), n
    assert not _tg.gate_up_applies(torch.empty(2, 4096, dtype=torch.bfloat16),
                                   torch.empty(2 * 3584, 4096, dtype=torch.bfloat16), None)
    x = torch.empty(1, 576, dtype=torch.bfloat16)
    assert _tg.gate_up_applies(x, torch.empty(2 * 1536, 576, dtype=torch.bfloat16), None)


def test_gate_up_tiles(monkeypatch):
    assert _tg.gate_up_config(14336, 4096) == _tg.GATE_UP_NARROW_TILES
    assert _tg.gate_up_config(7168, 4096) == _tg.gemv_config(7168, 4096)
    assert _tg.gate_up_config(3584, 4096) == _tg.GATE_UP_NARROW_TILES  # TP=4: 8-row plain tiles lost there
    assert _tg.gate_up_config(3072, 1024) == _tg.GATE_UP_NARROW_TILES  # Qwen3-0.6B
    assert _tg.gate_up_config(1536, 576) == _tg.gemv_config(1536, 576)
    monkeypatch.setenv("DISTLLM_GEMV_GATE_UP_TILES", "8,512,4,3")
    assert _tg.gate_up_config(14336, 4096) == (8, 512, 4, 3)


def test_forced_tiles_override_the_rule_for_their_shape_only(monkeypatch):
    monkeypatch.setattr(_tg, "FORCED_TILES", _tg._forced_tiles("4096x4096=4,512,8,2; 6144X4096=8,1024,4"))
    assert _tg.gemv_config(4096, 4096) == (4, 512, 8, 2)
    assert _tg.gemv_config(6144, 4096) == (8, 1024, 4)
    monkeypatch.setattr(_tg, "FORCED_TILES", {})
    assert _tg.gemv_config(4096, 4096) == (8, 1024, 4, _tg.LARGE_STAGES)


@pytest.mark.parametrize("spec", ["4096x4096", "4096=8,1024,4", "4096x4096=8,big,4"])
def test_malformed_forced_tiles_name_the_variable(spec):
    with pytest.raises(ValueError, match="DISTLLM_GEMV_FORCE_TILES"):
        _tg._forced_tiles(spec)


@pytest.mark.parametrize("setting,policy", [(None, "evict_first"), ("normal", ""), ("FIRST", "evict_first"),
                                            ("bogus", None)])
def test_weight_eviction_setting(setting, policy):
    """DISTLLM_GEMV_EVICT picks the weight loads' L2 policy (evict-first by default); anything
    else is refused at import, naming the variable."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DISTLLM_GEMV_EVICT"}
    if setting is not None:
        env["DISTLLM_GEMV_EVICT"] = setting
    r = subprocess.run([sys.executable, "-c", "import distllm.ops.triton_gemv as g; print(repr(g.WEIGHT_EVICTION))"],
                       capture_output=True, text=True, env=env, timeout=120)
    if policy is None:
        assert r.returncode != 0 and "DISTLLM_GEMV_EVICT must be one of ['first', 'normal']" in r.stderr
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == repr(policy)


def test_weight_eviction_keeps_results(monkeypatch):
    """The policy is a cache hint: both GEMV kernels give the same bits either way, and the
    right values."""
    x, w, _ = _inputs(1, 48, 256, seed=11)
    wg = (torch.randn(2 * 24, 256, generator=torch.Generator().manual_seed(12)) / 16).to(torch.float16)
    outs = []
    for policy in ("", "evict_first"):
        monkeypatch.setattr(_tg, "WEIGHT_EVICTION", policy)
        outs.append((_tg.gemv(x, w), _tg.gemv_gate_up(x, wg)))
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    torch.testing.assert_close(outs[0][0], (x.float() @ w.float().T).to(x.dtype), rtol=1e-2, atol=1e-2)
    gate, up = (x.float() @ wg.float().T).to(x.dtype).float().split(24, dim=-1)
    torch.testing.assert_close(outs[0][1].float(), torch.nn.functional.silu(gate).to(x.dtype).float() * up,
                               rtol=2e-2, atol=2e-2)
