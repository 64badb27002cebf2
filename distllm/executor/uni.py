"""One worker inside the driver process (tp = 1)."""

from __future__ import annotations

from distllm.core.plan import StepPlan, StepResult
from distllm.executor.base import Executor
from distllm.worker.worker import Worker


class UniExecutor(Executor):
    def start(self) -> int:
        self.worker = Worker(self.config)
        n = self.worker.start()
        self.worker.init_kv_cache(n)
        return n

    def execute(self, plan: StepPlan) -> StepResult:
        return self.worker.execute(plan)

    def shutdown(self) -> None:
        from distllm.distributed.parallel_state import destroy_tensor_parallel

        self.worker = None
        destroy_tensor_parallel()
