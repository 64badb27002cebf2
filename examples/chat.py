"""Chat with the model's chat template (mirrors vLLM's examples/offline_inference/basic/chat.py)."""

import argparse

from distllm import LLM, EngineArgs, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    max_tokens = args.max_tokens
    del args.max_tokens
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    sampling_params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
    print(f"Generated text: {outputs[0].outputs[0].text!r}")

    # A batch of conversations in one call.
    conversations = [conversation, [{"role": "user", "content": "What is 2 + 2?"}]]
    for out in llm.chat(conversations, sampling_params, use_tqdm=False):
        print(f"Generated text: {out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
