"""LLMEngine: schedule, execute, update. The step API under `LLM` and `AsyncLLMEngine`."""

from __future__ import annotations

import gc
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from distllm.config import EngineArgs, EngineConfig
from distllm.core.request import Request, RequestStatus
from distllm.core.scheduler import Scheduler
from distllm.engine.input_processor import InputProcessor, PromptType, load_tokenizer
from distllm.engine.output_processor import OutputProcessor
from distllm.executor.base import EngineDeadError, create_executor
from distllm.logger import init_logger
from distllm.outputs import PoolingRequestOutput, RequestOutput
from distllm.params import PoolingParams, SamplingParams

logger = init_logger(__name__)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def _load_tokenizer(model_config, in_thread: bool) -> Callable[[], tuple[Any, float]]:
    """Starts loading the tokenizer (in a thread, or here and now); the returned call gives
    (tokenizer, seconds taken), waiting for the thread if there is one."""
    if not in_thread:
        result = _timed(load_tokenizer, model_config)
        return lambda: result
    import safetensors  # noqa: F401 - imported here first, so the two threads never race on it
    import torch  # noqa: F401

    pool = ThreadPoolExecutor(1, thread_name_prefix="distllm-tokenizer")
    future = pool.submit(_timed, load_tokenizer, model_config)
    pool.shutdown(wait=False)  # its one thread exits once the tokenizer is loaded
    return future.result


class LLMEngine:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self.config = config
        self.model_config = config.model_config
        self.dead_error: str | None = None
        # With workers in other processes, the tokenizer (mostly the import of transformers) loads
        # in a thread while they load weights, profile memory and capture graphs. An in-process
        # worker would share the GIL with that thread: each of its thousands of start-up torch
        # calls waits for the GIL again, and on an H200 the memory profile took 8.3 s beside the
        # thread against 2.6 s after it (8B cold start 15.9 s threaded, 13.7 s one after the other).
        overlap = config.parallel_config.distributed_executor_backend != "uni"
        tok_where = "beside the workers' start" if overlap else "before the worker's start"
        tokenizer_result = _load_tokenizer(config.model_config, in_thread=overlap)
        self.executor = create_executor(config)
        try:
            num_blocks = self.executor.start()
            self.tokenizer, tok_s = tokenizer_result()
            self.input_processor = InputProcessor(config, self.tokenizer)
        except BaseException:
            self.executor.shutdown()
            raise
        config.cache_config.num_blocks = num_blocks
        sc = config.scheduler_config
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=config.cache_config.block_size,
            max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=sc.max_model_len,
            enable_prefix_caching=config.cache_config.enable_prefix_caching,
            policy=sc.policy,
            hash_salt=secrets.token_bytes(16),
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._parents: dict[str, list[str]] = {}
        # Core outputs of the last step, turned into RequestOutputs during the next step.
        self._pending: list = []
        self.async_output_processing = config.scheduler_config.async_output_processing
        # The plan launched by the last step and not collected yet (async scheduling).
        self._inflight = None
        self.async_scheduling = config.scheduler_config.async_scheduling
        # Start-up leaves millions of long-lived objects (weights' metadata, tokenizer tables);
        # freezing them keeps the collector from rescanning them during every step.
        gc.collect()
        gc.freeze()
        logger.info(
            "Engine ready in %.2f s (tokenizer %.2f s, %s): %s, max_model_len %d, "
            "%d KV blocks of %d tokens, executor %s",
            time.perf_counter() - t0, tok_s, tok_where, config.model_config.architecture, sc.max_model_len,
            num_blocks, config.cache_config.block_size, config.parallel_config.distributed_executor_backend,
        )

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        return cls(engine_args.create_engine_config())

    # ---- requests --------------------------------------------------------------------------

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.input_processor.default_sampling_params()

    def _check_runner(self, params: SamplingParams | PoolingParams) -> None:
        runner = self.model_config.runner
        if isinstance(params, SamplingParams) and runner != "generate":
            raise ValueError(
                f"this model runs with runner='{runner}'; generation needs a model loaded with runner='generate'."
            )
        if isinstance(params, PoolingParams) and runner != "pooling":
            raise ValueError(
                f"this model runs with runner='{runner}'; pooling (embed/classify/score/reward) needs runner='pooling'."
            )

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Validate and queue one request; a bad request raises here and changes nothing."""
        self._raise_if_dead()
        if request_id in self._parents or request_id in self.scheduler.requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        self._check_runner(params)
        params = params.clone()
        processed = self.input_processor.process(prompt, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        ids = processed.prompt_token_ids
        if isinstance(params, PoolingParams):
            self.output_processor.add_request(request_id, processed.prompt, ids, params, arrival)
            self.scheduler.add_request(Request(request_id, ids, pooling_params=params, arrival_time=arrival, priority=priority))
            self._parents[request_id] = [request_id]
            return
        n = params.n
        if n == 1:
            children = [(request_id, params)]
        else:
            self.output_processor.add_parent(request_id, n, processed.prompt, ids, arrival)
            children = []
            for i in range(n):
                child = params.clone()
                child.n = 1
                if params.seed is not None:
                    child.seed = params.seed + i  # distinct but reproducible samples per child
                children.append((f"{i}_{request_id}", child))
        try:
            for i, (cid, cp) in enumerate(children):
                self.output_processor.add_request(
                    cid, processed.prompt, ids, cp, arrival, parent_id=request_id if n > 1 else None, index=i
                )
                self.scheduler.add_request(Request(cid, ids, sampling_params=cp, arrival_time=arrival, priority=priority))
        except Exception:
            added = [cid for cid, _ in children if cid in self.scheduler.requests]
            self.scheduler.abort_requests(added)
            self.output_processor.abort_requests([request_id] + added)
            raise
        self._parents[request_id] = [cid for cid, _ in children]

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        core_ids = []
        for rid in ids:
            core_ids.extend(self._parents.pop(rid, [rid]))
        self.scheduler.abort_requests(core_ids)
        self.output_processor.abort_requests(ids)

    def has_unfinished_requests(self) -> bool:
        # A launched step not collected yet counts: its result must be taken off the workers'
        # socket now, not after an idle spell longer than worker_timeout_s.
        return (
            self._inflight is not None
            or bool(self._pending)
            or self.scheduler.has_unfinished_requests()
            or self.output_processor.has_unfinished_requests()
        )

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        """Run one step. Outputs trail the device: with async output processing the outputs of
        step N are built while the device runs step N + 1, and with async scheduling step N + 1
        is also scheduled and launched before step N's tokens are back (its decodes take their
        input tokens from step N's samples on the device)."""
        self._raise_if_dead()
        prev = self._inflight
        if prev is not None and not self.scheduler.can_overlap():
            self._inflight = None
            self._collect(prev)  # e.g. penalties read the previous token's value: wait for it
            prev = None
        plan = self.scheduler.schedule()
        launched = not (plan.is_empty() and not plan.finished_req_ids and not plan.preempted_req_ids)
        try:
            if launched:
                self.executor.submit(plan)
            outputs = self._process(self._take_pending())  # overlaps the device's work
            if prev is not None:
                self._inflight = None
                self._collect(prev)
            if launched:
                if self.async_scheduling:
                    self._inflight = plan
                else:
                    self._collect(plan)
        except EngineDeadError as e:
            if self.dead_error is None:
                self._die(str(e))
            raise
        if not self.async_output_processing:
            outputs += self._process(self._take_pending())
        return outputs

    def _collect(self, plan) -> None:
        """Wait for a launched plan's result and update the scheduler; its outputs are pending."""
        try:
            result = self.executor.collect(plan)
        except EngineDeadError as e:
            self._die(str(e))
            raise
        if result.errors:
            self._die("; ".join(result.errors))
            raise EngineDeadError(self.dead_error)
        self._pending += self.scheduler.update_from_output(plan, result)

    def _take_pending(self) -> list:
        pending, self._pending = self._pending, []
        return pending

    def _process(self, core_outputs: list) -> list[RequestOutput | PoolingRequestOutput]:
        if not core_outputs:
            return []
        processed = self.output_processor.process_outputs(core_outputs)
        if processed.reqs_to_abort:
            # Stop strings are found on the driver: the scheduler must free those requests too.
            # A request already in the step in flight just has that step's token dropped.
            self.scheduler.finish_requests(processed.reqs_to_abort, RequestStatus.FINISHED_STOPPED)
        for out in processed.request_outputs:
            if out.finished:
                self._parents.pop(out.request_id, None)
        return processed.request_outputs

    def _raise_if_dead(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_error}")

    def _die(self, why: str) -> None:
        self.dead_error = why
        logger.error("Engine dead: %s; failing %d requests", why, self.get_num_unfinished_requests())
        self._pending = []
        self._inflight = None
        self.scheduler.abort_requests(list(self.scheduler.requests))
        self.output_processor.abort_requests(list(self._parents))
        self._parents.clear()
        self.executor.shutdown()

    # ---- maintenance ---------------------------------------------------------------------------

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def get_stats(self) -> dict[str, Any]:
        return self.scheduler.make_stats()

    def shutdown(self) -> None:
        ex = getattr(self, "executor", None)
        if ex is not None:
            ex.shutdown()
            self.executor = None
            # Frozen objects are never collected: let a shut-down engine's cycles go.
            gc.unfreeze()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass
