"""The `distllm` command: generate, chat, serve, bench, launch."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from distllm.config import EngineArgs


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None, help="default: the model's generation config")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None)


def sampling_params_from_args(llm: Any, args: argparse.Namespace):
    from dataclasses import fields

    from distllm.params import SamplingParams

    defaults = llm.get_default_sampling_params()
    kw = {f.name: getattr(defaults, f.name) for f in fields(SamplingParams) if not f.name.startswith("_")}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "stop", "logprobs"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    kw.update(max_tokens=args.max_tokens, n=args.n, ignore_eos=args.ignore_eos, seed=args.sampling_seed)
    return SamplingParams(**kw)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    ea = EngineArgs.from_cli_args(args)
    return {k: v for k, v in vars(ea).items() if k != "model"}


def cmd_generate(args: argparse.Namespace) -> int:
    from distllm import LLM

    llm = LLM(model=args.model, **_engine_kwargs(args))
    sp = sampling_params_from_args(llm, args)
    for out in llm.generate(args.prompt, sp, use_tqdm=False):
        for o in out.outputs:
            print(o.text if len(out.outputs) == 1 else f"[{o.index}] {o.text}", flush=True)
    llm.shutdown()
    return 0


def chat_loop(llm: Any, sp: Any, stdin: Any, stdout: Any, system: str | None = None, interactive: bool = False) -> list[dict[str, str]]:
    """Read user turns line by line; every turn is answered with the whole history in context."""
    history: list[dict[str, str]] = []
    if system:
        history.append({"role": "system", "content": system})
    while True:
        if interactive:
            print("> ", end="", flush=True, file=stdout)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = llm.chat(history, sp, use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True, file=stdout)
    return history


def cmd_chat(args: argparse.Namespace) -> int:
    from distllm import LLM

    llm = LLM(model=args.model, **_engine_kwargs(args))
    sp = sampling_params_from_args(llm, args)
    chat_loop(llm, sp, sys.stdin, sys.stdout, args.system, interactive=sys.stdin.isatty())
    llm.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distllm", description="distllm: LLM inference with vLLM's API")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt", type=str)
    EngineArgs.add_cli_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat (keeps the history; /exit to quit)")
    c.add_argument("--system", type=str, default=None, help="a system prompt")
    EngineArgs.add_cli_args(c)
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    from distllm.entrypoints import cli_extra

    cli_extra.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"distllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
