"""GPU busy time against span in a torch.profiler Chrome trace, and where the GPU sat idle.

    DISTLLM_TORCH_PROFILE_DIR=d DISTLLM_TORCH_PROFILE_STEPS=100:110 DISTLLM_TORCH_PROFILE_TRACE=1 python ...
    python benchmarks/trace_gaps.py d/rank0.json

Prints the kernels' and copies' total time, the span from the first to the last, the idle time
in short gaps (< 50 us, the launch gaps inside a CUDA graph) by the pair of kernels around them,
and the longest gaps (the host between steps). A span far above the busy time means the steps
wait for the host, not for the GPU.

``--kernels`` adds where the chain's time went, by kernel name and grid: each kernel's
"end minus the previous event's end" (inside short gaps), averaged. With programmatic dependent
launch kernels overlap, so a kernel's own duration says little; what it adds to the chain is
how much later it ends than the one before it. ``--per N`` divides the totals by N (the number
of profiled steps times layers, say) to give a figure per layer.
"""

from __future__ import annotations

import argparse
import collections
import json

SHORT_US = 50.0
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--kernels", action="store_true", help="what each kernel adds to the chain, by name and grid")
    ap.add_argument("--per", type=float, default=0.0, help="with --kernels: also give totals divided by this")
    a = ap.parse_args()
    with open(a.trace) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    ks = sorted((e for e in events if e.get("cat") in GPU_CATS and "dur" in e), key=lambda e: e["ts"])
    if not ks:
        raise SystemExit(f"{a.trace}: no GPU events (was the profiler run with CUDA activities?)")
    busy = sum(e["dur"] for e in ks)
    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    short: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    long_gaps = []
    for prev, nxt in zip(ks, ks[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        pair = (prev["name"][:40], nxt["name"][:40])
        if gap < SHORT_US:
            short[pair] += gap
            count[pair] += 1
        else:
            long_gaps.append((gap, pair))
    print(f"{a.trace}: {len(ks)} GPU events, busy {busy:.0f} us, span {span:.0f} us ({busy / span:.0%} busy); "
          f"short gaps {sum(short.values()):.0f} us, {len(long_gaps)} gaps >= {SHORT_US:.0f} us: "
          f"{sum(g for g, _ in long_gaps):.0f} us")
    for pair, gap in short.most_common(a.top):
        print(f"  {gap:8.0f} us in {count[pair]:5d} gaps ({gap / count[pair]:.2f} us each): {pair[0]} -> {pair[1]}")
    for gap, pair in sorted(long_gaps, reverse=True)[: a.top]:
        print(f"  long gap {gap:.0f} us: {pair[0]} -> {pair[1]}")
    if a.kernels:
        print_chain_table(ks, a.per)


def chain_table(ks: list[dict]) -> dict[str, list[float]]:
    """{kernel name and grid: [end minus the previous event's end, for each occurrence]} over
    the events that follow the one before them within SHORT_US (a step's first event, after the
    host, is left out)."""
    table: dict[str, list[float]] = collections.defaultdict(list)
    prev_end = None
    for e in ks:
        end = e["ts"] + e["dur"]
        grid = (e.get("args") or {}).get("grid")
        key = e["name"][:48] + (f" {list(grid)}" if grid else "")
        if prev_end is not None and e["ts"] - prev_end < SHORT_US:
            table[key].append(end - prev_end)
        prev_end = max(prev_end or end, end)
    return table


def print_chain_table(ks: list[dict], per: float) -> None:
    table = chain_table(ks)
    total = sum(sum(v) for v in table.values())
    scale = f", total / {per:g}" if per else ""
    print(f"what each kernel adds to the chain (end minus the previous end; us{scale}):")
    for key, adds in sorted(table.items(), key=lambda kv: -sum(kv[1])):
        share = f"  {sum(adds) / per:8.2f}" if per else ""
        print(f"  {len(adds):6d} x {sum(adds) / len(adds):8.2f}  total {sum(adds):10.0f}{share}  {key}")
    print(f"  all: {total:.0f} us" + (f"; divided by {per:g}: {total / per:.2f} us" if per else ""))


if __name__ == "__main__":
    main()
