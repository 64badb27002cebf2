"""Request parameters with vLLM's names: SamplingParams, BeamSearchParams, PoolingParams.

Validation that needs no model happens in ``__post_init__``; checks that need the vocabulary
size or model limits happen in ``verify_for_model`` (called by the input processor before any
work is scheduled).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from enum import IntEnum
from typing import Any

MAX_LOGPROBS_DEFAULT = 20


class RequestOutputKind(IntEnum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None
    # Filled by the input processor: token ids of the bad words, and the EOS ids of the model.
    _bad_words_token_ids: list[list[int]] | None = field(default=None, repr=False)
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            # JSON clients send string keys.
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k == 0:
            self.top_k = -1
        self.output_kind = RequestOutputKind(self.output_kind)
        self._verify_args()
        self._all_stop_token_ids = set(self.stop_token_ids)

    @staticmethod
    def from_optional(**kwargs: Any) -> "SamplingParams":
        """Build from keyword arguments, skipping those that are None (as the server sends)."""
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})

    def _verify_args(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be at least 1, got {self.n}.")
        if self.best_of is not None and self.best_of < self.n:
            raise bad(f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or not -2.0 <= v <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {v}.")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise bad(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise bad(f"temperature must be non-negative and finite, got {self.temperature}.")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise bad(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise bad(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise bad(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise bad(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        if any(not s for s in self.stop):
            raise bad("stop cannot contain an empty string.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an integer, got {self.seed!r}.")
        if self.logit_bias is not None:
            for tok, b in self.logit_bias.items():
                if not math.isfinite(b):
                    raise bad(f"logit_bias for token {tok} must be finite, got {b}.")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise bad("allowed_token_ids is not allowed to be empty.")

    def verify_for_model(self, vocab_size: int, max_logprobs: int = MAX_LOGPROBS_DEFAULT) -> None:
        """Checks that need the model: token ids inside the vocabulary, logprob limits."""
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v > max_logprobs:
                raise ValueError(f"Requested {name} of {v}, which is greater than max allowed: {max_logprobs}")

        def check_ids(name: str, ids: Any) -> None:
            for t in ids:
                if not 0 <= int(t) < vocab_size:
                    raise ValueError(f"{name} contains out-of-vocab token id {t} (vocabulary size {vocab_size}).")

        if self.logit_bias:
            check_ids("logit_bias", self.logit_bias.keys())
        check_ids("stop_token_ids", self.stop_token_ids)
        if self.allowed_token_ids is not None:
            check_ids("allowed_token_ids", self.allowed_token_ids)

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _GREEDY_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    def update_from_generation_config(self, eos_token_ids: set[int]) -> None:
        """Add the model's EOS ids, so that generation stops on any of them."""
        if not self.ignore_eos:
            self._all_stop_token_ids |= set(eos_token_ids)

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)

    def to_worker_dict(self) -> dict[str, Any]:
        """The fields the worker's sampler needs, as plain msgpack-able values."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "logit_bias": [[k, v] for k, v in (self.logit_bias or {}).items()],
            "allowed_token_ids": self.allowed_token_ids,
            "bad_words_token_ids": self._bad_words_token_ids,
            "min_tokens": self.min_tokens,
            # Tokens masked while fewer than min_tokens have been generated.
            "stop_token_ids": sorted(self._all_stop_token_ids),
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
        }

    def __repr__(self) -> str:
        items = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if not f.name.startswith("_"))
        return f"SamplingParams({items})"


@dataclass
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be non-negative and finite, got {self.temperature}.")


@dataclass
class PoolingParams:
    truncate_prompt_tokens: int | None = None
    dimensions: int | None = None
    normalize: bool | None = None
    use_activation: bool | None = None
    task: str | None = None  # "embed", "classify", "score", "reward", "encode"
    output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY
    # Segment ids of a cross-encoder pair (tokenizer(text_1, text_2)["token_type_ids"]); set by LLM.score.
    token_type_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, got {self.truncate_prompt_tokens}")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")

    def clone(self) -> "PoolingParams":
        return copy.deepcopy(self)

    def to_worker_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["output_kind"] = int(self.output_kind)
        return d
