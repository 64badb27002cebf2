"""Opt-in torch.profiler window over a range of steps, for finding where a step's time goes.

    DISTLLM_TORCH_PROFILE_DIR=/tmp/prof DISTLLM_TORCH_PROFILE_STEPS=200:220 python ...

Every rank profiles launched steps [a, b) (counted from this rank's first step, warm-up
included) and writes rank{R}.txt (CPU and CUDA time per op and kernel, CUDA-graph kernels
included) and, with DISTLLM_TORCH_PROFILE_TRACE=1, a Chrome trace beside it. Off by default:
the engine pays one integer compare per step.
"""

from __future__ import annotations

import os

from distllm.logger import init_logger

logger = init_logger(__name__)

ENV_DIR = "DISTLLM_TORCH_PROFILE_DIR"
ENV_STEPS = "DISTLLM_TORCH_PROFILE_STEPS"
ENV_TRACE = "DISTLLM_TORCH_PROFILE_TRACE"


def parse_window(spec: str) -> tuple[int, int]:
    """'a:b' -> (a, b) with 0 <= a < b; a clear error naming the variable otherwise."""
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"{ENV_STEPS} must look like 'first:end' (e.g. 200:220), got {spec!r}") from None
    if not 0 <= a < b:
        raise ValueError(f"{ENV_STEPS}={spec!r}: need 0 <= first < end")
    return a, b


class StepProfiler:
    """Counts launched steps; runs torch.profiler over the configured window, then writes."""

    def __init__(self, rank: int, env=os.environ):
        self.rank = rank
        self.dir = env.get(ENV_DIR) or None
        self.window = parse_window(env.get(ENV_STEPS, "100:120")) if self.dir else (-1, -1)
        self.trace = env.get(ENV_TRACE, "") not in ("", "0")
        self.step = 0
        self._prof = None

    def on_launch(self) -> None:
        """Call before launching each step."""
        if self.dir is None:
            return
        a, b = self.window
        if self.step == a:
            self._start()
        elif self.step == b and self._prof is not None:
            self._stop()
        self.step += 1

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts)
        self._prof.__enter__()

    def _stop(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        a, b = self.window
        path = os.path.join(self.dir, f"rank{self.rank}.txt")
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        with open(path, "w") as f:
            f.write(f"steps {a}..{b - 1} ({b - a} steps), rank {self.rank}\n")
            f.write(prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90))
        if self.trace:
            prof.export_chrome_trace(os.path.join(self.dir, f"rank{self.rank}.json"))
        logger.info("step profile of steps %d..%d written to %s", a, b - 1, path)
