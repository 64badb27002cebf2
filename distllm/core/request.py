"""The driver's view of one request, and what the scheduler reports about it after a step."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distllm.core.plan import TokenLogprobs

if TYPE_CHECKING:
    from distllm.params import PoolingParams, SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status >= RequestStatus.FINISHED_STOPPED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> str | None:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "abort",
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: "SamplingParams | None" = None
    pooling_params: "PoolingParams | None" = None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    # Extra keys mixed into every block hash of this request (e.g. a per-request cache salt).
    cache_salt: str | None = None

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    error: str | None = None
    # Tokens whose KV is in the cache (computed this run or found in the prefix cache).
    num_computed_tokens: int = 0
    # Prompt tokens found in the prefix cache at first scheduling; -1 until scheduled.
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    # Owned by the scheduler / block manager.
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    # How many of all_token_ids / block_ids the workers already hold (for plan diffs). Workers
    # append the tokens they sample themselves, so those count as sent once they arrive.
    num_tokens_sent: int = 0
    num_blocks_sent: int = 0
    # Tokens being sampled by steps in flight: scheduled ahead, their ids not known here yet.
    num_output_placeholders: int = 0
    # Step id of the schedule() that last preempted this request (results of older plans are stale).
    last_preempted_step: int = -1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_from(self, start: int) -> list[int]:
        """all_token_ids[start:] without building the whole list (the plan diff of a running request)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n :]
        return self.prompt_token_ids[start:] + self.output_token_ids

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens if self.sampling_params is not None else None

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def overlap_safe(self) -> bool:
        """Can be scheduled while its last token is still being sampled: nothing in its sampling
        depends on the values of earlier output tokens (penalties and bad words do)."""
        sp = self.sampling_params
        if sp is None:
            return False
        return not (
            sp.bad_words
            or sp.repetition_penalty != 1.0
            or sp.frequency_penalty != 0.0
            or sp.presence_penalty != 0.0
        )

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)


@dataclass(slots=True)  # hundreds are made every step
class EngineCoreOutput:
    """What one step produced for one request, as the scheduler hands it to the output processor."""

    req_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: TokenLogprobs | None = None
    new_prompt_logprobs: TokenLogprobs | None = None
    pooled: Any = None  # torch.Tensor for pooling requests (built by the engine from the result)
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
