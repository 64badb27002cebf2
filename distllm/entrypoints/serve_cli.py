"""`distllm serve [MODEL] --host 127.0.0.1 --port 8000 [--api-key KEY] [engine args]`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from distllm.config import EngineArgs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    p.add_argument("model_tag", nargs="?", default=None,
                   help="model folder, GGUF file or hub id (same as --model; default: embedded SmolLM2)")
    p.add_argument("--host", type=str, default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", type=str, default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (or DISTLLM_API_KEY)")
    p.add_argument("--served-model-name", type=str, nargs="+", default=None,
                   help="the name(s) clients use in 'model' (default: the model path)")
    p.add_argument("--uvicorn-log-level", type=str, default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--disable-log-stats", action="store_true", help="no throughput log line every 5 s")
    p.add_argument("--log-stats-interval", type=float, default=5.0)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_serve)


def _missing_serve_deps() -> list[str]:
    import importlib.util

    return [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]


def cmd_serve(args: argparse.Namespace) -> int:
    missing = _missing_serve_deps()
    if missing:
        raise ValueError(f"`distllm serve` needs {', '.join(missing)}: pip install 'distllm[serve]'")
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    import uvicorn

    from distllm.engine.async_llm_engine import AsyncLLMEngine
    from distllm.entrypoints.server.app import build_app, uvicorn_config
    from distllm.logger import init_logger

    logger = init_logger("distllm.entrypoints.serve")
    engine_args = EngineArgs.from_cli_args(args)
    engine = AsyncLLMEngine.from_engine_args(engine_args, log_stats=not args.disable_log_stats,
                                             log_interval=args.log_stats_interval)
    api_key = args.api_key or os.environ.get("DISTLLM_API_KEY") or None
    names: Any = args.served_model_name or [args.model or engine.model_config.model]
    app = build_app(engine, names, api_key=api_key, model_path=args.model or engine.model_config.model)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("serving on %s without --api-key: anyone who can reach this address can use it", args.host)
    logger.info("Serving %s on http://%s:%d (OpenAI-compatible: /v1/completions, /v1/chat/completions, ...)",
                names[0], args.host, args.port)
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port, args.uvicorn_log_level)).run()
    finally:
        engine.shutdown()
    return 0
