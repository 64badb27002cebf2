"""One worker per device: sets the device, joins the TP group, loads its shard, runs plans."""

from __future__ import annotations

import time

import torch

from distllm.config import EngineConfig
from distllm.core.plan import StepPlan, StepResult
from distllm.distributed.custom_all_reduce import enable_for_tp as enable_custom_all_reduce
from distllm.distributed.parallel_state import init_tensor_parallel
from distllm.logger import init_logger
from distllm.models.source import resolve_device
from distllm.ops import csrc_ext
from distllm.worker.model_runner import ModelRunner
from distllm.worker.step_profiler import StepProfiler

logger = init_logger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, local_rank: int = 0, dist_init_method: str | None = None):
        self.config = config
        self.rank = rank
        self.local_rank = local_rank
        self.dist_init_method = dist_init_method
        self.runner: ModelRunner | None = None
        self.profiler = StepProfiler(rank)

    def init_device(self) -> None:
        kind = resolve_device(self.config.device)
        if kind == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        tp = self.config.parallel_config.tensor_parallel_size
        backend = "nccl" if kind == "cuda" else "gloo"
        init_tensor_parallel(self.rank, tp, self.dist_init_method or "", backend)
        if kind == "cuda" and tp > 1:
            enable_custom_all_reduce(self.device, self.config.parallel_config.disable_custom_all_reduce)  # logs why if off
        torch.manual_seed(self.config.seed)
        self.runner = ModelRunner(self.config, self.device)
        if kind == "cuda":
            csrc_ext.start_build()  # compiles beside the start-up; ModelRunner.init_kv_cache loads it

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.runner.execute(plan)

    def launch(self, plan: StepPlan):
        self.profiler.on_launch()
        return self.runner.launch(plan)

    def finish(self, pending) -> StepResult:
        return self.runner.finish(pending)

    def start(self) -> int:
        """All start-up phases; returns this rank's KV block count."""
        t0 = time.perf_counter()
        self.init_device()
        self.load_model()
        n = self.determine_num_blocks()
        logger.debug("worker %d ready for profiling in %.2f s", self.rank, time.perf_counter() - t0)
        return n
