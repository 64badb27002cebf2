"""The executor interface: start workers, agree on a KV block count, run one plan per step."""

from __future__ import annotations

from abc import ABC, abstractmethod

from distllm.config import EngineConfig
from distllm.core.plan import StepPlan, StepResult


class EngineDeadError(RuntimeError):
    """A worker died or stopped answering; every in-flight request has failed."""


class Executor(ABC):
    def __init__(self, config: EngineConfig):
        self.config = config

    @abstractmethod
    def start(self) -> int:
        """Start the workers, load the model; return the KV block count every rank can hold."""

    @abstractmethod
    def execute(self, plan: StepPlan) -> StepResult: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    def check_health(self) -> None:
        """Raise EngineDeadError when a worker is gone."""


def create_executor(config: EngineConfig) -> Executor:
    backend = config.parallel_config.distributed_executor_backend
    if backend == "uni":
        if config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("distributed_executor_backend='uni' runs one worker; use 'mp' or 'ray' for tp > 1.")
        from distllm.executor.uni import UniExecutor

        return UniExecutor(config)
    raise NotImplementedError(
        f"distributed_executor_backend={backend!r} is not implemented yet; tensor_parallel_size > 1 needs it."
    )
