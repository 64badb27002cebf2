"""Torch path of min-p, top-k and top-p on a batch of float32 logits (in place).

The same selection as the ``distllm_C::restrict_logits_`` kernels (csrc/sampling_select.h):
  m = max(x); min-p keeps exp(x - m) >= min_p;
  top-k keeps x >= the k-th largest x (ties at the k-th value kept, as vLLM);
  top-p keeps x_i when the mass of the kept tokens strictly above x_i is below top_p times
  their total mass, so every token tied with the last one kept is kept too.
Rows are switched off by top_k <= 0 or >= vocab, top_p >= 1, min_p <= 0. The host lists say
which stages any row needs, so a batch that needs none costs nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch


def host_column(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(list(values), dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def restrict_logits_ref_(
    x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> torch.Tensor:
    B, V = x.shape
    dev = x.device
    on_k = [0 < k < V for k in top_k]
    on_p = [p < 1.0 for p in top_p]
    on_mp = [m > 0.0 for m in min_p]
    if not (any(on_k) or any(on_p) or any(on_mp)):
        return x
    ninf = torch.full((), float("-inf"), dtype=x.dtype, device=dev)
    keep = torch.ones_like(x, dtype=torch.bool)

    m = x.amax(dim=-1, keepdim=True) if any(on_p) or any(on_mp) else None
    if any(on_mp):
        # [B, 1]; rows whose logits are all -inf are left alone.
        mp = host_column(min_p, torch.float32, dev).view(B, 1)
        keep &= ((x - m).exp() >= mp) | (m == float("-inf"))

    kth = ninf.expand(B, 1)
    if any(on_k):
        max_k = max(k for k, o in zip(top_k, on_k) if o)
        top_vals = x.topk(max_k, dim=-1).values  # [B, max_k], descending
        idx = host_column([k - 1 if o else 0 for k, o in zip(top_k, on_k)], torch.long, dev).view(B, 1)
        kth = torch.where(host_column(on_k, torch.bool, dev).view(B, 1), top_vals.gather(1, idx), ninf)
        keep &= x >= kth

    if any(on_p):
        # Masses summed in float64: a float32 running sum over a 128K vocab drifts by more than
        # the tail tokens' masses, which would move the cut by a few of them.
        w = torch.where(keep, (x - m).exp(), torch.zeros((), dtype=x.dtype, device=dev)).double()
        sorted_x, order = x.sort(dim=-1, descending=True)
        sorted_w = w.gather(1, order)
        cum = sorted_w.cumsum(dim=-1)
        above = cum - sorted_w  # mass strictly before each position, [B, V]
        target = host_column(top_p, torch.float32, dev).double().view(B, 1) * cum[:, -1:]
        n_keep = (above < target).sum(dim=-1, keepdim=True).clamp_(min=1)  # [B, 1]
        cut = sorted_x.gather(1, n_keep - 1)
        cut = torch.where(host_column(on_p, torch.bool, dev).view(B, 1) & (m > float("-inf")), cut, ninf)
        keep &= x >= cut

    return x.masked_fill_(~keep, float("-inf"))
