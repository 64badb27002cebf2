"""EngineArgs (vLLM's names) and the config dataclasses the engine is built from.

Nothing here imports torch or loads a model: reading `config.json` (or a GGUF header) happens
in `ModelConfig.resolve()`, which the engine calls once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_BACKENDS = (None, "uni", "mp", "ray")
_RUNNERS = ("auto", "generate", "pooling")
_POLICIES = ("fcfs", "priority")
_QUANTIZATIONS = (None, "gguf", "dequantize")


def parse_cpu_offload_gb(value: Any) -> float | str:
    """cpu_offload_gb as given: GiB of layer weights per GPU (a number >= 0, also as a string)
    or "auto" (choose from the measured free memory)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"cpu_offload_gb must be a number of GiB >= 0 or 'auto', got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"cpu_offload_gb must be a number of GiB >= 0 or 'auto', got {value!r}.")
    if value < 0:
        raise ValueError(f"cpu_offload_gb must be >= 0, got {value!r} (GiB of weights per GPU, or 'auto').")
    return float(value)


def _offload_arg(text: str) -> float | str:
    try:
        return parse_cpu_offload_gb(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _canonical_dtype(dtype: str) -> str:
    return {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32", "bf16": "bfloat16"}.get(
        dtype, dtype
    )


@dataclass
class EngineArgs:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct GGUF
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # TP on GPUs: small all-reduces go through distllm's one-shot NVLink kernel unless set.
    disable_custom_all_reduce: bool = False
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None  # CPU: memory given to the KV cache (default 1 GiB)
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    # Build step N's outputs (detokenize, stop strings) while the device runs step N + 1.
    disable_async_output_proc: bool = False
    # Schedule and launch step N + 1 while step N runs (decodes read step N's tokens on the device).
    async_scheduling: bool = True
    cpu_offload_gb: float | str = 0.0  # GiB per GPU, or "auto"
    enforce_eager: bool = False
    load_format: str = "auto"
    # GGUF files only. None: keep quantized on CUDA ("gguf"), dequantize at load on CPU;
    # "gguf": keep quantized (CPU uses the torch reference); "dequantize": dequantize at load.
    quantization: str | None = None
    trust_remote_code: bool = False
    runner: str = "auto"
    max_logprobs: int = 20
    hf_overrides: dict[str, Any] | None = None
    device: str = "auto"
    disable_log_stats: bool = True
    worker_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.cpu_offload_gb = parse_cpu_offload_gb(self.cpu_offload_gb)  # "8" -> 8.0, "AUTO" -> "auto"
        self.validate()

    def validate(self) -> None:
        """Reject invalid values, naming the parameter and the limit."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(_canonical_dtype(self.dtype) in _DTYPES, f"dtype must be one of {_DTYPES}, got {self.dtype!r}.")
        need(
            isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
            f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size}.",
        )
        need(
            self.distributed_executor_backend in _BACKENDS,
            f"distributed_executor_backend must be one of {_BACKENDS}, got {self.distributed_executor_backend!r}.",
        )
        need(
            0.0 < self.gpu_memory_utilization <= 1.0,
            f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.",
        )
        need(
            self.block_size in (8, 16, 32, 64, 128),
            f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}.",
        )
        need(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        need(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}.",
        )
        need(
            self.max_model_len is None or self.max_model_len >= 1,
            f"max_model_len must be >= 1, got {self.max_model_len}.",
        )
        parse_cpu_offload_gb(self.cpu_offload_gb)  # raises, naming cpu_offload_gb
        need(self.load_format in _LOAD_FORMATS, f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}.")
        need(self.runner in _RUNNERS, f"runner must be one of {_RUNNERS}, got {self.runner!r}.")
        need(
            self.scheduling_policy in _POLICIES,
            f"scheduling_policy must be one of {_POLICIES}, got {self.scheduling_policy!r}.",
        )
        need(self.max_logprobs >= 0, f"max_logprobs must be >= 0, got {self.max_logprobs}.")
        need(
            self.quantization in _QUANTIZATIONS,
            f"quantization must be one of {_QUANTIZATIONS} (None: 'gguf' for GGUF files on CUDA, dequantize at "
            f"load on CPU), got {self.quantization!r}.",
        )
        need(self.device in ("auto", "cpu", "cuda"), f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}.")
        need(
            self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
            f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}.",
        )

    # ---- command line ----------------------------------------------------------------------

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        g = parser.add_argument_group("engine")
        g.add_argument("--model", type=str, default=None, help="HF folder, GGUF file or hub id (default: embedded SmolLM2-135M-Instruct)")
        g.add_argument("--tokenizer", type=str, default=None)
        g.add_argument("--revision", type=str, default=None)
        g.add_argument("--dtype", type=str, default="auto", choices=list(_DTYPES))
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
        g.add_argument("--distributed-executor-backend", type=str, default=None, choices=["uni", "mp", "ray"])
        g.add_argument("--disable-custom-all-reduce", action="store_true",
                       help="tensor parallelism: NCCL for every all-reduce (default: one-shot NVLink kernel for small ones)")
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        g.add_argument("--block-size", type=int, default=16)
        g.add_argument("--num-gpu-blocks-override", type=int, default=None)
        g.add_argument("--max-num-seqs", type=int, default=256)
        g.add_argument("--max-num-batched-tokens", type=int, default=None)
        g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        g.add_argument("--scheduling-policy", type=str, default="fcfs", choices=list(_POLICIES))
        g.add_argument("--disable-async-output-proc", action="store_true",
                       help="build each step's outputs before the next step starts (one step less latency, less overlap)")
        g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                       help="schedule and launch each step before the previous one's tokens are back")
        g.add_argument("--cpu-offload-gb", type=_offload_arg, default=0.0,
                       help="GiB of layer weights per GPU kept in pinned host memory, or 'auto'")
        g.add_argument("--enforce-eager", action="store_true")
        g.add_argument("--load-format", type=str, default="auto", choices=list(_LOAD_FORMATS))
        g.add_argument(
            "--quantization", type=str, default=None, choices=["gguf", "dequantize"],
            help="GGUF files: 'gguf' keeps weights quantized in device memory (Triton dequantize-matmul "
            "kernels; default on CUDA), 'dequantize' converts them to --dtype at load (default on CPU).",
        )
        g.add_argument("--trust-remote-code", action="store_true")
        g.add_argument("--runner", type=str, default="auto", choices=list(_RUNNERS))
        g.add_argument("--max-logprobs", type=int, default=20)
        g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"])
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    # ---- configs -----------------------------------------------------------------------------

    def create_engine_config(self) -> "EngineConfig":
        model_config = ModelConfig.resolve(self)
        max_len = model_config.max_model_len
        if self.enable_chunked_prefill:
            batched = self.max_num_batched_tokens or max(8192, self.max_num_seqs)
        else:
            batched = max_len  # without chunking a whole prompt must fit in one step
        sched = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=batched,
            max_model_len=max_len,
            policy=self.scheduling_policy,
            async_output_processing=not self.disable_async_output_proc,
            async_scheduling=self.async_scheduling,
        )
        cache = CacheConfig(
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching and model_config.runner == "generate",
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            cpu_offload_gb=self.cpu_offload_gb,
        )
        backend = self.distributed_executor_backend or ("uni" if self.tensor_parallel_size == 1 else "ray")
        parallel = ParallelConfig(tensor_parallel_size=self.tensor_parallel_size, distributed_executor_backend=backend,
                                  disable_custom_all_reduce=self.disable_custom_all_reduce)
        return EngineConfig(
            model_config=model_config,
            scheduler_config=sched,
            cache_config=cache,
            parallel_config=parallel,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            device=self.device,
            max_logprobs=self.max_logprobs,
            worker_timeout_s=self.worker_timeout_s,
            disable_log_stats=self.disable_log_stats,
        )


@dataclass
class ModelConfig:
    model: str  # a local folder, a GGUF file, or a hub id
    tokenizer: str
    hf_config: dict[str, Any]  # config.json as a dict (or synthesised from GGUF metadata)
    architecture: str
    dtype: str  # canonical torch dtype name
    max_model_len: int
    load_format: str
    runner: str  # "generate" or "pooling"
    trust_remote_code: bool = False
    quantization: str | None = None  # "gguf": GGUF weights kept quantized; None: dequantized (resolved)
    gguf_file: str | None = None
    revision: str | None = None

    @staticmethod
    def resolve(args: EngineArgs) -> "ModelConfig":
        from distllm.models.source import resolve_model_source

        return resolve_model_source(args)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        hd = self.hf_config.get("head_dim")
        return int(hd) if hd else int(self.hf_config["hidden_size"]) // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "ModelConfig":
        return ModelConfig(**d)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    policy: str = "fcfs"
    async_output_processing: bool = True
    async_scheduling: bool = True


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None
    cpu_offload_gb: float | str = 0.0  # GiB per GPU, or "auto"
    num_blocks: int | None = None  # decided after profiling


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "uni"
    disable_custom_all_reduce: bool = False


@dataclass
class EngineConfig:
    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    cache_config: CacheConfig
    parallel_config: ParallelConfig
    seed: int = 0
    enforce_eager: bool = False
    device: str = "auto"
    max_logprobs: int = 20
    worker_timeout_s: float = 60.0
    disable_log_stats: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain values only, so the config can travel to worker processes as msgpack/JSON."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "EngineConfig":
        return EngineConfig(
            model_config=ModelConfig(**d["model_config"]),
            scheduler_config=SchedulerConfig(**d["scheduler_config"]),
            cache_config=CacheConfig(**d["cache_config"]),
            parallel_config=ParallelConfig(**d["parallel_config"]),
            **{k: v for k, v in d.items() if k not in ("model_config", "scheduler_config", "cache_config", "parallel_config")},
        )


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
AsyncEngineArgs = EngineArgs  # vLLM has a subclass; same fields here
