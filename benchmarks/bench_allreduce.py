"""All-reduce latency: NCCL against distllm's custom one-shot all-reduce, eager and in a CUDA graph.

For each message size (bf16): NCCL eager, NCCL replayed in a CUDA graph, custom eager, custom
in a graph. Eager: CUDA events around CALLS back-to-back calls, per-call time, median over
ROUNDS rounds. Graph: one graph of CALLS back-to-back all-reduces, replayed ROUNDS times,
elapsed / CALLS, median. Every round starts after a barrier (NCCL all-reduce + synchronize),
so rank skew is not counted. Rank 0 prints the card, a table, and (with --out) writes JSON.

    NCCL_NVLS_ENABLE=0 python benchmarks/bench_allreduce.py --world-size 2 [--sizes 8K,64K,2M]

The custom path is timed at every size its buffer holds, whether or not the engine would take
it there (custom_all_reduce.DEFAULT_MAX_BYTES): this table is what that limit is tuned from.

A second table times what decode runs after each row-parallel layer, the all-reduce fused with
the residual add and RMSNorm, on rows of --hidden bf16 (--norm-rows), with the flag kernel and
with the flag-in-word one (ops/triton_all_reduce_ll, DISTLLM_ALL_REDUCE_LL), in CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

CALLS = 100
ROUNDS = 20


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
    return int(s[:-1] if s[-1] in "KM" else s) * mult


def _barrier(dev) -> None:
    t = torch.zeros(1, device=dev)
    dist.all_reduce(t)
    torch.cuda.synchronize(dev)


def _time_eager(fn, x, dev) -> float:
    """Median µs per call over ROUNDS rounds of CALLS back-to-back calls."""
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(ROUNDS):
        _barrier(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(CALLS):
            fn(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / CALLS)
    return statistics.median(times)


def _time_graph(fn, x, dev) -> float:
    """Median µs per all-reduce: one graph of CALLS back-to-back calls, replayed ROUNDS times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the default stream, as torch.cuda.graph expects
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    _barrier(dev)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn(x)
    g.replay()  # first replay uploads the graph
    times = []
    for _ in range(ROUNDS):
        _barrier(dev)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / CALLS)
    del g
    return statistics.median(times)


def _fused_norm_rows(car, norm_rows: list[int], hidden: int, dev) -> list[dict]:
    """Graph µs of all_reduce_add_rms_norm per row count, flag kernel vs LL (every rank sets
    car.use_ll alike, as the engine's agreement would), each checked first against NCCL."""
    from distllm.ops.triton_all_reduce_ll import fits

    rows_out = []
    w = torch.ones(hidden, dtype=torch.bfloat16, device=dev)
    for rows in norm_rows:
        x = torch.zeros(rows, hidden, dtype=torch.bfloat16, device=dev)
        row = {"rows": rows, "hidden": hidden}
        for ll in (False, True):
            if ll and not fits(rows, hidden, 2):
                continue
            car.use_ll = ll
            name = "ll" if ll else "flag"
            v = torch.randint(-8, 9, x.shape, device=dev).to(x.dtype)
            want = v.clone()
            dist.all_reduce(want)
            _, summed = car.all_reduce_add_rms_norm(v, torch.zeros_like(v), w, 1e-5)
            row[f"{name}_matches_nccl"] = bool(torch.equal(summed, want))
            row[f"{name}_graph_us"] = _time_graph(lambda t: car.all_reduce_add_rms_norm(t, t, w, 1e-5), x, dev)
        car.use_ll = False
        rows_out.append(row)
    return rows_out


def _worker(rank: int, world: int, init_file: str, sizes: list[int], out_path: str | None,
            norm_rows: list[int] | None = None, hidden: int = 4096) -> None:
    from distllm.distributed.custom_all_reduce import BUFFER_BYTES, init_custom_all_reduce

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _barrier(dev)
    car = init_custom_all_reduce(dist.group.WORLD, rank, world, dev)
    rows = []
    for nbytes in sizes:
        # Zeros: repeated in-place sums stay finite (values don't change the timing).
        x = torch.zeros(nbytes // 2, dtype=torch.bfloat16, device=dev)
        row = {"bytes": nbytes}
        row["nccl_eager_us"] = _time_eager(lambda t: dist.all_reduce(t), x, dev)
        row["nccl_graph_us"] = _time_graph(lambda t: dist.all_reduce(t), x, dev)
        if car is not None and nbytes <= BUFFER_BYTES:
            # Sanity first: small integers sum exactly in any order, so custom == NCCL bit for bit.
            v = torch.randint(-8, 9, x.shape, device=dev).to(x.dtype)
            want = v.clone()
            dist.all_reduce(want)
            row["custom_matches_nccl"] = bool(torch.equal(car.all_reduce(v), want))
            row["custom_eager_us"] = _time_eager(car.all_reduce, x, dev)
            row["custom_graph_us"] = _time_graph(car.all_reduce, x, dev)
            row["custom_used_by_engine"] = car.should_use(x)
        rows.append(row)
    norm = _fused_norm_rows(car, norm_rows or [], hidden, dev) if car is not None else []
    if car is not None:
        torch.cuda.synchronize()
        assert car.errors() == 0, "custom all-reduce barrier timed out"
    if rank == 0:
        _report(world, rows, car is not None, out_path)
        for r in norm:
            print(f"all-reduce + add + RMSNorm, {r['rows']} x {r['hidden']} bf16, graph µs: flag kernel "
                  f"{_fmt(r['flag_graph_us']).strip()} (== NCCL: {r['flag_matches_nccl']}), LL "
                  f"{_fmt(r.get('ll_graph_us')).strip()} (== NCCL: {r.get('ll_matches_nccl', '-')})")
    _barrier(dev)
    dist.destroy_process_group()


def _fmt(v) -> str:
    return f"{v:12.1f}" if isinstance(v, float) else f"{'-':>12}"


def _report(world: int, rows: list[dict], custom_on: bool, out_path: str | None) -> None:
    import triton

    card = torch.cuda.get_device_name(0)
    v = torch.cuda.nccl.version()
    nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    print(f"\n{world} x {card}; torch {torch.__version__}, triton {triton.__version__}, NCCL {nccl}, "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE', '(unset)')}")
    if not custom_on:
        print("custom all-reduce did not come up (see its log line): NCCL columns only")
    print(f"all-reduce latency, bf16, median µs per call ({CALLS} calls x {ROUNDS} rounds)")
    cols = ["NCCL eager", "NCCL graph", "custom eager", "custom graph", "graph speedup"]
    print(f"{'size':>8} | " + " | ".join(f"{c:>12}" for c in cols) + " | engine uses custom | custom == NCCL")
    for r in rows:
        size = f"{r['bytes'] >> 20} MB" if r["bytes"] >= 1 << 20 else f"{r['bytes'] >> 10} KB"
        cg = r.get("custom_graph_us")
        speed = f"{r['nccl_graph_us'] / cg:11.2f}x" if cg else f"{'-':>12}"
        vals = [_fmt(r["nccl_eager_us"]), _fmt(r["nccl_graph_us"]), _fmt(r.get("custom_eager_us")), _fmt(cg), speed]
        print(f"{size:>8} | " + " | ".join(vals) + f" | {str(r.get('custom_used_by_engine', '-')):>18} | "
              f"{r.get('custom_matches_nccl', '-')}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump({"card": card, "world_size": world, "nccl": nccl, "rows": rows}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--sizes", default="8K,64K,2M", help="message sizes in bytes (K, M suffixes)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--norm-rows", default="1,8", help="row counts for the fused all-reduce + norm table ('' = none)")
    ap.add_argument("--hidden", type=int, default=4096, help="row width of that table")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world_size:
        sys.exit(f"needs {args.world_size} GPUs, have {torch.cuda.device_count()}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as d:
        norm_rows = [int(r) for r in args.norm_rows.split(",") if r.strip()]
        mp.spawn(_worker, args=(args.world_size, os.path.join(d, "init"), sizes, args.out, norm_rows, args.hidden),
                 nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
