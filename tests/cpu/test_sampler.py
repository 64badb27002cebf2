"""Sampler: greedy, seeds, filters, penalties, masks, logprobs, distribution (CPU)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distllm.layers.sampler import Sampler, SamplingState, compute_token_logprobs
from distllm.params import SamplingParams

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sampler = Sampler()


def state(prompt=(0,), output=(), bad_words=None, stop_ids=None, **sp) -> SamplingState:
    p = SamplingParams(**sp)
    if bad_words is not None:
        p._bad_words_token_ids = bad_words
    if stop_ids is not None:
        p.update_from_generation_config(set(stop_ids))
    return SamplingState.create(p.to_worker_dict(), list(prompt), list(output), "cpu")


def random_params(rng: random.Random, vocab: int) -> dict:
    kind = rng.random()
    sp: dict = {}
    if kind < 0.25:
        sp["temperature"] = 0.0
    else:
        sp["temperature"] = rng.choice([0.5, 1.0, 1.7])
        if rng.random() < 0.5:
            sp["top_k"] = rng.randint(1, vocab)
        if rng.random() < 0.5:
            sp["top_p"] = rng.uniform(0.1, 1.0)
        if rng.random() < 0.3:
            sp["min_p"] = rng.uniform(0.0, 0.5)
        if rng.random() < 0.5:
            sp["seed"] = rng.randint(0, 1000)
    if rng.random() < 0.3:
        sp["repetition_penalty"] = rng.uniform(0.5, 2.0)
        sp["frequency_penalty"] = rng.uniform(-2, 2)
        sp["presence_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.2:
        sp["logit_bias"] = {rng.randrange(vocab): rng.uniform(-5, 5)}
    if rng.random() < 0.2:
        sp["logprobs"] = rng.randint(0, 5)
    return sp


# ---- greedy ----------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 8), st.integers(2, 50), st.integers(0, 2**31 - 1))
def test_greedy_is_argmax(batch, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g)
    out = sampler(logits, [state(temperature=0.0) for _ in range(batch)])
    assert out.sampled_token_ids.dtype == torch.int64
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None


def test_greedy_low_precision_and_mixed_batch():
    logits = torch.randn(6, 40).to(torch.bfloat16)
    sts = [state(temperature=0.0), state(temperature=1.0, seed=1), state(temperature=0.0, top_k=2)] * 2
    out = sampler(logits, sts)
    ref = logits.float().argmax(-1)
    for i in (0, 2, 3, 5):
        assert out.sampled_token_ids[i] == ref[i]


# ---- seeds -----------------------------------------------------------------------------


def _run_seeded(vocab: int, steps: int, target_sp: dict, rng: random.Random | None, logit_seed: int):
    """Run the target request for several steps, alone (rng None) or among random neighbours."""
    lg = torch.Generator().manual_seed(logit_seed)
    target_logits = [torch.randn(vocab, generator=lg) * 3 for _ in range(steps)]
    target = state(prompt=[1, 2, 3], **target_sp)
    neighbours: list[SamplingState] = []
    tokens = []
    for step in range(steps):
        if rng is not None:
            # Fresh random neighbours every step, in random positions, random batch size.
            neighbours = [
                state(prompt=[rng.randrange(vocab)], output=[rng.randrange(vocab)], **random_params(rng, vocab))
                for _ in range(rng.randint(0, 6))
            ]
        pos = rng.randint(0, len(neighbours)) if rng is not None else 0
        batch = neighbours[:pos] + [target] + neighbours[pos:]
        logits = torch.randn(len(batch), vocab) * 3
        logits[pos] = target_logits[step]
        tok = sampler(logits, batch).sampled_token_ids[pos]
        target.output_token_ids.append(int(tok))
        tokens.append(int(tok))
    return tokens


@SETTINGS
@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.sampled_from([{}, {"top_k": 5}, {"top_p": 0.8}, {"min_p": 0.1}, {"repetition_penalty": 1.3}]),
    st.sampled_from([0.7, 1.0, 1.5]),
)
def test_seed_independent_of_batch(seed, rng_seed, extra, temperature):
    vocab, steps = 32, 6
    sp = dict(seed=seed, temperature=temperature, **extra)
    alone = _run_seeded(vocab, steps, sp, None, seed)
    mixed = _run_seeded(vocab, steps, sp, random.Random(rng_seed), seed)
    assert alone == mixed


def test_seed_differs_between_seeds_and_steps():
    vocab = 64
    logits = torch.zeros(1, vocab)  # uniform: the draw alone decides
    seqs = []
    for seed in range(4):
        s = state(seed=seed)
        for _ in range(8):
            s.output_token_ids.append(int(sampler(logits, [s]).sampled_token_ids[0]))
        seqs.append(s.output_token_ids)
    assert len({tuple(x) for x in seqs}) == 4
    assert all(len(set(x)) > 1 for x in seqs)


def test_seed_survives_state_rebuild():
    """A preempted request rebuilt with its outputs continues exactly as if not preempted."""
    vocab = 50
    logits = [torch.randn(1, vocab) for _ in range(8)]
    s = state(seed=7, top_p=0.9)
    for lg in logits:
        s.output_token_ids.append(int(sampler(lg, [s]).sampled_token_ids[0]))
    full = list(s.output_token_ids)
    s2 = state(seed=7, top_p=0.9)
    for lg in logits[:4]:
        s2.output_token_ids.append(int(sampler(lg, [s2]).sampled_token_ids[0]))
    s3 = SamplingState.create(s2.params, s2.prompt_token_ids, s2.output_token_ids, "cpu")
    for lg in logits[4:]:
        s3.output_token_ids.append(int(sampler(lg, [s3]).sampled_token_ids[0]))
    assert s3.output_token_ids == full


# ---- filters ---------------------------------------------------------------------------


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    s = sum(e)
    return [v / s for v in e]


def reference_allowed(logits: list[float], temperature, top_k, top_p, min_p, tol=1e-4) -> set[int]:
    """Tokens that may be sampled (vLLM V1 order: min-p, top-k, top-p), with a small slack."""
    V = len(logits)
    z = [x / temperature for x in logits]
    alive = set(range(V))
    if min_p > 0:
        p = _softmax(z)
        pmax = max(p)
        alive = {i for i in alive if p[i] >= min_p * pmax - tol}
    if 0 < top_k < V:
        vals = sorted((z[i] for i in alive), reverse=True)
        if len(vals) >= top_k:
            kth = vals[top_k - 1]
            alive = {i for i in alive if z[i] >= kth - tol}
    if top_p < 1.0:
        m = max(z[i] for i in alive)
        w = {i: math.exp(z[i] - m) for i in alive}
        tot = sum(w.values())
        order = sorted(alive, key=lambda i: -z[i])
        keep, cum = set(), 0.0
        for i in order:
            if cum < top_p + tol:
                keep.add(i)
            cum += w[i] / tot
        # Tokens tied with the last one kept are kept too (ops/sampling_ref.py).
        low = min(z[i] for i in keep)
        alive = keep | {i for i in alive if z[i] == low}
    return alive


@SETTINGS
@given(
    st.lists(st.floats(-6, 6, allow_nan=False), min_size=2, max_size=24, unique=True),
    st.sampled_from([0.3, 0.7, 1.0, 2.0]),
    st.integers(-1, 24),
    st.floats(0.05, 1.0),
    st.floats(0.0, 0.9),
    st.integers(0, 2**31 - 1),
)
def test_filters_never_sample_outside_allowed(logits, temperature, top_k, top_p, min_p, seed):
    if top_k == 0:
        top_k = -1
    torch.manual_seed(seed)
    rows = 64
    t = torch.tensor([logits] * rows, dtype=torch.float32)
    sp = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    # Half seeded, half not; a greedy row in the middle must not be filtered.
    sts = [state(seed=i, **sp) if i % 2 else state(**sp) for i in range(rows)]
    sts[rows // 2] = state(temperature=0.0, top_k=1)
    z32 = [x / temperature for x in t[0].tolist()]  # the float32 logits the sampler sees
    allowed = reference_allowed(z32, 1.0, top_k, top_p, min_p)
    out = sampler(t, sts).sampled_token_ids.tolist()
    for i, tok in enumerate(out):
        if i == rows // 2:
            assert tok == int(t[0].argmax())
        else:
            assert tok in allowed, (tok, allowed)


@pytest.mark.parametrize(
    "sp",
    [
        {"top_k": 4},
        {"top_p": 0.35},
        {"min_p": 0.6},
        {"top_k": 6, "top_p": 0.5},
        {"min_p": 0.3, "top_p": 0.6},
        {"top_k": 8, "min_p": 0.5, "temperature": 0.5},
    ],
)
def test_filters_exact_set_on_flat_distribution(sp):
    """Near-flat logits: the sampled set must be exactly the reference set (not a subset)."""
    V, n = 16, 3000
    logits = torch.arange(V, dtype=torch.float32) * 0.1
    torch.manual_seed(3)
    out = sampler(logits.repeat(n, 1), [state(**sp) for _ in range(n)]).sampled_token_ids
    z = (logits / sp.get("temperature", 1.0)).tolist()
    want = reference_allowed(z, 1.0, sp.get("top_k", -1), sp.get("top_p", 1.0), sp.get("min_p", 0.0), tol=0.0)
    assert set(out.tolist()) == want


def test_top_k_one_and_tiny_top_p_are_argmax():
    logits = torch.randn(10, 30)
    out_k = sampler(logits, [state(top_k=1, seed=i) for i in range(10)]).sampled_token_ids
    out_p = sampler(logits, [state(top_p=1e-6) for i in range(10)]).sampled_token_ids
    assert torch.equal(out_k, logits.argmax(-1))
    assert torch.equal(out_p, logits.argmax(-1))


def test_top_p_keeps_set_reaching_p():
    # probs 0.5, 0.3, 0.2: top_p=0.6 -> {0, 1}; top_p=0.5 -> {0}.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(400, 1)
    torch.manual_seed(0)
    a = set(sampler(logits, [state(top_p=0.6) for _ in range(400)]).sampled_token_ids.tolist())
    b = set(sampler(logits, [state(top_p=0.45) for _ in range(400)]).sampled_token_ids.tolist())
    assert a == {0, 1}
    assert b == {0}


# ---- penalties -------------------------------------------------------------------------


def reference_penalties(logits: list[float], prompt, output, rep, freq, pres) -> list[float]:
    out = list(logits)
    seen = set(prompt) | set(output)
    for t in range(len(out)):
        if rep != 1.0 and t in seen:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        c = output.count(t)
        out[t] -= freq * c
        if c:
            out[t] -= pres
    return out


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(2, 40))
def test_penalties_match_reference(seed, batch, vocab):
    rng = random.Random(seed)
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 4
    sts, specs = [], []
    for _ in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.25:
            rep, freq, pres = 1.0, 0.0, 0.0
        else:
            rep = rng.choice([1.0, rng.uniform(0.3, 3.0)])
            freq = rng.choice([0.0, rng.uniform(-2, 2)])
            pres = rng.choice([0.0, rng.uniform(-2, 2)])
        specs.append((prompt, output, rep, freq, pres))
        sts.append(
            state(prompt=prompt, output=output, temperature=0.0, repetition_penalty=rep,
                  frequency_penalty=freq, presence_penalty=pres)
        )
    got = sampler.process_logits(logits, sts)
    for i, (prompt, output, rep, freq, pres) in enumerate(specs):
        ref = reference_penalties(logits[i].tolist(), prompt, output, rep, freq, pres)
        assert got[i].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-5)
        # And greedy picks the argmax of the penalised logits.
        best = max(ref)
        assert ref[int(sampler(logits[i : i + 1], [sts[i]]).sampled_token_ids[0])] == pytest.approx(best, abs=1e-5)
    # The caller's logits are untouched.
    assert got.data_ptr() != logits.data_ptr()


def test_penalties_do_not_modify_input():
    logits = torch.randn(2, 10)
    before = logits.clone()
    sampler(logits, [state(output=[1, 2], repetition_penalty=2.0, temperature=0.0), state(logit_bias={3: 5.0})])
    assert torch.equal(logits, before)


# ---- masks and bias --------------------------------------------------------------------


def test_logit_bias():
    logits = torch.zeros(3, 8)
    logits[:, 0] = 5.0
    sts = [state(temperature=0.0, logit_bias={6: 10.0}), state(temperature=0.0), state(temperature=0.0, logit_bias={2: 4.0})]
    assert sampler(logits, sts).sampled_token_ids.tolist() == [6, 0, 0]
    x = sampler.process_logits(logits, sts)
    assert x[0, 6] == 10.0 and x[2, 2] == 4.0 and x[1].tolist() == logits[1].tolist()


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sets(st.integers(0, 19), min_size=1, max_size=5))
def test_allowed_token_ids(seed, allowed):
    torch.manual_seed(seed)
    logits = torch.randn(32, 20) * 5
    sts = [state(allowed_token_ids=sorted(allowed), seed=i) if i % 4 else state(temperature=0.0) for i in range(32)]
    out = sampler(logits, sts).sampled_token_ids.tolist()
    for i, tok in enumerate(out):
        if i % 4:
            assert tok in allowed
        else:
            assert tok == int(logits[i].argmax())
    x = sampler.process_logits(logits, sts)
    assert all(math.isinf(x[1, t]) == (t not in allowed) for t in range(20))


def test_bad_words():
    V = 10
    logits = torch.zeros(4, V)
    logits[:, 3] = 10.0
    logits[:, 4] = 9.0
    logits[:, 5] = 8.0
    bad = [[3], [7, 4], [1, 2, 5]]
    sts = [
        state(output=[], temperature=0.0, bad_words=bad),  # 3 banned -> 4
        state(output=[0, 7], temperature=0.0, bad_words=bad),  # 3, 4 banned -> 5
        state(output=[1, 2], temperature=0.0, bad_words=bad),  # 3, 5 banned -> 4
        state(prompt=[7], output=[], temperature=0.0, bad_words=[[7, 3]]),  # prompt does not count -> 3
    ]
    assert sampler(logits, sts).sampled_token_ids.tolist() == [4, 5, 4, 3]
    x = sampler.process_logits(logits, sts)
    assert math.isinf(x[2, 5]) and math.isinf(x[2, 3]) and not math.isinf(x[2, 4])


def test_min_tokens_masks_stop_tokens():
    V = 8
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # EOS
    logits[:, 5] = 9.0  # user stop id
    logits[:, 1] = 1.0
    mk = lambda out: state(output=out, temperature=0.0, min_tokens=3, stop_token_ids=[5], stop_ids={2})
    sts = [mk([0]), mk([0, 0, 0]), state(output=[0], temperature=0.0, stop_token_ids=[5], stop_ids={2})]
    assert sampler(logits, sts).sampled_token_ids.tolist() == [1, 2, 2]


def test_ignore_eos_with_min_tokens_masks_only_user_stops():
    logits = torch.zeros(1, 6)
    logits[0, 2] = 10.0
    logits[0, 5] = 9.0
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5], ignore_eos=True)
    p.update_from_generation_config({2})
    s = SamplingState.create(p.to_worker_dict(), [0], [], "cpu")
    assert int(sampler(logits, [s]).sampled_token_ids[0]) == 2


# ---- logprobs --------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(5, 40))
def test_logprobs(seed, batch, vocab):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    logits = torch.randn(batch, vocab) * 3
    sts = []
    for _ in range(batch):
        sp = random_params(rng, vocab)
        sp["logprobs"] = rng.choice([None, 0, 1, 3, 5])
        sts.append(state(output=[rng.randrange(vocab)], **sp))
    out = sampler(logits, sts)
    want = [s.params["logprobs"] for s in sts if s.params["logprobs"] is not None]
    if not want:
        assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None
        return
    K = max(want)
    ref = torch.log_softmax(logits.double(), -1)
    assert out.logprob_token_ids.shape == (batch, K + 1) and out.logprobs.shape == (batch, K + 1)
    assert out.logprobs.dtype == torch.float32 and out.sampled_ranks.dtype == torch.int64
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    for i in range(batch):
        ids = out.logprob_token_ids[i].tolist()
        lps = out.logprobs[i].tolist()
        for t, lp in zip(ids, lps):
            assert lp == pytest.approx(float(ref[i, t]), abs=1e-5)
        top = lps[1:]
        assert top == sorted(top, reverse=True)
        assert top == pytest.approx(sorted(ref[i].tolist(), reverse=True)[:K], abs=1e-5)
        tok = ids[0]
        assert int(out.sampled_ranks[i]) == sum(1 for v in ref[i].tolist() if v >= float(ref[i, tok]) - 1e-9)


def test_logprobs_are_raw_and_rank():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    s = state(temperature=0.0, logprobs=2, logit_bias={3: 100.0})
    out = sampler(logits, [s])
    assert out.sampled_token_ids.tolist() == [3]
    assert out.logprob_token_ids.tolist() == [[3, 0, 1]]
    assert int(out.sampled_ranks[0]) == 4
    assert out.logprobs[0].tolist() == pytest.approx(torch.log_softmax(logits, -1)[0, [3, 0, 1]].tolist())


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 10), st.integers(0, 5))
def test_compute_token_logprobs(seed, n, k):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 12, generator=g).to(torch.bfloat16)
    toks = torch.randint(0, 12, (n,), generator=g)
    ids, lps, ranks = compute_token_logprobs(logits, toks, k)
    ref = torch.log_softmax(logits.float(), -1)
    assert ids.shape == (n, k + 1) and lps.shape == (n, k + 1) and ranks.shape == (n,)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and ranks.dtype == torch.int64
    assert torch.equal(ids[:, 0], toks)
    assert torch.allclose(lps, ref.gather(1, ids))
    assert torch.equal(ranks, (ref >= ref.gather(1, toks[:, None])).sum(-1))
    if k:
        assert torch.allclose(lps[:, 1:], ref.topk(k, -1).values)
    # Consistent with the sampler's own logprobs for greedy requests.
    sts = [state(temperature=0.0, logprobs=k) for _ in range(n)]
    out = sampler(logits, sts)
    ids2, lps2, ranks2 = compute_token_logprobs(logits, out.sampled_token_ids, k)
    assert torch.equal(ids2, out.logprob_token_ids) and torch.allclose(lps2, out.logprobs)
    assert torch.equal(ranks2, out.sampled_ranks)


# ---- distribution ----------------------------------------------------------------------


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_distribution_matches_softmax(seeded):
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    probs = torch.softmax(logits, -1)
    if seeded:
        # One seeded request over many steps: the per-step draws must be well mixed.
        s = state(seed=1234)
        counts = torch.zeros(5)
        for _ in range(2000):
            tok = int(sampler(logits[None], [s]).sampled_token_ids[0])
            s.output_token_ids.append(tok)
            counts[tok] += 1
        n = 2000
    else:
        n = 20000
        torch.manual_seed(0)
        sts = [state() for _ in range(n)]
        out = sampler(logits.repeat(n, 1), sts).sampled_token_ids
        counts = torch.bincount(out, minlength=5).float()
    expected = probs * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, (counts, expected, chi2)  # 4 dof: p ~ 5e-5


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0, -1.0])
    n = 4000
    torch.manual_seed(1)
    hot = sampler(logits.repeat(n, 1), [state(temperature=2.0) for _ in range(n)]).sampled_token_ids
    cold = sampler(logits.repeat(n, 1), [state(temperature=0.3) for _ in range(n)]).sampled_token_ids
    p_hot = torch.softmax(logits / 2.0, -1)[0]
    p_cold = torch.softmax(logits / 0.3, -1)[0]
    assert abs(float((hot == 0).float().mean()) - float(p_hot)) < 0.04
    assert abs(float((cold == 0).float().mean()) - float(p_cold)) < 0.04
