"""LLM.generate end to end on tiny random models: equal to transformers, and unchanged by
prefix caching, chunked prefill, preemption and batch composition."""

from __future__ import annotations

import pytest
import torch

from distllm import LLM, SamplingParams

VOCAB = 49152


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def rand_prompts(lens: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, VOCAB, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_and_ref(request, tiny_models):
    from transformers import AutoModelForCausalLM

    folder = tiny_models[request.param]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # A shared prefix (32 tokens) on two prompts, so prefix caching has something to hit.
    prompts = rand_prompts([3, 17, 45, 9, 1], seed=7)
    prompts.append(prompts[2][:32] + rand_prompts([11], seed=8)[0])
    max_tokens = [8, 20, 5, 16, 12, 10]
    refs = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens)]
    return folder, prompts, max_tokens, refs


def _params(max_tokens: list[int], refs: list[list[int]]) -> list[SamplingParams]:
    ps = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    # Prompt 1 stops on a token id that greedy decoding reaches at step 6.
    ps[1] = SamplingParams(temperature=0.0, max_tokens=max_tokens[1], ignore_eos=True, stop_token_ids=[refs[1][5]])
    return ps


def _expected(refs: list[list[int]]) -> list[list[int]]:
    exp = [list(r) for r in refs]
    stop = refs[1][5]
    exp[1] = refs[1][: refs[1].index(stop) + 1]  # the stop token is kept in token_ids, as vLLM does
    return exp


def _run(folder, prompts, params, **engine_kwargs) -> list[list[int]]:
    with LLM(model=folder, device="cpu", **engine_kwargs) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
        leaked = llm.llm_engine.scheduler.block_manager.num_free_blocks
        total = llm.llm_engine.config.cache_config.num_blocks
        assert leaked == total, f"{total - leaked} KV blocks still in use after generate"
        return [o.outputs[0].token_ids for o in outs]


def test_mixed_batch_equals_hf(model_and_ref):
    folder, prompts, max_tokens, refs = model_and_ref
    got = _run(folder, prompts, _params(max_tokens, refs))
    assert got == _expected(refs)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        dict(enable_prefix_caching=False),
        dict(enable_prefix_caching=True, block_size=8),
        dict(max_num_batched_tokens=7),  # chunked prefill under a tiny budget
        dict(max_num_seqs=1),
        dict(block_size=8, num_gpu_blocks_override=12),  # forces preemption by recompute
    ],
    ids=["no-prefix-cache", "prefix-cache", "chunked", "one-seq", "preemption"],
)
def test_outputs_unchanged_by_engine_config(model_and_ref, engine_kwargs):
    folder, prompts, max_tokens, refs = model_and_ref
    got = _run(folder, prompts, _params(max_tokens, refs), **engine_kwargs)
    assert got == _expected(refs)


def test_preemption_really_happens(tiny_models):
    prompts = rand_prompts([40, 40, 40], seed=3)
    with LLM(model=tiny_models["llama"], device="cpu", block_size=8, num_gpu_blocks_override=12) as llm:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
            use_tqdm=False,
        )
        assert llm.llm_engine.scheduler.num_preemptions > 0
        assert all(len(o.outputs[0].token_ids) == 30 for o in outs)


def test_any_batch_composition(model_and_ref):
    """Each prompt alone gives what it gives inside the batch."""
    folder, prompts, max_tokens, refs = model_and_ref
    params = _params(max_tokens, refs)
    exp = _expected(refs)
    with LLM(model=folder, device="cpu") as llm:
        for i in (0, 2, 5):
            out = llm.generate({"prompt_token_ids": prompts[i]}, params[i], use_tqdm=False)[0]
            assert out.outputs[0].token_ids == exp[i]
        # Reversed order, in one batch.
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[::-1]], params[::-1], use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == exp[::-1]


def test_num_cached_tokens_exact(tiny_models):
    base = rand_prompts([40], seed=11)[0]
    extended = base + rand_prompts([10], seed=12)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    with LLM(model=tiny_models["llama"], device="cpu", block_size=16, enable_prefix_caching=True) as llm:
        first = llm.generate({"prompt_token_ids": base}, sp, use_tqdm=False)[0]
        assert first.num_cached_tokens == 0
        # Same prompt: every full block but never the last token -> 2 blocks of 16.
        again = llm.generate({"prompt_token_ids": base}, sp, use_tqdm=False)[0]
        assert again.num_cached_tokens == 32
        # 50 tokens: the 40 shared + 2 generated tokens sit in blocks 0-1 and part of 2 -> 32.
        ext = llm.generate({"prompt_token_ids": extended}, sp, use_tqdm=False)[0]
        assert ext.num_cached_tokens == 32
        assert llm.reset_prefix_cache()
        cold = llm.generate({"prompt_token_ids": base}, sp, use_tqdm=False)[0]
        assert cold.num_cached_tokens == 0
        assert cold.outputs[0].token_ids == first.outputs[0].token_ids


def test_seeded_sampling_independent_of_neighbours(tiny_models):
    p = rand_prompts([12], seed=5)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    others = [{"prompt_token_ids": q} for q in rand_prompts([5, 30, 8], seed=6)]
    with LLM(model=tiny_models["qwen3"], device="cpu") as llm:
        alone = llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0].token_ids
        noisy = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
        batch = [others[0], {"prompt_token_ids": p}, others[1], others[2]]
        outs = llm.generate(batch, [noisy, sp, noisy, noisy], use_tqdm=False)
        assert outs[1].outputs[0].token_ids == alone
        # Unseeded requests differ from run to run (a 16-token collision is essentially impossible).
        a = llm.generate(others[0], noisy, use_tqdm=False)[0].outputs[0].token_ids
        b = llm.generate(others[0], noisy, use_tqdm=False)[0].outputs[0].token_ids
        assert a != b


def test_n_logprobs_and_cumulative_logprob(tiny_models):
    p = rand_prompts([10], seed=9)[0]
    sp = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=6, logprobs=4, ignore_eos=True)
    with LLM(model=tiny_models["llama"], device="cpu") as llm:
        out = llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.token_ids) == 6 and len(o.logprobs) == 6
        total = 0.0
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and 4 <= len(lp) <= 5
            ranks = sorted(v.rank for k, v in lp.items() if k != tok or v.rank <= 4)
            assert ranks[:4] == [1, 2, 3, 4]
            assert lp[tok].logprob <= 0.0
            total += lp[tok].logprob
        assert o.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_greedy_logprobs_rank_one_and_prompt_logprobs(tiny_models):
    from transformers import AutoModelForCausalLM

    folder = tiny_models["qwen3"]
    p = rand_prompts([9], seed=21)[0]
    with LLM(model=folder, device="cpu", max_num_batched_tokens=4) as llm:  # prompt logprobs over chunks
        out = llm.generate(
            {"prompt_token_ids": p},
            SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, prompt_logprobs=1, ignore_eos=True),
            use_tqdm=False,
        )[0]
    for tok, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
        assert lp[tok].rank == 1
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for pos in range(1, len(p)):
        entry = out.prompt_logprobs[pos]
        assert entry[p[pos]].logprob == pytest.approx(ref[pos - 1, p[pos]].item(), abs=1e-4)


def test_stop_string_and_max_model_len(tiny_models):
    p = rand_prompts([6], seed=31)[0]
    with LLM(model=tiny_models["llama"], device="cpu", max_model_len=20) as llm:
        full = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
        text = full.outputs[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        if stop.strip():
            cut = llm.generate(
                {"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=[stop]), use_tqdm=False
            )[0].outputs[0]
            assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
        # max_model_len caps generation: 6 prompt tokens + 14 generated = 20.
        capped = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)
        assert len(capped[0].outputs[0].token_ids) == 14 and capped[0].outputs[0].finish_reason == "length"


def test_output_kinds_delta_and_final(tiny_models):
    from distllm import LLMEngine, EngineArgs
    from distllm.params import RequestOutputKind

    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_models["llama"], device="cpu"))
    p = {"prompt_token_ids": rand_prompts([5], seed=2)[0]}
    engine.add_request("d", p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA))
    engine.add_request("f", p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY))
    engine.add_request("c", p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    seen: dict[str, list] = {"d": [], "f": [], "c": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    final = seen["c"][-1].outputs[0]
    assert len(seen["f"]) == 1 and seen["f"][0].outputs[0].token_ids == final.token_ids
    assert sum((o.outputs[0].token_ids for o in seen["d"]), []) == final.token_ids
    assert "".join(o.outputs[0].text for o in seen["d"]) == final.text
    assert len(seen["c"]) == 6 and seen["c"][-1].finished
    engine.shutdown()


def test_abort_and_engine_keeps_serving(tiny_models):
    from distllm import EngineArgs, LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_models["llama"], device="cpu"))
    p = {"prompt_token_ids": rand_prompts([5], seed=2)[0]}
    engine.add_request("a", p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("b", p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("bad", p, SamplingParams(top_p=2.0))
    with pytest.raises(ValueError, match="out of vocabulary"):
        engine.add_request("bad", {"prompt_token_ids": [VOCAB + 5]}, SamplingParams())
    engine.step()
    engine.step()
    engine.abort_request("a")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert "b" in done and len(done["b"].outputs[0].token_ids) == 4
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == engine.config.cache_config.num_blocks
    engine.shutdown()


def test_beam_search(tiny_models):
    from distllm import BeamSearchParams

    p = rand_prompts([7], seed=41)[0]
    with LLM(model=tiny_models["llama"], device="cpu") as llm:
        greedy = llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
        one = llm.beam_search([{"prompt_token_ids": p}], BeamSearchParams(beam_width=1, max_tokens=5, ignore_eos=True))
        assert one[0].sequences[0].tokens[len(p) :] == greedy[0].outputs[0].token_ids
        three = llm.beam_search([{"prompt_token_ids": p}], BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))
        seqs = three[0].sequences
        assert len(seqs) == 3 and len({tuple(s.tokens) for s in seqs}) == 3
        scores = [s.cum_logprob / len(s.tokens) for s in seqs]
        assert scores == sorted(scores, reverse=True)
        # The best beam is at least as likely as the greedy path.
        greedy_lp = llm.generate(
            {"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0), use_tqdm=False
        )[0].outputs[0].cumulative_logprob
        assert seqs[0].cum_logprob >= greedy_lp - 1e-4


def test_two_llms_in_one_process_and_context_manager(tiny_models):
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    p = {"prompt_token_ids": [5, 6, 7]}
    with LLM(model=tiny_models["llama"], device="cpu") as a:
        ra = a.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(RuntimeError, match="shut down"):
        a.generate(p, sp, use_tqdm=False)
    b = LLM(model=tiny_models["qwen2"], device="cpu")
    c = LLM(model=tiny_models["llama"], device="cpu")
    assert c.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids == ra
    assert len(b.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids) == 3
    b.shutdown()
    c.shutdown()
