"""Beam search on top of generate(): each round extends every live beam by one token, using
the top-2w logprobs; the prefix cache makes re-reading each beam's prefix cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from distllm.outputs import BeamSearchOutput, BeamSearchSequence
from distllm.params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from distllm.entrypoints.llm import LLM


def beam_score(tokens: list[int], cum_logprob: float, eos_ids: set[int], length_penalty: float) -> float:
    """vLLM's score: cumulative logprob over sequence length (prompt included) ** length_penalty."""
    n = len(tokens)
    if tokens and tokens[-1] in eos_ids:
        n -= 1
    return cum_logprob / (max(n, 1) ** length_penalty)


def run_beam_search(llm: "LLM", prompts: list[Any], params: BeamSearchParams, use_tqdm: bool) -> list[BeamSearchOutput]:
    engine = llm._engine()
    tok = engine.get_tokenizer()
    eos = engine.input_processor.eos_token_ids
    w = params.beam_width
    step_params = SamplingParams(
        logprobs=2 * w, max_tokens=1, temperature=params.temperature, ignore_eos=params.ignore_eos
    )

    starts = [engine.input_processor.tokenize(p).prompt_token_ids for p in prompts]
    beams: list[list[BeamSearchSequence]] = [[BeamSearchSequence(tokens=list(s), logprobs=[])] for s in starts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    score = lambda b: beam_score(b.tokens, b.cum_logprob, eos, params.length_penalty)  # noqa: E731

    for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm):
        flat = [(i, b) for i, bs in enumerate(beams) for b in bs]
        if not flat:
            break
        outs = llm.generate([{"prompt_token_ids": b.tokens} for _, b in flat], step_params, use_tqdm=False)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, b), out in zip(flat, outs):
            lp = out.outputs[0].logprobs
            if not lp:
                continue
            for tid, l in lp[0].items():
                candidates[i].append(
                    BeamSearchSequence(
                        tokens=b.tokens + [tid], logprobs=b.logprobs + [lp[0]], cum_logprob=b.cum_logprob + l.logprob
                    )
                )
        for i, cands in enumerate(candidates):
            cands.sort(key=score, reverse=True)
            live = []
            for c in cands[:w]:
                if not params.ignore_eos and c.tokens[-1] in eos:
                    c.finish_reason = "stop"
                    done[i].append(c)
                else:
                    live.append(c)
            beams[i] = live
    results = []
    for i, start in enumerate(starts):
        for b in beams[i]:
            b.finish_reason = b.finish_reason or "length"
        seqs = sorted(done[i] + beams[i], key=score, reverse=True)[:w]
        for s in seqs:
            s.text = tok.decode(s.tokens, skip_special_tokens=True)
        results.append(BeamSearchOutput(sequences=seqs))
    return results
