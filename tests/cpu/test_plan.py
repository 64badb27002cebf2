"""StepPlan / StepResult msgpack round trips and version checks."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distllm.core.plan import (
    PLAN_VERSION,
    CachedRequestData,
    NewRequestData,
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
cached_req = st.builds(CachedRequestData, req_id, ids, ids, small)
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
@given(results)
def test_result_round_trip(res):
    assert decode_result(encode_result(res)) == res


def test_real_params_round_trip():
    sp = SamplingParams(temperature=0.7, top_k=5, logit_bias={3: -1.5}, stop_token_ids=[9], seed=1)
    sp.update_from_generation_config({2})
    plan = StepPlan(
        step_id=3,
        new_requests=[
            NewRequestData("a", [1, 2, 3], [4], [0, 1], 0, sampling=sp.to_worker_dict()),
            NewRequestData("b", [5], [], [2], 0, pooling=PoolingParams(task="embed").to_worker_dict()),
        ],
        cached_requests=[CachedRequestData("c", [7], [3], 12)],
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
