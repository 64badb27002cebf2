"""AsyncLLMEngine: many concurrent streaming requests over one LLMEngine, in one event loop.

One background task steps the engine while requests are in flight and sleeps (awaits an
Event) otherwise. Every engine call runs in one worker thread (a single-thread executor) under
one lock, so the event loop stays responsive while a step runs and the engine is never entered
twice at once. Each request has an asyncio.Queue that the loop fills with its outputs.

Cancelling a consumer (GeneratorExit / CancelledError in `generate`) queues an abort that the
loop applies before its next step, so the request's KV blocks are freed. An EngineDeadError
ends every stream with that error and marks the engine dead (`is_dead`, `check_health`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncGenerator, Callable

from distllm.config import EngineArgs
from distllm.engine.input_processor import PromptType
from distllm.engine.llm_engine import LLMEngine
from distllm.executor.base import EngineDeadError
from distllm.logger import init_logger
from distllm.outputs import PoolingRequestOutput, RequestOutput
from distllm.params import PoolingParams, SamplingParams

logger = init_logger(__name__)

_ABORTED = object()  # queue sentinel: the request was aborted through `abort`

# A step listener gets (outputs, scheduler stats, engine counters, now) after every step.
StepListener = Callable[[list[Any], dict[str, Any], dict[str, Any], float], None]


class _Stream:
    __slots__ = ("request_id", "queue", "finished", "core_ids", "queue_time_done", "queue_time")

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.core_ids: list[str] = [request_id]
        self.queue_time_done = False
        self.queue_time: float | None = None


class RequestStream:
    """The outputs of one request, as an async iterator; `close()` aborts it if unfinished."""

    def __init__(self, engine: "AsyncLLMEngine", stream: _Stream):
        self._engine = engine
        self._s = stream
        self._closed = False

    @property
    def request_id(self) -> str:
        return self._s.request_id

    @property
    def finished(self) -> bool:
        return self._s.finished

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Any:
        s = self._s
        if self._closed or (s.finished and s.queue.empty()):
            raise StopAsyncIteration
        try:
            item = await s.queue.get()
        except BaseException:
            self.close()  # cancelled consumer: abort the request
            raise
        if item is _ABORTED:
            self.close()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            s.finished = True
            self.close()
            raise item
        if item.finished:
            s.finished = True
            self._engine._streams.pop(s.request_id, None)
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        s = self._s
        if self._engine._streams.get(s.request_id) is s:
            self._engine._streams.pop(s.request_id, None)
        if not s.finished:
            s.finished = True
            self._engine._queue_abort(s.request_id)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


class StatLogger:
    """Logs throughput and cache state every `interval` seconds while the engine is busy."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self.last_time = time.monotonic()
        self.last_prompt = 0
        self.last_gen = 0
        self.last_queries = 0
        self.last_hits = 0

    def __call__(self, outputs: list[Any], stats: dict[str, Any], counters: dict[str, Any], now: float) -> None:
        dt = now - self.last_time
        if dt < self.interval:
            return
        p, g = counters["prompt_tokens"], counters["generation_tokens"]
        q, h = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
        dq, dh = q - self.last_queries, h - self.last_hits
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            (p - self.last_prompt) / dt, (g - self.last_gen) / dt, stats.get("num_running", 0),
            stats.get("num_waiting", 0), 100.0 * stats.get("kv_cache_usage", 0.0),
            100.0 * dh / dq if dq else 0.0,
        )
        self.last_time, self.last_prompt, self.last_gen, self.last_queries, self.last_hits = now, p, g, q, h


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, log_stats: bool = True, log_interval: float = 5.0):
        self.engine = engine
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distllm-engine")
        self._streams: dict[str, _Stream] = {}
        self._pending_aborts: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self.dead_error: str | None = engine.dead_error
        self.step_listeners: list[StepListener] = []
        self.last_stats: dict[str, Any] = engine.get_stats()
        if log_stats:
            self.step_listeners.append(StatLogger(log_interval))
        self._closed = False

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, log_stats: bool = True, **kwargs: Any) -> "AsyncLLMEngine":
        return cls(LLMEngine.from_engine_args(engine_args), log_stats=log_stats, **kwargs)

    # ---- plumbing --------------------------------------------------------------------------

    @property
    def model_config(self) -> Any:
        return self.engine.model_config

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    def get_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.engine.get_default_sampling_params()

    def check_health(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_error}")

    def num_in_flight(self) -> int:
        return len(self._streams)

    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run_loop(), name="distllm-engine-loop")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one engine call in the engine thread, under the engine lock."""

        def locked() -> Any:
            with self._lock:
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, locked)

    # ---- requests --------------------------------------------------------------------------

    async def _add(self, request_id: str, prompt: PromptType, params: Any, priority: int) -> _Stream:
        self.check_health()
        if self._closed:
            raise RuntimeError("this AsyncLLMEngine was shut down.")
        self._ensure_loop()
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        stream = _Stream(request_id)
        self._streams[request_id] = stream

        def add() -> list[str]:
            self.engine.add_request(request_id, prompt, params, arrival_time=time.monotonic(), priority=priority)
            return list(self.engine._parents.get(request_id, [request_id]))

        try:
            stream.core_ids = await self._call(add)
        except BaseException as e:
            self._streams.pop(request_id, None)
            if not isinstance(e, (ValueError, TypeError, EngineDeadError)):
                # Cancelled while the add was queued: it may still run in the engine thread,
                # so abort it (the abort runs after the add, in the same thread).
                self._queue_abort(request_id)
            raise
        assert self._wake is not None
        self._wake.set()
        return stream

    async def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams, priority: int = 0
    ) -> "RequestStream":
        """Queue one request (a bad one raises ValueError here, before any work) and return its
        stream: an async iterator of outputs whose `close()` (or being dropped) aborts it."""
        stream = await self._add(request_id, prompt, params, priority)
        return RequestStream(self, stream)

    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream RequestOutputs (cumulative, delta or final-only, per sampling_params.output_kind)."""
        stream = await self.add_request(request_id, prompt, sampling_params, priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def encode(
        self,
        prompt: PromptType,
        pooling_params: PoolingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncGenerator[PoolingRequestOutput, None]:
        stream = await self.add_request(request_id, prompt, pooling_params, priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def _queue_abort(self, request_id: str) -> None:
        self._pending_aborts.add(request_id)
        if self._wake is not None and self._loop is not None and not self._loop.is_closed():
            try:
                if asyncio.get_running_loop() is self._loop:
                    self._wake.set()
                else:
                    self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # no running loop in this thread
                self._loop.call_soon_threadsafe(self._wake.set)

    async def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends (without error) and its blocks are freed."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            stream.finished = True
            stream.queue.put_nowait(_ABORTED)
        self._queue_abort(request_id)

    # ---- the background loop ---------------------------------------------------------------

    def _counters(self) -> dict[str, Any]:
        op = self.engine.output_processor
        return {
            "prompt_tokens": op.num_prompt_tokens_total,
            "generation_tokens": op.num_generation_tokens_total,
        }

    def _step_once(self, aborts: list[str]) -> tuple[bool, list[Any], dict[str, Any], dict[str, Any]]:
        eng = self.engine
        if aborts:
            try:
                eng.abort_request(aborts)
            except Exception:  # noqa: BLE001 - a failed abort must not take the engine down
                logger.exception("abort of %s failed", aborts)
        if not eng.has_unfinished_requests():
            return False, [], eng.get_stats(), self._counters()
        outputs = eng.step()
        self._fill_queue_times(outputs)
        return True, outputs, eng.get_stats(), self._counters()

    def _fill_queue_times(self, outputs: list[Any]) -> None:
        """Record queue time (arrival -> first scheduled) in each output's metrics."""
        reqs = self.engine.scheduler.requests
        for s in list(self._streams.values()):
            if s.queue_time_done:
                continue
            for cid in s.core_ids:
                r = reqs.get(cid)
                if r is not None and r.first_scheduled_time is not None:
                    s.queue_time_done = True
                    s.queue_time = max(0.0, r.first_scheduled_time - r.arrival_time)
                    break
        for out in outputs:
            m = getattr(out, "metrics", None)
            s = self._streams.get(out.request_id)
            if m is None or s is None:
                continue
            qt = s.queue_time
            if qt is None and m.first_token_time is not None:
                qt = max(0.0, m.first_token_time - m.arrival_time)  # finished within its first step
            m.time_in_queue = qt
            if qt is not None:
                m.first_scheduled_time = m.arrival_time + qt

    async def _run_loop(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while not self._closed:
            wake.clear()
            aborts = list(self._pending_aborts)
            self._pending_aborts.clear()
            try:
                busy, outputs, stats, counters = await self._call(self._step_once, aborts)
            except EngineDeadError as e:
                self._fail_all(e)
                return
            except Exception as e:  # noqa: BLE001 - an engine bug must not hang every stream
                logger.exception("engine step failed")
                self._fail_all(EngineDeadError(f"engine step failed: {e!r}"))
                return
            self.last_stats = stats
            now = time.monotonic()
            for out in outputs:
                s = self._streams.get(out.request_id)
                if s is not None and not s.finished:
                    s.queue.put_nowait(out)
            for listener in self.step_listeners:
                try:
                    listener(outputs, stats, counters, now)
                except Exception:  # noqa: BLE001 - metrics never break serving
                    logger.exception("step listener failed")
            if not busy and not self._pending_aborts:
                await wake.wait()
            else:
                await asyncio.sleep(0)  # let consumers run between steps

    def _fail_all(self, err: BaseException) -> None:
        self.dead_error = self.engine.dead_error or str(err)
        logger.error("AsyncLLMEngine: engine dead (%s); ending %d streams", self.dead_error, len(self._streams))
        for s in list(self._streams.values()):
            s.finished = True
            s.queue.put_nowait(err if isinstance(err, EngineDeadError) else EngineDeadError(str(err)))
        self._streams.clear()

    # ---- teardown --------------------------------------------------------------------------

    def shutdown(self) -> None:
        self._closed = True
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self.engine.shutdown()
