"""The `distllm` logger: one handler on the package logger, level from DISTLLM_LOGGING_LEVEL."""

from __future__ import annotations

import logging
import os
import sys

_configured = False


def init_logger(name: str) -> logging.Logger:
    global _configured
    if not _configured:
        root = logging.getLogger("distllm")
        if not root.handlers:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
            root.addHandler(h)
        root.setLevel(os.environ.get("DISTLLM_LOGGING_LEVEL", "INFO").upper())
        root.propagate = False
        _configured = True
    return logging.getLogger(name)
