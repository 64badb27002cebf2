"""The executor interface: start workers, agree on a KV block count, run one plan per step."""

from __future__ import annotations

from abc import ABC, abstractmethod

from distllm.config import EngineConfig
from distllm.core.plan import StepPlan, StepResult
from distllm.logger import init_logger

logger = init_logger(__name__)


class EngineDeadError(RuntimeError):
    """A worker died or stopped answering; every in-flight request has failed."""


class Executor(ABC):
    def __init__(self, config: EngineConfig):
        self.config = config

    @abstractmethod
    def start(self) -> int:
        """Start the workers, load the model; return the KV block count every rank can hold."""

    @abstractmethod
    def submit(self, plan: StepPlan) -> None:
        """Start the step; the driver may work on other things until collect()."""

    @abstractmethod
    def collect(self, plan: StepPlan) -> StepResult:
        """Wait for the result of the plan last submitted."""

    def execute(self, plan: StepPlan) -> StepResult:
        self.submit(plan)
        return self.collect(plan)

    @abstractmethod
    def shutdown(self) -> None: ...

    def check_health(self) -> None:
        """Raise EngineDeadError when a worker is gone."""


def _ray_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def create_executor(config: EngineConfig) -> Executor:
    pc = config.parallel_config
    backend = pc.distributed_executor_backend
    if backend == "uni":
        if pc.tensor_parallel_size != 1:
            raise ValueError("distributed_executor_backend='uni' runs one worker; use 'mp' or 'ray' for tp > 1.")
        from distllm.executor.uni import UniExecutor

        return UniExecutor(config)
    if backend == "ray" and not _ray_installed():
        logger.warning(
            "distributed_executor_backend='ray' but Ray is not installed (pip install ray); "
            "falling back to 'mp' (worker processes on this host)."
        )
        pc.distributed_executor_backend = backend = "mp"
    if backend == "mp":
        from distllm.executor.mp import MPExecutor

        return MPExecutor(config)
    if backend == "ray":
        from distllm.executor.ray import RayExecutor

        return RayExecutor(config)
    raise ValueError(f"unknown distributed_executor_backend {backend!r}; expected 'uni', 'mp' or 'ray'.")
