"""``distllm launch``: run ``generate`` / ``chat`` / ``serve`` on a Ray cluster.

    distllm launch --tp 4 --model M [--address auto|ray://host:10001|host:6379] [--nodes N] \\
        generate "prompt" [engine and sampling args]

Joins the cluster at ``--address`` (or ``RAY_ADDRESS``), else starts a local one (loopback
only, Ray's token authentication left on); checks that it has the GPUs (or, on CPU, the CPUs)
asked for and, with ``--nodes``, that many alive nodes; then runs the subcommand with
``--tensor-parallel-size`` and ``--distributed-executor-backend ray``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

_COMMANDS = ("generate", "chat", "serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="run generate/chat/serve with tensor parallelism on a Ray cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, required=True, help="tensor-parallel ranks")
    p.add_argument("--model", type=str, default=None)
    p.add_argument(
        "--address", type=str, default=None,
        help="Ray cluster to join: 'auto' (the one `ray start` made here), host:port or ray://host:10001; "
        "default: RAY_ADDRESS, else start a local cluster",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks may spread over (PACK placement when > 1)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster distllm starts")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=f"one of {', '.join(_COMMANDS)} and its arguments")
    p.set_defaults(func=cmd_launch)


def _option(rest: list[str], name: str) -> str | None:
    for i, a in enumerate(rest):
        if a == name and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def check_cluster(tp: int, nodes: int, device: str) -> dict[str, Any]:
    """Raise ValueError (with what is there) when the cluster can't hold tp ranks on nodes."""
    import ray

    res = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    use_gpu = device == "cuda" or (device == "auto" and res.get("GPU", 0) > 0)
    kind = "GPU" if use_gpu else "CPU"
    have = res.get(kind, 0)
    if have < tp:
        raise ValueError(
            f"--tp {tp} needs {tp} {kind}s but the Ray cluster has {have:g} {kind}s on {len(alive)} node(s)"
            + ("" if use_gpu or device == "cpu" else "; pass --device cpu to run on CPUs")
        )
    if len(alive) < nodes:
        raise ValueError(f"--nodes {nodes} asked for, but the Ray cluster has {len(alive)} alive node(s)")
    if nodes <= 1:
        per_node = max((n.get("Resources", {}).get(kind, 0) for n in alive), default=0)
        if per_node < tp:
            raise ValueError(
                f"--tp {tp} on one node needs {tp} {kind}s on a node; the largest has {per_node:g} (use --nodes)"
            )
    return {"kind": kind, "have": have, "nodes": len(alive)}


def cmd_launch(args: argparse.Namespace) -> int:
    rest = list(args.rest)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest or rest[0] not in _COMMANDS:
        raise ValueError(f"distllm launch needs a command after its options: one of {', '.join(_COMMANDS)}")
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    import ray

    from distllm.executor.ray import ensure_ray

    device = _option(rest, "--device") or "auto"
    local_gpus = None
    if device == "cpu":
        local_gpus = 0
    num_cpus = args.num_cpus or (max(args.tp, os.cpu_count() or 1) if device == "cpu" else None)
    try:
        started = ensure_ray(args.address, num_cpus=num_cpus, num_gpus=local_gpus)
    except (ConnectionError, RuntimeError) as e:
        raise ValueError(f"could not join the Ray cluster at {args.address or os.environ.get('RAY_ADDRESS')!r}: {e}") from None
    try:
        info = check_cluster(args.tp, args.nodes, device)
        os.environ["DISTLLM_RAY_PLACEMENT_STRATEGY"] = "STRICT_PACK" if args.nodes <= 1 else "PACK"
        print(
            f"distllm launch: tp={args.tp} on {info['have']:g} {info['kind']}s, {info['nodes']} node(s)",
            file=sys.stderr,
        )
        from distllm.entrypoints.cli import build_parser

        argv = [rest[0], *rest[1:], "--tensor-parallel-size", str(args.tp), "--distributed-executor-backend", "ray"]
        if args.model is not None:
            argv += ["--model", args.model]
        sub_args = build_parser().parse_args(argv)
        return int(sub_args.func(sub_args) or 0)
    finally:
        os.environ.pop("DISTLLM_RAY_PLACEMENT_STRATEGY", None)
        if started and ray.is_initialized():
            ray.shutdown()
