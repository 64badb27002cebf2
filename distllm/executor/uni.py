"""One worker inside the driver process (tp = 1)."""

from __future__ import annotations

from distllm.core.plan import StepPlan, StepResult
from distllm.executor.base import Executor
from distllm.worker.worker import Worker


class UniExecutor(Executor):
    def start(self) -> int:
        self._pending = {}  # step id -> launched step, in launch order
        self.worker = Worker(self.config)
        n = self.worker.start()
        self.worker.init_kv_cache(n)
        return n

    def submit(self, plan: StepPlan) -> None:
        self._pending[plan.step_id] = self.worker.launch(plan)

    def collect(self, plan: StepPlan) -> StepResult:
        return self.worker.finish(self._pending.pop(plan.step_id))

    def shutdown(self) -> None:
        from distllm.distributed.parallel_state import destroy_tensor_parallel

        self.worker = None
        destroy_tensor_parallel()
