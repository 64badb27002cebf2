"""Tensor-parallel generation as a Ray job, using the cluster's workers.

On a running Ray cluster (``ray start --head`` here, or see launch/ray-cluster.yaml):

    ray job submit --working-dir . -- python examples/ray_job.py --tensor-parallel-size 2

``ray job submit`` runs this script as the job's driver with RAY_ADDRESS set, so distllm joins
that cluster (it never starts its own here); ``--working-dir .`` ships this checkout, so the
workers import the same distllm. The driver needs no GPU: the ranks are Ray actors placed with
a placement group (one bundle per GPU, STRICT_PACK). Without a cluster the script still runs:
distllm starts a local one. On CPU pass ``--device cpu`` and a model whose heads split by tp
(the embedded SmolLM2-135M has 9 heads / 3 KV heads: tp=3).
"""

import argparse

from distllm import LLM, EngineArgs, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(tensor_parallel_size=None, distributed_executor_backend="ray")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    prompts = args.prompt or ["Hello, my name is", "Ray places the workers and"]
    max_tokens = args.max_tokens
    del args.prompt, args.max_tokens
    if args.tensor_parallel_size is None:
        args.tensor_parallel_size = 3 if args.model is None else 2

    import ray

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    print(f"Ray cluster: {ray.cluster_resources()}")
    for out in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens)):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    llm.shutdown()


if __name__ == "__main__":
    main()
