"""Completions with the official openai client against `distllm serve`.

    distllm serve --port 8000 &
    python examples/openai_completion_client.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print("model:", model)

    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=args.max_tokens,
                                     temperature=0, logprobs=2)
    print("completion:", repr(comp.choices[0].text), comp.usage)

    print("streamed: ", end="", flush=True)
    for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=args.max_tokens,
                                           temperature=0.8, seed=0, stream=True):
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
