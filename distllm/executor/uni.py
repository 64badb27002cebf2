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

    def submit(self, plan: StepPlan) -> None:
        self._pending = self.worker.launch(plan)

    def collect(self, plan: StepPlan) -> StepResult:
        pending, self._pending = self._pending, None
        return self.worker.finish(pending)

    def shutdown(self) -> None:
        from distllm.distributed.parallel_state import destroy_tensor_parallel

        self.worker = None
        destroy_tensor_parallel()
