"""Chat completions with the official openai client against `distllm serve`.

    distllm serve --port 8000 &
    python examples/openai_chat_client.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."},
    ]
    resp = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=args.max_tokens,
                                          temperature=0)
    print("assistant:", resp.choices[0].message.content)
    print("usage:", resp.usage)

    print("streamed: ", end="", flush=True)
    stream = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=args.max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage:
            print(f"\n[usage: {chunk.usage.completion_tokens} completion tokens]")


if __name__ == "__main__":
    main()
