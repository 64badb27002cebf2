"""Driver-side output processing: EngineCoreOutput -> RequestOutput / PoolingRequestOutput.

Per step the engine hands the scheduler's ``EngineCoreOutput`` list to
``OutputProcessor.process_outputs``, which detokenizes the new tokens, checks stop strings,
converts logprobs to vLLM's format and builds the user-facing outputs honouring each request's
``output_kind``.

Public API (all on ``OutputProcessor``):

* ``add_request(request_id, prompt, prompt_token_ids, params, arrival_time, parent_id=None,
  index=0, queue=None)``: register one engine-core request.  For ``n > 1`` the engine adds
  ``n`` children (ids like ``f"{i}_{parent_id}"``) with ``parent_id`` and ``index=i``; their
  outputs are merged into one ``RequestOutput`` whose ``request_id`` is ``parent_id``.  The
  parent's size is ``params.n`` of the first child added, unless ``add_parent(parent_id, n)``
  was called first (use it when the children's params were cloned with ``n=1``).
* ``add_parent(parent_id, n, prompt=None, prompt_token_ids=None, arrival_time=None)``:
  optional, declares a parent of ``n`` children before the children are added.
* ``process_outputs(outputs) -> ProcessedOutputs(request_outputs, reqs_to_abort)``:
  ``reqs_to_abort`` lists engine-core ids that a stop string finished here while the
  scheduler still thinks they are running; the engine must abort them in the scheduler.
* ``abort_requests(req_ids) -> list[RequestOutput | PoolingRequestOutput]``: finish the given
  requests (engine-core ids or parent ids) with finish_reason "abort"; returns the final
  outputs (for pooling requests a ``PoolingRequestOutput`` whose ``outputs`` is None).
* ``resolve_request_ids(req_ids) -> list[str]``: the unfinished engine-core ids behind the
  given ids (a parent id expands to its unfinished children): what the scheduler must abort.
* ``has_unfinished_requests()``, ``get_num_unfinished_requests()`` (counts user-visible
  requests: a parent with n children counts once).
* ``errors: dict[str, str]``: requests that finished because of ``EngineCoreOutput.error``
  (finish_reason "abort"); keyed by the engine-core id and, for children, also the parent id.
  The engine may pop entries once it has reported them.
* Stats: ``num_prompt_tokens_total`` (prompt tokens of requests that produced their first
  output), ``num_generation_tokens_total``, ``num_cached_tokens_total``,
  ``num_finished_requests_total``; per-request times live in ``RequestOutput.metrics``
  (``first_token_time`` etc.), read with ``clock`` (``time.monotonic`` by default, the clock
  of ``Request.arrival_time``).

Output kinds: CUMULATIVE: every output carries the whole text / token ids / logprobs so far
(for n > 1 all children that produced something); DELTA: only what is new since the last
output (for n > 1 only the children that changed this step; prompt logprobs once, with the
first output); FINAL_ONLY: one output when the request (all its children) has finished.
A step that brings only prompt logprobs (a chunked prefill) yields no output; the prompt
logprobs are accumulated and delivered with the first token.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from distllm.core.plan import TokenLogprobs
from distllm.core.request import EngineCoreOutput
from distllm.engine.detokenizer import IncrementalDetokenizer
from distllm.outputs import (
    CompletionOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    RequestMetrics,
    RequestOutput,
)
from distllm.params import PoolingParams, RequestOutputKind, SamplingParams


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput | PoolingRequestOutput] = field(default_factory=list)
    reqs_to_abort: list[str] = field(default_factory=list)


class _ChildState:
    """One engine-core request that generates text."""

    def __init__(self, request_id: str, index: int, params: SamplingParams, detok: IncrementalDetokenizer,
                 group: "_GroupState", queue: Any) -> None:
        self.request_id = request_id
        self.index = index
        self.params = params
        self.detok = detok
        self.group = group
        self.queue = queue
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_sent_tokens = 0  # token ids / logprobs already sent in DELTA mode
        self.num_cached_tokens = 0
        self.started = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _GroupState:
    """What the user sees as one request: a plain request (n == 1) or a parent of n children."""

    def __init__(self, request_id: str, n: int, prompt: str | None, prompt_token_ids: list[int],
                 arrival_time: float, output_kind: RequestOutputKind, prompt_logprobs: bool) -> None:
        self.request_id = request_id
        self.n = n
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.output_kind = output_kind
        self.children: dict[int, _ChildState] = {}
        self.num_finished = 0
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        # Prompt logprobs: [None, {..}, ...]; filled by the child that reports them first.
        self.want_prompt_logprobs = prompt_logprobs
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        self.prompt_logprobs_owner: str | None = None
        self.num_sent_prompt_logprobs = 0
        self.counted_prompt = False

    @property
    def finished(self) -> bool:
        return len(self.children) >= self.n and self.num_finished >= self.n


class _PoolingState:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: PoolingParams, arrival_time: float,
                 queue: Any) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.arrival_time = arrival_time
        self.queue = queue


def _to_tensor(pooled: Any) -> Any:
    """EngineCoreOutput.pooled -> torch.Tensor: a tensor, (flat list, shape), or a flat list."""
    import torch

    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(pooled, (tuple, list)) and len(pooled) == 2 and isinstance(pooled[1], (list, tuple)):
        data, shape = pooled
        t = torch.tensor(list(data), dtype=torch.float32)
        return t.reshape(list(shape)) if shape is not None else t
    return torch.tensor(list(pooled), dtype=torch.float32)


class OutputProcessor:
    def __init__(self, tokenizer: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.tokenizer = tokenizer
        self.clock = clock
        self.request_states: dict[str, _ChildState | _PoolingState] = {}
        self.groups: dict[str, _GroupState] = {}
        self._pending_parents: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self._token_text_cache: dict[int, str] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_cached_tokens_total = 0
        self.num_finished_requests_total = 0

    # ---- registration --------------------------------------------------------------------

    def add_parent(self, parent_id: str, n: int, prompt: str | None = None,
                   prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> None:
        """Declare a parent request of ``n`` children (optional; see the module docstring)."""
        if parent_id in self.groups or parent_id in self._pending_parents:
            raise ValueError(f"Request id {parent_id} is already running.")
        self._pending_parents[parent_id] = {
            "n": n, "prompt": prompt, "prompt_token_ids": prompt_token_ids, "arrival_time": arrival_time,
        }

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams | PoolingParams, arrival_time: float,
                    parent_id: str | None = None, index: int = 0, queue: Any = None) -> None:
        if request_id in self.request_states:
            raise ValueError(f"Request id {request_id} is already running.")
        prompt_token_ids = list(prompt_token_ids)
        if isinstance(params, PoolingParams):
            self.request_states[request_id] = _PoolingState(request_id, prompt_token_ids, params, arrival_time, queue)
            return
        group_id = parent_id if parent_id is not None else request_id
        group = self.groups.get(group_id)
        if group is None:
            pending = self._pending_parents.pop(group_id, None) or {}
            n = pending.get("n") or (params.n if parent_id is not None else 1)
            group = _GroupState(
                group_id,
                n,
                pending.get("prompt", None) if pending.get("prompt") is not None else prompt,
                list(pending["prompt_token_ids"]) if pending.get("prompt_token_ids") is not None else prompt_token_ids,
                pending["arrival_time"] if pending.get("arrival_time") is not None else arrival_time,
                params.output_kind,
                params.prompt_logprobs is not None,
            )
            self.groups[group_id] = group
        elif index in group.children:
            raise ValueError(f"Request {group_id} already has a child with index {index}.")
        detok = IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, params, lazy=params.output_kind == RequestOutputKind.FINAL_ONLY
        )
        child = _ChildState(request_id, index, params, detok, group, queue)
        group.children[index] = child
        self.request_states[request_id] = child

    # ---- queries -------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.request_states) or bool(self.groups)

    def get_num_unfinished_requests(self) -> int:
        pooling = sum(1 for s in self.request_states.values() if isinstance(s, _PoolingState))
        return len(self.groups) + pooling

    def resolve_request_ids(self, req_ids: list[str]) -> list[str]:
        out: list[str] = []
        for rid in req_ids:
            if rid in self.request_states:
                out.append(rid)
            elif rid in self.groups:
                g = self.groups[rid]
                out.extend(c.request_id for _, c in sorted(g.children.items()) if not c.finished)
        return list(dict.fromkeys(out))

    # ---- logprobs ------------------------------------------------------------------------

    def _token_text(self, tid: int) -> str:
        s = self._token_text_cache.get(tid)
        if s is None:
            s = self.tokenizer.decode([tid]) if self.tokenizer is not None else ""
            if s is None:
                s = ""
            self._token_text_cache[tid] = s
        return s

    def _logprob_dicts(self, lp: TokenLogprobs, detokenize: bool) -> list[dict[int, Logprob]]:
        """One dict per position: the sampled/actual token (its own rank) and the top-K (ranks 1..K)."""
        out = []
        for ids, lps, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            ranks = [rank, *range(1, len(ids))]
            d: dict[int, Logprob] = {}
            for tid, l, r in zip(ids, lps, ranks):
                tid = int(tid)
                d[tid] = Logprob(float(l), int(r), self._token_text(tid) if detokenize else None)
            out.append(d)
        return out

    # ---- per-step processing --------------------------------------------------------------

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        result = ProcessedOutputs()
        now = self.clock()
        changed: dict[str, tuple[_GroupState, set[int]]] = {}
        for eco in outputs:
            st = self.request_states.get(eco.req_id)
            if st is None:
                continue  # aborted or unknown
            if isinstance(st, _PoolingState):
                pout = self._process_pooling(st, eco)
                if pout is not None:
                    result.request_outputs.append(pout)
                continue
            group = st.group
            params = st.params
            new_ids = eco.new_token_ids
            if len(new_ids) != 1 or type(new_ids[0]) is not int:  # one plain int: the usual step
                new_ids = [int(t) for t in new_ids]
            finish_reason = eco.finish_reason
            stop_reason = eco.stop_reason
            if eco.error is not None:
                finish_reason = "abort"
                stop_reason = None
                self.errors[st.request_id] = eco.error
                if group.request_id != st.request_id:
                    self.errors[group.request_id] = eco.error
            if eco.num_cached_tokens:
                st.num_cached_tokens = max(st.num_cached_tokens, int(eco.num_cached_tokens))

            # Prompt logprobs (may come in several chunks).
            if eco.new_prompt_logprobs is not None and group.want_prompt_logprobs:
                if group.prompt_logprobs_owner in (None, st.request_id):
                    group.prompt_logprobs_owner = st.request_id
                    if group.prompt_logprobs is None:
                        group.prompt_logprobs = [None]
                    group.prompt_logprobs.extend(self._logprob_dicts(eco.new_prompt_logprobs, params.detokenize))

            if new_ids:
                if group.metrics.first_token_time is None:
                    group.metrics.first_token_time = now
                group.metrics.last_token_time = now
                self.num_generation_tokens_total += len(new_ids)
                if not group.counted_prompt:
                    group.counted_prompt = True
                    self.num_prompt_tokens_total += len(group.prompt_token_ids)
                    self.num_cached_tokens_total += st.num_cached_tokens
                st.started = True

            # Text and stop strings.
            stop_string = st.detok.update(new_ids, stop_terminated=finish_reason == "stop",
                                          final=finish_reason is not None)
            if stop_string is not None:
                finish_reason = "stop"
                stop_reason = stop_string
                if not eco.finished:
                    result.reqs_to_abort.append(st.request_id)

            # Sample logprobs.
            if st.logprobs is not None and eco.new_logprobs is not None:
                dicts = self._logprob_dicts(eco.new_logprobs, params.detokenize)
                st.logprobs.extend(dicts)
                for ids, lps in zip(eco.new_logprobs.token_ids, eco.new_logprobs.logprobs):
                    st.cumulative_logprob += float(lps[0])

            if finish_reason is not None and not st.finished:
                st.finish_reason = finish_reason
                st.stop_reason = stop_reason
                group.num_finished += 1
                self.request_states.pop(st.request_id, None)
            if new_ids or st.finished:
                c = changed.get(group.request_id)
                if c is None:
                    changed[group.request_id] = (group, {st.index})
                else:
                    c[1].add(st.index)

        final_only = RequestOutputKind.FINAL_ONLY
        for group, idxs in changed.values():
            if group.output_kind == final_only and not group.finished:
                continue  # nothing to show before the end (what _make_output would decide)
            out = self._make_output(group, idxs, now)
            if out is not None:
                result.request_outputs.append(out)
        return result

    def _process_pooling(self, st: _PoolingState, eco: EngineCoreOutput) -> PoolingRequestOutput | None:
        if eco.error is not None:
            self.errors[st.request_id] = eco.error
        elif eco.pooled is None and not eco.finished:
            return None  # chunked prefill still running
        self.request_states.pop(st.request_id, None)
        self.num_finished_requests_total += 1
        self.num_prompt_tokens_total += len(st.prompt_token_ids)
        self.num_cached_tokens_total += int(eco.num_cached_tokens or 0)
        data = None if (eco.error is not None or eco.pooled is None) else PoolingOutput(_to_tensor(eco.pooled))
        return PoolingRequestOutput(st.request_id, data, st.prompt_token_ids, True, int(eco.num_cached_tokens or 0))

    def _completion(self, c: _ChildState, delta: bool) -> CompletionOutput:
        text = c.detok.get_next_output_text(c.finished, delta)
        ids_all = c.detok.output_token_ids
        if delta:
            start = c.num_sent_tokens
            ids = ids_all[start:]
            lps = c.logprobs[start:] if c.logprobs is not None else None
            c.num_sent_tokens = len(ids_all)
        else:
            ids = list(ids_all)
            lps = list(c.logprobs) if c.logprobs is not None else None
        return CompletionOutput(c.index, text, ids, c.cumulative_logprob, lps, c.finish_reason, c.stop_reason)

    def _make_output(self, group: _GroupState, changed: set[int], now: float) -> RequestOutput | None:
        finished = group.finished
        kind = group.output_kind
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if finished:
            group.metrics.finished_time = now
            self.groups.pop(group.request_id, None)
            self.num_finished_requests_total += 1
        delta = kind == RequestOutputKind.DELTA
        if delta:
            children = [group.children[i] for i in sorted(changed)]
        else:
            children = [c for _, c in sorted(group.children.items()) if c.started or c.finished]
        outs = [self._completion(c, delta) for c in children]
        plp = group.prompt_logprobs
        if plp is not None:
            if delta:
                plp_out = plp[group.num_sent_prompt_logprobs :]
                group.num_sent_prompt_logprobs = len(plp)
            else:
                plp_out = list(plp)
        else:
            plp_out = None
        cached = max((c.num_cached_tokens for c in group.children.values()), default=0)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=plp_out,
            outputs=outs,
            finished=finished,
            metrics=copy.copy(group.metrics),
            num_cached_tokens=cached,
        )

    # ---- aborts --------------------------------------------------------------------------

    def abort_requests(self, req_ids: list[str]) -> list[RequestOutput | PoolingRequestOutput]:
        """Finish the given requests (engine-core or parent ids) with finish_reason "abort"."""
        now = self.clock()
        outputs: list[RequestOutput | PoolingRequestOutput] = []
        changed: dict[str, tuple[_GroupState, set[int]]] = {}
        for rid in req_ids:
            self._pending_parents.pop(rid, None)
            if rid in self.groups and rid not in self.request_states:
                g = self.groups[rid]
                # Children never added can't finish: the parent is aborted as a whole.
                g.n = len(g.children)
                targets = [c.request_id for c in g.children.values() if not c.finished]
                if not targets:
                    self.groups.pop(rid, None)
                    continue
            else:
                targets = [rid]
            for tid in targets:
                st = self.request_states.pop(tid, None)
                if st is None:
                    continue
                if isinstance(st, _PoolingState):
                    self.num_finished_requests_total += 1
                    outputs.append(PoolingRequestOutput(st.request_id, None, st.prompt_token_ids, True))
                    continue
                st.detok.update([], final=True)
                st.finish_reason = "abort"
                st.stop_reason = None
                g = st.group
                g.num_finished += 1
                changed.setdefault(g.request_id, (g, set()))[1].add(st.index)
        # Aborting one child of a parent leaves its siblings running; the parent finishes with
        # its last child (FINAL_ONLY: nothing is emitted until then).
        for g, idxs in changed.values():
            out = self._make_output(g, idxs, now)
            if out is not None:
                outputs.append(out)
        return outputs
