"""Time the Triton paged-attention kernels on the GPU.

Decode: achieved GB/s of KV-cache read vs the card's copy bandwidth (measured here, same run).
Prefill: TFLOP/s of a causal prefill. Optional --sweep tries kernel tuning knobs.

    python benchmarks/bench_attention.py [--dtype bf16] [--sweep] [--log PATH]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distllm.ops import triton_paged_attention as tpa  # noqa: E402
from distllm.ops.triton_kv_store import store_kv  # noqa: E402

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def copy_bandwidth() -> float:
    n = 1 << 29  # 1 GiB of bf16
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300)
    del x, y
    return 2 * n * 2 / (ms * 1e-3) / 1e9  # read + write, GB/s


def make_decode(batch, ctx, h, hkv, d, block_size, dtype):
    nb = math.ceil((ctx + 1) / block_size)
    num_blocks = batch * nb
    k_cache = torch.randn(num_blocks, block_size, hkv, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, nb)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, h, d, device="cuda", dtype=dtype)
    return q, k_cache, v_cache, block_tables, seq_lens, qsl


def graph_ms(fn, calls: int = 20) -> float:
    """ms a call, replaying `calls` back-to-back calls captured in a CUDA graph, as decode runs:
    eager timing of a kernel of a few µs measures Python's launch, not the kernel."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=100) / calls


def bench_decode(batch, ctx, h, hkv, d, block_size, dtype, num_splits=None, sdpa=True, graph=False):
    q, kc, vc, bt, sl, qsl = make_decode(batch, ctx, h, hkv, d, block_size, dtype)
    fn = lambda: tpa.paged_attention(  # noqa: E731
        q, kc, vc, bt, sl, qsl, d**-0.5, max_query_len=1, max_seq_len=ctx, num_splits=num_splits
    )
    fn()
    ms = graph_ms(fn) if graph else triton.testing.do_bench(fn, warmup=25, rep=200)
    kv_bytes = batch * ctx * hkv * d * 2 * kc.element_size()
    splits = num_splits or tpa._choose_splits(q, batch * hkv, 1, ctx, sl)
    # dense, non-paged reference point: torch SDPA (flash) over contiguous K/V of the same size
    sdpa_ms = float("nan")
    if sdpa:
        try:
            kd = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=dtype)
            vd = torch.randn_like(kd)
            qd = q.view(batch, h, 1, d)
            f2 = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)  # noqa: E731
            f2()
            sdpa_ms = triton.testing.do_bench(f2, warmup=25, rep=200)
            del kd, vd
        except Exception as e:  # pragma: no cover
            log(f"  sdpa baseline failed: {e!r}")
    del kc, vc
    return ms, kv_bytes, splits, sdpa_ms


def bench_prefill(q_len, ctx, h, hkv, d, block_size, dtype):
    nb = math.ceil((ctx + q_len) / block_size)
    kc = torch.randn(nb, block_size, hkv, d, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device="cuda").to(torch.int32).view(1, nb)
    sl = torch.tensor([ctx + q_len], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
    q = torch.randn(q_len, h, d, device="cuda", dtype=dtype)
    fn = lambda: tpa.paged_attention(q, kc, vc, bt, sl, qsl, d**-0.5, max_query_len=q_len, max_seq_len=ctx + q_len)  # noqa: E731
    fn()
    ms = triton.testing.do_bench(fn, warmup=25, rep=200)
    # causal: each query attends to ctx + (i + 1) keys; 2 matmuls x 2 flops
    keys = q_len * ctx + q_len * (q_len + 1) / 2
    flops = 4 * h * d * keys
    return ms, flops


def bench_store(T, hkv, d, block_size, dtype):
    nb = math.ceil(T / block_size) + 8
    kc = torch.empty(nb, block_size, hkv, d, device="cuda", dtype=dtype)
    vc = torch.empty_like(kc)
    key = torch.randn(T, hkv, d, device="cuda", dtype=dtype)
    val = torch.randn_like(key)
    slots = torch.randperm(nb * block_size, device="cuda")[:T]
    ms = triton.testing.do_bench(lambda: store_kv(key, val, kc, vc, slots), warmup=25, rep=200)
    return ms, 2 * 2 * key.numel() * key.element_size()


def split_sweep(h: int, hkv: int, d: int, bs: int, dtype: torch.dtype, bw: float) -> None:
    """Decode with few sequences leaves most SMs idle unless the KV range is split: time each
    split count against the heuristic's, in CUDA graphs (as decode runs)."""
    log(f"\nsplit sweep (decode), H={h} Hkv={hkv} D={d} block={bs}; µs per split count")
    # the last three: enough sequences to fill the SMs without splitting
    for batch, ctx in [(1, 256), (1, 1024), (1, 4096), (1, 32768), (4, 2048), (4, 8192), (8, 4096),
                       (16, 512), (16, 2048), (32, 1024), (32, 4096), (64, 1024), (256, 1024), (256, 4096)]:
        cells, best = [], None
        for n in (1, 2, 4, 8, 16, 32, 64) if batch < 64 else (1,):
            if n > 1 and ctx // n < 32:
                continue
            ms, nbytes, _, _ = bench_decode(batch, ctx, h, hkv, d, bs, dtype, num_splits=n, sdpa=False, graph=True)
            cells.append(f"{n}:{ms * 1e3:.1f}")
            if best is None or ms < best[0]:
                best = (ms, n, nbytes / (ms * 1e-3) / 1e9)
        ms_h, nbytes, n_h, _ = bench_decode(batch, ctx, h, hkv, d, bs, dtype, sdpa=False, graph=True)
        log(f"  b={batch} ctx={ctx}: " + " ".join(cells)
            + f" | best {best[1]} splits {best[0] * 1e3:.1f} us {100 * best[2] / bw:.0f}% copy"
            + f" | heuristic {n_h} splits {ms_h * 1e3:.1f} us {100 * nbytes / (ms_h * 1e-3) / 1e9 / bw:.0f}% copy")
        torch.cuda.empty_cache()
    # A CUDA graph's split count is made for the longest context; shorter ones leave splits empty.
    for batch, ctx, cap in [(1, 256, 4096), (1, 256, 32768), (8, 512, 8192)]:
        q, kc, vc, bt, sl, qsl = make_decode(batch, ctx, h, hkv, d, bs, dtype)
        n = tpa._choose_splits(q, batch * hkv, 1, cap, sl)
        fn = lambda: tpa.paged_attention(q, kc, vc, bt, sl, qsl, d**-0.5, max_query_len=1, max_seq_len=cap)  # noqa: E731
        log(f"  b={batch} ctx={ctx}, splits made for {cap}: {n} splits {graph_ms(fn) * 1e3:.1f} us")
        del kc, vc


GRAPH_DECODE_SHAPES = [(2, 1024), (4, 2048), (8, 4096), (16, 512), (16, 2048), (32, 1024), (32, 4096), (64, 1024),
                       (256, 512), (256, 832)]


def graph_decode(h: int, hkv: int, d: int, bs: int, dtype: torch.dtype, bw: float) -> None:
    """Decode as the engine runs it: CUDA graphs, the heuristic's split count, from 2 to 256
    sequences (256 x 832 keys is long256's batch halfway through)."""
    log(f"\ndecode in CUDA graphs, H={h} Hkv={hkv} D={d} block={bs}, heuristic splits")
    for batch, ctx in GRAPH_DECODE_SHAPES:
        ms, nbytes, splits, _ = bench_decode(batch, ctx, h, hkv, d, bs, dtype, sdpa=False, graph=True)
        log(f"  b={batch} ctx={ctx}: {ms * 1e3:.1f} us, {splits} splits, {100 * nbytes / (ms * 1e-3) / 1e9 / bw:.0f}% copy")
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--sweep", action="store_true", help="try BLOCK_N x NUM_STAGES for decode")
    ap.add_argument("--split-sweep", action="store_true",
                    help="small-batch decode: every split-KV count vs the heuristic's, in CUDA graphs (then exit)")
    ap.add_argument("--graph-decode", action="store_true",
                    help="decode from 2 to 256 sequences in CUDA graphs, heuristic splits (then exit)")
    ap.add_argument("--log", default=os.path.join(os.environ.get("OUT", "."), "bench_attention.log"))
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    name = torch.cuda.get_device_name()
    log(f"device: {name}  SMs: {torch.cuda.get_device_properties(0).multi_processor_count}  "
        f"torch {torch.__version__}  triton {triton.__version__}  dtype {args.dtype}")
    bw = copy_bandwidth()
    log(f"copy bandwidth (read+write): {bw:.0f} GB/s")

    h, hkv, d, bs = 32, 8, 128, 16
    if args.split_sweep:
        split_sweep(h, hkv, d, bs, dtype, bw)
        return
    if args.graph_decode:
        graph_decode(h, hkv, d, bs, dtype, bw)
        return
    rows = []
    decode_cfgs = [(1, 4096), (1, 32768), (4, 8192), (8, 4096), (16, 2048), (32, 4096),
                   (64, 1024), (64, 4096), (128, 2048), (256, 4096)]
    log(f"\ndecode, H={h} Hkv={hkv} D={d} block={bs}")
    for batch, ctx in decode_cfgs:
        ms, nbytes, splits, sdpa_ms = bench_decode(batch, ctx, h, hkv, d, bs, dtype)
        gbs = nbytes / (ms * 1e-3) / 1e9
        sdpa_gbs = nbytes / (sdpa_ms * 1e-3) / 1e9
        rows.append((f"decode b={batch} ctx={ctx}", f"{ms * 1e3:.1f} us", f"{gbs:.0f} GB/s",
                     f"{100 * gbs / bw:.0f}% copy", f"splits={splits}", f"sdpa-dense {sdpa_gbs:.0f} GB/s"))
        log("  " + " | ".join(rows[-1]))
        torch.cuda.empty_cache()

    if args.sweep:
        log("\nsweep (decode): BLOCK_N x NUM_STAGES")
        # Decode takes DECODE_* when it walks long KV ranges (few splits), else the plain knobs: set both.
        base = (tpa.BLOCK_N, tpa.NUM_STAGES, tpa.DECODE_BLOCK_N, tpa.DECODE_NUM_STAGES)
        for batch, ctx in [(1, 32768), (8, 4096), (64, 4096), (256, 4096)]:
            best = None
            for bn, st in itertools.product([32, 64, 128], [2, 3, 4]):
                tpa.BLOCK_N, tpa.NUM_STAGES, tpa.DECODE_BLOCK_N, tpa.DECODE_NUM_STAGES = bn, st, bn, st
                try:
                    ms, nbytes, splits, _ = bench_decode(batch, ctx, h, hkv, d, bs, dtype)
                except Exception as e:
                    log(f"  b={batch} ctx={ctx} BLOCK_N={bn} stages={st}: failed {e!r}")
                    continue
                gbs = nbytes / (ms * 1e-3) / 1e9
                log(f"  b={batch} ctx={ctx} BLOCK_N={bn} stages={st}: {ms * 1e3:.1f} us {gbs:.0f} GB/s")
                if best is None or ms < best[0]:
                    best = (ms, bn, st, gbs)
            log(f"  best b={batch} ctx={ctx}: BLOCK_N={best[1]} stages={best[2]} {best[3]:.0f} GB/s")
            torch.cuda.empty_cache()
        tpa.BLOCK_N, tpa.NUM_STAGES, tpa.DECODE_BLOCK_N, tpa.DECODE_NUM_STAGES = base

    log(f"\nprefill (causal), H={h} Hkv={hkv} D={d}")
    for q_len, ctx in [(512, 0), (2048, 0), (4096, 0), (1024, 3072)]:
        ms, flops = bench_prefill(q_len, ctx, h, hkv, d, bs, dtype)
        rows.append((f"prefill q={q_len} ctx={ctx}", f"{ms * 1e3:.1f} us", f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s", "", "", ""))
        log("  " + " | ".join(rows[-1]))

    log("\nstore_kv")
    for T in [64, 8192]:
        ms, nbytes = bench_store(T, hkv, d, bs, dtype)
        rows.append((f"store_kv T={T}", f"{ms * 1e3:.1f} us", f"{nbytes / (ms * 1e-3) / 1e9:.0f} GB/s", "", "", ""))
        log("  " + " | ".join(rows[-1]))

    with open(args.log, "w") as f:
        f.write("\n".join(LOG) + "\n")
    print(f"\n=== summary ({name}, copy {bw:.0f} GB/s; log: {args.log}) ===")
    for r in rows:
        print(" | ".join(x for x in r if x))


if __name__ == "__main__":
    main()
