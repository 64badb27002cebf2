"""Worker-side sampler (vLLM V1 semantics), plain torch: runs on CPU and CUDA.

Order of work for one step (as vLLM V1):
  1. raw logprobs: log_softmax of the model's logits, before anything else (only if asked);
  2. allowed_token_ids (others -inf), bad words (-inf), min_tokens (stop ids -inf),
     logit_bias (added), penalties (repetition, frequency, presence);
  3. greedy rows (temperature < 1e-5): argmax of the processed logits;
  4. random rows: divide by temperature, min-p, top-k, top-p (``dispatch.restrict_logits_``:
     a csrc kernel without a sort where it is built, torch otherwise; ops/sampling_ref.py
     states which tokens they keep), then sample by the exponential race
     argmax(probs / q), q ~ Exp(1), taken as argmax(logits - log q).

Every stage is skipped when no row needs it; what rows need is read from the params on the
host, never from device tensors. Small index tensors are built on the host and copied with
``non_blocking=True`` (staged copies, no stream sync); nothing inside ``forward`` calls
``.item()``/``.tolist()``.

Seeds: a seeded row draws its own q row of shape [V] from its own generator, re-seeded every
step from (seed, number of output tokens so far). The token drawn at output position t thus
depends only on the request's own logits, params, seed and t: not on its batch neighbours, its
row, the batch size, nor on whether the worker state was rebuilt after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from distllm.ops.dispatch import argmax, restrict_logits_

_GREEDY_EPS = 1e-5
_MASK64 = (1 << 64) - 1


def _mix_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step), folded into a non-negative 63-bit torch seed."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z & ((1 << 63) - 1)


@dataclass
class SamplingState:
    """Per-request sampling state, kept by the worker across steps."""

    params: dict
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    # Params that always need stage 2 (masks, bias, penalties), decided once per request.
    always_process: bool = False
    # min_tokens with stop ids: stage 2 bans the stop ids until this many tokens are out.
    min_tokens_with_stops: int = 0
    # Cached device copy of the prompt ids (for the repetition penalty).
    _prompt_tensor: torch.Tensor | None = field(default=None, repr=False)

    @staticmethod
    def create(
        params: dict,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> "SamplingState":
        gen = None
        if params.get("seed") is not None:
            gen = torch.Generator(device=torch.device(device))
            gen.manual_seed(_mix_seed(int(params["seed"]), 0))
        p = params
        return SamplingState(
            params=params,
            prompt_token_ids=list(prompt_token_ids),
            output_token_ids=list(output_token_ids or []),
            generator=gen,
            always_process=bool(
                p.get("allowed_token_ids") or p.get("bad_words_token_ids") or p.get("logit_bias") or _needs_penalties(p)
            ),
            min_tokens_with_stops=int(p.get("min_tokens", 0)) if p.get("stop_token_ids") else 0,
        )

    def prompt_tensor(self, device: torch.device) -> torch.Tensor:
        t = self._prompt_tensor
        if t is None or t.device != device:
            t = _to_device(self.prompt_token_ids, torch.long, device)
            self._prompt_tensor = t
        return t


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64, on device
    logprob_token_ids: torch.Tensor | None = None  # [B, K+1]: col 0 = sampled, then top-K
    logprobs: torch.Tensor | None = None  # [B, K+1] float32
    sampled_ranks: torch.Tensor | None = None  # [B] int64, 1 = most likely


def _to_device(data: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cpu":
        return t
    # Pageable host -> device async copy: staged at once, no wait on the stream.
    return t.to(device, non_blocking=True)


def _is_greedy(p: dict) -> bool:
    return p["temperature"] < _GREEDY_EPS


def _needs_penalties(p: dict) -> bool:
    return (
        p.get("repetition_penalty", 1.0) != 1.0
        or p.get("frequency_penalty", 0.0) != 0.0
        or p.get("presence_penalty", 0.0) != 0.0
    )


def _pad(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0)
    return [r + [pad] * (width - len(r)) for r in rows]


def compute_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of the given tokens and the top ``num_top`` of each row.

    Returns ids [N, num_top+1] int64 (col 0 = the given token), logprobs [N, num_top+1]
    float32, ranks [N] int64 (vLLM: number of tokens whose logprob >= the given token's).
    """
    return _gather_logprobs(torch.log_softmax(logits.float(), dim=-1), token_ids, num_top)


def _gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    token_ids = token_ids.to(torch.long).view(-1, 1)
    token_lp = logprobs.gather(1, token_ids)
    ranks = (logprobs >= token_lp).sum(dim=-1)
    if num_top > 0:
        top_lp, top_ids = logprobs.topk(num_top, dim=-1)
        ids = torch.cat([token_ids, top_ids], dim=1)
        lps = torch.cat([token_lp, top_lp], dim=1)
    else:
        ids, lps = token_ids, token_lp
    return ids, lps.float(), ranks.to(torch.long)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, states: list[SamplingState]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(states)
        params = [s.params for s in states]
        max_lp = max((p["logprobs"] for p in params if p.get("logprobs") is not None), default=None)
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if max_lp is not None else None

        greedy = [_is_greedy(p) for p in params]
        if all(greedy) and not self._needs_processing(params, states):
            sampled = argmax(logits)
        else:
            x = self.process_logits(logits, states)
            sampled = self._sample(x, states, greedy)

        out = SamplerOutput(sampled_token_ids=sampled)
        if raw_logprobs is not None:
            out.logprob_token_ids, out.logprobs, out.sampled_ranks = _gather_logprobs(
                raw_logprobs, sampled, int(max_lp)
            )
        return out

    # ---- stage 2: masks, bias, penalties ----------------------------------------------

    @staticmethod
    def _needs_processing(params: list[dict], states: list[SamplingState]) -> bool:
        for s in states:
            if s.always_process or len(s.output_token_ids) < s.min_tokens_with_stops:
                return True
        return False

    def process_logits(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Float32 copy of the logits after allowed/bad/min_tokens masks, bias and penalties."""
        B, V = logits.shape
        device = logits.device
        x = logits.to(torch.float32, copy=True)
        params = [s.params for s in states]
        ninf = float("-inf")

        # allowed_token_ids: everything else -inf.
        allowed_rows = [i for i, p in enumerate(params) if p.get("allowed_token_ids")]
        if allowed_rows:
            rows, cols = [], []
            for i in allowed_rows:
                ids = params[i]["allowed_token_ids"]
                rows += [i] * len(ids)
                cols += list(ids)
            restricted = [False] * B
            for i in allowed_rows:
                restricted[i] = True
            keep = (~_to_device(restricted, torch.bool, device)).view(B, 1).expand(B, V).clone()
            keep.index_put_(
                (_to_device(rows, torch.long, device), _to_device(cols, torch.long, device)),
                torch.ones((), dtype=torch.bool, device=device),
            )
            x.masked_fill_(~keep, ninf)

        # Bad words, min_tokens: (row, token) pairs banned, decided on the host.
        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for i, (p, s) in enumerate(zip(params, states)):
            bad = p.get("bad_words_token_ids")
            if bad:
                out = s.output_token_ids
                for word in bad:
                    if not word:
                        continue
                    prefix_len = len(word) - 1
                    if prefix_len > len(out):
                        continue
                    if prefix_len == 0 or list(out[len(out) - prefix_len :]) == list(word[:prefix_len]):
                        ban_rows.append(i)
                        ban_cols.append(word[-1])
            stops = p.get("stop_token_ids")
            if stops and len(s.output_token_ids) < p.get("min_tokens", 0):
                ban_rows += [i] * len(stops)
                ban_cols += list(stops)
        if ban_rows:
            # index_put_ with a device value: a Python scalar value would be copied with a sync.
            x.index_put_(
                (_to_device(ban_rows, torch.long, device), _to_device(ban_cols, torch.long, device)),
                torch.full((), ninf, dtype=torch.float32, device=device),
            )

        # logit_bias: added.
        b_rows, b_cols, b_vals = [], [], []
        for i, p in enumerate(params):
            for tok, val in p.get("logit_bias") or ():
                b_rows.append(i)
                b_cols.append(int(tok))
                b_vals.append(float(val))
        if b_rows:
            x.index_put_(
                (_to_device(b_rows, torch.long, device), _to_device(b_cols, torch.long, device)),
                _to_device(b_vals, torch.float32, device),
                accumulate=True,
            )

        pen_rows = [i for i, p in enumerate(params) if _needs_penalties(p)]
        if pen_rows:
            self._apply_penalties(x, states, pen_rows)
        return x

    @staticmethod
    def _apply_penalties(x: torch.Tensor, states: list[SamplingState], rows: list[int]) -> None:
        B, V = x.shape
        device = x.device
        n = len(rows)
        full = n == B
        idx = None if full else _to_device(rows, torch.long, device)
        sub = x if full else x.index_select(0, idx)
        ps = [states[i].params for i in rows]

        outs = _pad([list(states[i].output_token_ids) for i in rows], V)
        counts = torch.zeros(n, V + 1, dtype=torch.float32, device=device)
        if outs and outs[0]:
            out_t = _to_device(outs, torch.long, device)
            counts.scatter_add_(1, out_t, torch.ones_like(out_t, dtype=torch.float32))
        counts = counts[:, :V]
        in_output = counts > 0

        reps = [p.get("repetition_penalty", 1.0) for p in ps]
        if any(r != 1.0 for r in reps):
            prompts = [states[i].prompt_tensor(device) for i in rows]
            seen = torch.zeros(n, V + 1, dtype=torch.bool, device=device)
            if any(len(states[i].prompt_token_ids) for i in rows):
                prompt_t = nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=V)
                seen.scatter_(1, prompt_t, True)
            seen = seen[:, :V] | in_output
            rep = _to_device(reps, torch.float32, device).view(n, 1)
            rep = torch.where(seen, rep, torch.ones((), dtype=torch.float32, device=device))
            sub = torch.where(sub > 0, sub / rep, sub * rep)
        freqs = [p.get("frequency_penalty", 0.0) for p in ps]
        if any(f != 0.0 for f in freqs):
            sub = sub - _to_device(freqs, torch.float32, device).view(n, 1) * counts
        pres = [p.get("presence_penalty", 0.0) for p in ps]
        if any(v != 0.0 for v in pres):
            sub = sub - _to_device(pres, torch.float32, device).view(n, 1) * in_output.float()

        if full:
            x.copy_(sub)
        else:
            x.index_copy_(0, idx, sub)

    # ---- stages 3-4: greedy and random sampling ---------------------------------------

    def _sample(self, x: torch.Tensor, states: list[SamplingState], greedy: list[bool]) -> torch.Tensor:
        B, V = x.shape
        device = x.device
        params = [s.params for s in states]
        any_greedy = any(greedy)
        greedy_ids = argmax(x) if any_greedy else None
        if all(greedy):
            return greedy_ids
        rand = [not g for g in greedy]

        temps = [1.0 if g else float(p["temperature"]) for p, g in zip(params, greedy)]
        if any(t != 1.0 for t in temps):
            x.div_(_to_device(temps, torch.float32, device).view(B, 1))

        # min-p, top-k, top-p (vLLM V1's order): one csrc kernel where built, torch otherwise.
        restrict_logits_(
            x,
            [int(p.get("top_k", -1)) if r else -1 for p, r in zip(params, rand)],
            [float(p.get("top_p", 1.0)) if r else 1.0 for p, r in zip(params, rand)],
            [float(p.get("min_p", 0.0)) if r else 0.0 for p, r in zip(params, rand)],
        )

        # The exponential race: with q ~ Exp(1), argmax_i p_i / q_i is token i with probability
        # p_i. Taken in log space, argmax_i (x_i - log q_i) (the Gumbel-max form) draws the same
        # without the softmax, whose one-block-a-row kernel took ~50 us of a batch-1 step on a
        # 128K vocabulary (H200 profile).
        seeded = [i for i, (s, r) in enumerate(zip(states, rand)) if r and s.generator is not None]
        unseeded_random = any(r and s.generator is None for s, r in zip(states, rand))
        if unseeded_random:
            q = torch.empty_like(x).exponential_()
        else:
            q = torch.ones_like(x)
        if seeded:
            draws = []
            for i in seeded:
                s = states[i]
                g = s.generator
                g.manual_seed(_mix_seed(int(s.params["seed"]), len(s.output_token_ids)))
                draws.append(torch.empty(V, dtype=torch.float32, device=device).exponential_(generator=g))
            q.index_copy_(0, _to_device(seeded, torch.long, device), torch.stack(draws))
        q.clamp_min_(torch.finfo(torch.float32).tiny)
        sampled = argmax(x.sub_(q.log_()))
        if any_greedy:
            sampled = torch.where(_to_device(greedy, torch.bool, device), greedy_ids, sampled)
        return sampled
