"""Time the fused Triton elementwise ops against the torch path they replace, per op.

Llama-3.1-8B shapes (hidden 4096, 32 q / 8 kv heads of 128, intermediate 14336), bf16, at
decode (T=1) and prefill (T=4096). Two timings per op:
  graph: GPU time per call inside a CUDA graph (triton.testing.do_bench_cudagraph): what a
         captured decode step pays, launch gaps between kernels included;
  eager: triton.testing.do_bench, host launch overhead included.
The last lines estimate the per-step saving of an 8B decode step (32 layers; per layer: one
rms_norm-or-fused-add, one fused add, one rotary, one silu-and-mul).

    python benchmarks/bench_fused_ops.py [--tokens 1 4096] [--qk-norm]

--qk-norm adds Qwen3's per-head q norm alone and q/k norms + rotary fused into one launch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distllm.layers.rotary import RotaryEmbedding  # noqa: E402
from distllm.ops import fused_ref  # noqa: E402
from distllm.ops import triton_activation, triton_argmax, triton_norm, triton_rotary  # noqa: E402

HIDDEN, HQ, HK, D, INTER, LAYERS = 4096, 32, 8, 128, 14336, 32
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def make_ops(t: int, qk_norm: bool) -> dict[str, tuple]:
    """name -> (torch fn, fused fn) on fresh bf16 inputs of T tokens."""
    bf = torch.bfloat16
    x = torch.randn(t, HIDDEN, device="cuda", dtype=bf)
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, device="cuda", dtype=bf) * 0.1 + 1
    qkv = torch.randn(t, (HQ + 2 * HK) * D, device="cuda", dtype=bf)
    q = qkv[:, : HQ * D].view(t, HQ, D)  # [T, Hq, D] strided views, as in the model
    k = qkv[:, HQ * D : (HQ + HK) * D].view(t, HK, D)
    pos = torch.randint(0, 8192, (t,), device="cuda")
    cache = RotaryEmbedding(D, 131072, 500000.0, SCALING).to("cuda").cos_sin_cache
    gu = torch.randn(t, 2 * INTER, device="cuda", dtype=bf)
    hw = torch.randn(D, device="cuda", dtype=bf) * 0.1 + 1
    logits = torch.randn(min(t, 256), 128256, device="cuda")
    ops = {
        "rms_norm": (lambda: fused_ref.rms_norm_ref(x, w, 1e-5), lambda: triton_norm.rms_norm(x, w, 1e-5)),
        "add_rms_norm": (
            lambda: fused_ref.fused_add_rms_norm_ref(x, res, w, 1e-5),
            lambda: triton_norm.fused_add_rms_norm(x, res, w, 1e-5),
        ),
        "rotary_qk": (
            lambda: fused_ref.rotary_ref(pos, q, k, cache),
            lambda: triton_rotary.rotary_embedding(pos, q, k, cache),
        ),
        "silu_and_mul": (lambda: fused_ref.silu_and_mul_ref(gu), lambda: triton_activation.silu_and_mul(gu)),
        # Greedy sampling, once a step on at most max_num_seqs rows of fp32 logits (Llama-3 vocabulary).
        "argmax": (lambda: logits.argmax(dim=-1), lambda: triton_argmax.argmax_last_dim(logits)),
    }
    if qk_norm:
        ops["q_head_norm"] = (lambda: fused_ref.rms_norm_ref(q, hw, 1e-6), lambda: triton_norm.rms_norm(q, hw, 1e-6))
        # Qwen3: q_norm + k_norm + rotary (3 ops, ~30 torch kernels) vs one fused launch.
        ops["qk_norm_rotary"] = (
            lambda: fused_ref.rotary_ref(pos, fused_ref.rms_norm_ref(q, hw, 1e-6), fused_ref.rms_norm_ref(k, hw, 1e-6), cache),
            lambda: triton_rotary.rotary_embedding(pos, q, k, cache, q_weight=hw, k_weight=hw, eps=1e-6),
        )
    return ops


def time_us(fn, graph: bool) -> float:
    fn()
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=40) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4096])
    ap.add_argument("--qk-norm", action="store_true", help="also time Qwen3's per-head norms (alone and fused with rotary)")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    per_layer = {"rms_norm": 0, "add_rms_norm": 2, "rotary_qk": 1, "silu_and_mul": 1}  # decode layer's calls
    for t in args.tokens:
        print(f"\nT={t}  (bf16, us per call)")
        print(f"{'op':14s} {'torch graph':>12s} {'fused graph':>12s} {'speedup':>8s} {'torch eager':>12s} {'fused eager':>12s}")
        saved = 0.0
        for name, (ref_fn, fused_fn) in make_ops(t, args.qk_norm).items():
            tg, fg = time_us(ref_fn, True), time_us(fused_fn, True)
            te, fe = time_us(ref_fn, False), time_us(fused_fn, False)
            print(f"{name:14s} {tg:12.2f} {fg:12.2f} {tg / fg:7.2f}x {te:12.2f} {fe:12.2f}")
            saved += per_layer.get(name, 0) * (tg - fg)
        print(f"est. saving per forward ({LAYERS} layers, in a graph): {saved * LAYERS / 1e3:.3f} ms"
              " (argmax, once a step, not included)")


if __name__ == "__main__":
    main()
