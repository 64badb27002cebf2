"""The driver-side scheduler: one token budget, no prefill/decode phases.

Each step every running request (in order) gets tokens so that its computed count catches up
with its token count, within ``max_num_batched_tokens``; then waiting requests are admitted while
budget, ``max_num_seqs`` and free blocks allow. Continuous batching, chunked prefill and
prefix-cache skips all follow from this one rule. When blocks run out, running requests are
preempted by recompute (fcfs: the latest; priority: the least important) and go back to waiting.

Pure Python: must never import torch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from distllm.core.block_manager import BlockManager
from distllm.core.plan import NewRequestData, StepPlan, StepResult
from distllm.core.request import EngineCoreOutput, Request, RequestStatus


def _remove(queue: list[Request] | deque[Request], req: Request) -> None:
    """Remove by identity (Request is a dataclass: == would compare every field)."""
    for i, r in enumerate(queue):
        if r is req:
            del queue[i]
            return
    raise ValueError(f"request {req.request_id} not in queue")


class Scheduler:
    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_prefix_caching: bool = False,
        policy: str = "fcfs",
        hash_salt: bytes | str = b"",
        long_prefill_token_threshold: int = 0,
    ) -> None:
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {policy!r}.")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {max_num_seqs}.")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {max_num_batched_tokens}.")
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching, hash_salt)

        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests whose state the workers hold (sent as new and not yet forgotten).
        self._worker_known: set[str] = set()
        # Finished/aborted requests the workers must forget with the next plan.
        self._finished_for_worker: list[str] = []
        self._step_id = 0
        self.num_preemptions = 0

    # ---- requests in / out -----------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"Request id {req.request_id!r} is already in use.")
        self._validate(req)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def _validate(self, req: Request) -> None:
        n = req.num_prompt_tokens
        if n == 0:
            raise ValueError("The decoder prompt cannot be empty.")
        if n > self.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {n}) is longer than the maximum model length of "
                f"{self.max_model_len}. Make sure that `max_model_len` is no smaller than the "
                "number of text tokens."
            )
        if req.is_pooling:
            if n > self.max_num_batched_tokens:
                raise ValueError(
                    f"The pooling prompt (length {n}) is longer than max_num_batched_tokens="
                    f"{self.max_num_batched_tokens}; pooling prompts are computed in one step. "
                    "Increase `max_num_batched_tokens` or shorten the input."
                )
            max_len = n
        else:
            max_tokens = req.max_tokens if req.max_tokens is not None else self.max_model_len
            max_len = min(self.max_model_len, req.num_tokens + max_tokens)
        bm = self.block_manager
        need = bm.blocks_needed(max_len)
        if need > bm.num_blocks:
            raise ValueError(
                f"Request {req.request_id!r} needs KV cache for up to {max_len} tokens ({need} blocks "
                f"of {bm.block_size}), but the KV cache only has {bm.num_blocks} blocks "
                f"({bm.num_blocks * bm.block_size} tokens). Shorten the prompt or max_tokens, or "
                "give the KV cache more memory (gpu_memory_utilization)."
            )

    def abort_requests(self, req_ids: str | Iterable[str]) -> list[Request]:
        return self.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish requests from outside a step (abort, stop strings). Unknown ids are ignored."""
        assert RequestStatus.is_finished(status)
        if isinstance(req_ids, str):
            req_ids = [req_ids]
        done = []
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished():
                continue
            if req.status == RequestStatus.RUNNING:
                _remove(self.running, req)
            else:
                _remove(self.waiting, req)
            self._finish(req, status)
            done.append(req)
        return done

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """Mark finished, free its blocks, tell the workers. The caller removed it from its queue."""
        req.status = status
        self.block_manager.free(req)
        if req.request_id in self._worker_known:
            self._worker_known.discard(req.request_id)
            self._finished_for_worker.append(req.request_id)
        del self.requests[req.request_id]

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished_requests(self) -> bool:
        return self.get_num_unfinished_requests() > 0

    @property
    def kv_cache_usage(self) -> float:
        return self.block_manager.usage

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    def make_stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_cache_usage": bm.usage,
            "num_free_blocks": bm.num_free_blocks,
            "prefix_cache_queries": bm.prefix_cache_queries,
            "prefix_cache_hits": bm.prefix_cache_hits,
            "num_preemptions": self.num_preemptions,
            "step_id": self._step_id,
        }

    # ---- scheduling ------------------------------------------------------------------------

    def _cap(self, n: int) -> int:
        t = self.long_prefill_token_threshold
        return min(n, t) if t > 0 else n

    def _pick_victim(self) -> Request:
        if self.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, req: Request) -> None:
        _remove(self.running, req)
        self.block_manager.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.num_tokens_sent = 0
        req.num_blocks_sent = 0
        # A token in flight for it is dropped when it arrives; the request samples it again.
        req.num_output_placeholders = 0
        req.last_preempted_step = self._step_id
        self._worker_known.discard(req.request_id)
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _next_waiting(self) -> Request:
        if self.policy == "priority":
            return min(self.waiting, key=lambda r: (r.priority, r.arrival_time))
        return self.waiting[0]

    def schedule(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id)
        budget = self.max_num_batched_tokens
        scheduled: dict[str, int] = {}  # req id -> tokens, in batch order
        bm = self.block_manager

        # 1. Running requests, in order. This loop and the plan loop below run for every
        # running request every step: attributes are read once, and the common decode step
        # (room left in the last block) never calls into the block manager.
        running_status = RequestStatus.RUNNING
        block_size = bm.block_size
        cap = self.long_prefill_token_threshold
        picked: list[tuple[Request, int]] = []  # (request, tokens), in batch order
        preempted = False
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != running_status:  # preempted earlier in this loop
                continue
            ahead = req.num_output_placeholders
            if ahead and not self._may_run_ahead(req):
                continue
            n = len(req.prompt_token_ids) + len(req.output_token_ids) + ahead - req.num_computed_tokens
            if n > budget:
                n = budget
            if 0 < cap < n:
                n = cap
            if n <= 0:
                continue
            if req.num_computed_tokens + n > len(req.block_ids) * block_size:
                while bm.allocate_slots(req, n) is None:
                    victim = self._pick_victim()
                    self._preempt(victim)
                    preempted = True
                    plan.preempted_req_ids.append(victim.request_id)
                    # A victim scheduled earlier in this step gives its tokens back.
                    budget += scheduled.pop(victim.request_id, 0)
                    if victim is req:
                        break
                if req.status != running_status:
                    continue
            scheduled[req.request_id] = n
            picked.append((req, n))
            budget -= n
        if preempted:  # drop the victims picked before they were preempted
            picked = [(r, n) for r, n in picked if r.request_id in scheduled]

        # 2. Waiting requests, unless this step had to preempt.
        while (
            not plan.preempted_req_ids
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            req = self._next_waiting()
            hit_blocks, num_hit = bm.get_computed_blocks(req)
            n = req.num_tokens - num_hit
            if req.is_pooling:
                if n > budget:  # pooling prompts are never chunked
                    break
            else:
                n = self._cap(min(n, budget))
            if bm.allocate_slots(req, n, hit_blocks) is None:
                break
            _remove(self.waiting, req)
            self.running.append(req)
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            scheduled[req.request_id] = n
            picked.append((req, n))
            budget -= n

        # 3. The plan: full state for requests the workers do not hold, diffs for the rest.
        known = self._worker_known
        cr = plan.cached_requests
        cr_ids = cr.req_ids
        for req, n in picked:
            rid = req.request_id
            num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
            num_blocks = len(req.block_ids)
            if rid not in known:
                plan.new_requests.append(
                    NewRequestData(
                        req_id=rid,
                        prompt_token_ids=list(req.prompt_token_ids),
                        output_token_ids=list(req.output_token_ids),
                        block_ids=list(req.block_ids),
                        num_computed_tokens=req.num_computed_tokens,
                        sampling=req.sampling_params.to_worker_dict() if req.sampling_params else None,
                        pooling=req.pooling_params.to_worker_dict() if req.pooling_params else None,
                    )
                )
                known.add(rid)
            elif req.num_tokens_sent < num_tokens or req.num_blocks_sent < num_blocks:
                cr.add(rid, req.token_ids_from(req.num_tokens_sent), req.block_ids[req.num_blocks_sent:])
            else:  # CachedRequests.add without tokens or blocks (most rows of a decode step), inline
                cr_ids.append(rid)
            req.num_tokens_sent = num_tokens
            req.num_blocks_sent = num_blocks
            computed = req.num_computed_tokens + n
            req.num_computed_tokens = computed
            if req.pooling_params is None and computed == num_tokens + req.num_output_placeholders:
                req.num_output_placeholders += 1  # this step samples a token
        plan.num_scheduled_tokens = scheduled
        plan.finished_req_ids = self._finished_for_worker
        self._finished_for_worker = []
        return plan

    def _may_run_ahead(self, req: Request) -> bool:
        """Schedule a request whose last token is still being sampled? Only if the token it waits
        for cannot end it by length, and its sampling does not read earlier token values."""
        if not req.overlap_safe:
            return False
        num_out = req.num_output_tokens + req.num_output_placeholders
        max_tokens = req.max_tokens
        if max_tokens is not None and num_out >= max_tokens:
            return False
        return req.num_tokens + req.num_output_placeholders < self.max_model_len

    def can_overlap(self) -> bool:
        """Whether the next plan may be scheduled before the results of the one in flight."""
        return all(r.overlap_safe for r in self.running)

    # ---- results ---------------------------------------------------------------------------

    def update_from_output(self, plan: StepPlan, result: StepResult) -> list[EngineCoreOutput]:
        by_id = {r.req_id: r for r in result.results}
        sampled = dict(zip(result.sampled_req_ids, result.sampled_token_ids))
        outputs: list[EngineCoreOutput] = []
        finished: list[Request] = []
        bm = self.block_manager
        caching = bm.enable_prefix_caching
        running = RequestStatus.RUNNING
        step_id = plan.step_id
        # The common case (one sampled token, nothing else) is inlined below: it runs for every
        # request every step. Its checks mirror cache_full_blocks and _check_stop, which run
        # only when they may have something to do.
        num_cached_blocks = bm.num_cached_blocks
        block_size = bm.block_size
        max_model_len = self.max_model_len
        requests = self.requests
        for rid in plan.num_scheduled_tokens:
            req = requests.get(rid)
            if req is None or req.status != running or req.last_preempted_step >= step_id:
                continue  # aborted, finished or preempted since this plan was made
            res = by_id.get(rid)
            tok = sampled.get(rid)
            if res is None and req.pooling_params is None:
                out_ids = req.output_token_ids
                if caching:
                    num_tokens = len(req.prompt_token_ids) + len(out_ids)
                    computed = req.num_computed_tokens
                    if computed > num_tokens:
                        computed = num_tokens
                    if computed >= (num_cached_blocks.get(rid, 0) + 1) * block_size:
                        bm.cache_full_blocks(req, computed)
                if tok is None:
                    continue  # a prefill chunk that samples nothing yet
                out_ids.append(tok)
                req.num_tokens_sent += 1  # the workers appended it themselves
                if req.num_output_placeholders:
                    req.num_output_placeholders -= 1
                sp = req.sampling_params
                num_out = len(out_ids)
                finish_reason = None
                if (
                    sp is None
                    or tok in sp._all_stop_token_ids
                    or (sp.max_tokens is not None and num_out >= sp.max_tokens)
                    or num_out + len(req.prompt_token_ids) >= max_model_len
                ) and self._check_stop(req, tok):
                    finished.append(req)
                    finish_reason = RequestStatus.finish_reason(req.status)
                cached = req.num_cached_tokens
                outputs.append(
                    EngineCoreOutput(
                        rid, [tok], None, None, None, finish_reason, req.stop_reason, cached if cached > 0 else 0
                    )
                )
                continue
            if res is not None and res.error is not None:
                req.error = res.error
                finished.append(req)
                req.status = RequestStatus.FINISHED_ERROR
                outputs.append(
                    EngineCoreOutput(
                        rid, finish_reason="abort", error=res.error, num_cached_tokens=max(req.num_cached_tokens, 0)
                    )
                )
                continue
            new_tokens: list[int] = []
            pooled = None
            if req.is_pooling:
                if req.num_computed_tokens >= req.num_tokens:
                    req.status = RequestStatus.FINISHED_STOPPED
                    if res is not None:
                        pooled = (res.pooled, res.pooled_shape)
            else:
                toks = ([tok] if tok is not None else []) + (res.sampled_token_ids if res is not None else [])
                for t in toks:
                    req.output_token_ids.append(t)
                    req.num_tokens_sent += 1
                    if req.num_output_placeholders:
                        req.num_output_placeholders -= 1
                    new_tokens.append(t)
                    if self._check_stop(req, t):
                        break
            if caching:
                bm.cache_full_blocks(req, min(req.num_computed_tokens, req.num_tokens))
            if req.is_finished():
                finished.append(req)
            if new_tokens or pooled is not None or req.is_finished() or (
                res is not None and (res.logprobs is not None or res.prompt_logprobs is not None)
            ):
                outputs.append(
                    EngineCoreOutput(
                        rid,
                        new_token_ids=new_tokens,
                        new_logprobs=res.logprobs if res is not None else None,
                        new_prompt_logprobs=res.prompt_logprobs if res is not None else None,
                        pooled=pooled,
                        finish_reason=RequestStatus.finish_reason(req.status),
                        stop_reason=req.stop_reason,
                        num_cached_tokens=max(req.num_cached_tokens, 0),
                    )
                )
        if finished:
            done = {r.request_id for r in finished}
            self.running = [r for r in self.running if r.request_id not in done]
            for req in finished:
                self._finish(req, req.status)
        return outputs

    def _check_stop(self, req: Request, token: int) -> bool:
        """Sets the finished status after ``token`` was appended; True when the request stops."""
        sp = req.sampling_params
        num_out = len(req.output_token_ids)
        if sp is not None and token in sp._all_stop_token_ids and num_out >= sp.min_tokens:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token if token in (sp.stop_token_ids or ()) else None
            return True
        max_tokens = sp.max_tokens if sp is not None else None
        if (max_tokens is not None and num_out >= max_tokens) or num_out + len(req.prompt_token_ids) >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False
