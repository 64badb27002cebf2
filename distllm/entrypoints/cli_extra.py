"""Subcommands beyond generate/chat, each in its own module: bench (and serve, launch as they land)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from distllm.entrypoints import bench_throughput

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bench_throughput.register(bsub)
    # Each further subcommand registers itself here with one line.
    __import__("distllm.entrypoints.serve_cli", fromlist=["register"]).register(sub)
    __import__("distllm.entrypoints.bench_serve", fromlist=["register"]).register(bsub)
    __import__("distllm.entrypoints.launch", fromlist=["register"]).register(sub)
    __import__("distllm.entrypoints.plan_cli", fromlist=["register"]).register(sub)
