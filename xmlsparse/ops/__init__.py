"""Ops with Triton kernels and a plain torch reference each: ``fixed_fanin`` (the sparse output
layer), ``sparse_target_loss`` (the fused loss) and ``adam`` (the bf16-moment Adam step).

``impl`` chooses between them: ``auto`` takes Triton on CUDA when it is installed, else the
reference; ``triton`` and ``reference`` force one.
"""

from __future__ import annotations

import importlib.util

import torch

IMPLS = ("auto", "triton", "reference")


def triton_available() -> bool:
    """True when the Triton package can be imported (it ships for Linux only)."""
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``auto`` to the implementation used on ``device``; validate explicit choices."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    return impl
