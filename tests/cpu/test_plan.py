"""StepPlan / StepResult msgpack round trips and version checks (see test_plan_codec.py for the
stateful codec over long runs)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.core.plan import (
    PLAN_VERSION,
    CachedRequestData,
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
from distllm.params import PoolingParams, SamplingParams

ids = st.lists(st.integers(0, 2**31 - 1), max_size=20)
req_id = st.text(min_size=1, max_size=12)
small = st.integers(0, 10_000)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
scalar = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | finite | st.text(max_size=8)
params = st.none() | st.dictionaries(st.text(max_size=8), scalar | st.lists(st.integers(-(2**40), 2**40), max_size=4), max_size=6)

new_req = st.builds(NewRequestData, req_id, ids, ids, ids, small, params, params)
cached_req = st.builds(CachedRequestData, req_id, ids, ids)
plans = st.builds(
    StepPlan,
    step_id=small,
    new_requests=st.lists(new_req, max_size=4),
    cached_requests=st.lists(cached_req, max_size=4),
    num_scheduled_tokens=st.dictionaries(req_id, st.integers(1, 4096), max_size=6),
    finished_req_ids=st.lists(req_id, max_size=4),
    preempted_req_ids=st.lists(req_id, max_size=4),
)


@st.composite
def logprobs(draw):
    n = draw(st.integers(0, 4))
    k = draw(st.integers(1, 3))
    return TokenLogprobs(
        token_ids=[draw(st.lists(st.integers(0, 2**20), min_size=k, max_size=k)) for _ in range(n)],
        logprobs=[draw(st.lists(st.floats(max_value=0.0, allow_nan=False), min_size=k, max_size=k)) for _ in range(n)],
        ranks=draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n)),
    )


req_result = st.builds(
    RequestResult,
    req_id,
    ids,
    st.none() | logprobs(),
    st.none() | logprobs(),
    st.none() | st.lists(finite, max_size=8),
    st.none() | st.lists(st.integers(1, 8), max_size=2),
    st.none() | st.text(max_size=20),
)
results = st.builds(
    StepResult, step_id=small, results=st.lists(req_result, max_size=4), errors=st.lists(st.text(max_size=10), max_size=2)
)


@settings(max_examples=40, deadline=None)
@given(plans)
def test_plan_round_trip(plan):
    got = decode_plan(encode_plan(plan))
    assert got == plan
    assert list(got.num_scheduled_tokens) == list(plan.num_scheduled_tokens)  # batch order kept


@settings(max_examples=40, deadline=None)
@given(st.lists(plans, min_size=1, max_size=6))
def test_stateful_plan_round_trips(seq):
    """Any plan sequence (ids repeated, finished twice, re-sent as new, never sent...) decodes to
    exactly what was encoded through one encoder/decoder pair, and the pair stays in step."""
    enc, dec = PlanEncoder(), PlanDecoder()
    for i, plan in enumerate(seq):
        plan.step_id = i + 1
        got = dec.decode(enc.encode(plan))
        assert got == plan
        assert list(got.num_scheduled_tokens) == list(plan.num_scheduled_tokens)
        assert dec._ids == {h: rid for rid, h in enc._handles.items()}


@settings(max_examples=40, deadline=None)
@given(results)
def test_result_round_trip(res):
    assert decode_result(encode_result(res)) == res


@settings(max_examples=40, deadline=None)
@given(results, st.lists(req_id, max_size=6, unique=True))
def test_result_round_trip_by_position(res, order):
    res.sampled_req_ids = [r.req_id for r in res.results] + order[::2]
    res.sampled_token_ids = list(range(len(res.sampled_req_ids)))
    assert decode_result(encode_result(res, order), order) == res


def test_real_params_round_trip():
    sp = SamplingParams(temperature=0.7, top_k=5, logit_bias={3: -1.5}, stop_token_ids=[9], seed=1)
    sp.update_from_generation_config({2})
    plan = StepPlan(
        step_id=3,
        new_requests=[
            NewRequestData("a", [1, 2, 3], [4], [0, 1], 0, sampling=sp.to_worker_dict()),
            NewRequestData("b", [5], [], [2], 0, pooling=PoolingParams(task="embed").to_worker_dict()),
        ],
        cached_requests=[CachedRequestData("c", [7], [3])],
        num_scheduled_tokens={"c": 1, "a": 4, "b": 1},
        finished_req_ids=["x"],
        preempted_req_ids=["y"],
    )
    got = decode_plan(encode_plan(plan))
    assert got == plan
    assert got.new_requests[0].sampling["stop_token_ids"] == [2, 9]
    assert got.total_num_scheduled_tokens == 6 and not got.is_empty()


def test_version_mismatch_raises():
    plan_obj = msgpack.unpackb(encode_plan(StepPlan(step_id=1)))
    plan_obj[0] = PLAN_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        decode_plan(msgpack.packb(plan_obj))
    res_obj = msgpack.unpackb(encode_result(StepResult(step_id=1)))
    res_obj[0] = PLAN_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        decode_result(msgpack.packb(res_obj))
    with pytest.raises(ValueError, match="version"):
        decode_plan(encode_plan(StepPlan(step_id=1, version=PLAN_VERSION + 7)))
