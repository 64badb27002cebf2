"""Copying checkpoint tensors into a model: each parameter's own weight_loader does the slicing."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from distllm.layers.linear import default_weight_loader


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, Any]],
    stacked_params: list[tuple[str, str, Any]] = (),
    skip_suffixes: tuple[str, ...] = (),
    name_map: Any = None,
) -> set[str]:
    """Load (checkpoint name, tensor or safetensors slice) pairs; every parameter must be filled.

    `stacked_params` folds separate checkpoint tensors into one of ours: (our name part, their
    name part, shard id). `name_map` optionally renames checkpoint names first (None = drop).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name, w in weights:
        if name_map is not None:
            name = name_map(name)
            if name is None:
                continue
        if name.endswith(skip_suffixes):
            continue
        for ours, theirs, shard in stacked_params:
            if f".{theirs}." in name:
                target = name.replace(f".{theirs}.", f".{ours}.")
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no matching parameter {target!r}")
                p = params[target]
                _call_loader(name, p.weight_loader, p, w, shard)
                loaded.add(f"{target}:{shard}")
                loaded.add(target)
                break
        else:
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to {type(model).__name__}")
            p = params[name]
            _call_loader(name, getattr(p, "weight_loader", default_weight_loader), p, w)
            loaded.add(name)
    tied = {n for n, p in params.items() if n.endswith(skip_suffixes)}
    missing = sorted(n for n in params if n not in loaded and n not in tied)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"the checkpoint lacks {len(missing)} weights of {type(model).__name__}: {shown}")
    return loaded


def _call_loader(name: str, loader: Any, *args: Any) -> None:
    """Run a weight loader; its ValueError (shape, sharding) gets the checkpoint tensor's name."""
    try:
        loader(*args)
    except ValueError as e:
        raise ValueError(f"loading {name!r}: {e}") from None
