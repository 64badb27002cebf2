"""Time min-p / top-k / top-p on a batch of logits: csrc's one-kernel select against the torch
path it replaces and against HF transformers' logits warpers, in the same run.

For each batch size and filter setting (Llama-3 vocab, 128,256 float32 logits a row):
  torch:  ops/sampling_ref.py (sort, cumsum, gathers), what sampling ran before csrc;
  csrc:   distllm_C::restrict_logits_ (radix select, no sort) through ops/dispatch.py;
  HF:     transformers' MinPLogitsWarper / TopKLogitsWarper / TopPLogitsWarper, as
          `generate(do_sample=True)` applies them;
  sampler: the whole Sampler.forward (temperature 0.8, the filters, softmax, the draw) with
          csrc off and on.
Each figure is the wall time per call of 50 calls queued back to back (one sync at the end),
so host launch overhead counts where it binds, as in a decode step. The roofline is one read
and one write of the logits at the card's measured copy bandwidth.

    python benchmarks/bench_sampling.py [--batch 1 32 256] [--vocab 128256] [--device cpu]

On a CPU (``--device cpu``) it times csrc's CPU build, for a smoke run only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from roofline import measure_copy_bandwidth  # noqa: E402

from distllm.layers.sampler import Sampler, SamplingState  # noqa: E402
from distllm.ops import csrc_ext  # noqa: E402
from distllm.ops.dispatch import restrict_logits_  # noqa: E402
from distllm.params import SamplingParams  # noqa: E402

SETTINGS = {
    "top_p=0.9": dict(top_p=0.9),
    "top_k=50": dict(top_k=50),
    "top_k=50,top_p=0.9": dict(top_k=50, top_p=0.9),
    "min_p=0.05": dict(min_p=0.05),
    "all three": dict(top_k=50, top_p=0.9, min_p=0.05),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def per_call_ms(fn, prepare, dev: torch.device, reps: int = 50) -> float:
    """Wall ms per call of `fn(arg)` over `reps` queued calls; `prepare()` makes each call's
    input beforehand (not timed)."""
    args = [prepare() for _ in range(reps)]
    fn(prepare())  # warm-up
    _sync(dev)
    t = time.perf_counter()
    for a in args:
        fn(a)
    _sync(dev)
    return (time.perf_counter() - t) * 1e3 / reps


def hf_warpers(sp: dict):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    # generate()'s order: top-k, top-p, min-p (vLLM and distllm apply min-p first).
    if sp.get("top_k"):
        procs.append(TopKLogitsWarper(sp["top_k"]))
    if sp.get("top_p", 1.0) < 1.0:
        procs.append(TopPLogitsWarper(sp["top_p"]))
    if sp.get("min_p"):
        procs.append(MinPLogitsWarper(sp["min_p"]))
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()

    os.environ["DISTLLM_CSRC"] = "1"
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    if csrc_ext.load_now() is None or (dev.type == "cuda" and not csrc_ext.with_cuda()):
        sys.exit(f"csrc's {dev.type} build is needed (a C++ compiler and ninja; nvcc and a CUDA torch for cuda)")
    print(f"csrc build + load: {time.perf_counter() - t0:.1f} s")
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke run: figures say nothing)"
    bw = measure_copy_bandwidth(args.device)
    V = args.vocab
    print(f"card: {card}; copy bandwidth {bw / 1e12:.2f} TB/s; vocab {V}")
    hdr = f"{'batch':>5} {'filters':<20} {'roofline':>9} {'torch':>9} {'csrc':>9} {'HF':>9} {'csrc/torch':>10} {'csrc/HF':>8} {'sampler torch':>14} {'sampler csrc':>13}"
    print(hdr)
    for B in args.batch:
        g = torch.Generator(device=dev).manual_seed(B)
        base = torch.randn(B, V, device=dev, generator=g) * 3
        roof_ms = 2 * B * V * 4 / bw * 1e3
        ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
        for name, sp in SETTINGS.items():
            ks = [int(sp.get("top_k", -1))] * B
            ps = [float(sp.get("top_p", 1.0))] * B
            mps = [float(sp.get("min_p", 0.0))] * B
            prep = base.clone
            os.environ["DISTLLM_CSRC"] = "0"
            t_torch = per_call_ms(lambda x: restrict_logits_(x, ks, ps, mps), prep, dev, args.reps)
            os.environ["DISTLLM_CSRC"] = "1"
            t_csrc = per_call_ms(lambda x: restrict_logits_(x, ks, ps, mps), prep, dev, args.reps)
            warp = hf_warpers(sp)
            t_hf = per_call_ms(lambda x: warp(ids, x), prep, dev, args.reps)

            params = SamplingParams(temperature=0.8, **sp).to_worker_dict()
            sampler = Sampler()

            def sample(x):
                states = [SamplingState.create(params, [0], [], dev) for _ in range(B)]
                return sampler(x, states)

            os.environ["DISTLLM_CSRC"] = "0"
            s_torch = per_call_ms(sample, prep, dev, reps=min(20, args.reps))
            os.environ["DISTLLM_CSRC"] = "1"
            s_csrc = per_call_ms(sample, prep, dev, reps=min(20, args.reps))
            print(
                f"{B:>5} {name:<20} {roof_ms:>8.4f}m {t_torch:>8.3f}m {t_csrc:>8.3f}m {t_hf:>8.3f}m "
                f"{t_torch / t_csrc:>9.2f}x {t_hf / t_csrc:>7.2f}x {s_torch:>13.3f}m {s_csrc:>12.3f}m",
                flush=True,
            )
    print("(m = ms per call; roofline = one read + one write of the logits at the copy bandwidth)")


if __name__ == "__main__":
    main()
