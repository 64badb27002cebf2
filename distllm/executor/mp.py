"""Worker processes on this host (``distributed_executor_backend="mp"``), and the driver-side
logic that ``mp`` and ``ray`` share: plans go out over the ZeroMQ transport, rank 0's results
come back, and worker liveness is polled while the driver waits.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import weakref
from abc import abstractmethod
from typing import Any

import msgpack

from distllm.core.plan import PlanEncoder, StepPlan, StepResult, decode_result
from distllm.distributed.transport import DriverChannel, TransportConfig, WorkerError
from distllm.executor.base import EngineDeadError, Executor
from distllm.executor.worker_proc import GO_STEP, INIT_KV_STEP, KV_READY_STEP, STARTED_STEP
from distllm.logger import init_logger

logger = init_logger(__name__)

_POLL_S = 0.2  # how often a waiting driver checks that every worker is still alive
# Loading weights and profiling may take minutes on big models; only liveness bounds it.
_START_TIMEOUT_S = float(os.environ.get("DISTLLM_WORKER_START_TIMEOUT_S", "1800"))


class TransportExecutor(Executor):
    """Driver half of the ZeroMQ protocol in ``worker_proc``; subclasses own the processes."""

    transport_mode = "ipc"

    def __init__(self, config):
        super().__init__(config)
        self.tp = config.parallel_config.tensor_parallel_size
        self.transport: TransportConfig | None = None
        self.channel: DriverChannel | None = None
        # Gives each request a small handle on the wire (core/plan.py); one per plan channel,
        # mirrored by every worker's PlanDecoder.
        self.plan_encoder = PlanEncoder()
        self.dead_reason: str | None = None
        self._closed = False
        self.worker_pids: dict[int, int] = {}
        self._submitted_at: dict[int, float] = {}

    # ---- what subclasses provide -------------------------------------------------------------

    @abstractmethod
    def _launch_workers(self, engine_config: dict[str, Any], transport_config: dict[str, Any]) -> None: ...

    @abstractmethod
    def _check_workers(self) -> None:
        """Raise EngineDeadError naming the rank when a worker is gone."""

    @abstractmethod
    def _stop_workers(self, graceful: bool) -> None: ...

    def _make_transport(self) -> TransportConfig:
        return TransportConfig.create(self.transport_mode)

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> int:
        t0 = time.perf_counter()
        self.transport = self._make_transport()
        self.channel = DriverChannel(self.transport)
        self._launch_workers(self.config.to_dict(), self.transport.to_dict())
        deadline = time.monotonic() + _START_TIMEOUT_S
        self._wait_for_handshake(deadline)
        self.channel.send_plan(GO_STEP, b"")
        started = self._collect(STARTED_STEP, deadline, "start")
        self.worker_pids.update({int(d["rank"]): int(d["pid"]) for d in started})
        num_blocks = min(int(d["num_blocks"]) for d in started)
        self.channel.send_plan(INIT_KV_STEP, msgpack.packb({"num_blocks": num_blocks}))
        self._collect(KV_READY_STEP, deadline, "KV cache allocation")
        logger.info(
            "%s executor: %d workers ready in %.2f s, %d KV blocks each",
            self.config.parallel_config.distributed_executor_backend, self.tp, time.perf_counter() - t0, num_blocks,
        )
        return num_blocks

    def _wait_for_handshake(self, deadline: float) -> None:
        while True:
            try:
                self.channel.wait_for_workers(self.tp, _POLL_S)
                return
            except TimeoutError:
                self._check_or_die()
                if time.monotonic() > deadline:
                    self._die(f"workers did not connect within {_START_TIMEOUT_S:.0f} s")
            except WorkerError as e:
                self._die(str(e))

    def _collect(self, step_id: int, deadline: float, what: str) -> list[dict[str, Any]]:
        """One report per rank for a start-up phase."""
        got: dict[int, dict[str, Any]] = {}
        while len(got) < self.tp:
            try:
                r = self.channel.recv_result(_POLL_S)
            except WorkerError as e:
                self._die(f"{what} failed: {e}")
            if r is None:
                self._check_or_die()
                if time.monotonic() > deadline:
                    self._die(f"workers did not finish {what} within {_START_TIMEOUT_S:.0f} s (done: {sorted(got)})")
                continue
            sid, payload = r
            if sid != step_id:
                continue
            d = msgpack.unpackb(payload, raw=False)
            got[int(d["rank"])] = d
        return [got[r] for r in sorted(got)]

    def submit(self, plan: StepPlan) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        self._submitted_at[plan.step_id] = time.monotonic()
        self.channel.send_plan(plan.step_id, self.plan_encoder.encode(plan))

    def collect(self, plan: StepPlan) -> StepResult:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        timeout = float(self.config.worker_timeout_s)
        deadline = self._submitted_at.pop(plan.step_id, time.monotonic()) + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                try:
                    r = self.channel.recv_result(0.0)  # it may have come while nobody was waiting
                except WorkerError as e:
                    self._die(str(e))
                if r is not None and r[0] == plan.step_id:
                    return _decode_result(r[1], plan)
                self._check_or_die()
                self._die(f"no result for step {plan.step_id} within worker_timeout_s={timeout:g} s")
            try:
                r = self.channel.recv_result(min(_POLL_S, remaining))
            except WorkerError as e:
                self._die(str(e))
            if r is None:
                self._check_or_die()
                continue
            sid, payload = r
            if sid == plan.step_id:
                return _decode_result(payload, plan)
            logger.warning("dropping a result for step %d while waiting for step %d", sid, plan.step_id)

    def check_health(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        self._check_or_die()

    def _check_or_die(self) -> None:
        try:
            self._check_workers()
        except EngineDeadError as e:
            self._die(str(e))

    def _die(self, why: str):
        """Record why, tear every worker down, raise EngineDeadError."""
        if self.dead_reason is None:
            self.dead_reason = why
            logger.error("%s executor: %s; shutting the workers down", self.config.parallel_config.distributed_executor_backend, why)
        self.shutdown(graceful=False)
        raise EngineDeadError(why)

    def shutdown(self, graceful: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if graceful and self.channel is not None and self.dead_reason is None:
            try:
                self.channel.send_shutdown()
            except Exception:  # noqa: BLE001
                graceful = False
        try:
            self._stop_workers(graceful)
        finally:
            if self.channel is not None:
                self.channel.close()
            if self.transport is not None:
                self.transport.cleanup()


def _decode_result(payload: bytes, plan: StepPlan) -> StepResult:
    # The result names its requests by position in the plan's batch order (core/plan.py); the
    # plan being collected is the one it answers, so no order needs keeping per step.
    return decode_result(payload, list(plan.num_scheduled_tokens))


# ---- mp ----------------------------------------------------------------------------------------


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _reap(procs: list, grace_s: float) -> None:
    """Join, then SIGTERM, then SIGKILL; used by shutdown() and by the finalizer."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(2.0)


def _finalize(procs: list, transport: TransportConfig | None) -> None:
    _reap(procs, 0.0)
    if transport is not None:
        transport.cleanup()


class MPExecutor(TransportExecutor):
    """tp worker processes started with multiprocessing's spawn (never fork) on this host."""

    def __init__(self, config):
        super().__init__(config)
        self.procs: list = []
        self._finalizer = None

    def _launch_workers(self, engine_config: dict[str, Any], transport_config: dict[str, Any]) -> None:
        from distllm.executor.worker_proc import mp_main

        ctx = multiprocessing.get_context("spawn")
        # A FileStore in the per-engine private temp dir: no port to race for, no collision
        # between two engines on one host.
        init_method = f"file://{os.path.join(self.transport.ipc_dir, 'tp_store')}"
        # Runs at interpreter exit too (weakref.finalize's atexit hook): no orphans.
        self._finalizer = weakref.finalize(self, _finalize, self.procs, self.transport)
        for rank in range(self.tp):
            p = ctx.Process(
                target=mp_main,
                args=(engine_config, transport_config, rank, rank, init_method, os.getpid()),
                name=f"distllm-tp{rank}",
                daemon=True,
            )
            p.start()
            self.procs.append(p)
            self.worker_pids[rank] = p.pid
        logger.info("mp executor: spawned %d workers, pids %s", self.tp, [p.pid for p in self.procs])

    def _check_workers(self) -> None:
        for rank, p in enumerate(self.procs):
            if not p.is_alive():
                raise EngineDeadError(
                    f"worker rank {rank} (pid {p.pid}) died ({_signal_name(p.exitcode)})"
                )

    def _stop_workers(self, graceful: bool) -> None:
        _reap(self.procs, 5.0 if graceful else 0.0)
        if self._finalizer is not None:
            self._finalizer.detach()
