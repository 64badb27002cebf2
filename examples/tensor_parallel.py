"""Tensor-parallel offline generation (vLLM's `LLM(..., tensor_parallel_size=N)`).

    python examples/tensor_parallel.py                                  # embedded SmolLM2, tp=3
    python examples/tensor_parallel.py --model /path/to/hf_folder --tensor-parallel-size 2 \\
        --distributed-executor-backend mp --device cpu

Each rank is a worker process (``mp``) or a Ray actor (``ray``, the default for tp > 1; a local
Ray cluster is started unless RAY_ADDRESS names one). On CPU the ranks talk over gloo, on GPUs
over NCCL. The attention heads and KV heads must split evenly: the embedded SmolLM2-135M has 9
heads and 3 KV heads, so tp=3 works there and tp=2 does not.
"""

import argparse

from distllm import LLM, EngineArgs, SamplingParams

PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "The future of AI is",
]


def default_tp(model: str | None) -> int:
    return 3 if model is None else 2  # SmolLM2-135M: 9 heads / 3 KV heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(tensor_parallel_size=None)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    max_tokens = args.max_tokens
    del args.max_tokens
    if args.tensor_parallel_size is None:
        args.tensor_parallel_size = default_tp(args.model)
    engine_args = EngineArgs.from_cli_args(args)

    llm = LLM(**vars(engine_args))
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    backend = llm.llm_engine.config.parallel_config.distributed_executor_backend
    print(f"\ntp={engine_args.tensor_parallel_size} ({backend})\n" + "-" * 60)
    for out in outputs:
        print(f"Prompt: {out.prompt!r}\nOutput: {out.outputs[0].text!r}\n" + "-" * 60)
    llm.shutdown()


if __name__ == "__main__":  # required: worker processes are spawned, and re-import this file
    main()
