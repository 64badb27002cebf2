"""The step contract between the driver (scheduler) and the workers.

One StepPlan goes from the driver to every tensor-parallel rank each step; one StepResult comes
back from rank 0. Both are plain dataclasses of msgpack-able values (no tensors, no pickle), so
the in-process executor and the ZeroMQ transport send exactly the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

PLAN_VERSION = 3


@dataclass
class NewRequestData:
    """A request the workers have not seen (or must rebuild after preemption)."""

    req_id: str
    # The worker's token list is prompt_token_ids + output_token_ids; outputs are kept apart
    # because penalties and min_tokens count generated tokens only.
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    # SamplingParams.to_worker_dict() for generation, PoolingParams.to_worker_dict() for pooling.
    sampling: dict[str, Any] | None = None
    pooling: dict[str, Any] | None = None


class CachedRequestData(NamedTuple):
    """A diff for a request the workers already hold (one row of CachedRequests)."""

    req_id: str
    # Tokens the workers do not hold yet (they keep the ones they sample themselves).
    new_token_ids: list[int]
    # Blocks allocated since the last plan, appended to the request's block table.
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequests:
    """The diffs of every running request the workers hold, in columns.

    Hundreds of them go out every step, mostly with nothing but a computed count: flat columns
    (variable-length lists as counts + one flat list) pack and unpack at C speed, where a list
    per request costs a fraction of a microsecond each way. Iterating yields CachedRequestData.
    """

    req_ids: list[str] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    new_token_counts: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)  # flat, new_token_counts[i] per request
    new_block_counts: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)  # flat, new_block_counts[i] per request

    @staticmethod
    def of(items) -> "CachedRequests":
        out = CachedRequests()
        for c in items:
            out.add(*c)
        return out

    def add(self, req_id: str, new_token_ids: list[int], new_block_ids: list[int], num_computed_tokens: int) -> None:
        self.req_ids.append(req_id)
        self.num_computed_tokens.append(num_computed_tokens)
        self.new_token_counts.append(len(new_token_ids))
        if new_token_ids:
            self.new_token_ids.extend(new_token_ids)
        self.new_block_counts.append(len(new_block_ids))
        if new_block_ids:
            self.new_block_ids.extend(new_block_ids)

    def __len__(self) -> int:
        return len(self.req_ids)

    def __iter__(self):
        t = b = 0
        for rid, nc, kt, kb in zip(self.req_ids, self.num_computed_tokens, self.new_token_counts, self.new_block_counts):
            yield CachedRequestData(rid, self.new_token_ids[t : t + kt], self.new_block_ids[b : b + kb], nc)
            t += kt
            b += kb

    def __getitem__(self, i: int) -> CachedRequestData:
        return list(self)[i]

    def to_obj(self) -> list:
        return [self.req_ids, self.num_computed_tokens, self.new_token_counts, self.new_token_ids,
                self.new_block_counts, self.new_block_ids]

    @staticmethod
    def from_obj(o: list) -> "CachedRequests":
        return CachedRequests(*o)


@dataclass
class StepPlan:
    step_id: int
    new_requests: list[NewRequestData] = field(default_factory=list)
    # A list of CachedRequestData is accepted and turned into columns.
    cached_requests: CachedRequests = field(default_factory=CachedRequests)
    # Tokens to compute this step, per request id; the order of this dict is the batch order.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests the workers must forget (finished, aborted) before running this step.
    finished_req_ids: list[str] = field(default_factory=list)
    # Requests preempted by recompute: forgotten now, sent again later as new requests.
    preempted_req_ids: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.cached_requests, CachedRequests):
            self.cached_requests = CachedRequests.of(self.cached_requests)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class TokenLogprobs:
    """Top logprobs at one or more positions: ids[i][0] is the sampled/actual token."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]  # rank of the sampled/actual token at each position


@dataclass
class RequestResult:
    req_id: str
    # Empty when the request was in the middle of a chunked prefill (nothing sampled).
    sampled_token_ids: list[int] = field(default_factory=list)
    logprobs: TokenLogprobs | None = None
    # Logprobs of prompt positions computed this step (position p is the prompt token p+1).
    prompt_logprobs: TokenLogprobs | None = None
    # Pooling output as a flat list of floats with its shape.
    pooled: list[float] | None = None
    pooled_shape: list[int] | None = None
    error: str | None = None


@dataclass
class StepResult:
    step_id: int
    # Per-request extras: logprobs, prompt logprobs, pooled outputs, errors (and tokens, if any
    # producer prefers this form; they come after the column's token).
    results: list[RequestResult] = field(default_factory=list)
    # Errors that are not tied to one request (rank failures).
    errors: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION
    # The common case in columns: one sampled token per request (cheap to build, encode, read).
    sampled_req_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)


# ---- msgpack encoding --------------------------------------------------------------------


def _plan_to_obj(p: StepPlan) -> list:
    return [
        p.version,
        p.step_id,
        [
            [r.req_id, r.prompt_token_ids, r.output_token_ids, r.block_ids, r.num_computed_tokens, r.sampling, r.pooling]
            for r in p.new_requests
        ],
        p.cached_requests.to_obj(),
        list(p.num_scheduled_tokens),
        list(p.num_scheduled_tokens.values()),
        p.finished_req_ids,
        p.preempted_req_ids,
    ]


def _check_version(v: int) -> None:
    if v != PLAN_VERSION:
        raise ValueError(f"step message version {v} does not match this build's {PLAN_VERSION}")


def encode_plan(plan: StepPlan) -> bytes:
    return msgpack.packb(_plan_to_obj(plan), use_bin_type=True)


def decode_plan(data: bytes) -> StepPlan:
    o = msgpack.unpackb(data, raw=False, strict_map_key=False)
    _check_version(o[0])
    return StepPlan(
        step_id=o[1],
        new_requests=[NewRequestData(*r) for r in o[2]],
        cached_requests=CachedRequests.from_obj(o[3]),
        num_scheduled_tokens=dict(zip(o[4], o[5])),
        finished_req_ids=o[6],
        preempted_req_ids=o[7],
        version=o[0],
    )


def _lp_to_obj(lp: TokenLogprobs | None) -> list | None:
    return None if lp is None else [lp.token_ids, lp.logprobs, lp.ranks]


def _lp_from_obj(o: list | None) -> TokenLogprobs | None:
    return None if o is None else TokenLogprobs(*o)


def encode_result(res: StepResult) -> bytes:
    return msgpack.packb(
        [
            res.version,
            res.step_id,
            res.sampled_req_ids,
            res.sampled_token_ids,
            [
                [
                    r.req_id,
                    r.sampled_token_ids,
                    _lp_to_obj(r.logprobs),
                    _lp_to_obj(r.prompt_logprobs),
                    r.pooled,
                    r.pooled_shape,
                    r.error,
                ]
                for r in res.results
            ],
            res.errors,
        ],
        use_bin_type=True,
    )


def decode_result(data: bytes) -> StepResult:
    o = msgpack.unpackb(data, raw=False, strict_map_key=False)
    _check_version(o[0])
    return StepResult(
        step_id=o[1],
        sampled_req_ids=o[2],
        sampled_token_ids=o[3],
        results=[
            RequestResult(r[0], r[1], _lp_from_obj(r[2]), _lp_from_obj(r[3]), r[4], r[5], r[6]) for r in o[4]
        ],
        errors=o[5],
        version=o[0],
    )
