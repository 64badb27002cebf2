"""Per-step cost of the driver <-> worker transport, with workers that do no model work.

Each step the driver sends a StepPlan and waits for rank 0's StepResult. Two modes:

* ``full``: what a real step pays outside the model, with the codecs the ``mp``/``ray``
  executors use: the driver's PlanEncoder -> send -> worker recv + its PlanDecoder -> worker
  builds a StepResult (one sampled id per request) + encode_result by batch position -> send ->
  driver recv + decode_result against the plan's batch order. Step 1 (in the warm-up) sends
  every request as new; the timed steps are cached diffs, as in a decode phase.
* ``raw``: the transport alone (framing, HMAC, ZeroMQ hops): pre-encoded plan/result bytes of
  the same sizes, no msgpack codec on either side.

Transports (``--modes``): ``shm`` = ipc with the shared-memory fast path (the default for
ipc), ``ipc`` = ipc over ZeroMQ alone (as with ``DISTLLM_SHM_TRANSPORT=0``), ``tcp``. Rows of
one batch size and kind sit together, so one run compares them. ``shm %``: the share of plans
(rank 0) and results (driver) taken from shared memory rather than from ZeroMQ; ``copy %``:
the share of plans (driver) and results (rank 0) whose ZeroMQ copy was sent all the same (a
reader did not ack it in time, or was asleep; see transport.py's "acked copies").

Workers are spawned processes (as with the ``mp`` executor), so driver and worker do not share
a GIL. Batch 256 = 256 cached (decoding) requests, each scheduled for one token and sending no
token ids (the workers keep the ids they sample, so the scheduler sends none in a decode phase)
and no computed count (plan format v5: the workers keep their own), every 16th with a new
block; batch 1 = one.
Request ids look like the server's (``cmpl-<32 hex>-0``). ``wrk dec``/``wrk enc``: rank 0's
median plan decode and result encode.

    python benchmarks/bench_transport.py [--steps 2000] [--workers 1] [--modes shm,ipc,tcp]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from distllm.core.plan import (  # noqa: E402
    CachedRequestData,
    NewRequestData,
    PlanDecoder,
    PlanEncoder,
    StepPlan,
    StepResult,
    decode_result,
    encode_result,
)
from distllm.distributed.shm_ring import ShmRing, create_ring  # noqa: E402
from distllm.distributed.transport import (  # noqa: E402
    DriverChannel,
    ShutdownRequested,
    TransportConfig,
    WorkerChannel,
)

_PROMPT_LEN = 64
_RING = 8
_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "top_k": -1, "seed": None, "max_tokens": 256, "logprobs": None}


def make_plan(step_id: int, req_ids: list[str]) -> StepPlan:
    if step_id == 1:  # every request arrives: prompts in full, prefilled in one step
        new = [
            NewRequestData(rid, [1000 + (i + j) % 30000 for j in range(_PROMPT_LEN)], [], [4 * i + k for k in range(4)],
                           0, dict(_SAMPLING))
            for i, rid in enumerate(req_ids)
        ]
        return StepPlan(step_id=1, new_requests=new, num_scheduled_tokens={rid: _PROMPT_LEN for rid in req_ids})
    cached = [
        # every 16th request crosses a block boundary this step (block size 16)
        CachedRequestData(rid, [], [step_id * 256 + i] if i % 16 == 0 else [])
        for i, rid in enumerate(req_ids)
    ]
    return StepPlan(step_id=step_id, cached_requests=cached, num_scheduled_tokens={rid: 1 for rid in req_ids})


_TOKENS: dict[tuple[int, int], list[int]] = {}


def make_result(step_id: int, req_ids) -> StepResult:
    # As the model runner builds it: sampled ids in columns, no per-request objects. The ids
    # come from a small table (the runner gets them with one tensor.tolist()): a Python loop
    # making them would add ~15 us a step at batch 256 that is no part of the transport.
    ids = list(req_ids)
    key = (step_id % _RING, len(ids))
    toks = _TOKENS.get(key)
    if toks is None:
        toks = _TOKENS[key] = [(step_id * 31 + i) % 49152 for i in range(len(ids))]
    return StepResult(step_id=step_id, sampled_req_ids=ids, sampled_token_ids=list(toks))


def worker_main(cfg_dict: dict, rank: int, codec: bool, raw_result: bytes, warmup: int, steps: int, stats) -> None:
    w = WorkerChannel(TransportConfig.from_dict(cfg_dict), rank)
    plans = PlanDecoder()
    dec_us, enc_us = [], []
    try:
        while True:
            got = w.recv_plan(timeout_s=60)
            if got is None:
                return
            step_id, payload = got
            if codec:
                t0 = time.perf_counter()
                plan = plans.decode(payload)
                t1 = time.perf_counter()
                if step_id > warmup:
                    dec_us.append((t1 - t0) * 1e6)
                if rank == 0:
                    order = list(plan.num_scheduled_tokens)
                    res = make_result(step_id, order)
                    t1 = time.perf_counter()
                    data = encode_result(res, order)
                    if step_id > warmup:
                        enc_us.append((time.perf_counter() - t1) * 1e6)
                    w.send_result(step_id, data)
            elif rank == 0:
                w.send_result(step_id, raw_result)
    except ShutdownRequested:
        pass
    finally:
        w.close()
        if rank == 0:
            nan = float("nan")
            stats.put((statistics.median(dec_us) if dec_us else nan, statistics.median(enc_us) if enc_us else nan,
                       w.shm_taken / max(1, warmup + steps), w.copies_sent / max(1, warmup + steps)))


def run_one(mode: str, batch: int, codec: bool, steps: int, warmup: int, n_workers: int) -> dict:
    req_ids = [f"cmpl-{uuid.uuid4().hex}-0" for _ in range(batch)]
    # Sizes of a steady (cached-diff) step, as the executors' codecs send them.
    sizer = PlanEncoder()
    sizer.encode(make_plan(1, req_ids))
    raw_plan = sizer.encode(make_plan(2, req_ids))
    raw_result = encode_result(make_result(2, req_ids), list(req_ids))
    cfg = TransportConfig.create("ipc" if mode == "shm" else mode, shm=mode == "shm")
    d = DriverChannel(cfg)
    ctx = mp.get_context("spawn")
    stats = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(cfg.to_dict(), r, codec, raw_result, warmup, steps, stats), daemon=True)
        for r in range(n_workers)
    ]
    for p in procs:
        p.start()
    wrk = (float("nan"),) * 4
    try:
        d.wait_for_workers(n_workers, timeout_s=60)
        times, enc, dec = [], [], []
        encoder = PlanEncoder()
        # A few cached-diff plans used in turn (step ids set as they go): made up front, so no
        # plan building sits between steps, yet in cache as a plan the scheduler has just made
        # is (a thousand distinct plans would not be).
        first, ring = make_plan(1, req_ids), [make_plan(s, req_ids) for s in range(2, 2 + _RING)]
        for s in range(1, warmup + steps + 1):
            plan = first if s == 1 else ring[s % _RING]
            plan.step_id = s
            t0 = time.perf_counter()
            payload = encoder.encode(plan) if codec else raw_plan
            t1 = time.perf_counter()
            d.send_plan(s, payload)
            got = d.recv_result(timeout_s=30)
            if got is None:
                raise RuntimeError(f"no result for step {s}")
            t2 = time.perf_counter()
            if codec:
                res = decode_result(got[1], list(plan.num_scheduled_tokens))
                assert res.step_id == s and res.sampled_req_ids == req_ids and len(res.sampled_token_ids) == batch
            t3 = time.perf_counter()
            if s > warmup:
                times.append((t3 - t0) * 1e6)
                enc.append((t1 - t0) * 1e6)
                dec.append((t3 - t2) * 1e6)
        d.send_shutdown()
        wrk = stats.get(timeout=30)
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
        "wrk_dec": wrk[0],
        "wrk_enc": wrk[1],
        # plans (rank 0) and results (driver) taken from shm, as a share of all
        "shm": 50 * (wrk[2] + d.shm_taken / (warmup + steps)),
        # plans (driver) and results (rank 0) whose ZeroMQ copy was sent (not acked in time)
        "copies": 50 * (wrk[3] + d.copies_sent / (warmup + steps)),
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


def _ring_peer(plan_path: str, result_path: str, n: int, reply_bytes: int) -> None:
    rin, rout = ShmRing(plan_path), ShmRing(result_path, writable=True)
    reply = b"r" * reply_bytes
    try:
        for seq in range(1, n + 1):
            while type(rin.read(seq)) is int:
                os.sched_yield()
            rout.write(seq, b"h", reply, b"m" * 32)
    finally:
        rin.close()
        rout.close()


def ring_floor(plan_bytes: int, result_bytes: int, n: int = 3000, warmup: int = 500) -> float:
    """Median round trip (us) of a frame through the shm ring and back, both sides spinning,
    with no ZeroMQ, no MAC and no codec: the floor under the ``shm raw`` rows."""
    folder = tempfile.mkdtemp(prefix="distllm-ringfloor-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    plan_path, result_path = os.path.join(folder, "plan"), os.path.join(folder, "result")
    create_ring(plan_path)
    create_ring(result_path)
    peer = mp.get_context("spawn").Process(target=_ring_peer, args=(plan_path, result_path, n, result_bytes),
                                           daemon=True)
    peer.start()
    rout, rin = ShmRing(plan_path, writable=True), ShmRing(result_path)
    payload = b"p" * plan_bytes
    times = []
    try:
        for seq in range(1, n + 1):
            t0 = time.perf_counter()
            rout.write(seq, b"h", payload, b"m" * 32)
            while type(rin.read(seq)) is int:
                os.sched_yield()
            times.append(time.perf_counter() - t0)
        peer.join(10)
    finally:
        if peer.is_alive():
            peer.kill()
        rout.close()
        rin.close()
        shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times[warmup:]) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1, help="subscribers (tensor-parallel ranks); rank 0 replies")
    ap.add_argument("--modes", default="shm,ipc,tcp", help="shm: ipc with the shm fast path; ipc: ZeroMQ only")
    ap.add_argument("--batches", default="1,256")
    args = ap.parse_args()
    print(
        f"# {os.cpu_count()} CPUs visible, {args.workers} worker process(es), "
        f"{args.steps} steps (+{args.warmup} warmup)"
    )
    print(f"{'transport':9} {'batch':>5} {'what':>5} {'plan B':>7} {'res B':>6} {'median us':>10} {'p99 us':>9}"
          f" {'shm %':>6} {'copy %':>6} {'drv enc us':>10} {'drv dec us':>10} {'wrk dec us':>10} {'wrk enc us':>10}")
    sizes = {104}
    ring_sizes: set[tuple[int, int]] = set()
    for batch in (int(b) for b in args.batches.split(",")):
        for codec in (False, True):
            for mode in args.modes.split(","):
                r = run_one(mode, batch, codec, args.steps, args.warmup, args.workers)
                what = "full" if codec else "raw"
                sizes.update((r["plan_bytes"], r["result_bytes"]))
                ring_sizes.add((r["plan_bytes"], r["result_bytes"]))
                cols = (r["enc"], r["dec"], r["wrk_dec"], r["wrk_enc"])
                print(
                    f"{mode:9} {batch:5d} {what:>5} {r['plan_bytes']:7d} {r['result_bytes']:6d}"
                    f" {r['median']:10.1f} {r['p99']:9.1f} {r['shm']:6.1f} {r['copies']:6.1f}"
                    + ("".join(f" {c:10.1f}" for c in cols) if codec else f" {'-':>10}" * 4),
                    flush=True,
                )
    if "shm" in args.modes.split(","):
        print("# shm ring alone (no ZeroMQ, MAC or codec), both sides spinning, median round trip:")
        for p_b, r_b in sorted(ring_sizes):
            print(f"#   plan {p_b:6d} B, result {r_b:6d} B: {ring_floor(p_b, r_b):6.1f} us")
    print("# transport CPU cost per message (framing + HMAC-SHA256), no wakeups:")
    for nbytes in sorted(sizes):
        sg, vf = framing_cost(nbytes)
        print(f"#   {nbytes:6d} B payload: sign {sg:6.1f} us, verify {vf:6.1f} us")


if __name__ == "__main__":
    main()
