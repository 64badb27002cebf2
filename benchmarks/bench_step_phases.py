"""Where a decode step's time goes on the host, with async scheduling on and off.

    python benchmarks/bench_step_phases.py --model-shape qwen3-0.6b --batch 256 --tokens 64
    python benchmarks/bench_step_phases.py --model-shape smollm2-135m --batch 1 --tokens 256
    python benchmarks/bench_step_phases.py --model-shape micro --dtype float32 --repeat 3   # CPU

The ``micro`` shape (one layer of width 64, vocabulary 1024) makes the model's own work small,
so on a CPU the phases other than ``forward`` are the driver's and the worker's Python: the
host cost a GPU step pays per request, measured without a GPU.

Each mode runs in a fresh process (two engines in one process skew the second). Prints ms per
step for the whole step and for each phase: schedule, submit (launch: apply the plan, build the
inputs, replay the graph, sample), forward (the model's forward, inside submit; eager steps only:
a replayed graph does not call it), process (detokenize, build outputs), collect (wait for the
step), update (scheduler bookkeeping). With async scheduling, `collect` shrinks to what the
host could not hide behind the device.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_one(shape: str, batch: int, tokens: int, async_scheduling: bool, dtype: str) -> str:
    import bench_tp_decode as b

    from distllm import LLM, SamplingParams

    folder, _ = b.make_model_dir(shape)
    llm = LLM(model=folder, load_format="dummy", dtype=dtype, max_model_len=2048, max_num_seqs=max(batch, 1),
              num_gpu_blocks_override=4096, async_scheduling=async_scheduling)
    eng = llm.llm_engine
    acc: dict[str, float] = collections.defaultdict(float)

    def wrap(obj, name: str, key: str) -> None:
        f = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            r = f(*a, **k)
            acc[key] += time.perf_counter() - t
            return r

        setattr(obj, name, timed)

    wrap(eng.scheduler, "schedule", "schedule")
    wrap(eng.scheduler, "update_from_output", "update")
    wrap(eng.executor, "submit", "submit")
    wrap(eng.executor, "collect", "collect")
    wrap(eng, "_process", "process")
    worker = getattr(eng.executor, "worker", None)  # the in-process executor's worker
    if worker is not None:
        wrap(worker.runner.model, "forward", "forward")
    prompts = [{"prompt_token_ids": [1] + list(range(100 + i, 131 + i))} for i in range(batch)]
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    # Warm-up, twice: the timed run's prompts hit the prefix cache, and the prefill of a cached
    # prefix is a kernel variant of its own; with a cold Triton cache its compile landed in the
    # timed run once (11-13 ms a step instead of ~3.1 for the first process on a fresh H200).
    for _ in range(2):
        llm.generate(prompts, sp, use_tqdm=False)
    acc.clear()
    t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    llm.shutdown()
    phases = ", ".join(f"{k} {v / tokens * 1e3:.2f}" for k, v in acc.items())
    return (f"async_scheduling={async_scheduling}: {dt / tokens * 1e3:.3f} ms/step, {batch * tokens / dt:.1f} tok/s "
            f"(ms/step: {phases})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-shape", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", help="float32 for CPU runs")
    ap.add_argument("--repeat", type=int, default=1, help="processes per mode (run-to-run spread)")
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process's mode
    args = ap.parse_args()
    if args.one:
        print(run_one(args.model_shape, args.batch, args.tokens, args.one == "on", args.dtype), flush=True)
        return
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"card: {card}; {args.model_shape} dummy {args.dtype}, batch {args.batch}, {args.tokens} decode steps")
    for mode in [m for m in ("on", "off") for _ in range(args.repeat)]:
        out = subprocess.run([sys.executable, __file__, "--model-shape", args.model_shape, "--batch", str(args.batch),
                              "--tokens", str(args.tokens), "--dtype", args.dtype, "--one", mode],
                             capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("async_scheduling=")]
        print(lines[-1] if lines else f"async_scheduling={mode}: failed\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
