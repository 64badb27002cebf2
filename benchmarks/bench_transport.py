"""Per-step cost of the driver <-> worker transport, with workers that do no model work.

Each step the driver sends a StepPlan and waits for rank 0's StepResult. Two modes:

* ``full``: what a real step pays outside the model: driver encode_plan -> send -> worker
  recv + decode_plan -> worker builds a StepResult (one sampled id per request) + encode_result
  -> send -> driver recv + decode_result.
* ``raw``: the transport alone (framing, HMAC, ZeroMQ hops): pre-encoded plan/result bytes of
  the same sizes, no msgpack codec on either side.

Workers are spawned processes (as with the ``mp`` executor), so driver and worker do not share
a GIL. Batch 256 = 256 cached (decoding) requests with one new token each; batch 1 = one.

    python benchmarks/bench_transport.py [--steps 2000] [--workers 1] [--modes ipc,tcp]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from distllm.core.plan import (  # noqa: E402
    CachedRequestData,
    StepPlan,
    StepResult,
    decode_plan,
    decode_result,
    encode_plan,
    encode_result,
)
from distllm.distributed.transport import (  # noqa: E402
    DriverChannel,
    ShutdownRequested,
    TransportConfig,
    WorkerChannel,
)


def make_plan(step_id: int, req_ids: list[str]) -> StepPlan:
    cached = [
        # every 16th request crosses a block boundary this step (block size 16)
        CachedRequestData(
            rid, [1000 + (step_id * 7 + i) % 30000], [step_id * 256 + i] if i % 16 == 0 else [], 300 + step_id + i
        )
        for i, rid in enumerate(req_ids)
    ]
    return StepPlan(step_id=step_id, cached_requests=cached, num_scheduled_tokens={rid: 1 for rid in req_ids})


def make_result(step_id: int, req_ids) -> StepResult:
    # As the model runner builds it: sampled ids in columns, no per-request objects.
    ids = list(req_ids)
    return StepResult(step_id=step_id, sampled_req_ids=ids,
                      sampled_token_ids=[(step_id * 31 + i) % 49152 for i in range(len(ids))])


def worker_main(cfg_dict: dict, rank: int, codec: bool, raw_result: bytes) -> None:
    w = WorkerChannel(TransportConfig.from_dict(cfg_dict), rank)
    try:
        while True:
            got = w.recv_plan(timeout_s=60)
            if got is None:
                return
            step_id, payload = got
            if codec:
                plan = decode_plan(payload)
                if rank == 0:
                    w.send_result(step_id, encode_result(make_result(step_id, plan.num_scheduled_tokens)))
            elif rank == 0:
                w.send_result(step_id, raw_result)
    except ShutdownRequested:
        pass
    finally:
        w.close()


def run_one(mode: str, batch: int, codec: bool, steps: int, warmup: int, n_workers: int) -> dict:
    req_ids = [f"cmpl-{uuid.uuid4().hex}-0" for _ in range(batch)]
    raw_plan = encode_plan(make_plan(1, req_ids))
    raw_result = encode_result(make_result(1, req_ids))
    plans = [make_plan(s, req_ids) for s in range(warmup + steps + 1)]
    cfg = TransportConfig.create(mode)
    d = DriverChannel(cfg)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker_main, args=(cfg.to_dict(), r, codec, raw_result), daemon=True)
        for r in range(n_workers)
    ]
    for p in procs:
        p.start()
    try:
        d.wait_for_workers(n_workers, timeout_s=60)
        times, enc, dec = [], [], []
        for s in range(1, warmup + steps + 1):
            t0 = time.perf_counter()
            payload = encode_plan(plans[s]) if codec else raw_plan
            t1 = time.perf_counter()
            d.send_plan(s, payload)
            got = d.recv_result(timeout_s=30)
            if got is None:
                raise RuntimeError(f"no result for step {s}")
            t2 = time.perf_counter()
            if codec:
                res = decode_result(got[1])
                assert res.step_id == s and len(res.sampled_token_ids) == batch
            t3 = time.perf_counter()
            if s > warmup:
                times.append((t3 - t0) * 1e6)
                enc.append((t1 - t0) * 1e6)
                dec.append((t3 - t2) * 1e6)
        d.send_shutdown()
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        d.close()
        cfg.cleanup()
    times.sort()
    return {
        "median": statistics.median(times),
        "p99": times[min(len(times) - 1, int(len(times) * 0.99))],
        "enc": statistics.median(enc),
        "dec": statistics.median(dec),
        "plan_bytes": len(raw_plan),
        "result_bytes": len(raw_result),
    }


def framing_cost(nbytes: int, n: int = 3000) -> tuple[float, float]:
    """CPU cost (us) of signing and of verifying one message of nbytes (header + HMAC-SHA256)."""
    cfg = TransportConfig.create("ipc")
    d = DriverChannel(cfg)
    w = WorkerChannel(cfg, 0)
    try:
        payload = os.urandom(nbytes)
        t0 = time.perf_counter()
        for s in range(n):
            frames = d._frames("plan", s, payload, -1)
        t1 = time.perf_counter()
        for _ in range(n):
            w._last_seq.clear()
            assert w._verify(frames) is not None
        t2 = time.perf_counter()
    finally:
        w.close()
        d.close()
        cfg.cleanup()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1, help="subscribers (tensor-parallel ranks); rank 0 replies")
    ap.add_argument("--modes", default="ipc,tcp")
    ap.add_argument("--batches", default="1,256")
    args = ap.parse_args()
    print(
        f"# {os.cpu_count()} CPUs visible, {args.workers} worker process(es), "
        f"{args.steps} steps (+{args.warmup} warmup)"
    )
    print(f"{'transport':9} {'batch':>5} {'what':>5} {'plan B':>7} {'res B':>6} {'median us':>10} {'p99 us':>9}"
          f" {'drv enc us':>10} {'drv dec us':>10}")
    for mode in args.modes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for codec in (False, True):
                r = run_one(mode, batch, codec, args.steps, args.warmup, args.workers)
                what = "full" if codec else "raw"
                print(
                    f"{mode:9} {batch:5d} {what:>5} {r['plan_bytes']:7d} {r['result_bytes']:6d}"
                    f" {r['median']:10.1f} {r['p99']:9.1f}"
                    + (f" {r['enc']:10.1f} {r['dec']:10.1f}" if codec else f" {'-':>10} {'-':>10}"),
                    flush=True,
                )
    print("# transport CPU cost per message (framing + HMAC-SHA256), no wakeups:")
    for nbytes in (104, 12741, 23868):
        sg, vf = framing_cost(nbytes)
        print(f"#   {nbytes:6d} B payload: sign {sg:6.1f} us, verify {vf:6.1f} us")


if __name__ == "__main__":
    main()
