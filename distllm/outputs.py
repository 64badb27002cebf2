"""Output classes with vLLM's names and fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar



@dataclass
class Logprob:
    """The logprob of one token, its rank in the distribution (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob.
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, outputs={self.outputs}, "
            f"finished={self.finished}, num_cached_tokens={self.num_cached_tokens})"
        )


@dataclass
class BeamSearchSequence:
    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]


# ---- pooling ---------------------------------------------------------------------------

@dataclass
class PoolingOutput:
    data: Any  # torch.Tensor

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PoolingOutput) and bool((self.data == other.data).all())


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @staticmethod
    def from_base(out: PoolingOutput) -> "EmbeddingOutput":
        data = out.data
        if data.ndim != 1:
            raise ValueError("pooled data should be a 1-D embedding vector")
        return EmbeddingOutput(data.tolist())

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @staticmethod
    def from_base(out: PoolingOutput) -> "ClassificationOutput":
        data = out.data
        if data.ndim != 1:
            raise ValueError("pooled data should be a 1-D probability vector")
        return ClassificationOutput(data.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float

    @staticmethod
    def from_base(out: PoolingOutput) -> "ScoringOutput":
        data = out.data
        if data.numel() != 1:
            raise ValueError("pooled data should be a single score")
        return ScoringOutput(float(data.reshape(-1)[0]))


_O = TypeVar("_O")


@dataclass
class PoolingRequestOutput(Generic[_O]):
    request_id: str
    outputs: _O
    prompt_token_ids: list[int]
    finished: bool = True
    num_cached_tokens: int = 0


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @staticmethod
    def from_base(r: PoolingRequestOutput) -> "EmbeddingRequestOutput":
        return EmbeddingRequestOutput(r.request_id, EmbeddingOutput.from_base(r.outputs), r.prompt_token_ids, r.finished)


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @staticmethod
    def from_base(r: PoolingRequestOutput) -> "ClassificationRequestOutput":
        return ClassificationRequestOutput(
            r.request_id, ClassificationOutput.from_base(r.outputs), r.prompt_token_ids, r.finished
        )


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    @staticmethod
    def from_base(r: PoolingRequestOutput) -> "ScoringRequestOutput":
        return ScoringRequestOutput(r.request_id, ScoringOutput.from_base(r.outputs), r.prompt_token_ids, r.finished)


__all__ = [
    "Logprob",
    "CompletionOutput",
    "RequestOutput",
    "RequestMetrics",
    "BeamSearchSequence",
    "BeamSearchOutput",
    "PoolingOutput",
    "PoolingRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
]
