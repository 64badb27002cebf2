"""Offline throughput: distllm vs HF transformers generate on the same random prompts, same run.

    python benchmarks/throughput.py --num-prompts 16 --input-len 128 --output-len 128          # SmolLM2 on CPU
    python benchmarks/throughput.py --model <folder> --dummy --num-prompts 1000 --input-len 1024 --output-len 128

Same as `distllm bench throughput`; prints requests/s, total and output tokens/s, the device,
and the HF baseline.
"""

import argparse
import sys

from distllm.entrypoints.bench_throughput import add_args, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    sys.exit(main(parser.parse_args()))
