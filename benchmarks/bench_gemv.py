"""Decode GEMV: distllm's Triton kernel (ops/triton_gemv.py) against cuBLAS (torch's F.linear),
inside CUDA graphs (triton.testing.do_bench_cudagraph), bf16, at M = 1, 2, 4 rows of x, with
the weight read from HBM (each timed call walks copies of W worth twice the L2).

    python benchmarks/bench_gemv.py [--shapes smollm2,qwen3,llama8b] [--ms 1,2,4] [--quick]
    python benchmarks/bench_gemv.py --gate-up 14336,7168   # the gate/up GEMV with its SiLU epilogue

Per weight shape [N, K]: cuBLAS us, the kernel's default config us, and the best config of a
sweep (BLOCK_N x BLOCK_K x warps), with GB/s of weight bytes; the last lines say at which M and
up to which weight size the kernel wins, which is what triton_gemv.MAX_M, MAX_WEIGHT_ELEMENTS
and CONFIGS are set from.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    # [N, K] of each decode matmul (qkv fused, gate_up fused, down, LM head)
    "smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)],
    "qwen3": [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)],
    "llama8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    # one rank's shards at TP=2 and TP=4 (column-parallel N / tp, row-parallel K / tp), and the LM head
    "llama8b_tp2": [(3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)],
    "llama8b_tp4": [(1536, 4096), (4096, 1024), (7168, 4096), (4096, 3584)],
    "lmhead8b": [(128256, 4096), (64128, 4096), (32064, 4096)],
}


def main() -> None:
    import torch.nn.functional as F
    import triton.testing

    from distllm.ops import triton_gemv as tg

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="smollm2,qwen3,llama8b")
    ap.add_argument("--ms", default="1,2,4")
    ap.add_argument("--quick", action="store_true", help="fewer sweep configs")
    ap.add_argument("--large", action="store_true",
                    help="the sweep for large weights: K loops with pipelined loads (num_stages), BLOCK_M rows of x")
    ap.add_argument("--gate-up", default="",
                    help="instead: gemv_gate_up (the gate/up GEMV with its SiLU epilogue) vs cuBLAS + SiLU-and-mul, "
                         "with a tile sweep, for these comma-separated gate/up output sizes N (e.g. 14336,7168) at K=--gate-up-k")
    ap.add_argument("--gate-up-k", type=int, default=4096, help="K of --gate-up's weights (Qwen3-0.6B: 1024)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemv needs a CUDA device")
    if a.gate_up:
        return gate_up_sweep([int(v) for v in a.gate_up.split(",")], a.gate_up_k)
    ms = [int(v) for v in a.ms.split(",")]
    block_ns = (2, 4, 8, 16) if a.quick else (1, 2, 4, 8, 16, 32)
    block_ks = (256, 1024, 2048) if a.quick else (64, 128, 256, 512, 1024, 2048)
    warps = (4,) if a.quick else (1, 2, 4, 8)
    configs = list(itertools.product(block_ns, block_ks, warps))
    if a.large:  # (BLOCK_N, BLOCK_K, warps, num_stages, BLOCK_M)
        configs = list(itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (2, 4), (1,)))
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{len(configs)} configs swept; CUDA-graph timing (median us)", flush=True)

    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)

    def bench(one) -> float:
        """us per call of one(w) over the rotating copies of W."""
        def fn():
            for wc in ws:
                one(wc)
        fn()
        torch.cuda.synchronize()
        try:
            t = triton.testing.do_bench_cudagraph(fn, rep=20)
        except Exception:  # noqa: BLE001 - an older Triton: plain timing
            t = triton.testing.do_bench(fn, warmup=5, rep=20)
        return t * 1e3 / len(ws)

    gen = torch.Generator().manual_seed(0)
    ws: list[torch.Tensor] = []
    best_rows = []
    for fam in a.shapes.split(","):
        for n, k in SHAPES[fam]:
            w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.bfloat16).cuda()
            gb = n * k * 2 / 1e9
            # Copies of W worth twice the L2, each multiplied once per timed call: in a decode step
            # every weight comes from HBM, as it does here (time is per copy).
            ws = [w] + [w.clone() for _ in range(max(0, -(-2 * l2_bytes // (n * k * 2)) - 1))]
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
                ref = F.linear(x.float(), w.float())
                t_cublas = bench(lambda wc: F.linear(x, wc))
                t_default = bench(lambda wc: tg.gemv(x, wc))
                times = []
                run = configs
                if a.large and m > 1:  # the same tiles with every row of x in one program
                    run = [c[:4] + (triton.next_power_of_2(m),) for c in configs]
                for cfg in run:
                    rows = cfg[4] if len(cfg) > 4 else 1
                    if cfg[1] > max(64, triton.next_power_of_2(k)) or rows * cfg[0] * cfg[1] > 16384:
                        continue
                    try:
                        y = tg.gemv(x, w, config=cfg)
                        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                        if err > 2e-2:
                            print(f"  ERR {cfg}: rel err {err:.1e}", flush=True)
                            continue
                        times.append((bench(lambda wc: tg.gemv(x, wc, config=cfg)), cfg))
                    except Exception as e:  # noqa: BLE001 - a config that doesn't compile is skipped
                        print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                best_t, best_cfg = min(times)
                best_rows.append((fam, n, k, m, t_cublas, t_default, best_t, best_cfg))
                print(f"{fam:8s} N={n:6d} K={k:6d} M={m}: cuBLAS {t_cublas:7.2f} us ({gb / t_cublas * 1e6:6.0f} GB/s) | "
                      f"gemv default {gemv_cfg_text(tg.gemv_config(n, k))} {t_default:7.2f} us | best {best_cfg} "
                      f"{best_t:7.2f} us ({gb / best_t * 1e6:6.0f} GB/s) -> {t_cublas / best_t:.2f}x", flush=True)
    print("\nbest configs (fam, N, K, M, cublas_us, default_us, best_us, (BLOCK_N, BLOCK_K, warps)):")
    for r in best_rows:
        print(f"  {r[0]}, {r[1]}, {r[2]}, {r[3]}, {r[4]:.2f}, {r[5]:.2f}, {r[6]:.2f}, {r[7]}")


def _bench_rotating(one, ws) -> float:
    """us per call of one(w) over copies of W worth twice the L2 (weights come from HBM)."""
    import triton.testing

    def fn():
        for wc in ws:
            one(wc)
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3 / len(ws)


def gate_up_sweep(ns: list[int], k: int) -> None:
    """gemv_gate_up's tiles for [2N, K] stacked weights vs cuBLAS then the SiLU-and-mul kernel."""
    import torch.nn.functional as F

    from distllm.ops import dispatch
    from distllm.ops import triton_gemv as tg

    configs = list(itertools.product((2, 4, 8, 16), (512, 1024), (4, 8), (3, 4)))
    print(f"card: {torch.cuda.get_device_name()}; gate/up GEMV + SiLU epilogue, K={k}, M=1; {len(configs)} configs; "
          f"CUDA-graph timing, weights from HBM", flush=True)
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    gen = torch.Generator().manual_seed(0)
    for n in ns:
        w = (torch.randn(2 * n, k, generator=gen) / k**0.5).to(torch.bfloat16).cuda()
        ws = [w] + [w.clone() for _ in range(max(0, -(-2 * l2_bytes // w.nbytes) - 1))]
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16).cuda()
        ref = dispatch.silu_and_mul(F.linear(x, w)).float()
        t_cublas = _bench_rotating(lambda wc: dispatch.silu_and_mul(F.linear(x, wc)), ws)
        times = []
        for cfg in configs:
            try:
                err = ((tg.gemv_gate_up(x, w, config=cfg).float() - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    print(f"  ERR {cfg}: rel err {err:.1e}", flush=True)
                    continue
                times.append((_bench_rotating(lambda wc: tg.gemv_gate_up(x, wc, config=cfg), ws), cfg))
            except Exception as e:  # noqa: BLE001 - a config that doesn't compile is skipped
                print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        times.sort()
        t_default = _bench_rotating(lambda wc: tg.gemv_gate_up(x, wc), ws)
        gb = w.nbytes / 1e9
        print(f"N={n} (weight {2 * n}x{k}): cuBLAS + silu_and_mul {t_cublas:.2f} us ({gb / t_cublas * 1e6:.0f} GB/s); "
              f"default {gemv_cfg_text(tg.gate_up_config(n, k))} {t_default:.2f} us; best "
              + ", ".join(f"{gemv_cfg_text(c)} {t:.2f}" for t, c in times[:4]), flush=True)
        print(f"BEST {n} {','.join(str(v) for v in times[0][1])}", flush=True)


def gemv_cfg_text(cfg: tuple) -> str:
    return "x".join(str(v) for v in cfg)


if __name__ == "__main__":
    main()
