"""csrc's restrict_logits_ CUDA kernel against the torch path (ops/sampling_ref.py), at
real vocab sizes; the engine's start-up building and loading it (ops/csrc_ext.py)."""

from __future__ import annotations

import random

import pytest
import torch

from distllm.layers.sampler import Sampler, SamplingState
from distllm.ops import csrc_ext
from distllm.ops.sampling_ref import restrict_logits_ref_
from distllm.params import SamplingParams

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")


@pytest.fixture(scope="module")
def ext():
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTLLM_CSRC", "1")
    ops = csrc_ext.load_now()
    assert ops is not None and csrc_ext.with_cuda(), "the CUDA build of csrc failed (nvcc and ninja are on the GPU hosts)"
    yield ops
    mp.undo()


def _cols(ks, ps, mps):
    return (torch.tensor([ks, ps, mps], dtype=torch.float32, device=DEV),)


def _params(rng: random.Random, B: int, V: int):
    ks, ps, mps = [], [], []
    for _ in range(B):
        ks.append(rng.choice([-1, 1, 20, 50, rng.randint(1, V), V]))
        ps.append(rng.choice([1.0, 0.9, 0.95, rng.uniform(0.05, 0.999)]))
        mps.append(rng.choice([0.0, 0.0, 0.05, rng.uniform(0.001, 0.3)]))
    return ks, ps, mps


@pytest.mark.parametrize("V", [128256, 151936, 49152, 32001])  # 32001: the scalar (non-float4) path
@pytest.mark.parametrize("B", [1, 7, 64])
def test_kernel_matches_torch_path(ext, V, B):
    rng = random.Random(V + B)
    g = torch.Generator(device=DEV).manual_seed(V * 3 + B)
    x = torch.randn(B, V, device=DEV, generator=g) * rng.choice([1.0, 4.0])
    ks, ps, mps = _params(rng, B, V)
    want = restrict_logits_ref_(x.clone(), ks, ps, mps)
    got = x.clone()
    ext.restrict_logits_(got, *_cols(ks, ps, mps))
    mismatch = (got != want).any(dim=-1).nonzero().flatten().tolist()
    assert not mismatch, [(r, ks[r], ps[r], mps[r]) for r in mismatch]


def test_ties_and_infs(ext):
    V = 128256
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randint(-8, 8, (9, V), device=DEV, generator=g).float()
    x[1, ::2] = float("-inf")
    x[2] = float("-inf")
    ks, ps, mps = [5, 100, 7, -1, 3000, -1, 1, 64, -1], [0.9, 0.5, 0.9, 0.3, 1.0, 0.999, 0.5, 0.7, 1.0], [0.0] * 8 + [0.5]
    want = restrict_logits_ref_(x.clone(), ks, ps, mps)
    got = x.clone()
    ext.restrict_logits_(got, *_cols(ks, ps, mps))
    assert torch.equal(got, want)
    assert torch.equal(got[2], x[2])


def test_sampler_same_tokens_with_and_without(ext, monkeypatch):
    rng = random.Random(2)
    V = 128256
    logits = torch.randn(48, V, device=DEV, generator=torch.Generator(device=DEV).manual_seed(3)) * 3
    sts = []
    for i in range(48):
        sp = dict(temperature=rng.choice([0.0, 0.6, 1.0]), seed=i, top_p=rng.choice([1.0, 0.9, 0.5]))
        if rng.random() < 0.5:
            sp["top_k"] = rng.choice([1, 10, 50, 1000])
        if rng.random() < 0.3:
            sp["min_p"] = 0.05
        sts.append(sp)

    def run(mode):
        monkeypatch.setenv("DISTLLM_CSRC", mode)
        states = [SamplingState.create(SamplingParams(**sp).to_worker_dict(), [0], [], DEV) for sp in sts]
        return Sampler()(logits.clone(), states).sampled_token_ids.cpu()

    assert torch.equal(run("1"), run("0"))


_ENGINE_SCRIPT = """
import sys
from distllm import LLM, SamplingParams
from distllm.ops import csrc_ext
with LLM(model=sys.argv[1], max_model_len=256, gpu_memory_utilization=0.3) as llm:
    assert csrc_ext._ops is not None, "start-up did not load the csrc ops"
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=0, max_tokens=8, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], sp, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
print("csrc-engine-ok")
"""


def test_engine_start_up_loads_it(ext, tiny_models):
    """A CUDA engine in the default mode loads the build at the end of its start-up (a fresh
    process: this module's fixture has loaded the ops into this one already; its build is
    in the default directory, so the engine finds it fresh). tests/cpu covers a cold build."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, DISTLLM_CSRC="auto")
    proc = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, tiny_models["llama"]], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "csrc-engine-ok" in proc.stdout, proc.stderr[-3000:]
    assert "csrc: distllm_C loaded" in proc.stderr, proc.stderr[-3000:]
