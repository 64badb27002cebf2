"""ops/launch.compile_only on a GPU: kernels compile without running, and an engine started
with an empty Triton cache compiles its kernels in the compile-only passes, not at launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_store_kv_compiles_without_running():
    from distllm.ops import launch as L
    from distllm.ops.triton_kv_store import store_kv

    if not L.available(torch.device("cuda")):
        pytest.skip("this Triton has no AsyncCompileMode")
    dev = torch.device("cuda")
    # A shape no other test uses (3 kv heads of 24, fp16), so the pass has something to compile.
    k = torch.randn(5, 3, 24, dtype=torch.float16, device=dev)
    v = torch.randn_like(k)
    kc = torch.zeros(4, 16, 3, 24, dtype=torch.float16, device=dev)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([0, 17, 18, 40, 63], dtype=torch.int64, device=dev)
    with L.compile_only("test") as pas:
        store_kv(k, v, kc, vc, slots)
    torch.cuda.synchronize()
    assert pas.compiled == 1
    assert not kc.any() and not vc.any()  # compiled, not run
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc.view(-1, 3, 24)[slots], k) and torch.equal(vc.view(-1, 3, 24)[slots], v)


_CHILD = r"""
import json, sys
from distllm import LLM, SamplingParams
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
with LLM(model=folder, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3) as llm:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def _fresh_engine(folder: str, prompts: list, cache_dir: str, parallel: bool) -> tuple[list, str]:
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, DISTLLM_LOGGING_LEVEL="INFO",
               DISTLLM_PARALLEL_COMPILE="1" if parallel else "0",
               PYTHONPATH=os.pathsep.join([_REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-c", _CHILD, folder, json.dumps(prompts)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    toks = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("TOKENS ")][-1].split(" ", 1)[1])
    return toks, p.stderr


def test_engine_from_an_empty_triton_cache_compiles_ahead(tiny_models, tmp_path):
    from distllm.ops import launch as L

    if not L.available(torch.device("cuda")):
        pytest.skip("this Triton has no AsyncCompileMode")
    g = torch.Generator().manual_seed(11)
    prompts = [{"prompt_token_ids": torch.randint(100, 49152, (n,), generator=g).tolist()} for n in (4, 33, 70)]
    on, log = _fresh_engine(tiny_models["llama"], prompts, str(tmp_path / "on"), parallel=True)
    off, log_off = _fresh_engine(tiny_models["llama"], prompts, str(tmp_path / "off"), parallel=False)
    assert on == off
    passes = [ln for ln in log.splitlines() if "Triton: " in ln and "kernel variants compiled" in ln]
    assert any("CUDA-graph warm-up" in ln for ln in passes), log[-3000:]
    graph_pass = [ln for ln in passes if "CUDA-graph warm-up" in ln][0]
    assert int(graph_pass.split(": ")[-1].split(" kernel variants")[0]) > 0, graph_pass
    assert "Triton: " not in log_off
