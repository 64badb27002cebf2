"""The stateful plan codec (PlanEncoder on the driver, PlanDecoder on each worker) and results
encoded by batch position: long runs with requests joining, finishing, being preempted and
rejoining; async scheduling (plan N + 1 before result N); desyncs that must fail loudly."""

from __future__ import annotations

import random
import uuid

import msgpack
import pytest

from distllm.core.plan import (
    PLAN_VERSION,
    CachedRequestData,
    CachedRequests,
    CodecError,
    NewRequestData,
    PlanDecoder,
    PlanEncoder,
    RequestResult,
    StepPlan,
    StepResult,
    TokenLogprobs,
    decode_plan,
    decode_result,
    encode_plan,
    encode_result,
)


def _rid() -> str:
    return f"cmpl-{uuid.uuid4().hex}-0"


def _new(rid: str, rng: random.Random) -> NewRequestData:
    n = rng.randint(1, 40)
    return NewRequestData(rid, [rng.randrange(50_000) for _ in range(n)], [rng.randrange(50_000)] * rng.randint(0, 2),
                          [rng.randrange(1000) for _ in range(n // 16 + 1)], 0, {"temperature": 0.5, "seed": 1})


class _Sim:
    """A toy scheduler: the running batch in order, waiting (preempted) requests, and churn."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.step = 0
        self.running: list[str] = []  # the workers hold these
        self.waiting: list[str] = []  # preempted: rejoin later as new requests, same id
        self.to_finish: list[str] = []

    def plan(self) -> StepPlan:
        rng = self.rng
        self.step += 1
        plan = StepPlan(step_id=self.step)
        if self.to_finish:
            plan.finished_req_ids, self.to_finish = self.to_finish, []
        if self.running and rng.random() < 0.2:
            victim = self.running.pop(rng.randrange(len(self.running)))
            plan.preempted_req_ids.append(victim)
            self.waiting.append(victim)
        if rng.random() < 0.1:  # an abort of a request the workers never saw
            plan.finished_req_ids.append(_rid())
        batch = list(self.running)
        skipped = [r for r in batch if rng.random() < 0.05]  # not scheduled this step
        batch = [r for r in batch if r not in skipped]
        cached = [CachedRequestData(r, [rng.randrange(50_000)] * rng.randint(0, 2),
                                    [rng.randrange(1000)] * (rng.random() < 0.1)) for r in batch]
        if rng.random() < 0.3:  # new requests mixed into the batch, not after it
            rng.shuffle(batch)
        joining = []
        if not plan.preempted_req_ids:
            while self.waiting and rng.random() < 0.5:
                joining.append(self.waiting.pop(0))
            joining += [_rid() for _ in range(rng.randint(0, 3))]
        plan.new_requests = [_new(r, rng) for r in joining]
        plan.cached_requests = CachedRequests.of(cached)
        order = batch + joining
        if rng.random() < 0.2:
            rng.shuffle(order)
        uniform = rng.random() < 0.5
        plan.num_scheduled_tokens = {r: 1 if uniform else rng.randint(1, 600) for r in order}
        self.running += joining
        # Some finish; the scheduler tells the workers in the next plan.
        for r in list(self.running):
            if rng.random() < 0.08:
                self.running.remove(r)
                self.to_finish.append(r)
        return plan


def _result_for(plan: StepPlan, rng: random.Random) -> StepResult:
    order = list(plan.num_scheduled_tokens)
    sampled = [r for r in order if rng.random() < 0.9] if rng.random() < 0.5 else list(order)
    rows = [RequestResult(r, [], TokenLogprobs([[1, 2]], [[-0.1, -2.0]], [1])) for r in order if rng.random() < 0.1]
    if rng.random() < 0.1:
        rows.append(RequestResult("not-in-batch", error="boom"))
    return StepResult(plan.step_id, results=rows, sampled_req_ids=sampled,
                      sampled_token_ids=[rng.randrange(50_000) for _ in sampled])


@pytest.mark.parametrize("seed", range(6))
def test_long_run_round_trips(seed):
    sim, enc, decs = _Sim(seed), PlanEncoder(), [PlanDecoder(), PlanDecoder()]  # two ranks
    rng = random.Random(seed + 100)
    sizes = []
    for _ in range(400):
        plan = sim.plan()
        data = enc.encode(plan)
        for dec in decs:
            got = dec.decode(data)
            assert got == plan
            assert list(got.num_scheduled_tokens) == list(plan.num_scheduled_tokens)  # batch order
        res = _result_for(plan, rng)
        order = list(got.num_scheduled_tokens)
        assert decode_result(encode_result(res, order), list(plan.num_scheduled_tokens)) == res
        # Handles live exactly as long as the workers hold the request: nothing leaks.
        live = set(sim.running) | set(sim.to_finish)
        assert set(enc._handles) == live
        assert all(set(d._ids.values()) == live and len(d) == len(live) for d in decs)
        sizes.append(len(data))
    assert len(enc) > 0 and max(sizes) < 20_000


def test_steady_decode_is_small_and_names_no_ids():
    ids = [_rid() for _ in range(256)]
    enc, dec = PlanEncoder(), PlanDecoder()
    first = StepPlan(1, [NewRequestData(r, [1] * 30, [], [i], 0, {"temperature": 0.0}) for i, r in enumerate(ids)],
                     num_scheduled_tokens=dict.fromkeys(ids, 30))
    assert dec.decode(enc.encode(first)) == first
    for step in (2, 3, 4):  # the same batch again: repeated by reference to the last plan
        plan = StepPlan(step, cached_requests=[CachedRequestData(r, [7], []) for r in ids],
                        num_scheduled_tokens=dict.fromkeys(ids, 1))
        data = enc.encode(plan)
        got = dec.decode(data)
        assert got == plan
        got.num_scheduled_tokens.clear()  # the decoder keeps its own copy of a repeated batch
        assert b"cmpl-" not in data and len(data) < 2000
        res = StepResult(step, sampled_req_ids=list(ids), sampled_token_ids=list(range(256)))
        rdata = encode_result(res, ids)
        assert b"cmpl-" not in rdata and len(rdata) < 800
        assert decode_result(rdata, list(plan.num_scheduled_tokens)) == res


def test_async_result_after_next_plan():
    """Plan N + 1 (finishing a request of step N) is encoded and decoded by the worker before
    result N comes back; result N still names that request."""
    enc, dec = PlanEncoder(), PlanDecoder()
    a, b, c = _rid(), _rid(), _rid()
    p1 = StepPlan(1, [NewRequestData(a, [1, 2], [], [0], 0), NewRequestData(b, [3], [], [1], 0)],
                  num_scheduled_tokens={a: 2, b: 1})
    assert dec.decode(enc.encode(p1)) == p1
    p2 = StepPlan(2, cached_requests=[CachedRequestData(a, [], []), CachedRequestData(b, [], [])],
                  num_scheduled_tokens={a: 1, b: 1})
    w2 = dec.decode(enc.encode(p2))
    # Step 3 is scheduled before step 2's result: b is finished (aborted), c joins.
    p3 = StepPlan(3, [NewRequestData(c, [4], [], [2], 0)], [CachedRequestData(a, [], [])],
                  num_scheduled_tokens={a: 1, c: 1}, finished_req_ids=[b])
    w3 = dec.decode(enc.encode(p3))
    assert w3 == p3 and b not in enc._handles and len(dec) == 2
    # The worker answers step 2 now, by positions in step 2's order.
    r2 = StepResult(2, results=[RequestResult(b, [], pooled=[0.5], pooled_shape=[1])],
                    sampled_req_ids=[a, b], sampled_token_ids=[11, 12])
    got = decode_result(encode_result(r2, list(w2.num_scheduled_tokens)), list(p2.num_scheduled_tokens))
    assert got == r2 and got.sampled_req_ids == [a, b] and got.results[0].req_id == b
    r3 = StepResult(3, sampled_req_ids=[a, c], sampled_token_ids=[13, 14])
    assert decode_result(encode_result(r3, list(w3.num_scheduled_tokens)), list(p3.num_scheduled_tokens)) == r3


def test_preempted_request_rejoins_with_a_new_handle():
    enc, dec = PlanEncoder(), PlanDecoder()
    a = _rid()
    dec.decode(enc.encode(StepPlan(1, [NewRequestData(a, [1], [], [0], 0)], num_scheduled_tokens={a: 1})))
    h1 = enc._handles[a]
    assert dec.decode(enc.encode(StepPlan(2, preempted_req_ids=[a]))).preempted_req_ids == [a]
    assert a not in enc._handles and len(dec) == 0
    p3 = StepPlan(3, [NewRequestData(a, [1], [5], [3], 0)], num_scheduled_tokens={a: 2})
    assert dec.decode(enc.encode(p3)) == p3
    assert enc._handles[a] > h1 and dec._ids == {enc._handles[a]: a}


def test_unknown_ids_travel_as_strings():
    """Ids without a handle (never sent as new) are sent as strings, so the worker sees exactly
    what the uni executor would (and fails the same way on a diff for a request it lacks)."""
    enc, dec = PlanEncoder(), PlanDecoder()
    plan = StepPlan(1, cached_requests=[CachedRequestData("x", [1], [])], num_scheduled_tokens={"x": 1},
                    finished_req_ids=["never-sent"])
    assert dec.decode(enc.encode(plan)) == plan
    assert len(enc) == 0 and len(dec) == 0


def test_handles_and_strings_mix():
    """A batch with some requests by handle and one by its string (a diff for a request never
    sent as new); a result naming one request outside its batch; a request sent as new twice."""
    enc, dec = PlanEncoder(), PlanDecoder()
    a, b = _rid(), _rid()
    dec.decode(enc.encode(StepPlan(1, [NewRequestData(a, [1], [], [0], 0)], num_scheduled_tokens={a: 1})))
    p2 = StepPlan(2, [NewRequestData(b, [1], [], [1], 0)],
                  [CachedRequestData("stray", [], []), CachedRequestData(a, [], [])],
                  num_scheduled_tokens={a: 1, "stray": 1, b: 1})
    data = enc.encode(p2)
    assert dec.decode(data) == p2
    assert msgpack.unpackb(data)[5] == ["stray", enc._handles[a]]
    order = list(p2.num_scheduled_tokens)
    res = StepResult(2, results=[RequestResult("elsewhere", error="x")], sampled_req_ids=[b, "elsewhere", a],
                     sampled_token_ids=[1, 2, 3])
    assert msgpack.unpackb(encode_result(res, order))[2] == [2, "elsewhere", 0]
    assert decode_result(encode_result(res, order), order) == res
    # b sent as new again without being finished: its old handle is dropped on both sides.
    old = enc._handles[b]
    p3 = StepPlan(3, [NewRequestData(b, [1, 2], [], [1], 0)], num_scheduled_tokens={b: 2})
    assert dec.decode(enc.encode(p3)) == p3
    assert enc._handles[b] != old and old not in dec._ids and len(dec) == len(enc) == 2


def test_unknown_handle_raises():
    enc, dec = PlanEncoder(), PlanDecoder()
    a = _rid()
    dec.decode(enc.encode(StepPlan(1, [NewRequestData(a, [1], [], [0], 0)], num_scheduled_tokens={a: 1})))
    obj = msgpack.unpackb(enc.encode(StepPlan(2, cached_requests=[CachedRequestData(a, [], [])], num_scheduled_tokens={a: 1})))
    for bad in ([999], [-1], [None], [1.0], [[0]]):
        o = list(obj)
        o[12] = bad  # the batch order
        with pytest.raises(CodecError, match="out of step"):
            dec.decode(msgpack.packb(o))
    o = list(obj)
    o[2] = [12345]  # finishing a handle the worker does not hold
    with pytest.raises(CodecError, match="handle 12345"):
        dec.decode(msgpack.packb(o))


def test_sparse_rows_round_trip_and_are_checked():
    """Only the cached rows that bring tokens or blocks are on the wire (by row index); a
    message whose rows, counts and ids do not fit together is refused, not misapplied."""
    ids = [_rid() for _ in range(5)]
    enc = PlanEncoder()
    first = enc.encode(StepPlan(1, [NewRequestData(r, [1, 2], [], [i], 0) for i, r in enumerate(ids)],
                                num_scheduled_tokens=dict.fromkeys(ids, 2)))

    def worker() -> PlanDecoder:  # one that holds plan 1, as the worker does
        dec = PlanDecoder()
        dec.decode(first)
        return dec

    cached = [CachedRequestData(ids[0], [], [5]), CachedRequestData(ids[1], [8, 9], []),
              CachedRequestData(ids[2], [], []), CachedRequestData(ids[3], [4], [6, 7]), CachedRequestData(ids[4], [], [])]
    plan = StepPlan(2, cached_requests=cached, num_scheduled_tokens=dict.fromkeys(ids, 1))
    cr = plan.cached_requests
    assert (cr.new_token_rows, cr.new_token_counts, cr.new_token_ids) == ([1, 3], [2, 1], [8, 9, 4])
    assert (cr.new_block_rows, cr.new_block_counts, cr.new_block_ids) == ([0, 3], [1, 2], [5, 6, 7])
    data = enc.encode(plan)
    got = worker().decode(data)
    assert got == plan and list(got.cached_requests) == cached
    obj = msgpack.unpackb(data)
    assert obj[5] == 5 and obj[6] == [1, 3] and obj[9] == [0, 3]  # five cached rows, two of each kind
    for field, bad, msg in [(6, [3, 1], "ascending"), (6, [1, 5], "ascending"), (6, [-1, 3], "ascending"),
                            (7, [2, 2], "add up"), (8, [8, 9], "add up"), (10, [1], "counts for 2 rows"),
                            (5, 6, "6 cached requests but a batch of 5")]:
        o = list(obj)
        o[field] = bad
        with pytest.raises(CodecError, match=msg):
            worker().decode(msgpack.packb(o))


def test_lost_plan_is_detected():
    enc, dec = PlanEncoder(), PlanDecoder()
    a, b = _rid(), _rid()
    enc.encode(StepPlan(1, [NewRequestData(a, [1], [], [0], 0)], num_scheduled_tokens={a: 1}))  # never arrives
    with pytest.raises(CodecError, match="lost"):
        dec.decode(enc.encode(StepPlan(2, [NewRequestData(b, [1], [], [0], 0)], num_scheduled_tokens={b: 1})))
    # A repeated batch must refer to the plan the worker decoded last.
    enc2, dec2 = PlanEncoder(), PlanDecoder()
    dec2.decode(enc2.encode(StepPlan(1, [NewRequestData(a, [1], [], [0], 0)], num_scheduled_tokens={a: 1})))
    enc2.encode(StepPlan(2, cached_requests=[CachedRequestData(a, [], [])], num_scheduled_tokens={a: 1}))  # lost
    with pytest.raises(CodecError, match="lost"):
        dec2.decode(enc2.encode(StepPlan(3, cached_requests=[CachedRequestData(a, [], [])], num_scheduled_tokens={a: 1})))


def test_encoder_refuses_to_go_on_after_a_failure():
    enc = PlanEncoder()
    bad = StepPlan(1, [NewRequestData("a", [1], [], [0], 0, sampling={"x": object()})], num_scheduled_tokens={"a": 1})
    with pytest.raises(TypeError):
        enc.encode(bad)
    with pytest.raises(CodecError, match="earlier failure"):
        enc.encode(StepPlan(2))


def test_result_positions_checked():
    order = ["a", "b"]
    res = StepResult(1, results=[RequestResult("b", [3])], sampled_req_ids=["b", "a"], sampled_token_ids=[1, 2])
    data = encode_result(res, order)
    assert decode_result(data, order) == res
    with pytest.raises(CodecError, match="position"):
        decode_result(data, ["a"])  # a shorter batch than the result's
    with pytest.raises(CodecError, match="position"):
        decode_result(data)  # positions without the plan's order
    o = msgpack.unpackb(data)
    o[2] = [-1, 0]
    with pytest.raises(CodecError, match="position"):
        decode_result(msgpack.packb(o), order)
    # All of the batch in order goes as one marker; it needs the order to decode.
    full = encode_result(StepResult(1, sampled_req_ids=list(order), sampled_token_ids=[5, 6]), order)
    assert msgpack.unpackb(full)[2] is None
    with pytest.raises(CodecError, match="batch order"):
        decode_result(full)
    # Without an order, everything goes as strings and decodes on its own.
    assert decode_result(encode_result(res)) == res


def test_stateless_plan_has_no_handles():
    a = _rid()
    plan = StepPlan(4, [NewRequestData(a, [1], [], [0], 0)], [CachedRequestData("c", [2], [9])],
                    num_scheduled_tokens={"c": 1, a: 300})
    assert decode_plan(encode_plan(plan)) == plan
    assert decode_plan(encode_plan(plan)) == plan  # self-contained: any number of times
    # A stateful encoder's plans need their decoder's state: a fresh one refuses them.
    enc = PlanEncoder()
    enc.encode(StepPlan(1, [NewRequestData("z", [1], [], [0], 0)], num_scheduled_tokens={"z": 1}))
    with pytest.raises(CodecError, match="out of step"):
        decode_plan(enc.encode(StepPlan(2, cached_requests=[CachedRequestData("z", [], [])], num_scheduled_tokens={"z": 1, "y": 2})))


def test_version_mismatch_raises():
    enc = PlanEncoder()
    obj = msgpack.unpackb(enc.encode(StepPlan(1)))
    obj[0] = PLAN_VERSION - 1
    with pytest.raises(ValueError, match="version"):
        PlanDecoder().decode(msgpack.packb(obj))
    robj = msgpack.unpackb(encode_result(StepResult(1), []))
    robj[0] = PLAN_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        decode_result(msgpack.packb(robj), [])
