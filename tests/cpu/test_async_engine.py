"""AsyncLLMEngine: streaming deltas, abort on cancel, priorities, concurrency, engine death."""

from __future__ import annotations

import asyncio

import pytest

from distllm.config import EngineArgs
from distllm.engine.async_llm_engine import AsyncLLMEngine
from distllm.executor.base import EngineDeadError
from distllm.params import RequestOutputKind, SamplingParams

PROMPT = "The quick brown fox jumps over"


def _free_all(engine: AsyncLLMEngine) -> bool:
    bm = engine.engine.scheduler.block_manager
    return bm.num_free_blocks == bm.num_blocks


@pytest.fixture(scope="module")
def aengine(tiny_models):
    eng = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=tiny_models["llama"], device="cpu", num_gpu_blocks_override=256), log_stats=False
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def aengine_prio(tiny_models):
    eng = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=tiny_models["llama"], device="cpu", max_num_seqs=1, scheduling_policy="priority",
                   num_gpu_blocks_override=64),
        log_stats=False,
    )
    yield eng
    eng.shutdown()


def _sp(kind: RequestOutputKind, n_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True, output_kind=kind, **kw)


async def _collect(eng, prompt, sp, rid, priority=0):
    return [o async for o in eng.generate(prompt, sp, rid, priority=priority)]


def test_deltas_concatenate_to_final_text(aengine):
    async def main():
        deltas = await _collect(aengine, PROMPT, _sp(RequestOutputKind.DELTA, 10), "d")
        cumul = await _collect(aengine, PROMPT, _sp(RequestOutputKind.CUMULATIVE, 10), "c")
        final = await _collect(aengine, PROMPT, _sp(RequestOutputKind.FINAL_ONLY, 10), "f")
        return deltas, cumul, final

    deltas, cumul, final = asyncio.run(main())
    assert len(final) == 1 and final[0].finished
    assert len(deltas) > 1 and deltas[-1].finished and not any(o.finished for o in deltas[:-1])
    text = "".join(o.outputs[0].text for o in deltas)
    ids = [t for o in deltas for t in o.outputs[0].token_ids]
    assert text == final[0].outputs[0].text == cumul[-1].outputs[0].text
    assert ids == final[0].outputs[0].token_ids and len(ids) == 10
    # Cumulative outputs grow.
    assert [len(o.outputs[0].token_ids) for o in cumul] == sorted(len(o.outputs[0].token_ids) for o in cumul)
    assert final[0].metrics.time_in_queue is not None and final[0].metrics.first_token_time is not None
    assert _free_all(aengine)


def test_concurrent_exact_counts_and_abort_on_cancel(aengine):
    async def main():
        async def one(i):
            n = 4 + i % 5
            outs = await _collect(aengine, f"{PROMPT} {i}", _sp(RequestOutputKind.DELTA, n), f"cc{i}")
            return n, sum(len(o.outputs[0].token_ids) for o in outs), outs[-1].outputs[0].finish_reason

        results = await asyncio.gather(*(one(i) for i in range(16)))
        for n, got, reason in results:
            assert got == n and reason == "length"

        # Cancel a consumer mid-stream: the request is aborted and its blocks freed.
        seen = asyncio.Event()

        async def long():
            async for o in aengine.generate(PROMPT, _sp(RequestOutputKind.DELTA, 400), "long"):
                seen.set()

        t = asyncio.create_task(long())
        await asyncio.wait_for(seen.wait(), 60)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        for _ in range(200):
            await asyncio.sleep(0.02)
            if not aengine.engine.has_unfinished_requests():
                break
        assert not aengine.engine.has_unfinished_requests()

        # Closing the generator early (break) aborts too.
        agen = aengine.generate(PROMPT, _sp(RequestOutputKind.DELTA, 400), "brk")
        async for _ in agen:
            break
        await agen.aclose()
        for _ in range(200):
            await asyncio.sleep(0.02)
            if not aengine.engine.has_unfinished_requests():
                break
        assert not aengine.engine.has_unfinished_requests()

        # abort() ends the stream without error.
        async def aborted():
            outs = []
            async for o in aengine.generate(PROMPT, _sp(RequestOutputKind.DELTA, 400), "ab"):
                outs.append(o)
                if len(outs) == 2:
                    await aengine.abort("ab")
            return outs

        outs = await aborted()
        assert len(outs) == 2
        for _ in range(200):
            await asyncio.sleep(0.02)
            if not aengine.engine.has_unfinished_requests():
                break

    asyncio.run(main())
    assert not aengine.engine.has_unfinished_requests()
    assert _free_all(aengine)


def test_bad_request_raises_before_work(aengine):
    async def main():
        with pytest.raises(ValueError, match="max_model_len|maximum model length"):
            await _collect(aengine, [100 + i % 1000 for i in range(100000)], _sp(RequestOutputKind.DELTA), "toolong")
        with pytest.raises(ValueError, match="out-of-vocab"):
            await _collect(aengine, PROMPT, _sp(RequestOutputKind.DELTA, logit_bias={10**7: 1.0}), "badbias")
        # The engine still serves.
        outs = await _collect(aengine, PROMPT, _sp(RequestOutputKind.FINAL_ONLY, 3), "ok")
        assert len(outs[0].outputs[0].token_ids) == 3

    asyncio.run(main())


def test_priorities(aengine_prio):
    """max_num_seqs=1: once the first request runs, the rest finish in priority order."""
    eng = aengine_prio

    async def main():
        order: list[str] = []
        started = asyncio.Event()

        async def run(rid, prio, n):
            async for o in eng.generate(PROMPT, _sp(RequestOutputKind.DELTA, n), rid, priority=prio):
                started.set()
                if o.finished:
                    order.append(rid)

        first = asyncio.create_task(run("first", 0, 12))
        await asyncio.wait_for(started.wait(), 60)
        others = [asyncio.create_task(run(rid, prio, 3)) for rid, prio in (("p5", 5), ("p1", 1), ("p3", 3))]
        await asyncio.gather(first, *others)
        return order

    order = asyncio.run(main())
    assert order == ["first", "p1", "p3", "p5"]


def test_engine_death_ends_every_stream(tiny_models):
    eng = AsyncLLMEngine.from_engine_args(
        EngineArgs(model=tiny_models["llama"], device="cpu", num_gpu_blocks_override=32), log_stats=False
    )
    real_collect = eng.engine.executor.collect
    calls = {"n": 0}

    def dying_collect(plan):
        calls["n"] += 1
        if calls["n"] > 3:
            raise EngineDeadError("worker 0 exited")
        return real_collect(plan)

    eng.engine.executor.collect = dying_collect

    async def main():
        async def one(i):
            return await _collect(eng, PROMPT, _sp(RequestOutputKind.DELTA, 50), f"x{i}")

        res = await asyncio.gather(*(one(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in res), res
        assert eng.is_dead
        with pytest.raises(EngineDeadError):
            eng.check_health()
        with pytest.raises(EngineDeadError):
            await _collect(eng, PROMPT, _sp(RequestOutputKind.DELTA, 2), "after")

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
