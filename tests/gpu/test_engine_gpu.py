"""End to end on CUDA: the GPU path (Triton kernels, CUDA graphs, on-device sampling) against the
CPU float32 path, and prefix caching / preemption equivalence on GPU."""

from __future__ import annotations

import pytest
import torch

from distllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def _prompts(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lens = [3, 17, 45, 9, 64, 1]
    return [{"prompt_token_ids": torch.randint(100, 49152, (n,), generator=g).tolist()} for n in lens]


def _greedy_top2(folder: str, **kw) -> list:
    with LLM(model=folder, **kw) as llm:
        sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
        return [o.outputs[0] for o in llm.generate(_prompts(), sp, use_tqdm=False)]


def _assert_equal_but_near_ties(a: list, b: list, tie: float = 0.05) -> None:
    """Greedy sequences of two runs that sum in a different order (bf16): equal, except that at
    the first step where they part the two runs' top two tokens must be the same pair and a
    near-tie (log-probabilities within ``tie``); what follows a parting is not compared."""
    for x, y in zip(a, b):
        for i, (tx, ty) in enumerate(zip(x.token_ids, y.token_ids)):
            if tx != ty:
                top_x, top_y = x.logprobs[i], y.logprobs[i]
                assert {tx, ty} <= set(top_x) & set(top_y), (i, tx, ty)
                assert abs(top_x[tx].logprob - top_x[ty].logprob) < tie, (i, top_x)
                break


def _greedy(folder: str, **kw) -> list[list[int]]:
    with LLM(model=folder, **kw) as llm:
        outs = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def cpu_reference(tiny_models):
    return {k: _greedy(tiny_models[k], device="cpu") for k in ("llama", "qwen3")}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_fp32_gpu_equals_cpu(tiny_models, cpu_reference, kind, eager):
    got = _greedy(tiny_models[kind], device="cuda", dtype="float32", enforce_eager=eager, gpu_memory_utilization=0.3)
    assert got == cpu_reference[kind]


@pytest.mark.parametrize(
    "kw",
    [dict(enable_prefix_caching=True), dict(max_num_batched_tokens=16), dict(block_size=16, num_gpu_blocks_override=10)],
    ids=["prefix-cache", "chunked", "preemption"],
)
def test_engine_configs_equal_on_gpu(tiny_models, cpu_reference, kw):
    got = _greedy(tiny_models["llama"], device="cuda", dtype="float32", gpu_memory_utilization=0.3, **kw)
    assert got == cpu_reference["llama"]


def test_bf16_graphs_equal_eager_and_logprobs_close(tiny_models):
    folder = tiny_models["llama"]
    a = _greedy(folder, device="cuda", dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.3)
    b = _greedy(folder, device="cuda", dtype="bfloat16", enforce_eager=False, gpu_memory_utilization=0.3)
    assert a == b
    p = _prompts(1)[4]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    with LLM(model=folder, device="cpu") as cpu:
        ref = cpu.generate(p, sp, use_tqdm=False)[0].prompt_logprobs
    with LLM(model=folder, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3) as gpu:
        got = gpu.generate(p, sp, use_tqdm=False)[0].prompt_logprobs
    toks = p["prompt_token_ids"]
    diffs = [abs(got[i][toks[i]].logprob - ref[i][toks[i]].logprob) for i in range(1, len(toks))]
    assert max(diffs) < 0.15, max(diffs)


def test_seeded_sampling_batch_invariant_on_gpu(tiny_models):
    p = _prompts(2)[1]
    sp = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    with LLM(model=tiny_models["qwen3"], device="cuda", gpu_memory_utilization=0.3) as llm:
        alone = llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids
        noisy = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
        outs = llm.generate(_prompts(3)[:3] + [p], [noisy] * 3 + [sp], use_tqdm=False)
        assert outs[3].outputs[0].token_ids == alone


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_pdl_on_equals_off(tiny_models, kind, monkeypatch):
    """Programmatic dependent launch (ops/pdl.py) changes when kernels start, never what they
    compute: bf16 greedy tokens with CUDA graphs are the same with it on and off."""
    from distllm.ops import pdl

    if not pdl._device_supports(torch.cuda.current_device()):
        pytest.skip("PDL needs compute capability 9.0+ and a Triton with launch_pdl")
    kw = dict(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    monkeypatch.setattr(pdl, "ENABLED", False)
    off = _greedy(tiny_models[kind], **kw)
    monkeypatch.setattr(pdl, "ENABLED", True)
    on = _greedy(tiny_models[kind], **kw)
    assert on == off



def test_gated_gemv_on_equals_off(tiny_models, monkeypatch):
    """SiLU-and-mul folded into the down projection's decode GEMV (DISTLLM_GEMV_SILU) rounds
    exactly as the separate kernel does: bf16 greedy tokens with CUDA graphs are the same. Two
    sequences at a time: the gated GEMV takes decode steps of up to two rows (MAX_M)."""
    from distllm.ops import triton_gemv

    kw = dict(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, max_num_seqs=2)
    monkeypatch.setattr(triton_gemv, "GATE_UP", False)  # else no [gate | up] reaches the down GEMV
    monkeypatch.setattr(triton_gemv, "GATED", False)
    off = _greedy(tiny_models["llama"], **kw)
    monkeypatch.setattr(triton_gemv, "GATED", True)
    on = _greedy(tiny_models["llama"], **kw)
    assert on == off


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_gate_up_gemv_on_equals_off(tiny_models, kind, monkeypatch):
    """SiLU-and-mul as the gate/up GEMV's epilogue (DISTLLM_GEMV_GATE_UP) sums each row as the
    plain decode GEMV does in another order, and rounds as the SiLU-and-mul kernel does: the same
    bf16 greedy tokens but for near-ties. One sequence at a time, so that every decode step is a
    one-row GEMV."""
    from distllm.ops import triton_gemv

    kw = dict(device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, max_num_seqs=1)
    monkeypatch.setattr(triton_gemv, "GATE_UP", False)
    off = _greedy_top2(tiny_models[kind], **kw)
    monkeypatch.setattr(triton_gemv, "GATE_UP", True)
    on = _greedy_top2(tiny_models[kind], **kw)
    _assert_equal_but_near_ties(on, off)


def test_short_context_graphs_equal_cpu(tiny_models, tmp_path):
    """With max_model_len past worker/cuda_graph.SHORT_CONTEXT, small decode batches replay a
    graph made for short contexts while every context fits it, and the max_model_len graph
    otherwise (other split-KV counts): both give the CPU float32 tokens."""
    import json
    import shutil

    from distllm.worker.cuda_graph import SHORT_CONTEXT

    folder = tmp_path / "llama2k"
    shutil.copytree(tiny_models["llama"], folder)
    with open(folder / "config.json") as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 2048
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f)
    g = torch.Generator().manual_seed(5)
    short = [{"prompt_token_ids": torch.randint(100, 49152, (n,), generator=g).tolist()} for n in (5, 40, 200)]
    long = [{"prompt_token_ids": torch.randint(100, 49152, (n,), generator=g).tolist()} for n in (7, 700)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run(**kw) -> list[list[list[int]]]:
        with LLM(model=str(folder), max_model_len=2048, **kw) as llm:
            got = [[o.outputs[0].token_ids for o in llm.generate(p, sp, use_tqdm=False)] for p in (short, long)]
            if kw.get("device") == "cuda":
                graphs = llm.llm_engine.executor.worker.runner.graphs
                assert {ctx for _, ctx in graphs.graphs} == {2048, SHORT_CONTEXT}
            return got

    assert run(device="cuda", dtype="float32", gpu_memory_utilization=0.3) == run(device="cpu")
