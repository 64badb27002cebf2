"""Async scheduling: step N + 1 is scheduled and launched before step N's tokens are back, its
decode inputs taken from step N's samples on the device. Outputs must not change."""

from __future__ import annotations

import pytest

from distllm import LLM, SamplingParams

VOCAB = 49152


def _prompts(n: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(3)
    return [torch.randint(100, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(2, 40, (n,), generator=g)]


def _generate(folder, prompts, params, **kw):
    with LLM(model=folder, device="cpu", **kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runner = llm.llm_engine.executor.worker.runner
        bm = llm.llm_engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        assert not runner.states, "worker state left behind"
        return outs, runner.num_placeholder_fills


def _mixed_params(n: int) -> list[SamplingParams]:
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.9, seed=11),
        dict(temperature=0.7, top_k=20, top_p=0.9, seed=5, logprobs=2),
        dict(temperature=0.0, min_tokens=3, stop_token_ids=[VOCAB - 1]),
        dict(temperature=0.0, max_tokens=1),
    ]
    out = []
    for i in range(n):
        kw = dict(max_tokens=6 + i % 7, ignore_eos=True)
        kw.update(kinds[i % len(kinds)])
        out.append(SamplingParams(**kw))
    return out


@pytest.mark.parametrize("engine_kw", [
    dict(),
    dict(block_size=8, num_gpu_blocks_override=14, max_num_seqs=8),  # preemption
    dict(max_num_batched_tokens=16),  # chunked prefill beside decodes
])
def test_async_scheduling_keeps_outputs(tiny_models, engine_kw):
    prompts = _prompts(10)
    params = _mixed_params(10)
    on, fills = _generate(tiny_models["llama"], prompts, params, async_scheduling=True, **engine_kw)
    off, fills_off = _generate(tiny_models["llama"], prompts, params, async_scheduling=False, **engine_kw)
    assert fills > 0, "async scheduling never ran a step ahead"
    assert fills_off == 0
    for a, b in zip(on, off):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
        if b.outputs[0].logprobs is not None:
            for da, db in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert da.keys() == db.keys()
                assert all(abs(da[k].logprob - db[k].logprob) < 1e-5 for k in da)


def test_penalties_and_stop_strings_stay_correct(tiny_models, smol_tokenizer):
    """Penalties read earlier token values: those steps wait for the tokens. Stop strings are
    found a step late on the driver: the extra token computed meanwhile is dropped."""
    prompts = _prompts(6)
    with LLM(model=tiny_models["llama"], device="cpu", async_scheduling=False) as llm:
        ref = llm.generate([{"prompt_token_ids": p} for p in prompts[:1]],
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    text = ref[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3] if len(text) > 6 else None
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop] if stop else None),
    ] * 2
    stops_only = [params[2]] * len(prompts)
    for batch in (params, stops_only):
        on, fills = _generate(tiny_models["llama"], prompts, batch, async_scheduling=True)
        off, _ = _generate(tiny_models["llama"], prompts, batch, async_scheduling=False)
        if batch is stops_only:
            assert fills > 0
            assert stop is None or on[0].outputs[0].finish_reason == "stop"
        for a, b in zip(on, off):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert a.outputs[0].text == b.outputs[0].text
            assert a.outputs[0].finish_reason == b.outputs[0].finish_reason


def test_idle_engine_with_a_step_in_flight_survives_worker_timeout(tiny_models):
    """A step may still be in flight when the caller stops stepping (its request already
    finished); its result waits on the socket past worker_timeout_s and must still be taken."""
    import time

    from distllm import EngineArgs, LLMEngine

    eng = LLMEngine.from_engine_args(EngineArgs(
        model=tiny_models["llama"], device="cpu", distributed_executor_backend="mp", worker_timeout_s=1.0,
    ))
    try:
        sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        for rid in ("a", "b"):
            eng.add_request(rid, {"prompt_token_ids": _prompts(1)[0]}, sp)
            done = False
            while not done:
                done = any(o.finished and o.request_id == rid for o in eng.step())
            time.sleep(1.5)  # idle longer than worker_timeout_s, maybe with a plan in flight
        while eng.has_unfinished_requests():
            eng.step()
        assert eng.dead_error is None
    finally:
        eng.shutdown()


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("engine_kw", [
    dict(block_size=8, num_gpu_blocks_override=14, max_num_seqs=8),  # preemption
    dict(max_num_batched_tokens=16, enable_prefix_caching=True),  # chunked prefill, cache hits
])
def test_worker_computed_counts_follow_the_scheduler(tiny_models, engine_kw, async_scheduling):
    """Plans carry no computed counts for running requests (plan format v5): the worker moves
    its own on by what each step computes. After every launch, they must equal the scheduler's."""
    prompts = _prompts(10)
    prompts += [p + [7, 8, 9] for p in prompts[:3]]  # shared prefixes: prefix-cache hits
    with LLM(model=tiny_models["llama"], device="cpu", async_scheduling=async_scheduling, **engine_kw) as llm:
        eng = llm.llm_engine
        runner, sched = eng.executor.worker.runner, eng.scheduler
        launch, checked = runner.launch, []

        def checked_launch(plan):
            pending = launch(plan)
            for rid in plan.num_scheduled_tokens:
                assert runner.states[rid].num_computed_tokens == sched.requests[rid].num_computed_tokens, rid
                checked.append(rid)
            return pending

        runner.launch = checked_launch
        preempt, preempted = sched._preempt, []
        sched._preempt = lambda req: (preempted.append(req.request_id), preempt(req))
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _mixed_params(len(prompts)), use_tqdm=False)
    assert len(checked) > 50
    # the first case must preempt (counts start over), the second must hit the prefix cache
    if "num_gpu_blocks_override" in engine_kw:
        assert preempted
    else:
        assert any(o.num_cached_tokens for o in outs), [o.num_cached_tokens for o in outs]
