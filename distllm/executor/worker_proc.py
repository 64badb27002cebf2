"""The worker side of the ``mp`` and ``ray`` executors: one loop per tensor-parallel rank.

Everything a worker gets is a plain value (the EngineConfig dict, the TransportConfig dict,
ints and strings), so the same function runs in a spawned process and inside a Ray actor.

Protocol on top of ``distllm.distributed.transport`` (all frames HMAC-signed, msgpack only):

1. The worker connects its channel, finishes the transport handshake, and waits for the
   driver's ``plan`` step ``GO_STEP`` (sent once *every* rank is subscribed: a report sent
   before the driver's handshake ends would be dropped by it).
2. It starts the Worker (device, TP group, weights, profiling) and reports
   ``res`` step ``STARTED_STEP`` with ``{"rank", "num_blocks"}``.
3. The driver publishes ``plan`` step ``INIT_KV_STEP`` with ``{"num_blocks": min over ranks}``;
   every rank allocates exactly that many blocks and reports ``res`` step ``KV_READY_STEP``.
4. Step loop: every ``plan`` with step id >= 0 is a StepPlan; all ranks run it, rank 0 replies.
   Any exception is sent as an ``err`` frame (with the traceback) and the worker exits: the
   other ranks may be stuck in a collective, and the driver tears the whole group down.
5. A ``ctl shutdown`` ends the loop; the TP group is destroyed and the channel closed.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import deque
from typing import Any

import msgpack

GO_STEP = -3  # driver -> workers once every rank is subscribed: start loading
STARTED_STEP = -1
INIT_KV_STEP = -1
KV_READY_STEP = -2

_HANDSHAKE_TIMEOUT_S = 120.0
_GO_TIMEOUT_S = 1800.0  # the other ranks may still be starting (Ray actors, slow imports)
_POLL_S = 1.0
# Socket wait between checks of the running step: short against a step, long against a syscall.
_SPIN_S = 0.0002


def _set_cpu_threads(engine_config: dict[str, Any], tp: int) -> None:
    """Intra-op threads per rank: tp ranks share this host's cores.

    On CPU each rank gets cores // tp (oversubscribed gloo steps crawl). On GPU a rank's CPU
    work is kernel launches and small input tensors: one thread, as vLLM does, since every
    extra OpenMP pool spins on the cores the other ranks' launch threads need. OMP_NUM_THREADS
    set by the user wins.
    """
    import torch

    from distllm.models.source import resolve_device

    if os.environ.get("OMP_NUM_THREADS"):
        return
    if resolve_device(engine_config.get("device", "auto")) == "cuda":
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, tp)))


def run_worker(
    engine_config: dict[str, Any],
    transport_config: dict[str, Any],
    rank: int,
    local_rank: int,
    dist_init_method: str,
    should_stop=None,
) -> None:
    """The whole life of one rank. ``should_stop()`` (optional) is polled between plans."""
    from distllm.distributed.transport import ShutdownRequested, TransportConfig, WorkerChannel

    tcfg = TransportConfig.from_dict(transport_config)
    channel = WorkerChannel(tcfg, rank)
    step_id = -1
    worker = None
    step_times: list[float] = []  # seconds inside decode + execute + reply, per step
    try:
        if not channel.handshake(_HANDSHAKE_TIMEOUT_S):
            raise TimeoutError(f"rank {rank}: no sync from the driver within {_HANDSHAKE_TIMEOUT_S}s")
        deadline = time.monotonic() + _GO_TIMEOUT_S
        while True:
            got = channel.recv_plan(max(0.0, deadline - time.monotonic()))
            if got is None:
                raise TimeoutError(f"rank {rank}: no start message from the driver within {_GO_TIMEOUT_S}s")
            if got[0] == GO_STEP:
                break

        from distllm.config import EngineConfig
        from distllm.core.plan import PlanDecoder, encode_result
        from distllm.worker.worker import Worker

        config = EngineConfig.from_dict(engine_config)
        tp = config.parallel_config.tensor_parallel_size
        _set_cpu_threads(engine_config, tp)
        worker = Worker(config, rank=rank, local_rank=local_rank, dist_init_method=dist_init_method)
        num_blocks = worker.start()
        channel.send_result(STARTED_STEP, msgpack.packb({"rank": rank, "num_blocks": int(num_blocks), "pid": os.getpid()}))

        # Launched steps not finished yet. With async scheduling the driver sends plan N + 1
        # while step N runs: it is launched at once (its decode inputs come from step N's
        # samples on the device), then step N is finished and answered.
        inflight: deque = deque()
        # Mirrors the driver's PlanEncoder: every plan goes through it, in order, on every rank.
        plans = PlanDecoder()
        while True:
            if should_stop is not None and should_stop():
                return
            if inflight and (inflight[0][1].ready() or len(inflight) >= 2):
                sid, pending, t0, order = inflight.popleft()
                result = worker.finish(pending)
                if rank == 0:
                    channel.send_result(sid, encode_result(result, order))
                if len(step_times) < 100_000:
                    step_times.append(time.perf_counter() - t0)
                continue
            try:
                # While a step runs, look for the next plan without sleeping past its end.
                got = channel.recv_plan(_SPIN_S if inflight else _POLL_S)
            except ShutdownRequested:
                return
            if got is None:
                continue
            step_id, payload = got
            if step_id == INIT_KV_STEP:
                n = int(msgpack.unpackb(payload, raw=False)["num_blocks"])
                worker.init_kv_cache(n)
                channel.send_result(KV_READY_STEP, msgpack.packb({"rank": rank, "num_blocks": n}))
                continue
            if step_id < 0:
                continue
            t0 = time.perf_counter()
            plan = plans.decode(payload)
            # Rank 0's result names requests by their position in this batch order (core/plan.py).
            order = list(plan.num_scheduled_tokens) if rank == 0 else None
            inflight.append((step_id, worker.launch(plan), t0, order))
    except BaseException as e:  # noqa: BLE001 - reported to the driver, then the rank exits
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            try:
                msg = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=20)}"
                channel.send_error(msg, step_id if step_id >= 0 else None)
                time.sleep(0.05)  # let the PUSH socket flush before LINGER=0 drops it
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        if os.environ.get("DISTLLM_WORKER_STATS") and step_times:
            med = sorted(step_times)[len(step_times) // 2]
            print(f"distllm worker rank {rank}: {len(step_times)} steps, median {1e3 * med:.2f} ms/step in execute",
                  flush=True)
        try:
            from distllm.distributed.parallel_state import destroy_tensor_parallel

            destroy_tensor_parallel()
        except Exception:  # noqa: BLE001
            pass
        channel.close()


def _watch_parent(parent_pid: int) -> None:
    """Exit at once when the driver process is gone (no orphans even after a driver SIGKILL)."""

    def loop() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=loop, name="distllm-parent-watch", daemon=True).start()


def mp_main(
    engine_config: dict[str, Any],
    transport_config: dict[str, Any],
    rank: int,
    local_rank: int,
    dist_init_method: str,
    parent_pid: int,
) -> None:
    """Entry point of a worker process spawned by the ``mp`` executor."""
    _watch_parent(parent_pid)
    try:
        run_worker(engine_config, transport_config, rank, local_rank, dist_init_method)
    except BaseException:  # noqa: BLE001 - already reported as an err frame
        os._exit(1)
    os._exit(0)  # skip interpreter teardown (gloo / zmq threads); everything is closed already
