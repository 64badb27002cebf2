"""Reward scores with a reward model (mirrors vLLM's examples/offline_inference/basic/reward.py).

A reward model here is a `*ForSequenceClassification` head; as in vLLM, `reward()` returns the
head's raw outputs for every token (`.outputs.data`, shape [num_tokens, num_labels]); the last row is
the sequence's reward for outcome reward models.

Pass a real reward model with --model. Without it, this script builds a TINY RANDOM
Qwen3ForSequenceClassification (1 label) in a temporary folder, so that it runs on CPU in CI: its
rewards are meaningless.

    python examples/reward.py [--model FOLDER] [--device cpu]
"""

import argparse
import os
import sys
import tempfile

from distllm import LLM, EngineArgs

# The tiny random stand-in model is the classifier example's, with one label.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classify import build_tiny_random_classifier  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(runner="pooling")
    return parser.parse_args()


def main(args: argparse.Namespace) -> None:
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            print("No --model: using a tiny RANDOM Qwen3ForSequenceClassification (rewards are meaningless).")
            args.model = build_tiny_random_classifier(tmp, num_labels=1)
        llm = LLM(**vars(EngineArgs.from_cli_args(args)))
        outputs = llm.reward(prompts)
        print("\nGenerated Outputs:\n" + "-" * 60)
        for prompt, output in zip(prompts, outputs):
            rewards = output.outputs.data
            rewards_trimmed = (str(rewards[:16])[:-1] + ", ...]") if len(rewards) > 16 else rewards
            print(f"Prompt: {prompt!r} \nReward: {rewards_trimmed} (size={len(rewards)})")
            print("-" * 60)
        llm.shutdown()


if __name__ == "__main__":
    main(parse_args())
