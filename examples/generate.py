"""Generation with engine and sampling arguments from the command line
(mirrors vLLM's examples/offline_inference/basic/generate.py).

    python examples/generate.py --max-tokens 32 --temperature 0.7 --max-model-len 2048
"""

import argparse

from distllm import LLM, EngineArgs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    return parser.parse_args()


def main(args: argparse.Namespace) -> None:
    sampling = {k: getattr(args, k) for k in ("max_tokens", "temperature", "top_p", "top_k")}
    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**vars(engine_args))

    sampling_params = llm.get_default_sampling_params()
    for k, v in sampling.items():
        if v is not None:
            setattr(sampling_params, k, -1 if (k == "top_k" and v == 0) else v)

    prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
    for output in llm.generate(prompts, sampling_params):
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")


if __name__ == "__main__":
    main(parse_args())
