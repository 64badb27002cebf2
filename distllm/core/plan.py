"""The step contract between the driver (scheduler) and the workers.

One StepPlan goes from the driver to every tensor-parallel rank each step; one StepResult comes
back from rank 0. Both are plain dataclasses of msgpack-able values (no tensors, no pickle), so
the in-process executor and the ZeroMQ transport send exactly the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import operator

import msgpack

PLAN_VERSION = 5


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
    """A diff for a request the workers already hold (one row of CachedRequests).

    It carries no computed count: a worker advances its own by the tokens each step computes
    (the scheduler does the same), and a request whose count starts over (preemption) is sent
    again as a new request."""

    req_id: str
    # Tokens the workers do not hold yet (they keep the ones they sample themselves).
    new_token_ids: list[int]
    # Blocks allocated since the last plan, appended to the request's block table.
    new_block_ids: list[int]


@dataclass
class CachedRequests:
    """The diffs of every running request the workers hold, in columns.

    Hundreds of them go out every step, mostly with nothing to say but "still running": only the
    few rows that bring tokens or blocks are listed, by row index (sparse), with their counts and
    the ids in one flat list each. Flat columns pack and unpack at C speed, where a list per
    request costs a fraction of a microsecond each way. Iterating yields CachedRequestData.
    """

    req_ids: list[str] = field(default_factory=list)
    # Rows (indices into req_ids, ascending) that bring tokens, their counts, the tokens flat.
    new_token_rows: list[int] = field(default_factory=list)
    new_token_counts: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    # Rows that bring blocks, their counts, the block ids flat.
    new_block_rows: list[int] = field(default_factory=list)
    new_block_counts: list[int] = field(default_factory=list)
    new_block_ids: list[int] = field(default_factory=list)

    @staticmethod
    def of(items) -> "CachedRequests":
        out = CachedRequests()
        for c in items:
            out.add(*c)
        return out

    def add(self, req_id: str, new_token_ids: list[int], new_block_ids: list[int]) -> None:
        row = len(self.req_ids)
        self.req_ids.append(req_id)
        if new_token_ids:
            self.new_token_rows.append(row)
            self.new_token_counts.append(len(new_token_ids))
            self.new_token_ids.extend(new_token_ids)
        if new_block_ids:
            self.new_block_rows.append(row)
            self.new_block_counts.append(len(new_block_ids))
            self.new_block_ids.extend(new_block_ids)

    def __len__(self) -> int:
        return len(self.req_ids)

    def new_tokens_by_row(self) -> dict[int, list[int]]:
        return _by_row(self.new_token_rows, self.new_token_counts, self.new_token_ids)

    def new_blocks_by_row(self) -> dict[int, list[int]]:
        return _by_row(self.new_block_rows, self.new_block_counts, self.new_block_ids)

    def __iter__(self):
        toks, blks = self.new_tokens_by_row(), self.new_blocks_by_row()
        for i, rid in enumerate(self.req_ids):
            yield CachedRequestData(rid, toks.get(i, []), blks.get(i, []))

    def __getitem__(self, i: int) -> CachedRequestData:
        return list(self)[i]


def _by_row(rows: list[int], counts: list[int], flat: list[int]) -> dict[int, list[int]]:
    """{row: its slice of flat} for a sparse column (rows with counts[i] entries each)."""
    out, at = {}, 0
    for row, k in zip(rows, counts):
        out[row] = flat[at : at + k]
        at += k
    return out


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


# ---- msgpack wire format -----------------------------------------------------------------
#
# Request ids are strings like "cmpl-<32 hex>-0", and a decode step names each running request
# three times (cached diff, num_scheduled_tokens, result): as strings they were most of the
# bytes, and bytes are what MACs, copies and msgpack pay for. So on the wire a request is a
# *ref*: either its id string, or
#
# * in a plan, a *handle*: a small int the driver's PlanEncoder gives a request when it first
#   sends it as a new request (the only place its string goes out). The worker's PlanDecoder
#   learns it from that row. Both forget it when the request is finished or preempted (a
#   preempted request comes back as a new request, with a new handle). Handles count up and are
#   never reused, so a handle can only ever name one request; one the decoder does not hold
#   means the two sides are out of step, and decoding fails (CodecError) rather than guess.
#   The decoder also checks that new handles come in sequence, which catches a lost plan.
# * in a result, the request's position in its plan's batch order
#   (``list(plan.num_scheduled_tokens)``), which both sides hold: results need no shared state,
#   so a result that comes after later plans (async scheduling) or never comes is harmless.
#
# An id without a handle (stateless encode_plan, or an id the workers were never sent) and a
# result row not in its plan's batch travel as strings, so every message decodes to exactly
# what was encoded. Per message the order of state changes is: finished, preempted, new.
#
# Plan: [version, step_id, finished refs, preempted refs,
#        new rows [[handle | None, req_id, prompt ids, output ids, block ids, computed, sampling,
#                   pooling], ...],
#        cached refs | an int n (the first n requests of the batch order, the scheduler's
#                                usual layout: running requests first, then new ones),
#        new token rows | None, new token counts, new token ids,
#        new block rows | None, new block counts, new block ids (sparse: only the cached rows
#                             that bring tokens / blocks; None: every row),
#        batch order refs | an int (the step id of the last plan, whose batch order this one
#                                   repeats: a decode step without joins or finishes),
#        scheduled counts | one int (the same count for every request)]
# Counts (scheduled, new token, new block) go as one int when all are equal, as bytes when all
# are below 256, else as a list. A running request's computed count is not sent: driver and
# workers each move it on by the tokens a step schedules for it (see CachedRequestData).
# Result: [version, step_id, sampled refs | None (None: exactly the batch order),
#          sampled token ids, rows [[ref, tokens, logprobs, prompt logprobs, pooled,
#          pooled shape, error], ...], errors]


class CodecError(ValueError):
    """A signed message that does not fit the receiver's codec state (a desync bug)."""


def _check_version(v: int) -> None:
    if v != PLAN_VERSION:
        raise ValueError(f"step message version {v} does not match this build's {PLAN_VERSION}")


def _get_all(d: dict, keys) -> list:
    """[d[k] for k in keys], at C speed; raises KeyError (or TypeError) like the loop."""
    if len(keys) > 1:
        return list(operator.itemgetter(*keys)(d))
    return [d[k] for k in keys]


def _pack_counts(col: list[int]) -> int | bytes | list[int]:
    """A column of counts: one int when all are equal (the decoder knows the length), bytes when
    all are below 256 (packed and unpacked as one string), else the list itself."""
    if col and col.count(col[0]) == len(col):
        return col[0]
    try:
        return bytes(col)
    except ValueError:  # a count over 255 (or negative)
        return col


def _unpack_counts(o, n: int) -> list[int]:
    if type(o) is int:
        return [o] * n
    if len(o) != n:
        raise CodecError(f"a column of {len(o)} counts for {n} rows")
    return list(o)


class PlanEncoder:
    """Driver side, one per plan channel: StepPlan -> bytes, giving new requests handles.

    ``handles=False`` gives none: every ref is the id string, and each message stands alone.
    """

    def __init__(self, handles: bool = True) -> None:
        self._give_handles = handles
        self._handles: dict[str, int] = {}
        self._next = 0
        self._failed: str | None = None
        # The last plan's batch order and step id: a decode step usually repeats it.
        self._prev_order: list[str] | None = None
        self._prev_step = 0

    def __len__(self) -> int:
        return len(self._handles)

    def encode(self, plan: StepPlan) -> bytes:
        if self._failed is not None:
            raise CodecError(f"plan encoder unusable after an earlier failure: {self._failed}")
        _check_version(plan.version)
        try:
            return msgpack.packb(self._to_obj(plan), use_bin_type=True)
        except BaseException as e:
            # Handles may have changed for a plan that was never sent: the decoders no longer
            # match, so refuse to go on rather than send plans they would misread.
            self._failed = f"{type(e).__name__}: {e}"
            raise

    def _refs(self, req_ids: list[str]) -> list:
        try:
            return _get_all(self._handles, req_ids)
        except KeyError:  # an id without a handle goes as its string
            get = self._handles.get
            return [get(rid, rid) for rid in req_ids]

    def _drop(self, req_ids: list[str]) -> list:
        pop = self._handles.pop
        return [pop(rid, rid) for rid in req_ids]

    def _to_obj(self, p: StepPlan) -> list:
        fin = self._drop(p.finished_req_ids) if p.finished_req_ids else []
        pre = self._drop(p.preempted_req_ids) if p.preempted_req_ids else []
        new = []
        for r in p.new_requests:
            h = None
            if self._give_handles:
                h = self._next
                self._next = h + 1
                self._handles[r.req_id] = h
            new.append([h, r.req_id, r.prompt_token_ids, r.output_token_ids, r.block_ids, r.num_computed_tokens,
                        r.sampling, r.pooling])
        order = list(p.num_scheduled_tokens)
        if self._give_handles and order == self._prev_order:
            order_refs = self._prev_step
        else:
            order_refs = self._refs(order)
        if self._give_handles:
            self._prev_order, self._prev_step = order, p.step_id
        cr = p.cached_requests
        n = len(cr.req_ids)
        return [
            PLAN_VERSION, p.step_id, fin, pre, new,
            n if cr.req_ids == order[:n] else self._refs(cr.req_ids),
            *_pack_sparse(n, cr.new_token_rows, cr.new_token_counts, cr.new_token_ids),
            *_pack_sparse(n, cr.new_block_rows, cr.new_block_counts, cr.new_block_ids),
            order_refs, _pack_counts(list(p.num_scheduled_tokens.values())),
        ]


class PlanDecoder:
    """Worker side, one per rank: bytes -> StepPlan, mirroring its driver's PlanEncoder."""

    def __init__(self) -> None:
        self._ids: dict[int, str] = {}
        self._handle_of: dict[str, int] = {}
        self._next = 0
        # The last plan's batch: order, step id, counts as sent, num_scheduled_tokens.
        self._prev_order: list[str] = []
        self._prev_step: int | None = None
        self._prev_counts = None
        self._prev_scheduled: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    @staticmethod
    def _unknown(step_id: int, h) -> CodecError:
        return CodecError(
            f"plan {step_id} names request handle {h!r}, which this worker does not hold: "
            "driver and worker plan codecs are out of step"
        )

    def _resolve(self, step_id: int, refs: list) -> list[str]:
        ids = self._ids
        try:
            return _get_all(ids, refs)
        except (KeyError, TypeError):  # some refs are id strings, or a bad handle
            pass
        out = []
        for h in refs:
            if type(h) is str:
                out.append(h)
            elif type(h) is int and h in ids:
                out.append(ids[h])
            else:
                raise self._unknown(step_id, h)
        return out

    def _drop(self, step_id: int, refs: list) -> list[str]:
        out = []
        for h in refs:
            if type(h) is str:
                out.append(h)
                continue
            rid = self._ids.pop(h, None) if type(h) is int else None
            if rid is None:
                raise self._unknown(step_id, h)
            if self._handle_of.get(rid) == h:
                del self._handle_of[rid]
            out.append(rid)
        return out

    def _add(self, step_id: int, h, rid: str) -> None:
        if h is None:
            return
        if type(h) is not int or h != self._next:
            raise CodecError(
                f"plan {step_id} gives request {rid!r} handle {h!r}, expected {self._next}: "
                "a plan was lost or driver and worker plan codecs are out of step"
            )
        self._next = h + 1
        old = self._handle_of.get(rid)
        if old is not None:  # sent as new again without being finished: the old handle is dead
            del self._ids[old]
        self._ids[h] = rid
        self._handle_of[rid] = h

    def _batch(self, step_id: int, order_refs, counts) -> tuple[list[str], dict[str, int]]:
        """The batch order and num_scheduled_tokens; a repeat of the last plan's is copied."""
        if type(order_refs) is not int:
            order = self._resolve(step_id, order_refs)
        elif order_refs != self._prev_step:
            raise CodecError(
                f"plan {step_id} repeats the batch of plan {order_refs}, but the last plan here was "
                f"{self._prev_step}: a plan was lost or driver and worker plan codecs are out of step"
            )
        elif counts == self._prev_counts:  # a steady decode step: the same dict again
            self._prev_step = step_id
            return self._prev_order, self._prev_scheduled.copy()
        else:
            order = self._prev_order
        if type(counts) is int:
            scheduled = dict.fromkeys(order, counts)
        else:
            scheduled = dict(zip(order, _unpack_counts(counts, len(order))))
        # A copy of our own: the caller may do what it likes with the plan's dict.
        self._prev_order, self._prev_step, self._prev_counts, self._prev_scheduled = (
            order, step_id, counts, scheduled.copy())
        return order, scheduled

    def decode(self, data: bytes) -> StepPlan:
        o = msgpack.unpackb(data, raw=False, strict_map_key=False)
        _check_version(o[0])
        if len(o) != 14:
            raise CodecError(f"a plan of {len(o)} fields, expected 14")
        _, step_id, fin, pre, new, cached_refs, c_tr, c_tc, c_tids, c_br, c_bc, c_bids, order_refs, counts = o
        finished = self._drop(step_id, fin) if fin else []
        preempted = self._drop(step_id, pre) if pre else []
        new_requests = []
        for r in new:
            self._add(step_id, r[0], r[1])
            new_requests.append(NewRequestData(*r[1:]))
        order, scheduled = self._batch(step_id, order_refs, counts)
        if type(cached_refs) is int:
            n = cached_refs
            if not 0 <= n <= len(order):
                raise CodecError(f"plan {step_id}: {n} cached requests but a batch of {len(order)}")
            cached_ids = order[:n]
        else:
            cached_ids = self._resolve(step_id, cached_refs)
            n = len(cached_ids)
        c_tr, c_tc, c_tids = _unpack_sparse(step_id, "token", n, c_tr, c_tc, c_tids)
        c_br, c_bc, c_bids = _unpack_sparse(step_id, "block", n, c_br, c_bc, c_bids)
        cached = CachedRequests(cached_ids, c_tr, c_tc, c_tids, c_br, c_bc, c_bids)
        return StepPlan(
            step_id=step_id,
            new_requests=new_requests,
            cached_requests=cached,
            num_scheduled_tokens=scheduled,
            finished_req_ids=finished,
            preempted_req_ids=preempted,
            version=o[0],
        )


def _pack_sparse(n: int, rows: list[int], counts: list[int], flat: list[int]) -> list:
    """A sparse column of n rows: rows (None: every row), counts (one int: all equal), ids."""
    return [None if len(rows) == n else rows, _pack_counts(counts), flat]


def _unpack_sparse(step_id: int, what: str, n: int, rows, counts, flat) -> tuple[list, list, list]:
    """_pack_sparse undone; the rows must be in range and ascending, the counts add up."""
    every = rows is None
    rows = list(range(n)) if every else rows
    counts = _unpack_counts(counts, len(rows))
    if sum(counts) != len(flat):
        raise CodecError(f"plan {step_id}: new-{what} counts add up to {sum(counts)}, with {len(flat)} ids")
    if not every and rows and not (0 <= rows[0] and rows[-1] < n and all(a < b for a, b in zip(rows, rows[1:]))):
        raise CodecError(f"plan {step_id}: new-{what} rows {rows[:8]}... are not ascending rows of {n}")
    return rows, counts, flat


def encode_plan(plan: StepPlan) -> bytes:
    """A self-contained plan (every id as its string); decode it with decode_plan."""
    return PlanEncoder(handles=False).encode(plan)


def decode_plan(data: bytes) -> StepPlan:
    """Decode a self-contained plan (encode_plan's); a handle in it raises CodecError."""
    return PlanDecoder().decode(data)


def _lp_to_obj(lp: TokenLogprobs | None) -> list | None:
    return None if lp is None else [lp.token_ids, lp.logprobs, lp.ranks]


def _lp_from_obj(o: list | None) -> TokenLogprobs | None:
    return None if o is None else TokenLogprobs(*o)


def encode_result(res: StepResult, order: list[str] | None = None) -> bytes:
    """``order``: the batch order of the result's plan (``list(plan.num_scheduled_tokens)``);
    requests in it go as positions. Decode with decode_result and the same order."""
    pos = None
    sampled = res.sampled_req_ids
    if order is not None and sampled == order:
        sampled = None
    elif order is not None and sampled:
        pos = {rid: i for i, rid in enumerate(order)}
        sampled = [pos.get(rid, rid) for rid in sampled]
    rows = []
    for r in res.results:
        ref = r.req_id
        if order is not None:
            if pos is None:
                pos = {rid: i for i, rid in enumerate(order)}
            ref = pos.get(ref, ref)
        rows.append([ref, r.sampled_token_ids, _lp_to_obj(r.logprobs), _lp_to_obj(r.prompt_logprobs), r.pooled,
                     r.pooled_shape, r.error])
    return msgpack.packb([res.version, res.step_id, sampled, res.sampled_token_ids, rows, res.errors],
                         use_bin_type=True)


def _at(order: list[str] | None, step_id: int, ref) -> str:
    if type(ref) is str:
        return ref
    if order is None or type(ref) is not int or not 0 <= ref < len(order):
        n = "no plan order" if order is None else f"a batch of {len(order)}"
        raise CodecError(f"result of step {step_id} names batch position {ref!r}, with {n}")
    return order[ref]


def _all_at(order: list[str] | None, step_id: int, refs: list) -> list[str]:
    if order is not None:
        try:
            if min(refs) >= 0 and max(refs) < len(order):
                return [order[i] for i in refs]
        except TypeError:  # some refs are id strings
            pass
    return [_at(order, step_id, ref) for ref in refs]


def decode_result(data: bytes, order: list[str] | None = None) -> StepResult:
    o = msgpack.unpackb(data, raw=False, strict_map_key=False)
    _check_version(o[0])
    step_id, sampled = o[1], o[2]
    if sampled is None:
        if order is None:
            raise CodecError(f"result of step {step_id} refers to its plan's batch order, but none was given")
        sampled = list(order)
    elif sampled:
        sampled = _all_at(order, step_id, sampled)
    return StepResult(
        step_id=step_id,
        sampled_req_ids=sampled,
        sampled_token_ids=o[3],
        results=[
            RequestResult(_at(order, step_id, r[0]), r[1], _lp_from_obj(r[2]), _lp_from_obj(r[3]), r[4], r[5], r[6])
            for r in o[4]
        ],
        errors=o[5],
        version=o[0],
    )
