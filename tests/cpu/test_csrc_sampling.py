"""csrc's restrict_logits_ (min-p, top-k, top-p without a sort), CPU kernel, against the
torch path (ops/sampling_ref.py); the JIT build and its switches (ops/csrc_ext.py).

The CPU kernel runs the same radix select, fixed-point masses and bin search as the CUDA
one (tests/gpu/test_csrc_sampling_gpu.py runs that against the same reference)."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from distllm.layers.sampler import Sampler, SamplingState
from distllm.ops import csrc_ext
from distllm.ops.dispatch import restrict_logits_
from distllm.ops.sampling_ref import restrict_logits_ref_
from distllm.params import SamplingParams


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("csrc_build")


@pytest.fixture(scope="module")
def ext(build_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTLLM_CSRC", "1")
    mp.setenv("DISTLLM_CSRC_BUILD_DIR", str(build_dir))
    ops = csrc_ext.load_now()
    assert ops is not None, "the csrc build failed (see the log): CI has g++ and ninja, so it must build"
    yield ops
    mp.undo()


def _cols(ks, ps, mps):
    return (torch.tensor([ks, ps, mps], dtype=torch.float32),)


def _both(x, ks, ps, mps, ext):
    want = restrict_logits_ref_(x.clone(), ks, ps, mps)
    got = x.clone()
    ext.restrict_logits_(got, *_cols(ks, ps, mps))
    return got, want


def _random_rows(rng: random.Random, B: int, V: int):
    ks, ps, mps = [], [], []
    for _ in range(B):
        ks.append(rng.choice([-1, 0, 1, 2, rng.randint(1, V), V, V + 3]))
        ps.append(rng.choice([1.0, rng.uniform(0.05, 0.999), 1e-4]))
        mps.append(rng.choice([0.0, 0.0, rng.uniform(0.001, 0.5)]))
    return ks, ps, mps


@pytest.mark.parametrize("V", [7, 64, 1000, 4099])
@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_matches_torch_path_random(ext, V, scale):
    rng = random.Random(V * 31 + int(scale * 10))
    g = torch.Generator().manual_seed(V + int(scale))
    B = 12
    x = torch.randn(B, V, generator=g) * scale
    ks, ps, mps = _random_rows(rng, B, V)
    got, want = _both(x, ks, ps, mps, ext)
    assert torch.equal(got, want), (ks, ps, mps)


def test_ties_are_kept_together(ext):
    # Integer logits: every value is shared by many tokens; the kept set is closed under ties.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-6, 6, (16, 500), generator=g).float()
    rng = random.Random(1)
    ks, ps, mps = _random_rows(rng, 16, 500)
    got, want = _both(x, ks, ps, mps, ext)
    assert torch.equal(got, want)
    for r in range(16):
        kept = got[r] > float("-inf")
        if kept.any():
            low = x[r][kept].min()
            assert bool(kept[x[r] >= low].all()), "a token tied with a kept one was cut"


def test_top_k_keeps_exactly_k_distinct(ext):
    x = torch.randperm(1000).float().view(1, 1000) / 7
    got = x.clone()
    ext.restrict_logits_(got, *_cols([37], [1.0], [0.0]))
    kept = (got > float("-inf")).nonzero()[:, 1]
    assert sorted(kept.tolist()) == sorted(x[0].topk(37).indices.tolist())


def test_top_p_mass_is_minimal_head(ext):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3000, generator=g) * 2
    got = x.clone()
    ext.restrict_logits_(got, *_cols([-1], [0.7], [0.0]))
    probs = x.softmax(-1)[0]
    kept = got[0] > float("-inf")
    assert probs[kept].sum() >= 0.7 - 1e-6
    # Without its smallest kept token the head would no longer reach top_p.
    smallest = probs[kept].min()
    assert probs[kept].sum() - smallest < 0.7


def test_neg_inf_nan_and_degenerate_rows(ext):
    V = 300
    x = torch.randn(5, V, generator=torch.Generator().manual_seed(9))
    x[0, 10:] = float("-inf")  # fewer finite tokens than top_k
    x[1] = float("-inf")  # nothing finite: left alone
    x[2, ::3] = float("-inf")
    x[3, 5] = 50.0  # one token holds all the mass
    ks, ps, mps = [20, 5, 40, -1, 2], [0.9, 0.5, 0.3, 0.95, 0.999], [0.0, 0.1, 0.05, 0.2, 0.0]
    got, want = _both(x, ks, ps, mps, ext)
    assert torch.equal(got, want)
    assert torch.equal(got[1], x[1])
    assert int((got[3] > float("-inf")).sum()) == 1


def test_rows_with_a_stride(ext):
    wide = torch.randn(6, 130, generator=torch.Generator().manual_seed(4))
    x = wide[:, :101]  # stride(0) = 130
    ks, ps, mps = [5, -1, 50, 3, -1, 100], [1.0, 0.6, 0.8, 0.2, 1.0, 0.99], [0.0, 0.0, 0.01, 0.0, 0.3, 0.0]
    want = restrict_logits_ref_(x.clone(), ks, ps, mps)
    ext.restrict_logits_(x, *_cols(ks, ps, mps))
    assert torch.equal(x, want)
    assert torch.equal(wide[:, 101:], torch.randn(6, 130, generator=torch.Generator().manual_seed(4))[:, 101:])


def test_bad_arguments_name_the_parameter(ext):
    x = torch.randn(2, 10)
    with pytest.raises(RuntimeError, match="float32"):
        ext.restrict_logits_(x.double(), *_cols([1, 1], [1.0, 1.0], [0.0, 0.0]))
    with pytest.raises(RuntimeError, match=r"params must be float32 \[3, 2\]"):
        ext.restrict_logits_(x, torch.ones(3, 3))
    with pytest.raises(RuntimeError, match="params must be float32"):
        ext.restrict_logits_(x, torch.ones(3, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.restrict_logits_(x, torch.ones(2, 3).t())


def test_dispatch_uses_the_kernel_only_when_asked(ext, monkeypatch):
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    args = ([4, -1, 9], [1.0, 0.5, 0.8], [0.0, 0.0, 0.1])
    want = restrict_logits_ref_(x.clone(), *args)
    calls = []
    real = csrc_ext.ops_for

    def spy(device):
        ops = real(device)
        calls.append(ops is not None)
        return ops

    monkeypatch.setattr(csrc_ext, "ops_for", spy)
    for m, used in (("1", True), ("auto", False), ("0", False)):
        monkeypatch.setenv("DISTLLM_CSRC", m)
        calls.clear()
        assert torch.equal(restrict_logits_(x.clone(), *args), want)
        assert calls == [used], m


def test_sampler_draws_the_same_tokens_either_way(ext, monkeypatch):
    rng = random.Random(5)
    V = 257
    logits = torch.randn(24, V, generator=torch.Generator().manual_seed(6)) * 3
    sts = []
    for i in range(24):
        sp = dict(temperature=rng.choice([0.0, 0.7, 1.0, 1.3]), seed=1000 + i)
        if rng.random() < 0.6:
            sp["top_k"] = rng.randint(1, V)
        if rng.random() < 0.6:
            sp["top_p"] = rng.uniform(0.1, 1.0)
        if rng.random() < 0.4:
            sp["min_p"] = rng.uniform(0.0, 0.3)
        sts.append(sp)

    def run(mode):
        monkeypatch.setenv("DISTLLM_CSRC", mode)
        states = [SamplingState.create(SamplingParams(**sp).to_worker_dict(), [0], [], "cpu") for sp in sts]
        return Sampler()(logits.clone(), states).sampled_token_ids

    assert torch.equal(run("1"), run("0"))


def test_auto_mode_never_builds_for_cpu(monkeypatch):
    monkeypatch.setenv("DISTLLM_CSRC", "auto")
    monkeypatch.setattr(csrc_ext, "_ops", None)
    monkeypatch.setattr(csrc_ext, "_started", False)
    assert csrc_ext.ops_for(torch.device("cpu")) is None
    assert not csrc_ext._started
    monkeypatch.setenv("DISTLLM_CSRC", "0")
    csrc_ext.start_build()
    assert not csrc_ext._started


def _fresh_state(monkeypatch):
    monkeypatch.setattr(csrc_ext, "_ops", None)
    monkeypatch.setattr(csrc_ext, "_failed", False)
    monkeypatch.setattr(csrc_ext, "_started", False)
    monkeypatch.setattr(csrc_ext, "_builder", None)
    monkeypatch.setattr(csrc_ext, "_build_error", None)
    built = threading.Event()
    monkeypatch.setattr(csrc_ext, "_built", built)
    monkeypatch.setenv("DISTLLM_CSRC", "auto")
    return built


def test_first_build_runs_in_the_background(ext, build_dir, tmp_path, monkeypatch):
    """A cold build: a child process compiles; start-up does not wait for it (by default), and
    the next start (a fresh library in the build directory) loads it.

    (The load takes the module's build: one process registers distllm_C only once.)"""
    monkeypatch.setenv("DISTLLM_CSRC_BUILD_DIR", str(tmp_path))
    built = _fresh_state(monkeypatch)
    csrc_ext.start_build()
    assert csrc_ext._builder is not None, "a cold build directory must start a compile"
    assert csrc_ext.finish_build() is None or built.is_set()  # no wait by default
    csrc_ext._builder.join(timeout=600)
    assert built.is_set() and csrc_ext._build_error is None, csrc_ext._build_error
    assert list(tmp_path.glob("*.so")), "the child left no library in the build directory"
    assert csrc_ext._library_is_fresh()

    # Next start: a fresh library, so no child; finish_build loads it.
    monkeypatch.setenv("DISTLLM_CSRC_BUILD_DIR", str(build_dir))
    _fresh_state(monkeypatch)
    assert csrc_ext._library_is_fresh()
    csrc_ext.start_build()
    assert csrc_ext._builder is None
    assert csrc_ext.finish_build() is ext
    assert csrc_ext.ops_for(torch.device("cpu")) is None  # auto: CPU tensors keep the torch path
    monkeypatch.setenv("DISTLLM_CSRC", "1")
    assert csrc_ext.ops_for(torch.device("cpu")) is ext


def test_start_up_waits_for_the_build_only_when_asked(monkeypatch):
    waits = []

    class Pending:
        def is_set(self):
            return False

        def wait(self, timeout):
            waits.append(timeout)
            return False

    _fresh_state(monkeypatch)
    monkeypatch.setattr(csrc_ext, "_built", Pending())
    monkeypatch.setattr(csrc_ext, "_started", True)
    assert csrc_ext.finish_build() is None  # auto: a first build is not waited for
    monkeypatch.setenv("DISTLLM_CSRC", "1")
    assert csrc_ext.finish_build() is None
    monkeypatch.setenv("DISTLLM_CSRC_WAIT_S", "7")
    csrc_ext.finish_build()
    assert waits == [0.0, 900.0, 7.0]


def test_a_failed_build_keeps_the_torch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTLLM_CSRC_BUILD_DIR", str(tmp_path))
    _fresh_state(monkeypatch)
    broken = tmp_path / "src"
    broken.mkdir()
    (broken / "sampling.cpp").write_text("this is not C++\n")
    (broken / "sampling_select.h").write_text("")
    monkeypatch.setattr(csrc_ext, "CSRC_DIR", broken)
    monkeypatch.setattr(csrc_ext, "with_cuda", lambda: False)
    csrc_ext.start_build()
    csrc_ext._builder.join(timeout=600)
    assert "sampling.cpp" in (csrc_ext._build_error or ""), "the child's compiler error is kept for the log"
    assert csrc_ext.finish_build() is None
    assert csrc_ext._failed
    x = torch.randn(2, 30)
    monkeypatch.setenv("DISTLLM_CSRC", "1")
    want = restrict_logits_ref_(x.clone(), [3, -1], [1.0, 0.5], [0.0, 0.0])
    assert torch.equal(restrict_logits_(x.clone(), [3, -1], [1.0, 0.5], [0.0, 0.0]), want)


def test_bench_sampling_smoke_on_cpu(ext, build_dir):
    """benchmarks/bench_sampling.py end to end on the CPU build (tiny shapes; no figure checked)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DISTLLM_CSRC_BUILD_DIR=str(build_dir), PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_sampling.py"), "--device", "cpu", "--batch", "1", "3",
         "--vocab", "300", "--reps", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith(("1 ", "3 "))]
    assert len(rows) == 10, proc.stdout  # 2 batch sizes x 5 filter settings
