"""Decode step time with CPU offload (Llama-3.1-8B shape, dummy bf16 weights), against the
issue's bounds:

    batch 256:  step(offload) <= 1.2 x max(step(no offload), offloaded bytes / H2D bandwidth)
    batch 1:    step(offload) <= 1.2 x (step(no offload) + offloaded bytes / H2D bandwidth)

    python benchmarks/bench_offload.py [--offload-gb 8] [--model-shape llama3-8b] [--steps 16] \\
        [--slots 2] [--no-prefetch-next]

Step time = (t(N + 1 tokens) - t(1 token)) / N for one batch of equal prompts: the prefill and
the first token cancel. H2D bandwidth is measured here (pinned 1 GiB, best of 5) before the
engines start; the engine's own measurement is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_tp_decode import SHAPES, make_model_dir  # noqa: E402

PROMPT_LEN = 16


def step_times(folder: str, offload_gb: float, batches: list[int], steps: int) -> tuple[dict[int, float], int, float | None]:
    """Decode step seconds per batch size; offloaded bytes and the engine's H2D bytes/s."""
    import torch

    from distllm import LLM, SamplingParams

    llm = LLM(model=folder, load_format="dummy", dtype="bfloat16", max_model_len=256, max_num_seqs=max(batches),
              max_num_batched_tokens=max(8192, max(batches) * PROMPT_LEN), enable_prefix_caching=False,
              cpu_offload_gb=offload_gb)
    try:
        runner = llm.llm_engine.executor.worker.runner
        off = runner.offload
        offloaded = off.plan.offloaded_bytes if off is not None and off.plan is not None else 0
        engine_bw = off.h2d_bytes_per_s if off is not None else None

        def timed(batch: int, n: int) -> float:
            prompts = [{"prompt_token_ids": [1] + [100 + (b * 31 + i) % 30000 for i in range(PROMPT_LEN - 1)]}
                       for b in range(batch)]
            sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            return time.perf_counter() - t

        out = {}
        for b in batches:
            timed(b, 3)  # warm-up: kernels, allocator
            t1 = min(timed(b, 1) for _ in range(2))
            tn = min(timed(b, steps + 1) for _ in range(2))
            out[b] = (tn - t1) / steps
        return out, offloaded, engine_bw
    finally:
        llm.shutdown()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--offload-gb", type=float, default=8.0)
    ap.add_argument("--model-shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per measurement")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--slots", type=int, default=2, help="GPU staging slots (DISTLLM_OFFLOAD_SLOTS)")
    ap.add_argument("--no-prefetch-next", action="store_true",
                    help="do not copy the next step's first layers at the end of a step (DISTLLM_OFFLOAD_PREFETCH_NEXT=0)")
    args = ap.parse_args()
    os.environ["DISTLLM_OFFLOAD_SLOTS"] = str(args.slots)
    os.environ["DISTLLM_OFFLOAD_PREFETCH_NEXT"] = "0" if args.no_prefetch_next else "1"

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_offload needs a CUDA GPU")
    from distllm.worker.offload import measure_h2d_bandwidth

    props = torch.cuda.get_device_properties(0)
    print(f"card: {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB)", flush=True)
    src = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    bw = measure_h2d_bandwidth(torch.device("cuda", 0), src, reps=5)
    del src
    print(f"pinned H2D bandwidth: {bw / 1e9:.1f} GB/s (1 GiB, best of 5)", flush=True)

    folder, _ = make_model_dir(args.model_shape)
    batches = [int(x) for x in args.batches.split(",")]
    base, _, _ = step_times(folder, 0.0, batches, args.steps)
    print("no offload:", {b: f"{t * 1e3:.2f} ms" for b, t in base.items()}, flush=True)
    offl, nbytes, engine_bw = step_times(folder, args.offload_gb, batches, args.steps)
    transfer = nbytes / bw
    print(f"offload {args.offload_gb:g} GiB ({args.slots} slots, prefetch across steps "
          f"{'off' if args.no_prefetch_next else 'on'}): {nbytes / 1e9:.2f} GB offloaded, transfer floor {transfer * 1e3:.1f} ms/step"
          + (f", engine measured {engine_bw / 1e9:.1f} GB/s" if engine_bw else ""), flush=True)

    print(f"\n{'batch':>5} | {'no offload ms':>13} | {'offload ms':>10} | {'bound ms':>8} | {'ratio':>5} | result")
    print("-" * 66)
    ok_all = True
    for b in batches:
        # The two bounds: large batches hide compute under the transfer, batch 1 adds them.
        bound = 1.2 * (max(base[b], transfer) if b > 1 else base[b] + transfer)
        ok = offl[b] <= bound
        ok_all &= ok
        print(f"{b:>5} | {base[b] * 1e3:>13.2f} | {offl[b] * 1e3:>10.2f} | {bound * 1e3:>8.1f} | "
              f"{offl[b] / bound * 1.2:>5.2f} | {'pass' if ok else 'MISS'}")
    print("\nratio = offload step / (bound / 1.2): 1.00 is the ideal, <= 1.20 passes")
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
