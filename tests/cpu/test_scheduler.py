"""Scheduler: exact plans step by step, driven by a fake worker that mirrors the plan diffs."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from distllm.core.plan import RequestResult, StepPlan, StepResult
from distllm.core.request import EngineCoreOutput, Request, RequestStatus
from distllm.core.scheduler import Scheduler
from distllm.params import PoolingParams, SamplingParams


def next_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends only on the whole sequence so far."""
    return 100 + (sum(t * (i + 1) for i, t in enumerate(tokens)) % 97)


class FakeWorker:
    """Rebuilds each request's tokens and block table from plans only, like a real worker."""

    def __init__(self, sched: Scheduler, token_fn=next_token) -> None:
        self.sched = sched
        self.token_fn = token_fn
        self.state: dict[str, dict] = {}
        self.plans: list[StepPlan] = []

    def execute(self, plan: StepPlan, overrides: dict[str, RequestResult] | None = None) -> StepResult:
        for rid in plan.finished_req_ids + plan.preempted_req_ids:
            del self.state[rid]
        for nr in plan.new_requests:
            assert nr.req_id not in self.state
            self.state[nr.req_id] = dict(
                tokens=nr.prompt_token_ids + nr.output_token_ids,
                blocks=list(nr.block_ids),
                computed=nr.num_computed_tokens,
                pooling=nr.pooling is not None,
            )
        for cr in plan.cached_requests:
            st = self.state[cr.req_id]
            st["tokens"] += cr.new_token_ids
            st["blocks"] += cr.new_block_ids
        results = []
        bs = self.sched.block_size
        for rid, n in plan.num_scheduled_tokens.items():
            st = self.state[rid]
            req = self.sched.requests[rid]
            assert st["tokens"] == req.all_token_ids
            assert st["blocks"] == req.block_ids
            assert st["computed"] + n <= len(st["tokens"])
            assert len(st["blocks"]) * bs >= st["computed"] + n
            # Plans carry no computed counts for cached requests: the worker's own count, moved
            # on by what each step computes, must be where the scheduler's is.
            assert st["computed"] + n == req.num_computed_tokens
            st["computed"] += n
            if overrides and rid in overrides:
                results.append(overrides[rid])
            elif st["pooling"]:
                results.append(RequestResult(rid, pooled=[0.5, -0.5], pooled_shape=[2]))
            elif st["computed"] == len(st["tokens"]):
                tok = self.token_fn(st["tokens"])
                st["tokens"].append(tok)  # workers keep the tokens they sample
                results.append(RequestResult(rid, [tok]))
            else:
                results.append(RequestResult(rid, []))
        self.plans.append(plan)
        return StepResult(plan.step_id, results)

    def step(self, overrides=None) -> tuple[StepPlan, list[EngineCoreOutput]]:
        plan = self.sched.schedule()
        return plan, self.sched.update_from_output(plan, self.execute(plan, overrides))

    def run_all(self, max_steps: int = 1000) -> dict[str, EngineCoreOutput]:
        final: dict[str, EngineCoreOutput] = {}
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests():
                break
            for out in self.step()[1]:
                if out.finished:
                    final[out.req_id] = out
        assert not self.sched.has_unfinished_requests()
        return final


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=64, **kw) -> Scheduler:
    return Scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        **kw,
    )


def gen(rid: str, prompt, max_tokens=4, priority=0, arrival=None, **sp) -> Request:
    r = Request(rid, list(prompt), sampling_params=SamplingParams(max_tokens=max_tokens, **sp), priority=priority)
    if arrival is not None:
        r.arrival_time = arrival
    return r


def assert_all_free(s: Scheduler) -> None:
    bm = s.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_cnt == 0 for b in bm.blocks)
    assert s.kv_cache_usage == 0.0


def test_chunked_prefill_exact_steps():
    s = make(budget=8)
    w = FakeWorker(s)
    s.add_request(gen("a", range(1, 21), max_tokens=3))
    s.add_request(gen("b", range(1, 7), max_tokens=2))
    sched = [w.step()[0].num_scheduled_tokens for _ in range(5)]
    assert sched == [
        {"a": 8},
        {"a": 8},
        {"a": 4, "b": 4},
        {"a": 1, "b": 2},
        {"a": 1, "b": 1},
    ]
    p1, p2, p3 = w.plans[:3]
    assert [r.req_id for r in p1.new_requests] == ["a"] and p1.new_requests[0].block_ids == [0, 1]
    assert p2.cached_requests[0].new_block_ids == [2, 3] and p2.cached_requests[0].new_token_ids == []
    assert p3.new_requests[0].req_id == "b" and p3.new_requests[0].block_ids == [5]
    assert not s.has_unfinished_requests()
    assert_all_free(s)


def test_long_prefill_token_threshold():
    s = make(budget=32, long_prefill_token_threshold=5)
    w = FakeWorker(s)
    s.add_request(gen("a", range(1, 13), max_tokens=1))
    s.add_request(gen("b", range(1, 4), max_tokens=1))
    assert w.step()[0].num_scheduled_tokens == {"a": 5, "b": 3}
    assert w.step()[0].num_scheduled_tokens == {"a": 5}
    assert w.step()[0].num_scheduled_tokens == {"a": 2}
    assert_all_free(s)


def test_max_num_seqs_and_continuous_batching():
    s = make(max_num_seqs=2)
    w = FakeWorker(s)
    s.add_request(gen("a", range(1, 6), max_tokens=2))
    s.add_request(gen("b", range(1, 4), max_tokens=4))
    s.add_request(gen("c", range(1, 3), max_tokens=1))
    plan, outs = w.step()
    assert plan.num_scheduled_tokens == {"a": 5, "b": 3}
    assert s.num_running == 2 and s.num_waiting == 1
    a_tok = outs[0].new_token_ids
    assert [o.req_id for o in outs] == ["a", "b"] and len(a_tok) == 1
    plan, outs = w.step()  # a finishes (max_tokens=2)
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1}
    assert plan.cached_requests[0].new_token_ids == []  # the worker keeps the token it sampled (a_tok)
    assert outs[0].finish_reason == "length"
    plan, _ = w.step()  # c joins while b decodes
    assert plan.num_scheduled_tokens == {"b": 1, "c": 2}
    assert plan.finished_req_ids == ["a"]
    assert [r.req_id for r in plan.new_requests] == ["c"]
    assert [r.req_id for r in plan.cached_requests] == ["b"]
    w.run_all()
    assert_all_free(s)


def test_preemption_recompute_fcfs():
    s = make(num_blocks=4, budget=32)
    w = FakeWorker(s)
    s.add_request(gen("a", range(1, 8), max_tokens=8))
    s.add_request(gen("b", range(11, 18), max_tokens=8))
    p, _ = w.step()
    assert p.num_scheduled_tokens == {"a": 7, "b": 7}
    assert s.requests["a"].block_ids == [0, 1] and s.requests["b"].block_ids == [2, 3]
    p, _ = w.step()
    assert p.num_scheduled_tokens == {"a": 1, "b": 1}
    b_out = list(s.requests["b"].output_token_ids)
    assert len(b_out) == 2
    p, _ = w.step()  # a needs a 3rd block: b (the last running) is preempted
    assert p.preempted_req_ids == ["b"] and p.num_scheduled_tokens == {"a": 1}
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert s.requests["a"].block_ids == [0, 1, 3]
    assert s.num_preemptions == 1 and s.make_stats()["num_preemptions"] == 1
    assert list(s.waiting) == [b]
    for _ in range(5):  # b cannot come back until a frees its blocks
        p, outs = w.step()
        assert list(p.num_scheduled_tokens) == ["a"]
    assert outs[0].finish_reason == "length" and len(outs[0].new_token_ids) == 1
    p, _ = w.step()
    assert p.finished_req_ids == ["a"]
    assert p.num_scheduled_tokens == {"b": 9}
    nb = p.new_requests[0]
    assert nb.req_id == "b" and nb.output_token_ids == b_out and nb.num_computed_tokens == 0
    assert nb.prompt_token_ids == list(range(11, 18))
    final = w.run_all()
    assert final["b"].finish_reason == "length"
    assert_all_free(s)
    # Outputs did not change because of the preemption.
    ref = make(num_blocks=64)
    rw = FakeWorker(ref)
    ref.add_request(gen("b", range(11, 18), max_tokens=8))
    ref_tokens = []
    while ref.has_unfinished_requests():
        for o in rw.step()[1]:
            ref_tokens += o.new_token_ids
    assert b.output_token_ids == ref_tokens


def test_priority_order_and_preemption():
    s = make(num_blocks=4, budget=32, max_num_seqs=1, policy="priority")
    w = FakeWorker(s)
    s.add_request(gen("low", [1, 2], max_tokens=1, priority=5, arrival=1.0))
    s.add_request(gen("high", [3, 4], max_tokens=1, priority=0, arrival=2.0))
    s.add_request(gen("high2", [5, 6], max_tokens=1, priority=0, arrival=3.0))
    order = [list(w.step()[0].num_scheduled_tokens) for _ in range(3)]
    assert order == [["high"], ["high2"], ["low"]]
    assert_all_free(s)

    # lo is running first and is already scheduled this step when hi needs a block:
    # lo (larger priority value) is preempted and gives its tokens back.
    s = make(num_blocks=4, budget=32, policy="priority")
    w = FakeWorker(s)
    s.add_request(gen("lo", range(1, 6), max_tokens=10, priority=5))
    w.step()
    s.add_request(gen("hi", range(1, 8), max_tokens=9, priority=0))
    assert w.step()[0].num_scheduled_tokens == {"lo": 1, "hi": 7}
    assert w.step()[0].num_scheduled_tokens == {"lo": 1, "hi": 1}
    p, _ = w.step()
    assert p.preempted_req_ids == ["lo"] and p.num_scheduled_tokens == {"hi": 1}
    assert s.requests["hi"].block_ids == [2, 3, 1]
    assert p.cached_requests[0].new_block_ids == [1]
    final = w.run_all()
    assert set(final) == {"lo", "hi"}
    assert_all_free(s)


def test_fcfs_preempts_last_even_if_more_important():
    s = make(num_blocks=4, budget=32, policy="fcfs")
    w = FakeWorker(s)
    s.add_request(gen("lo", range(1, 6), max_tokens=10, priority=5))
    w.step()
    s.add_request(gen("hi", range(1, 8), max_tokens=9, priority=0))
    w.step()
    w.step()
    p, _ = w.step()
    assert p.preempted_req_ids == ["hi"] and p.num_scheduled_tokens == {"lo": 1}
    w.run_all()
    assert_all_free(s)


def test_prefix_cache_hit_including_generated_tokens():
    s = make(enable_prefix_caching=True)
    w = FakeWorker(s)
    a = gen("a", range(1, 7), max_tokens=4)
    s.add_request(a)
    final = w.run_all()
    assert final["a"].num_cached_tokens == 0
    a_tokens = a.all_token_ids
    assert len(a_tokens) == 10  # 9 computed -> blocks 0 and 1 (with 2 generated tokens) cached
    s.add_request(gen("b", a_tokens + [7], max_tokens=2))
    s.add_request(gen("c", a_tokens[:8] + [9, 9, 9], max_tokens=2))
    p, outs = w.step()
    assert p.num_scheduled_tokens == {"b": 3, "c": 3}
    nb, nc = p.new_requests
    assert nb.num_computed_tokens == 8 and nb.block_ids[:2] == [0, 1]
    assert nc.num_computed_tokens == 8 and nc.block_ids[:2] == [0, 1]
    assert [s.block_manager.blocks[i].ref_cnt for i in (0, 1)] == [2, 2]
    assert [o.num_cached_tokens for o in outs] == [8, 8]
    assert s.requests["b"].num_cached_tokens == 8
    stats = s.make_stats()
    assert stats["prefix_cache_hits"] == 16 and stats["prefix_cache_queries"] == 6 + 11 + 11
    w.run_all()
    assert_all_free(s)
    assert s.reset_prefix_cache() is True
    assert s.block_manager.cached_blocks == {}


def test_abort_frees_blocks_and_tells_worker():
    s = make(budget=8)
    w = FakeWorker(s)
    s.add_request(gen("a", range(1, 5), max_tokens=8))
    s.add_request(gen("b", range(1, 21), max_tokens=8))
    s.add_request(gen("c", range(1, 5), max_tokens=8))
    p = s.schedule()
    assert p.num_scheduled_tokens == {"a": 4, "b": 4}
    res = w.execute(p)
    aborted = s.abort_requests(["b", "c", "nope"])
    assert [r.request_id for r in aborted] == ["b", "c"]
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in aborted)
    assert aborted[0].block_ids == [] and s.num_waiting == 0 and s.num_running == 1
    outs = s.update_from_output(p, res)  # b's result is ignored
    assert [o.req_id for o in outs] == ["a"]
    p, _ = w.step()
    assert p.finished_req_ids == ["b"]  # c was never sent to the worker
    s.abort_requests("a")
    assert not s.has_unfinished_requests() and s.get_num_unfinished_requests() == 0
    assert s.schedule().finished_req_ids == ["a"]
    assert_all_free(s)


def test_finish_requests_for_stop_strings():
    s = make()
    w = FakeWorker(s)
    s.add_request(gen("a", [1, 2, 3], max_tokens=8))
    w.step()
    done = s.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert done[0].status == RequestStatus.FINISHED_STOPPED
    assert s.schedule().finished_req_ids == ["a"]
    assert_all_free(s)


def test_stop_conditions():
    tokens = iter([])

    def fixed(_):
        return next(tokens)

    s = make(max_model_len=10)
    w = FakeWorker(s, fixed)
    r = gen("stop", [1, 2], max_tokens=8, stop_token_ids=[7], min_tokens=2)
    s.add_request(r)
    tokens = iter([7, 5, 7])
    final = w.run_all()["stop"]
    assert (final.finish_reason, final.stop_reason) == ("stop", 7)
    assert r.output_token_ids == [7, 5, 7]  # the first 7 came before min_tokens

    sp_eos = SamplingParams(max_tokens=8)
    sp_eos.update_from_generation_config({2})
    s.add_request(Request("eos", [1, 2], sampling_params=sp_eos))
    tokens = iter([4, 2])
    final = w.run_all()["eos"]
    assert (final.finish_reason, final.stop_reason) == ("stop", None)

    sp_ign = SamplingParams(max_tokens=3, ignore_eos=True)
    sp_ign.update_from_generation_config({2})
    s.add_request(Request("ign", [1, 2], sampling_params=sp_ign))
    tokens = iter([2, 2, 2])
    assert w.run_all()["ign"].finish_reason == "length"

    s.add_request(gen("mml", range(1, 9), max_tokens=16))
    tokens = iter([4, 4, 4])
    final = w.run_all()["mml"]
    assert final.finish_reason == "length"
    assert next(tokens) == 4  # stopped after 2 tokens: 8 + 2 == max_model_len
    assert_all_free(s)


def test_pooling_scheduled_whole_and_finished_in_one_step():
    s = make(budget=8)
    w = FakeWorker(s)
    s.add_request(gen("g", range(1, 6), max_tokens=4))
    s.add_request(Request("p", list(range(1, 7)), pooling_params=PoolingParams(task="embed")))
    p, _ = w.step()
    assert p.num_scheduled_tokens == {"g": 5}  # 3 tokens left: p is never chunked
    p, outs = w.step()
    assert p.num_scheduled_tokens == {"g": 1, "p": 6}
    np_ = p.new_requests[0]
    assert np_.sampling is None and np_.pooling["task"] == "embed"
    pout = [o for o in outs if o.req_id == "p"][0]
    assert pout.finish_reason == "stop" and pout.pooled == ([0.5, -0.5], [2])
    assert "p" not in s.requests and s.num_running == 1
    w.run_all()
    assert_all_free(s)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        s.add_request(Request("big", list(range(9)), pooling_params=PoolingParams()))


def test_worker_error_finishes_only_that_request():
    s = make()
    w = FakeWorker(s)
    s.add_request(gen("a", [1, 2, 3]))
    s.add_request(gen("b", [1, 2, 3]))
    _, outs = w.step({"a": RequestResult("a", error="NaN in logits")})
    a = [o for o in outs if o.req_id == "a"][0]
    assert a.finish_reason == "abort" and a.error == "NaN in logits"
    assert s.num_running == 1
    assert s.schedule().finished_req_ids == ["a"]


def test_validation():
    s = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match=r"The decoder prompt \(length 33\) is longer than the maximum model length of 32"):
        s.add_request(gen("a", range(33)))
    with pytest.raises(ValueError, match="only has 4 blocks"):
        s.add_request(gen("b", range(10), max_tokens=10))
    with pytest.raises(ValueError, match="cannot be empty"):
        s.add_request(gen("c", []))
    s.add_request(gen("d", range(10), max_tokens=6))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(gen("d", range(3)))
    with pytest.raises(ValueError, match="policy"):
        make(policy="lifo")


def test_random_workload_outputs_invariant_under_pressure():
    """Preemption, chunking and prefix caching must not change any output."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 90) for _ in range(rng.randrange(4, 12))] for _ in range(3)]
    specs = []
    for i in range(24):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 90) for _ in range(rng.randrange(1, 7))]
        specs.append((f"r{i}", prompt, rng.randrange(1, 11), rng.randrange(3), rng.randrange(4)))

    def run(**kw) -> dict[str, list[int]]:
        s = make(**kw)
        w = FakeWorker(s)
        outs: dict[str, list[int]] = {}
        pending = list(specs)
        step = 0
        while pending or s.has_unfinished_requests():
            while pending and pending[0][3] <= step % 3:
                rid, prompt, mt, _, prio = pending.pop(0)
                s.add_request(gen(rid, prompt, max_tokens=mt, priority=prio, arrival=float(len(specs) - len(pending))))
            for o in w.step()[1]:
                outs.setdefault(o.req_id, []).extend(o.new_token_ids)
            step += 1
            assert step < 2000
        assert_all_free(s)
        return outs, s

    ref, _ = run(num_blocks=256, budget=512, max_num_seqs=64)
    for kw in (
        dict(num_blocks=8, budget=16, max_num_seqs=4, enable_prefix_caching=True),
        dict(num_blocks=7, budget=5, max_num_seqs=3, policy="priority", enable_prefix_caching=True),
        dict(num_blocks=9, budget=64, max_num_seqs=8),
    ):
        got, s = run(**kw)
        assert got == ref
        if kw["num_blocks"] < 9:
            assert s.num_preemptions > 0


def test_scheduler_does_not_import_torch():
    code = "import sys, distllm.core.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
