"""Request validation like vLLM's: raised before any work, naming the parameter and the limit;
a bad request fails alone and the engine keeps serving."""

from __future__ import annotations

import math

import pytest

from distllm import LLM, SamplingParams


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(temperature=-0.1), r"temperature must be non-negative and finite, got -0.1"),
        (dict(temperature=math.nan), r"temperature must be non-negative and finite, got nan"),
        (dict(temperature=math.inf), r"temperature must be non-negative and finite, got inf"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-2), r"top_k must be -1 \(disable\), or at least 1, got -2"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\], got -0.1"),
        (dict(min_p=1.1), r"min_p must be in \[0, 1\], got 1.1"),
        (dict(n=0), r"n must be at least 1, got 0"),
        (dict(max_tokens=0), r"max_tokens must be at least 1, got 0"),
        (dict(min_tokens=5, max_tokens=3), r"min_tokens must be less than or equal to max_tokens=3, got 5"),
        (dict(presence_penalty=3.0), r"presence_penalty must be in \[-2, 2\], got 3.0"),
        (dict(frequency_penalty=-2.5), r"frequency_penalty must be in \[-2, 2\], got -2.5"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be greater than zero, got 0.0"),
        (dict(logprobs=-1), r"logprobs must be non-negative, got -1"),
        (dict(stop=["ok", ""]), r"stop cannot contain an empty string"),
    ],
)
def test_sampling_params_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def llm(tiny_models):
    with LLM(model=tiny_models["llama"], device="cpu", max_model_len=64) as llm:
        yield llm


GOOD = {"prompt_token_ids": [10, 11, 12]}


@pytest.mark.parametrize(
    "prompt, kwargs, pattern",
    [
        (GOOD, dict(logprobs=21), r"Requested logprobs of 21, which is greater than max allowed: 20"),
        (GOOD, dict(prompt_logprobs=25), r"Requested prompt_logprobs of 25, which is greater than max allowed: 20"),
        (GOOD, dict(logit_bias={49152: 1.0}), r"logit_bias contains out-of-vocab token id 49152 \(vocabulary size 49152\)"),
        (GOOD, dict(stop_token_ids=[-1]), r"stop_token_ids contains out-of-vocab token id -1"),
        (GOOD, dict(allowed_token_ids=[5, 60000]), r"allowed_token_ids contains out-of-vocab token id 60000"),
        ({"prompt_token_ids": [1, 2, 99999]}, {}, r"Token id 99999 is out of vocabulary \(vocabulary size 49152\)"),
        ({"prompt_token_ids": []}, {}, r"The decoder prompt cannot be empty"),
        ("", {}, r"The decoder prompt cannot be empty"),
        (
            {"prompt_token_ids": list(range(100, 170))},
            {},
            r"The decoder prompt \(length 70\) is longer than the maximum model length of 64",
        ),
    ],
)
def test_request_rejected_before_any_work(llm, prompt, kwargs, pattern):
    engine = llm.llm_engine
    steps_before = engine.scheduler.make_stats()["step_id"]
    with pytest.raises(ValueError, match=pattern):
        llm.generate([GOOD, prompt], SamplingParams(max_tokens=2, **kwargs) if kwargs else SamplingParams(max_tokens=2), use_tqdm=False)
    assert engine.scheduler.make_stats()["step_id"] == steps_before, "work was scheduled before validation"
    assert not engine.has_unfinished_requests()
    # The engine still serves.
    out = llm.generate(GOOD, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_truncate_prompt_tokens_keeps_the_end(llm):
    long_prompt = {"prompt_token_ids": list(range(100, 170))}
    out = llm.generate(long_prompt, SamplingParams(max_tokens=2, truncate_prompt_tokens=40), use_tqdm=False)
    assert out[0].prompt_token_ids == list(range(130, 170))


def test_bad_request_in_engine_fails_alone(llm):
    engine = llm.llm_engine
    engine.add_request("ok-1", GOOD, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="longer than the maximum model length"):
        engine.add_request("bad", {"prompt_token_ids": list(range(100, 200))}, SamplingParams())
    engine.add_request("ok-2", GOOD, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok-2", GOOD, SamplingParams())
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert set(done) == {"ok-1", "ok-2"}
    assert done["ok-1"].outputs[0].token_ids == done["ok-2"].outputs[0].token_ids


def test_runner_mismatch_names_runner(llm):
    with pytest.raises(ValueError, match="runner='pooling'"):
        llm.encode("hello")
